"""Command line: ``riskfast <command>`` (also ``python -m riskfast``)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def _train(args: argparse.Namespace) -> int:
    from .demo.train import run_training

    run_training(args)
    return 0


def _study(args: argparse.Namespace) -> int:
    from .demo.study import run_study

    run_study(args)
    return 0


def _rlr_demo(args: argparse.Namespace) -> int:
    from .demo.rlr_demo import run_rlr_demo

    run_rlr_demo(args)
    return 0


def _explain(args: argparse.Namespace) -> int:
    from .demo import run_synthetic_demo

    run_synthetic_demo(
        num_questions=args.questions,
        group_size=args.group_size,
        bundle_size=args.bundle_size,
        alpha=args.alpha,
        beta=args.beta,
        omega=args.omega,
        seed=args.seed,
        as_json=args.json,
    )
    return 0


def _info(args: argparse.Namespace) -> int:
    from . import __version__, build_info

    print(json.dumps({"riskfast": __version__, **build_info()}, indent=2, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="riskfast", description="Risk-based and likelihood-ratio objectives for post-training."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="the demos: GRPO vs RiskPO (default), or 'demo rlr': RLR vs DDPO, AlignProp "
        "and DRaFT",
        description="Two demos, each trained for real from the same start and seeds, writing "
        "metrics.jsonl, summary.json and report.png. 'riskfast demo [options]': warm-start a "
        "tiny causal LM on reversed-digit addition, then train it by RL with GRPO and with "
        "RiskPO (through TRL; needs the [demo] extra); the options below are its own. "
        "'riskfast demo rlr [options]': steer a tiny digit diffusion model (pretrained on "
        "scikit-learn's digits) to a target digit with RLR, DDPO, AlignProp and DRaFT at an "
        "equal budget of model evaluations (needs the [diffusion] extra); 'riskfast demo rlr "
        "--help' lists its options.",
    )
    from .demo.train import add_train_arguments

    add_train_arguments(demo)
    demo.set_defaults(run=_train)
    demos = demo.add_subparsers(dest="demo", metavar="{rlr}", title="other demo")
    rlr = demos.add_parser(
        "rlr",
        help="RLR vs DDPO, AlignProp and DRaFT on a digit diffusion model (riskfast demo rlr "
        "--help)",
        description="Pretrain (or load from the cache) a tiny class-conditional UNet2DModel "
        "and a classifier on scikit-learn's 8x8 digits, then train LoRA adapters with RLR, "
        "DDPO, AlignProp and DRaFT from the same start, seeds and budget of denoiser "
        "evaluations so that unconditional samples become a target digit (reward: the "
        "classifier's log-probability of it); writes metrics.jsonl, summary.json and "
        "report.png. Needs the [diffusion] extra.",
    )
    from .demo.rlr_demo import add_rlr_demo_arguments

    add_rlr_demo_arguments(rlr)
    rlr.set_defaults(run=_rlr_demo)
    study = commands.add_parser(
        "study",
        help="GRPO vs RiskPO presets over seeds: one warm start per seed, each arm's learning "
        "rate tuned on a validation split, mean and 95%% interval on a test split",
        description="Run (or resume) a multi-seed comparison of GRPO and RiskPO presets on the "
        "demo's task: one shared warm start per seed, the same budget of sampled completions "
        "for every arm, each arm's learning rate picked on its own grid by a validation split, "
        "the report (table.md, curves.csv, summary.json, report.png) on a separate test split. "
        "Run again with the same --out to resume an interrupted study.",
    )
    from .demo.study import add_study_arguments

    add_study_arguments(study)
    study.set_defaults(run=_study)
    _add_explain(commands)
    info = commands.add_parser("info", help="versions and how the extension was built")
    info.set_defaults(run=_info)
    return parser


def _add_explain(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser(
        "explain", help="GRPO vs RiskPO advantages and loss on a synthetic rollout batch"
    )
    demo.add_argument("--questions", type=int, default=8, help="questions in the batch (default 8)")
    demo.add_argument(
        "--group-size", type=int, default=8, help="responses per question, G (default 8)"
    )
    demo.add_argument(
        "--bundle-size", type=int, default=4, help="questions per bundle, B (default 4)"
    )
    demo.add_argument("--alpha", type=float, default=0.2, help="lower quantile level (default 0.2)")
    demo.add_argument("--beta", type=float, default=0.8, help="upper quantile level (default 0.8)")
    demo.add_argument("--omega", type=float, default=0.5, help="lower-tail weight (default 0.5)")
    demo.add_argument(
        "--seed", type=int, default=0, help="seed of rewards and bundling (default 0)"
    )
    demo.add_argument("--json", action="store_true", help="print the numbers as JSON")
    demo.set_defaults(run=_explain)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except (ValueError, TypeError, ImportError) as err:
        print(f"riskfast {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
