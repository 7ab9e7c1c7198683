"""pass@k beyond k = 16 for a finished ``riskfast study``.

The study keeps no trained policies, only their numbers. This script retrains each arm's
selected run of each seed from the study's stored warm start (on one machine a run is a
function of its settings, so the retrained policy is the study's: the script checks
that its 16-sample test pass@1 and pass@16 equal the study's ``result.json`` exactly),
then samples ``--samples`` completions per test question at temperature 1 and reports
the unbiased pass@k (spec ``riskpo.md`` section 6) for k = 1, 2, 4, ..., ``--samples``,
for the warm start and every arm, with mean and 95% t-interval over seeds and the
paired differences. Usage (the study's own command line after ``--``)::

    .venv/bin/python scripts/study_large_k.py --samples 64 --jobs 2 -- \\
        --arms grpo official-math ... --out riskfast_out/study-hard

Writes ``OUT/large_k.json`` and prints a Markdown table. A run already in
``OUT/large_k.json`` at the same ``--samples`` (same seed, arm and selected rate) is
reused rather than retrained, so a study grown by more seeds retrains only the new
ones; ``--fresh`` retrains everything.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any


def _study_args(argv: list[str]) -> argparse.Namespace:
    from riskfast.demo.study import _resolve, add_study_arguments

    parser = argparse.ArgumentParser(prog="riskfast study")
    add_study_arguments(parser)
    return _resolve(parser.parse_args(argv))


def _evaluate(
    model: Any,
    tokenizer: Any,
    questions: list[Any],
    args: argparse.Namespace,
    seed: int,
    samples: int,
) -> dict[str, float]:
    from riskfast.demo.task import evaluate

    ks = [k for k in (2**i for i in range(samples.bit_length())) if k <= samples]
    ev = evaluate(
        model,
        tokenizer,
        questions,
        num_samples=samples,
        ks=ks,
        seed=seed + 1000,  # the study's own evaluation seed: 16 samples give its numbers
        max_new_tokens=args.max_digits + 3,
    )
    return {**{f"pass@{k}": v for k, v in ev.pass_at.items()}, "entropy": ev.entropy}


def _one(task: tuple[list[str], int, str, float | None, int]) -> dict[str, Any]:
    """Retrain one selected run (``arm`` None: the warm start) and evaluate it."""
    import time

    import torch

    from riskfast.demo.study import _evaluation_dict, _questions, _run_dir
    from riskfast.demo.task import build_model, build_tokenizer
    from riskfast.demo.train import Arm, RunSettings, evaluate_state, train_arm

    argv, seed, arm_name, lr, samples = task
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = _study_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    tokenizer = build_tokenizer()
    start_state = torch.load(args.out / f"seed{seed}" / "warm_start.pt", weights_only=True)["state"]
    _, test = _questions(args, seed)
    common = {
        "model_size": args.model_size,
        "max_digits": args.max_digits,
        "seed": seed,
        "device": device,
    }
    started = time.perf_counter()
    if arm_name is None:
        model = build_model(tokenizer, args.model_size, seed=seed).to(device)
        model.load_state_dict(start_state)
        check = None
    else:
        method = "grpo" if arm_name == "grpo" else "riskpo"
        arm = Arm(
            arm_name, method, lr, args.arm_options[arm_name], None if method == "grpo" else arm_name
        )
        settings = RunSettings(
            args.steps,
            args.prompts_per_step,
            args.group_size,
            args.max_digits,
            args.model_size,
            seed,
            args.eval_every,
            args.train_questions,
        )
        scratch = Path(os.environ.get("TMPDIR", "/tmp")) / f"large_k_{os.getpid()}"

        def evaluate_at(step: int, model: Any) -> Any:  # the study's final evaluation only
            return evaluate_state(model, tokenizer, test, **common) if step == args.steps else None

        result, model = train_arm(
            arm,
            settings,
            start_state,
            tokenizer,
            device,
            output_dir=scratch,
            evaluate_at=evaluate_at,
            record=lambda line: None,
        )
        stored = json.loads((_run_dir(args.out, seed, arm_name, lr) / "result.json").read_text())
        again = _evaluation_dict(result["final"])
        check = {m: (again[m], stored["test"][m]) for m in ("pass@1", "pass@16")}
        if any(a != b for a, b in check.values()):
            raise RuntimeError(
                f"seed {seed} {arm_name} lr {lr}: retrained run differs from "
                f"the study's ({check}); same machine and commit?"
            )
    out = _evaluate(model, tokenizer, test, args, seed, samples)
    return {
        "seed": seed,
        "arm": arm_name or "warm start",
        "lr": lr,
        "test": out,
        "check_vs_study": check,
        "seconds": time.perf_counter() - started,
    }


def _key(seed: int, arm_name: str | None, lr: float | None) -> tuple[int, str, float | None]:
    return seed, arm_name or "warm start", lr


def _stored_runs(path: Path, samples: int) -> dict[tuple[int, str, float | None], Any]:
    """The runs of an earlier ``large_k.json`` made with the same number of samples."""
    if not path.exists():
        return {}
    stored = json.loads(path.read_text())
    if stored.get("samples") != samples:
        return {}
    return {
        _key(r["seed"], None if r["arm"] == "warm start" else r["arm"], r["lr"]): r
        for r in stored["runs"]
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        raise SystemExit("usage: study_large_k.py [--samples N] [--jobs J] -- STUDY OPTIONS")
    cut = argv.index("--")
    own = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    own.add_argument("--samples", type=int, default=64, help="completions per question (64)")
    own.add_argument("--jobs", type=int, default=1, help="runs at once (1)")
    own.add_argument(
        "--fresh",
        action="store_true",
        help="retrain every run, even those already in OUT/large_k.json",
    )
    opts = own.parse_args(argv[:cut])
    study_argv = argv[cut + 1 :]
    if opts.samples < 1 or opts.jobs < 1:
        raise SystemExit("--samples and --jobs must be >= 1")
    args = _study_args(study_argv)
    summary = json.loads((args.out / "summary.json").read_text())
    tasks = [(study_argv, seed, None, None, opts.samples) for seed in args.seeds]
    tasks += [
        (study_argv, seed, arm, summary["selected"][arm][str(seed)]["lr"], opts.samples)
        for arm in args.arms
        for seed in args.seeds
    ]
    done = {} if opts.fresh else _stored_runs(args.out / "large_k.json", opts.samples)
    todo = [t for t in tasks if _key(t[1], t[2], t[3]) not in done]
    if len(todo) < len(tasks):
        print(
            f"[large_k] reusing {len(tasks) - len(todo)} runs from {args.out / 'large_k.json'}",
            flush=True,
        )
    if opts.jobs == 1 or len(todo) <= 1:
        fresh = [_one(t) for t in todo]
    else:
        import multiprocessing

        with ProcessPoolExecutor(
            opts.jobs, mp_context=multiprocessing.get_context("spawn")
        ) as pool:
            fresh = list(pool.map(_one, todo))
    new = {
        _key(r["seed"], None if r["arm"] == "warm start" else r["arm"], r["lr"]): r for r in fresh
    }
    rows = [new.get(k) or done[k] for k in (_key(t[1], t[2], t[3]) for t in tasks)]
    from riskfast.demo.study import _cell, t_interval

    metrics = list(rows[0]["test"])
    by = {(r["arm"], r["seed"]): r["test"] for r in rows}
    arms = ["warm start", *args.arms]
    table = {
        arm: {m: t_interval([by[(arm, s)][m] for s in args.seeds]) for m in metrics} for arm in arms
    }
    pairs = [(a, "grpo") for a in args.arms if a != "grpo" and "grpo" in args.arms]
    pairs += [(a, "warm start") for a in args.arms]
    diffs = {
        f"{a} - {b}": {
            m: t_interval([by[(a, s)][m] - by[(b, s)][m] for s in args.seeds]) for m in metrics
        }
        for a, b in pairs
    }
    (args.out / "large_k.json").write_text(
        json.dumps(
            {"samples": opts.samples, "runs": rows, "table": table, "differences": diffs}, indent=2
        )
    )

    print("| arm | " + " | ".join(metrics) + " |")
    print("| --- |" + " --- |" * len(metrics))
    for name, row in [*table.items(), *diffs.items()]:
        signed = " - " in name
        print(f"| {name} | " + " | ".join(_cell(row[m], signed) for m in metrics) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
