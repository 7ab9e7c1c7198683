"""Command line: ``riskfast <command>`` (also ``python -m riskfast``)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def _demo(args: argparse.Namespace) -> int:
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
    for name in ("demo", "explain"):
        _add_explain(commands, name)
    info = commands.add_parser("info", help="versions and how the extension was built")
    info.set_defaults(run=_info)
    return parser


def _add_explain(commands: argparse._SubParsersAction, name: str) -> None:
    demo = commands.add_parser(
        name, help="GRPO vs RiskPO advantages and loss on a synthetic rollout batch"
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
    demo.set_defaults(run=_demo)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except (ValueError, TypeError) as err:
        print(f"riskfast {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
