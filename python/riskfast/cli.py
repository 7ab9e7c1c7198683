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
        help="train GRPO and RiskPO on a built-in verifiable task and compare them",
        description="Warm-start a tiny causal LM on reversed-digit addition, then train it by "
        "RL with GRPO and with RiskPO from the same start and seeds (through TRL); writes "
        "metrics.jsonl, summary.json and report.png. Needs the [demo] extra (TRL).",
    )
    from .demo.train import add_train_arguments

    add_train_arguments(demo)
    demo.set_defaults(run=_train)
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
