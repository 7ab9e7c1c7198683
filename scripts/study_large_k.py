"""pass@k beyond k = 16 for a finished ``riskfast study``.

For each seed, the script takes the warm start and each arm's selected run: the policy
the study stored with the run (``policy.pt``), or, for a run stored without one (or with
``--retrain``), the policy retrained from the study's stored warm start (on one machine a
run is a function of its settings, so the retrained policy is the study's). Either way it
checks that the policy's 16-sample test pass@1 and pass@16 equal the study's
``result.json`` exactly. It then samples ``--samples`` completions per test question at
temperature 1 and reports the unbiased pass@k (spec ``riskpo.md`` section 6) for
k = 1, 2, 4, ..., ``--samples``, for the warm start and every arm, with mean and 95%
t-interval over seeds and the paired differences; then the same per question level
(number of digits) at k = 1, 16 and ``--samples``. Usage (the study's own command line after ``--``)::

    .venv/bin/python scripts/study_large_k.py --samples 64 --jobs 2 -- \\
        --arms grpo official-math ... --out riskfast_out/study-hard

Writes ``OUT/large_k.json`` (each run as it finishes, so an interrupted call resumes)
and prints Markdown tables. A run already there at the same ``--samples`` (same seed,
arm and selected rate) is reused rather than evaluated again, so a study grown by more
seeds evaluates only the new ones; runs stored before the script kept per-level numbers
are evaluated again, unless ``--report-only`` (tables from the stored runs, evaluating
nothing); ``--fresh`` evaluates everything again.

``--every-rate`` evaluates every run of every arm's grid, not only the selected ones, and
adds a table by rate (mean and 95% t-interval over seeds of pass@1, pass@16, pass@``N``
and entropy, and each rate's paired difference from the warm start at pass@``N``): how
an arm's large-k coverage moves with its learning rate, a post hoc view beside the
validation's pick (the tables above it stay those of the selected runs).
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
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """pass@k for k = 1, 2, 4, ..., ``samples`` and the entropy; and pass@k per level."""
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
    by_level = {
        str(level): {f"pass@{k}": v for k, v in row.items()}
        for level, row in ev.pass_at_by_level.items()
    }
    return {**{f"pass@{k}": v for k, v in ev.pass_at.items()}, "entropy": ev.entropy}, by_level


def _one(task: tuple[list[str], int, str | None, float | None, int, bool]) -> dict[str, Any]:
    """Evaluate one selected run (``arm`` None: the warm start): its stored policy, or the
    run retrained (no stored policy, or ``retrain``)."""
    import time

    import torch

    from riskfast.demo.study import POLICY_FILE, _evaluation_dict, _questions, _run_dir
    from riskfast.demo.task import build_model, build_tokenizer
    from riskfast.demo.train import Arm, RunSettings, evaluate_state, train_arm

    argv, seed, arm_name, lr, samples, retrain = task
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
        check, source = None, None
    elif (policy := _run_dir(args.out, seed, arm_name, lr) / POLICY_FILE).exists() and not retrain:
        model = build_model(tokenizer, args.model_size, seed=seed).to(device)
        model.load_state_dict(torch.load(policy, weights_only=True)["state"])
        final, source = evaluate_state(model, tokenizer, test, **common), "stored"
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

        trained, model = train_arm(
            arm,
            settings,
            start_state,
            tokenizer,
            device,
            output_dir=scratch,
            evaluate_at=evaluate_at,
            record=lambda line: None,
        )
        final, source = trained["final"], "retrained"
    if arm_name is not None:
        stored = json.loads((_run_dir(args.out, seed, arm_name, lr) / "result.json").read_text())
        again = _evaluation_dict(final)
        check = {m: (again[m], stored["test"][m]) for m in ("pass@1", "pass@16")}
        if any(a != b for a, b in check.values()):
            raise RuntimeError(
                f"seed {seed} {arm_name} lr {lr}: {source} policy differs from "
                f"the study's ({check}); same machine and commit?"
            )
    out, by_level = _evaluate(model, tokenizer, test, args, seed, samples)
    return {
        "seed": seed,
        "arm": arm_name or "warm start",
        "lr": lr,
        "test": out,
        "test_by_level": by_level,
        "check_vs_study": check,
        "policy": source,
        "seconds": time.perf_counter() - started,
    }


def _key(seed: int, arm_name: str | None, lr: float | None) -> tuple[int, str, float | None]:
    """A run's key in ``large_k.json``: the warm start is arm None in a task, "warm start" in a row."""
    return seed, arm_name or "warm start", lr


