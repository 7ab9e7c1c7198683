"""``riskfast study``: GRPO against RiskPO configurations over seeds, tuned and tested apart.

What one study does (the demo's task and trainer, :mod:`riskfast.demo.train`):

1. for every seed, one supervised warm start (stopped by a validation rule), shared by
   every arm and learning rate of that seed;
2. for every arm (``grpo`` or a RiskPO preset of :mod:`riskfast.demo.presets`) and every
   learning rate of that arm's own grid, RL from that warm start at the same budget of
   sampled completions (steps x prompts per step x G, the same for every arm), with the
   same training knobs for every arm;
3. per seed and arm, the learning rate whose final policy scores best on the
   *validation* split (``--select``, default the mean of pass@1, 2, 4, 8, 16) is kept,
   and that run is reported on the separate *test* split;
4. a table of the mean and the 95% t-interval over seeds of test pass@1, 2, 4, 8, 16 and
   the policy entropy for every arm and the warm start, the paired differences of each
   RiskPO arm against GRPO, per-step curves and ``report.png``.

Every run writes its result atomically into ``OUT/seed<S>/<arm>/lr<LR>/`` (``result.json``,
beside its curves and its trained policy, ``policy.pt``, which
``scripts/study_large_k.py`` evaluates further without retraining); a study run
again with the same ``--out`` skips what is finished (a run interrupted midway restarts
from its warm start), so an interrupted study resumes and a finished one only rebuilds
its report; ``--report-only`` builds the report from finished runs and trains nothing
(a missing run is an error naming it), which reads a study in progress over the seeds
it has finished; ``--progress`` writes nothing and prints, per seed and arm, the finished
runs, the rate validation picks so far and whether that pick sits at an edge of its grid
(:func:`study_progress`). Settings that change results are stored in ``OUT/study_config.json``; a
second run with other settings in the same folder is refused (seeds, arms and grids may
grow, and ``--select`` may change: it picks among finished runs and retrains nothing). On
one machine the results are bit for bit a function of the settings (the thread count
is one of them, ``--threads``, default 1, though 1 and 2 threads gave equal bits on the
development machine); across machines they are not (another CPU instruction
set or BLAS code path changes the bits, then the rollouts): ``summary.json`` records
the machine.

Outputs: ``summary.json`` (configuration, machine, every run, the selection, the table's
numbers), ``table.md``, ``curves.csv`` (every evaluation and training step of the
selected runs) and ``report.png``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from ._plot import require_matplotlib
from .presets import PRESETS, TRAINING_KEYS, preset_values
from .train import KS, WARM_START_KEYS, train_set_text

METRICS = tuple(f"pass@{k}" for k in KS) + ("entropy",)
"""Columns of the study's table: test pass@k and the policy entropy per token."""

TABLE_FIELDS = ("arm", "seeds", *METRICS)
"""Fields of every row of ``summary["table"]`` (each metric: mean, low, high, values)."""

SELECT_METRICS = ("mean_pass@k", *(f"pass@{k}" for k in KS))

DEFAULT_ARMS = ("grpo", "paper", "official-math")
DEFAULT_GRIDS = {"grpo": (3e-4, 1e-3), "riskpo": (3e-4, 1e-3)}
"""Learning-rate grid of each arm unless ``--lr-grid ARM=...`` sets one."""

STUDY_DEFAULTS = {
    "steps": 150,
    "prompts_per_step": 100,
    "group_size": 8,
    "model_size": "mini",
    "max_digits": 3,
    "warm_steps": 800,
    "warm_batch": 256,
    "warm_lr": 3e-3,
    "warm_target": 0.4,
    "eval_every": 25,
    "val_questions": 100,
    "test_questions": 200,
}
"""The study's defaults of the options the parser leaves unset."""

QUICK = {
    "steps": 3,
    "prompts_per_step": 10,
    "group_size": 4,
    "model_size": "tiny",
    "max_digits": 2,
    "warm_steps": 40,
    "warm_batch": 64,
    "warm_lr": 5e-3,
    "warm_target": 2.0,
    "eval_every": 2,
    "val_questions": 8,
    "test_questions": 8,
}
"""What ``--quick`` changes: a smoke study of a few seconds per run (the test suite's); an
option given on the command line wins over it."""

_T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201,
          2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074,
          2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
"""Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom."""


def t_interval(values: Sequence[float]) -> dict[str, Any]:
    """Mean and 95% t-interval of ``values`` (one per seed); the interval is None for one value."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "low": None, "high": None, "values": list(values)}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    t = _T_975[n - 2] if n - 1 <= len(_T_975) else 1.96
    half = t * sd / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "values": list(values)}


def _lr_list(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(","))


def _grid_argument(text: str) -> tuple[str, tuple[float, ...]]:
    arm, sep, values = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected ARM=LR,LR,..., got {text!r}")
    try:
        return arm, _lr_list(values)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: {err}") from None


def add_study_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``riskfast study`` options."""
    from .train import add_train_questions_argument, add_training_arguments

    add = parser.add_argument
    arms = ", ".join(sorted(PRESETS))
    add("--arms", nargs="+", default=list(DEFAULT_ARMS),
        help=f"arms: grpo and RiskPO presets ({arms}); default {' '.join(DEFAULT_ARMS)}")
    add("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds (default 0 1 2; >= 3 for intervals)")
    add("--lr-grid", type=_grid_argument, action="append", default=[], metavar="ARM=LR,LR",
        help="an arm's learning-rate grid (repeat per arm); default "
        f"{','.join(f'{v:g}' for v in DEFAULT_GRIDS['grpo'])} for every arm")
    add("--select", choices=SELECT_METRICS, default="mean_pass@k",
        help="validation metric that picks each arm's learning rate per seed (default: the "
        "mean of pass@1, 2, 4, 8, 16)")
    add("--training-preset", choices=sorted(PRESETS), default=None,
        help="take every arm's training knobs from this preset (default: riskfast's, one "
        "update per rollout); the flags below override single knobs")
    add("--out", type=Path, default=Path("riskfast_out/study"), help="output folder (resumable)")
    add("--steps", type=int, default=None, help=f"RL steps per run (default {STUDY_DEFAULTS['steps']})")
    add("--prompts-per-step", type=int, default=None,
        help=f"prompts per RL step (default {STUDY_DEFAULTS['prompts_per_step']}: 20 bundles of 5)")
    add("--group-size", type=int, default=None, help="completions per prompt, G (default 8)")
    add("--model-size", choices=("tiny", "mini", "small", "medium"), default=None,
        help="model size (default mini, 133k parameters)")
    add("--max-digits", type=int, default=None, help="hardest level, digits (default 3)")
    add_train_questions_argument(parser)
    add("--warm-steps", type=int, default=None, help="max warm-start steps (default 800)")
    add("--warm-batch", type=int, default=None, help="warm-start batch (default 256)")
    add("--warm-lr", type=float, default=None, help="warm-start learning rate (default 3e-3)")
    add("--warm-target", type=float, default=None,
        help="stop the warm start at this sampled validation pass@1 (default 0.4)")
    add("--eval-every", type=int, default=None, help="RL steps between test evaluations (default 25)")
    add("--val-questions", type=int, default=None, help="validation questions (default 100)")
    add("--test-questions", type=int, default=None, help="test questions (default 200)")
    add("--threads", type=int, default=1, help="torch threads per run (default 1)")
    add("--jobs", type=int, default=1,
        help="warm starts, then runs, trained at once, each in its own process on --threads "
        "threads (default 1); results do not depend on it")
    add("--device", default="cpu", help="cpu (default), cuda, ...")
    add("--no-plot", action="store_true", help="skip report.png")
    add("--report-only", action="store_true",
        help="train nothing: the report from finished runs only (a study in progress can be "
        "read this way, over the seeds it has finished); a missing run is an error naming it")
    add("--progress", action="store_true",
        help="train nothing, write nothing: per seed and arm, the finished runs, their "
        "validation scores, the rate picked so far and whether it sits at an edge of the "
        "grid (grow the grid there)")
    add("--quick", action="store_true",
        help="a smoke study: " + ", ".join(f"{k}={v}" for k, v in QUICK.items())
        + " (options given on the command line win)")
    add_training_arguments(parser)