def _stored_runs(path: Path, samples: int) -> dict[tuple[int, str, float | None], Any]:
    """The runs of an earlier ``large_k.json`` made with the same number of samples."""
    if not path.exists():
        return {}
    stored = json.loads(path.read_text())
    if stored.get("samples") != samples:
        return {}
    return {_key(r["seed"], r["arm"], r["lr"]): r for r in stored["runs"]}


def _by_rate(
    merged: dict[tuple[int, str, float | None], Any],
    args: argparse.Namespace,
    top: str,
    metrics: list[str],
) -> dict[str, Any]:
    """Every rate of every arm's grid over the seeds, with its paired difference from the
    warm start at ``top``; prints the table and returns it (keyed ``"arm lr"``)."""
    from riskfast.demo.study import _cell, seed_tables

    by = {("warm start", s): merged[_key(s, None, None)]["test"] for s in args.seeds}
    names = []
    for arm in args.arms:
        for lr in args.grids[arm]:
            names.append(f"{arm} lr {lr:g}")
            by.update({(names[-1], s): merged[_key(s, arm, lr)]["test"] for s in args.seeds})
    table, diffs = seed_tables(by, args.seeds, names, [(n, "warm start") for n in names], metrics)
    shown = [m for m in ("pass@1", "pass@16", top, "entropy") if m in metrics]
    print(
        "\n| arm and rate | " + " | ".join(shown) + f" | {top} - warm start | seeds at or below 0 |"
    )
    print("| --- |" + " --- |" * (len(shown) + 2))
    for name in names:
        cell = diffs[f"{name} - warm start"][top]
        cells = " | ".join(_cell(table[name][m], False) for m in shown)
        print(
            f"| {name} | {cells} | {_cell(cell, True)} | "
            f"{cell['at_or_below_zero']} of {len(args.seeds)} |"
        )
    return {
        name: {**table[name], f"{top} - warm start": diffs[f"{name} - warm start"][top]}
        for name in names
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
        help="evaluate every run again, even those already in OUT/large_k.json",
    )
    own.add_argument(
        "--report-only",
        action="store_true",
        help="evaluate nothing: tables from the runs already in OUT/large_k.json, "
        "those stored before the per-level numbers included",
    )
    own.add_argument(
        "--retrain",
        action="store_true",
        help="retrain the selected runs even where the study stored their policies "
        "(a check that the runs reproduce on this machine)",
    )
    own.add_argument(
        "--every-rate",
        action="store_true",
        help="evaluate every rate of every arm's grid, not only the selected ones, and "
        "print a table by rate",
    )
    opts = own.parse_args(argv[:cut])
    study_argv = argv[cut + 1 :]
    if opts.samples < 1 or opts.jobs < 1:
        raise SystemExit("--samples and --jobs must be >= 1")
    if opts.fresh and opts.report_only:
        raise SystemExit("--fresh and --report-only exclude each other")
    args = _study_args(study_argv)
    summary = json.loads((args.out / "summary.json").read_text())
    tasks = [(study_argv, seed, None, None, opts.samples, opts.retrain) for seed in args.seeds]
    tasks += [
        (
            study_argv,
            seed,
            arm,
            summary["selected"][arm][str(seed)]["lr"],
            opts.samples,
            opts.retrain,
        )
        for arm in args.arms
        for seed in args.seeds
    ]
    if opts.every_rate:  # the other rates of each grid, after the selected ones
        tasks += [
            (study_argv, seed, arm, lr, opts.samples, opts.retrain)
            for arm in args.arms
            for seed in args.seeds
            for lr in args.grids[arm]
            if lr != summary["selected"][arm][str(seed)]["lr"]
        ]
    path = args.out / "large_k.json"
    previous = _stored_runs(path, opts.samples)
    stored = {} if opts.fresh else previous
    # a stored run is reused when it holds every number this script records
    done = {k: r for k, r in stored.items() if opts.report_only or "test_by_level" in r}
    todo = [t for t in tasks if _key(t[1], t[2], t[3]) not in done]
    if opts.report_only and todo:
        missing = ", ".join(f"seed {t[1]} {t[2] or 'warm start'}" for t in todo)
        raise SystemExit(f"--report-only: {path} has no {opts.samples}-sample run for {missing}")
    todo.sort(key=lambda t: _key(t[1], t[2], t[3]) in stored)  # runs never stored first
    if len(todo) < len(tasks):
        print(f"[large_k] reusing {len(tasks) - len(todo)} runs from {path}", flush=True)
    merged = dict(previous)

    def keep(row: dict[str, Any]) -> None:
        """Store each finished run at once: an interrupted call loses only running ones."""
        merged[_key(row["seed"], row["arm"], row["lr"])] = row
        path.write_text(
            json.dumps({"samples": opts.samples, "runs": list(merged.values())}, indent=2)
        )
        print(f"[large_k] seed {row['seed']} {row['arm']}: {row['seconds']:.0f} s", flush=True)

    if opts.jobs == 1 or len(todo) <= 1:
        for task in todo:
            keep(_one(task))
    else:
        import multiprocessing
        from concurrent.futures import as_completed

        with ProcessPoolExecutor(
            opts.jobs, mp_context=multiprocessing.get_context("spawn")
        ) as pool:
            for future in as_completed([pool.submit(_one, t) for t in todo]):
                keep(future.result())
    rows = [merged[_key(t[1], t[2], t[3])] for t in tasks[: len(args.seeds) * (1 + len(args.arms))]]
    from riskfast.demo.study import _cell, seed_tables

    metrics = list(rows[0]["test"])
    arms = ["warm start", *args.arms]
    pairs = [(a, "grpo") for a in args.arms if a != "grpo" and "grpo" in args.arms]
    pairs += [(a, "warm start") for a in args.arms]
    table, diffs = seed_tables(
        {(r["arm"], r["seed"]): r["test"] for r in rows}, args.seeds, arms, pairs, metrics
    )
    others = [r for r in merged.values() if r not in rows]  # other seeds' stored runs, kept
    result = {
        "samples": opts.samples,
        "runs": rows + others,
        "table": table,
        "differences": diffs,
    }
    print("| arm | " + " | ".join(metrics) + " |")
    print("| --- |" + " --- |" * len(metrics))
    for name, row in [*table.items(), *diffs.items()]:
        print(f"| {name} | " + " | ".join(_cell(row[m], " - " in name) for m in metrics) + " |")
    # each paired difference at the largest k: how many seeds it does not favour
    top = f"pass@{max(int(m.split('@')[1]) for m in metrics if m.startswith('pass@'))}"
    print(f"\n| difference at {top} | mean [95% CI] | seeds at or below 0 |")
    print("| --- | --- | --- |")
    for name, row in diffs.items():
        cell = row[top]
        print(f"| {name} | {_cell(cell, True)} | {cell['at_or_below_zero']} of {len(args.seeds)} |")
    # the same largest k seed by seed: which seeds carry a mean
    print(f"\n| {top} by seed | " + " | ".join(str(s) for s in args.seeds) + " |")
    print("| --- |" + " --- |" * len(args.seeds))
    for name, row in [*table.items(), *diffs.items()]:
        signed = " - " in name
        cells = [f"{v:+.3f}" if signed else f"{v:.3f}" for v in row[top]["values"]]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if all("test_by_level" in r for r in rows):  # runs stored by an older script lack it
        levels = sorted(set.intersection(*(set(r["test_by_level"]) for r in rows)), key=int)
        shown = [m for m in ("pass@1", "pass@16", f"pass@{opts.samples}") if m in metrics]
        result["by_level"] = {}
        print("\n| level | arm | " + " | ".join(shown) + " |")
        print("| --- | --- |" + " --- |" * len(shown))
        for level in levels:
            by = {(r["arm"], r["seed"]): r["test_by_level"][level] for r in rows}
            ptable, pdiffs = seed_tables(
                by, args.seeds, arms, pairs, [m for m in metrics if m != "entropy"]
            )
            result["by_level"][level] = {"table": ptable, "differences": pdiffs}
            for name, row in [*ptable.items(), *pdiffs.items()]:
                cells = " | ".join(_cell(row[m], " - " in name) for m in shown)
                print(f"| {level} | {name} | {cells} |")
    if opts.every_rate:
        result["by_rate"] = _by_rate(merged, args, top, metrics)
    (args.out / "large_k.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