def _resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the defaults, validate everything (``ValueError`` naming the flag) and build
    every arm's options before anything runs."""
    from .train import check_common, check_options

    args = copy.copy(args)
    for key, value in STUDY_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, QUICK[key] if args.quick else value)
    args.eval_questions = args.test_questions
    check_common(args)
    for name in ("val_questions", "test_questions", "jobs"):
        if getattr(args, name) < 1:
            raise ValueError(f"{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    if not args.seeds or len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        raise ValueError(f"seeds: need distinct seeds >= 0, got {args.seeds}")
    if not args.arms or len(set(args.arms)) != len(args.arms):
        raise ValueError(f"arms: need distinct arms, got {args.arms}")
    for arm in args.arms:
        if arm != "grpo" and arm not in PRESETS:
            raise ValueError(f"arms: {arm!r} is neither 'grpo' nor a preset ({sorted(PRESETS)})")
    grids: dict[str, tuple[float, ...]] = {}
    for arm, values in args.lr_grid:
        if arm not in args.arms:
            raise ValueError(f"lr-grid: {arm!r} is not one of the arms {args.arms}")
        if not values or min(values) <= 0 or len(set(values)) != len(values):
            raise ValueError(f"lr-grid: {arm}'s grid must hold distinct rates > 0, got {values}")
        grids[arm] = tuple(values)
    args.grids = {
        arm: grids.get(arm, DEFAULT_GRIDS["grpo" if arm == "grpo" else "riskpo"]) for arm in args.arms
    }
    # Training knobs: one set for every arm (the comparison isolates the estimator).
    training = preset_values(args.training_preset)
    for key in TRAINING_KEYS:
        if getattr(args, key, None) is not None:
            training[key] = getattr(args, key)
    args.training = {k: training[k] for k in TRAINING_KEYS}
    args.arm_options = {}
    for arm in args.arms:
        options = preset_values(None if arm == "grpo" else arm)
        options.update(args.training)
        check_options(options)
        completions = args.prompts_per_step * args.group_size
        if completions % options["updates_per_rollout"]:
            raise ValueError(
                f"updates-per-rollout: {completions} completions per step do not split into "
                f"{options['updates_per_rollout']} equal updates"
            )
        args.arm_options[arm] = options
    return args


def study_config(args: argparse.Namespace) -> dict[str, Any]:
    """The settings that change results (stored in ``OUT/study_config.json``)."""
    keys = ("steps", "prompts_per_step", "group_size", "model_size", "max_digits", "warm_steps",
            "warm_batch", "warm_lr", "warm_target", "eval_every", "val_questions",
            "test_questions", "threads", "select", "device")
    config = {**{k: getattr(args, k) for k in keys}, "training": args.training}
    if args.train_questions is not None:  # absent when unset: older studies keep resuming
        config["train_questions"] = args.train_questions
    return config


REPORT_ONLY = ("select",)
"""Keys of :func:`study_config` that change the report but no run: a finished study can be
summarised again under another ``--select`` without retraining anything."""


def _run_settings(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` without :data:`REPORT_ONLY` (what a stored run must match)."""
    return {k: v for k, v in config.items() if k not in REPORT_ONLY}


POLICY_FILE = "policy.pt"
"""A finished run's trained policy, ``{"state": state_dict}`` in its run folder."""


def _run_dir(out: Path, seed: int, arm: str, lr: float) -> Path:
    return out / f"seed{seed}" / arm / f"lr{lr:g}"


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)


def _evaluation_dict(ev: Any) -> dict[str, Any]:
    return {
        **{f"pass@{k}": v for k, v in ev.pass_at.items()},
        "entropy": ev.entropy,
        "by_level": {str(level): row[1] for level, row in ev.pass_at_by_level.items()},
    }


def _questions(args: argparse.Namespace, seed: int) -> tuple[list[Any], list[Any]]:
    from .task import sample_questions

    val = sample_questions(args.val_questions, "val", max_digits=args.max_digits, seed=seed,
                           unique=True)
    test = sample_questions(args.test_questions, "test", max_digits=args.max_digits, seed=seed,
                            unique=True)
    return val, test


def _seed_args(args: argparse.Namespace, seed: int) -> argparse.Namespace:
    seed_args = copy.copy(args)
    seed_args.seed = seed
    return seed_args


def _stored_warm_start(args: argparse.Namespace, seed: int) -> dict[str, Any] | None:
    """The seed's finished warm start made with these settings, or None."""
    folder = args.out / f"seed{seed}"
    summary_path = folder / "warm.json"
    if not summary_path.exists() or not (folder / "warm_start.pt").exists():
        return None
    saved = json.loads(summary_path.read_text())
    key = {k: getattr(_seed_args(args, seed), k) for k in WARM_START_KEYS}
    return saved if saved.get("key") == key else None


def _fingerprint(args: argparse.Namespace, seed: int, arm_name: str, lr: float) -> dict[str, Any]:
    return {"config": study_config(args), "seed": seed, "arm": arm_name, "lr": lr,
            "options": args.arm_options[arm_name]}


def _stored_run(args: argparse.Namespace, seed: int, arm_name: str, lr: float) -> dict[str, Any] | None:
    """The run's finished result made with these settings, or None."""
    result_path = _run_dir(args.out, seed, arm_name, lr) / "result.json"
    if not result_path.exists():
        return None
    saved = json.loads(result_path.read_text())
    stored = saved.get("fingerprint") or {}
    fingerprint = _fingerprint(args, seed, arm_name, lr)
    same = {**stored, "config": _run_settings(stored.get("config", {}))} == {
        **fingerprint, "config": _run_settings(fingerprint["config"])}
    return saved if same else None


def prepare_seed(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """The seed's warm start (trained once, then reused) and its val/test evaluations."""
    import torch

    from .task import build_tokenizer
    from .train import evaluate_state, prepare_warm_start

    folder = args.out / f"seed{seed}"
    saved = _stored_warm_start(args, seed)
    if saved is not None:
        return saved
    folder.mkdir(parents=True, exist_ok=True)
    summary_path = folder / "warm.json"
    seed_args = _seed_args(args, seed)
    key = {k: getattr(seed_args, k) for k in WARM_START_KEYS}
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    tokenizer = build_tokenizer()
    started = time.perf_counter()
    state, log, _ = prepare_warm_start(seed_args, tokenizer, device, cache=folder / "warm_start.pt")
    val, test = _questions(args, seed)
    common = {"model_size": args.model_size, "max_digits": args.max_digits, "seed": seed,
              "device": device}
    result = {
        "key": key,
        "steps": log["steps"],
        "val_pass@1_at_stop": log["val_pass@1"],
        "val": _evaluation_dict(evaluate_state(state, tokenizer, val, **common)),
        "test": _evaluation_dict(evaluate_state(state, tokenizer, test, **common)),
        "seconds": time.perf_counter() - started,
    }
    _write_json(summary_path, result)
    return result


def run_one(args: argparse.Namespace, seed: int, arm_name: str, lr: float) -> dict[str, Any]:
    """Train one (seed, arm, learning rate) run, or return its stored result."""
    import torch

    from .task import build_tokenizer
    from .train import Arm, RunSettings, evaluate_state, train_arm

    saved = _stored_run(args, seed, arm_name, lr)
    if saved is not None:
        return saved
    folder = _run_dir(args.out, seed, arm_name, lr)
    result_path = folder / "result.json"
    fingerprint = _fingerprint(args, seed, arm_name, lr)
    folder.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    tokenizer = build_tokenizer()
    saved_warm = torch.load(args.out / f"seed{seed}" / "warm_start.pt", weights_only=True)
    start_state = saved_warm["state"]
    val, test = _questions(args, seed)
    settings = RunSettings(args.steps, args.prompts_per_step, args.group_size, args.max_digits,
                           args.model_size, seed, args.eval_every, args.train_questions)
    common = {"model_size": args.model_size, "max_digits": args.max_digits, "seed": seed,
              "device": device}
    lines: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    # Progress of a run in flight (replaced by metrics.jsonl when it finishes).
    partial = (folder / "metrics.partial.jsonl").open("w")

    def record(line: dict[str, Any]) -> None:
        lines.append(line)
        partial.write(json.dumps(line) + "\n")
        partial.flush()

    def evaluate_at(step: int, model: Any) -> Any:
        ev = evaluate_state(model, tokenizer, test, **common)
        record({"kind": "eval", "split": "test", "step": step, **_evaluation_dict(ev),
                "elapsed_seconds": time.perf_counter() - t0})
        return ev

    method = "grpo" if arm_name == "grpo" else "riskpo"
    arm = Arm(arm_name, method, lr, args.arm_options[arm_name],
              None if method == "grpo" else arm_name)
    train_result, model = train_arm(
        arm, settings, start_state, tokenizer, device, output_dir=folder / "trainer",
        evaluate_at=evaluate_at, record=record, t0=t0,
    )
    partial.close()
    final_test = train_result.pop("final")
    final_val = evaluate_state(model, tokenizer, val, **common)
    # The trained policy (a few hundred KB), so later evaluations need not retrain it;
    # written before result.json, whose presence marks the run finished.
    torch.save({"state": {k: v.detach().cpu() for k, v in model.state_dict().items()}},
               folder / POLICY_FILE)
    with (folder / "metrics.jsonl").open("w") as handle:
        for line in lines:
            handle.write(json.dumps(line) + "\n")
    (folder / "metrics.partial.jsonl").unlink()
    result = {
        "fingerprint": fingerprint,
        "seed": seed,
        "arm": arm_name,
        "lr": lr,
        "val": _evaluation_dict(final_val),
        "test": _evaluation_dict(final_test),
        "train": train_result,
        "curve": lines,
    }
    _write_json(result_path, result)
    return result


def _warm_task(task: tuple[argparse.Namespace, int]) -> tuple[int, dict[str, Any], float]:
    args, seed = task
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    started = time.perf_counter()
    result = prepare_seed(args, seed)
    return seed, result, time.perf_counter() - started


def _run_task(task: tuple[argparse.Namespace, int, str, float]) -> tuple[int, str, float, float]:
    args, seed, arm, lr = task
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    started = time.perf_counter()
    run_one(args, seed, arm, lr)
    return seed, arm, lr, time.perf_counter() - started


def seed_tables(
    by: dict[tuple[str, int], dict[str, float]],
    seeds: Sequence[int],
    arms: Sequence[str],
    pairs: Sequence[tuple[str, str]],
    metrics: Sequence[str],
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Mean and 95% t-interval over ``seeds`` of each arm's metrics, ``by[(arm, seed)][m]``,
    and of each paired difference ``a - b`` (the same seed's values subtracted first); a
    difference also counts its seeds at or below zero (``"at_or_below_zero"``: seeds where
    ``a`` does not beat ``b``)."""
    table = {arm: {m: t_interval([by[(arm, s)][m] for s in seeds]) for m in metrics} for arm in arms}

    def difference(a: str, b: str, m: str) -> dict[str, Any]:
        stats = t_interval([by[(a, s)][m] - by[(b, s)][m] for s in seeds])
        return {**stats, "at_or_below_zero": sum(v <= 0 for v in stats["values"])}

    differences = {f"{a} - {b}": {m: difference(a, b, m) for m in metrics} for a, b in pairs}
    return table, differences


def _select_value(block: dict[str, Any], metric: str) -> float:
    if metric == "mean_pass@k":
        return sum(block[f"pass@{k}"] for k in KS) / len(KS)
    return block[metric]


def _pick(candidates: Sequence[dict[str, Any]], select: str) -> dict[str, Any]:
    """The run that validation selects: highest ``select`` score on the validation split;
    ties go to the smaller learning rate."""
    return max(candidates, key=lambda r: (_select_value(r["val"], select), -r["lr"]))


def summarize(args: argparse.Namespace, warm: dict[int, Any], runs: dict[tuple, Any]) -> dict[str, Any]:
    """Selection per seed and arm, the table, paired differences (see the module docstring)."""
    selected: dict[str, dict[int, dict[str, Any]]] = {}
    for arm in args.arms:
        selected[arm] = {}
        for seed in args.seeds:
            selected[arm][seed] = _pick([runs[(seed, arm, lr)] for lr in args.grids[arm]], args.select)
    by = {("warm start", s): warm[s]["test"] for s in args.seeds}
    by.update({(arm, s): selected[arm][s]["test"] for arm in args.arms for s in args.seeds})
    vs_grpo = [(arm, "grpo") for arm in args.arms if arm != "grpo" and "grpo" in args.arms]
    vs_start = [(arm, "warm start") for arm in args.arms]
    arms, pairs = seed_tables(by, args.seeds, ["warm start", *args.arms], vs_grpo + vs_start, METRICS)

    def rows(stats: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"arm": name, "seeds": list(args.seeds), **row} for name, row in stats.items()]

    table = rows(arms)
    differences = rows({f"{a} - {b}": pairs[f"{a} - {b}"] for a, b in vs_grpo})
    against_start = rows({f"{a} - {b}": pairs[f"{a} - {b}"] for a, b in vs_start})
    return {
        "selected": {arm: {str(s): {"lr": r["lr"], "val_score": _select_value(r["val"], args.select)}
                           for s, r in per_seed.items()} for arm, per_seed in selected.items()},
        "table": table,
        "differences_vs_grpo": differences,
        "differences_vs_warm_start": against_start,
        "selected_runs": selected,
    }


def study_progress(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Where a study stands, training nothing: per seed and arm, the finished runs of the
    arm's grid with their validation scores (``args.select``), the rate validation picks
    among them, and whether the grid is complete and its pick at an edge of the grid (the
    smallest or the largest rate: where a grid should grow before the pick is trusted).
    ``args`` must be resolved (``_resolve``)."""
    rows = []
    for seed in args.seeds:
        for arm in args.arms:
            grid = sorted(args.grids[arm])
            finished = [r for lr in grid if (r := _stored_run(args, seed, arm, lr)) is not None]
            pick = _pick(finished, args.select)["lr"] if finished else None
            complete = len(finished) == len(grid)
            rows.append({
                "seed": seed,
                "arm": arm,
                "warm_start": _stored_warm_start(args, seed) is not None,
                "finished": len(finished),
                "grid": grid,
                "val_scores": {f"{r['lr']:g}": _select_value(r["val"], args.select) for r in finished},
                "pick": pick,
                "complete": complete,
                "edge": None if not complete else "low" if pick == grid[0] else
                        "high" if pick == grid[-1] else None,
            })
    return rows


def format_progress(rows: Sequence[dict[str, Any]], select: str) -> str:
    """:func:`study_progress` as a markdown table."""
    lines = [f"| seed | arm | warm start | runs | validation {select} by rate | pick | grid edge |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        scores = ", ".join(f"{lr} {v:.4f}" for lr, v in row["val_scores"].items()) or "-"
        pick = "-" if row["pick"] is None else f"{row['pick']:g}" + ("" if row["complete"] else " so far")
        edge = {None: "", "low": "lowest rate: grow the grid down",
                "high": "highest rate: grow the grid up"}[row["edge"]]
        if len(row["grid"]) == 1 and row["edge"]:
            edge = "one rate: grow the grid"
        lines.append(f"| {row['seed']} | {row['arm']} | {'ready' if row['warm_start'] else 'missing'} | "
                     f"{row['finished']}/{len(row['grid'])} | {scores} | {pick} | {edge} |")
    done = sum(r["finished"] for r in rows)
    lines.append(f"\n{done} of {sum(len(r['grid']) for r in rows)} runs finished.")
    return "\n".join(lines)


def _cell(stats: dict[str, Any], signed: bool = False) -> str:
    fmt = "+.3f" if signed else ".3f"
    if stats["low"] is None:
        return format(stats["mean"], fmt)
    return f"{stats['mean']:{fmt}} [{stats['low']:{fmt}}, {stats['high']:{fmt}}]"


def format_table(summary: dict[str, Any]) -> str:
    """The study's table (markdown): means and 95% intervals over seeds, test split."""
    config = summary["config"]
    head = "| arm | lr per seed | " + " | ".join(METRICS) + " |"
    lines = [head, "|" + " --- |" * (len(METRICS) + 2)]
    for row in summary["table"]:
        lrs = "-" if row["arm"] == "warm start" else " / ".join(
            f"{summary['selected'][row['arm']][str(s)]['lr']:g}" for s in row["seeds"])
        lines.append(f"| {row['arm']} | {lrs} | " + " | ".join(_cell(row[m]) for m in METRICS) + " |")
    for block in (summary["differences_vs_grpo"], summary["differences_vs_warm_start"]):
        for row in block:
            lines.append(f"| {row['arm']} | | "
                         + " | ".join(_cell(row[m], signed=True) for m in METRICS) + " |")
    lines.append("")
    lines.append(
        f"Test split: {config['test_questions']} questions x {max(KS)} samples (temperature 1), "
        f"unbiased pass@k, entropy per token (nats); mean [95% t-interval] over seeds "
        f"{', '.join(map(str, summary['seeds']))}. Each arm: {config['steps']} RL steps of "
        f"{config['prompts_per_step']} prompts x G={config['group_size']}"
        + train_set_text(config)
        + f" from the seed's warm start, learning rate picked per seed from its grid by validation {config['select']} "
        f"({config['val_questions']} questions). Training knobs (every arm): "
        + ", ".join(f"{k}={v}" for k, v in config["training"].items()) + "."
    )
    return "\n".join(lines)


def write_curves(path: Path, summary: dict[str, Any]) -> None:
    """``curves.csv``: every evaluation and training step of the selected runs."""
    columns = ["arm", "seed", "lr", "kind", "step", *(f"pass@{k}" for k in KS), "entropy",
               "reward_mean", "zero_advantage_bundle_frac", "clip_frac"]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for arm, per_seed in summary["selected_runs"].items():
            for seed, run in per_seed.items():
                for line in run["curve"]:
                    writer.writerow({"arm": arm, "seed": seed, "lr": run["lr"], **line})


def plot_report(path: Path, summary: dict[str, Any]) -> None:
    """``report.png``: pass@k against k, test pass@1 / pass@16 and entropy over steps, reward."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"grpo": "tab:blue", "paper": "tab:red", "official-math": "tab:green",
              "official-hard-math": "tab:purple"}
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    ax = axes[0, 0]
    for row in summary["table"]:
        color = colors.get(row["arm"], "black")
        means = [row[f"pass@{k}"]["mean"] for k in KS]
        lows = [row[f"pass@{k}"]["low"] for k in KS]
        highs = [row[f"pass@{k}"]["high"] for k in KS]
        style = ":" if row["arm"] == "warm start" else "-"
        ax.plot(KS, means, style, marker="o", color=color, label=row["arm"])
        if lows[0] is not None:
            ax.fill_between(KS, lows, highs, color=color, alpha=0.12)
    ax.set_xscale("log", base=2)
    ax.set(title="test pass@k after RL (mean, 95% interval over seeds)", xlabel="k", ylabel="pass@k")
    ax.legend(fontsize=8)

    def mean_curve(runs: dict[Any, Any], kind: str, field: str) -> tuple[list[int], list[float]]:
        by_step: dict[int, list[float]] = {}
        for run in runs.values():
            for line in run["curve"]:
                if line["kind"] == kind and line.get(field) is not None:
                    by_step.setdefault(line["step"], []).append(float(line[field]))
        steps = sorted(by_step)
        return steps, [sum(by_step[s]) / len(by_step[s]) for s in steps]

    for (ax, field, title) in (
        (axes[0, 1], "entropy", "policy entropy on test samples (nats/token)"),
        (axes[1, 0], "pass@16", "test pass@1 (dashed) and pass@16 (solid) during RL"),
    ):
        for arm, runs in summary["selected_runs"].items():
            steps, values = mean_curve(runs, "eval", field)
            ax.plot(steps, values, "-", marker=".", color=colors.get(arm, "black"), label=arm)
            if field == "pass@16":
                steps, values = mean_curve(runs, "eval", "pass@1")
                ax.plot(steps, values, "--", color=colors.get(arm, "black"))
        warm = summary["table"][0][field]["mean"]
        ax.axhline(warm, color="black", linestyle=":", label="warm start")
        ax.set(title=title + " (mean over seeds)", xlabel="RL step")
        ax.legend(fontsize=8)
    ax = axes[1, 1]
    for arm, runs in summary["selected_runs"].items():
        steps, values = mean_curve(runs, "train", "reward_mean")
        width, smoothed, acc = 10, [], []
        for v in values:
            acc = (acc + [v])[-width:]
            smoothed.append(sum(acc) / len(acc))
        ax.plot(steps, smoothed, color=colors.get(arm, "black"), label=arm)
    ax.set(title="training reward (10-step mean, mean over seeds)", xlabel="RL step", ylabel="reward")
    ax.legend(fontsize=8)
    config = summary["config"]
    fig.suptitle(
        f"riskfast study: GRPO vs RiskPO on reversed addition (1-{config['max_digits']} digits), "
        f"{config['model_size']} model, {config['steps']} steps x {config['prompts_per_step']} "
        f"prompts x G={config['group_size']}, seeds {', '.join(map(str, summary['seeds']))}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_study(args: argparse.Namespace) -> dict[str, Any]:
    """Run (or resume) the study described in the module docstring; returns its summary."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = _resolve(args)
    from ..integrations import trl as _trl  # noqa: F401 - raises a clear ImportError
    from .train import machine_info

    require_matplotlib(args.no_plot)
    import torch

    torch.set_num_threads(args.threads)
    out: Path = args.out
    config = study_config(args)
    config_path = out / "study_config.json"
    if args.report_only and args.progress:
        raise ValueError("progress: --progress and --report-only exclude each other")
    for flag in ("report_only", "progress"):
        if getattr(args, flag) and not config_path.exists():
            name = flag.replace("_", "-")
            raise ValueError(f"{name}: {out} holds no study ({config_path.name} missing)")
    out.mkdir(parents=True, exist_ok=True)
    if config_path.exists():
        stored = _run_settings(json.loads(config_path.read_text()))
        current = _run_settings(config)
        changed = sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))
        if changed:
            raise ValueError(
                f"out: {out} holds a study made with other settings ({', '.join(changed)}); "
                "pass another --out"
            )
    else:
        _write_json(config_path, config)
    if args.progress:
        rows = study_progress(args)
        print(format_progress(rows, args.select))
        return {"progress": rows}
    started = time.perf_counter()
    tasks = [(args, seed, arm, lr) for seed in args.seeds for arm in args.arms
             for lr in args.grids[arm]]
    warm = {}

    def work(pool: ProcessPoolExecutor | None) -> None:
        """Warm starts first (the runs start from them), then the runs; ``--jobs`` at a time."""
        run_map = map if pool is None else pool.map
        print(f"[study] {len(args.seeds)} warm starts ({args.jobs} at a time)", flush=True)
        for seed, result, seconds in run_map(_warm_task, [(args, seed) for seed in args.seeds]):
            warm[seed] = result
            print(f"[study] seed {seed}: warm start ready ({seconds:.0f} s)", flush=True)
        print(f"[study] {len(tasks)} runs ({args.jobs} at a time)", flush=True)
        for i, (seed, arm, lr, seconds) in enumerate(run_map(_run_task, tasks), 1):
            print(f"[study] {i}/{len(tasks)} seed {seed} {arm} lr {lr:g}: {seconds:.0f} s", flush=True)

    if args.report_only:
        warm.update({seed: _stored_warm_start(args, seed) for seed in args.seeds})
        missing = [f"seed {seed} warm start" for seed, w in warm.items() if w is None]
        missing += [f"seed {seed} {arm} lr {lr:g}" for (_, seed, arm, lr) in tasks
                    if _stored_run(args, seed, arm, lr) is None]
        if missing:
            shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
            raise ValueError(f"report-only: {len(missing)} not finished in {out}: {shown}")
    elif args.jobs == 1:
        work(None)
    else:
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as pool:
            work(pool)
    runs = {(seed, arm, lr): run_one(args, seed, arm, lr) for (_, seed, arm, lr) in tasks}
    result = summarize(args, warm, runs)
    summary: dict[str, Any] = {
        "config": config,
        "arms": list(args.arms),
        "seeds": list(args.seeds),
        "grids": {arm: list(v) for arm, v in args.grids.items()},
        "arm_options": args.arm_options,
        "machine": machine_info(torch.device(args.device)),
        "warm_start": {str(s): w for s, w in warm.items()},
        "runs": [{"seed": s, "arm": a, "lr": lr, "val": r["val"], "test": r["test"],
                  "seconds": r["train"]["seconds"]} for (s, a, lr), r in runs.items()],
        "selected": result["selected"],
        "table": result["table"],
        "differences_vs_grpo": result["differences_vs_grpo"],
        "differences_vs_warm_start": result["differences_vs_warm_start"],
        "seconds_this_invocation": time.perf_counter() - started,
        "command": "riskfast study " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["study"] else None,
    }
    (out / "table.md").write_text(format_table({**summary, "selected_runs": {}}) + "\n")
    write_curves(out / "curves.csv", {"selected_runs": result["selected_runs"]})
    _write_json(out / "summary.json", summary)
    if not args.no_plot:
        plot_report(out / "report.png", {**summary, "selected_runs": result["selected_runs"]})
    print(format_table(summary))
    print(f"wrote {out / 'summary.json'}, {out / 'table.md'}, {out / 'curves.csv'}"
          + ("" if args.no_plot else f", {out / 'report.png'}"))
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m riskfast.demo.study``."""
    parser = argparse.ArgumentParser(prog="python -m riskfast.demo.study",
                                     description=__doc__.split("\n")[0])
    add_study_arguments(parser)
    run_study(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
