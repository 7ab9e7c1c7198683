"""``riskfast demo``: GRPO vs RiskPO, trained for real on a verifiable task.

What it does, on the embedded defaults (no download, CPU or CUDA):

1. builds the reversed-digit addition task (:mod:`riskfast.demo.task`): a character
   tokenizer, a small Qwen2 model from a config, training / validation / held-out
   test questions of 1 to 4 digits;
2. warm-starts the model by supervised training until it solves part of the task
   (sampled validation accuracy reaches ``--warm-target``, or ``--warm-steps``);
3. from that same start, trains each method by RL through TRL with
   :class:`riskfast.integrations.trl.RiskPOTrainer` and the same seed: the GRPO arm
   uses ``estimator="grpo"`` (TRL's GRPO advantages; ``--grpo-trainer trl`` uses
   TRL's own ``GRPOTrainer`` instead), the RiskPO arm the Mixed-VaR estimator with
   bundles;
4. evaluates held-out pass@k (k = 1, 2, 4, 8, 16, unbiased estimator from 16 samples
   per question at temperature 1) and the policy entropy during and after training;
5. writes ``metrics.jsonl`` (one line per RL step and per evaluation),
   ``summary.json`` and ``report.png`` into ``--out`` and prints a table.

Both arms share everything but the advantage estimator (and the ratio level, which
gives the same gradient while the ratio is 1, i.e. with ``num_iterations=1``): the
learning rate, loss aggregation (TRL's ``dapo`` token mean), prompts, group size and
seeds. The summary records the learning rate and centring of every arm. One seed
says little: compare several (``--seed``) before reading a difference into it.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .task import (
    Evaluation,
    build_model,
    build_tokenizer,
    evaluate,
    exact_match_reward,
    sample_questions,
    warm_start,
)

KS = (1, 2, 4, 8, 16)
METHODS = ("grpo", "riskpo")

TRAIN_RECORD_FIELDS = (
    "kind",
    "method",
    "step",
    "reward_mean",
    "reward_std",
    "quantile_alpha",
    "quantile_beta",
    "entropy",
    "clip_frac",
    "advantage_mean",
    "advantage_std",
    "zero_advantage_bundle_frac",
    "completion_length",
    "step_seconds",
    "elapsed_seconds",
)
"""Fields of every ``kind: "train"`` line of ``metrics.jsonl``."""

EVAL_RECORD_FIELDS = ("kind", "method", "step", "pass@k", "entropy", "elapsed_seconds")
"""Fields of every ``kind: "eval"`` line of ``metrics.jsonl`` (``pass@k``: {k: value})."""

SUMMARY_METHOD_FIELDS = (
    "pass@k",
    "pass@k_by_level",
    "final_entropy",
    "train_entropy_last",
    "reward_first",
    "reward_last",
    "steps",
    "learning_rate",
    "center",
    "estimator",
    "trainer",
    "ratio_level",
    "bundle_size",
    "seconds",
)
"""Fields of each entry of ``summary["methods"]`` (and ``warm_start`` has ``pass@k``,
``pass@k_by_level``, ``final_entropy``)."""

QUICK = {
    "steps": 40,
    "model_size": "tiny",
    "max_digits": 2,
    "warm_steps": 600,
    "warm_batch": 128,
    "warm_lr": 5e-3,
    "warm_target": None,
    "eval_questions": 60,
    "eval_every": 20,
}
"""What ``--quick`` overrides: a smoke run (tiny model, short phases), < 2 minutes."""


WARM_START_KEYS = ("seed", "model_size", "max_digits", "warm_steps", "warm_batch", "warm_lr",
                   "warm_target")
"""Settings a saved warm start must match to be reused (``--warm-start``)."""


def _load_warm_start(path: Path | None, key: dict[str, Any]) -> dict[str, Any] | None:
    if path is None or not Path(path).exists():
        return None
    saved = torch.load(path, weights_only=True)
    if saved.get("key") != key:
        print(f"warm start {path} was made with other settings; training a new one", file=sys.stderr)
        return None
    return saved


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the demo's options to ``parser`` (the ``riskfast demo`` subcommand)."""
    add = parser.add_argument
    add("--method", choices=("both", *METHODS), default="both",
        help="which arm(s) to train from the shared warm start (default both)")
    add("--steps", type=int, default=300, help="RL steps per method (default 300)")
    add("--seed", type=int, default=0, help="seed of task, model, warm start and RL (default 0)")
    add("--out", type=Path, default=Path("riskfast_out/demo"),
        help="output folder (default riskfast_out/demo)")
    add("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    add("--model-size", choices=("tiny", "small", "medium"), default="small",
        help="model size (default small, ~1M parameters)")
    add("--group-size", type=int, default=8, help="completions per prompt, G (default 8)")
    add("--prompts-per-step", type=int, default=10, help="prompts per RL step (default 10)")
    add("--bundle-size", type=int, default=5, help="RiskPO prompts per bundle, B (default 5)")
    add("--alpha", type=float, default=0.2, help="RiskPO lower quantile level (default 0.2)")
    add("--beta", type=float, default=0.8, help="RiskPO upper quantile level (default 0.8)")
    add("--omega", type=float, default=0.5, help="RiskPO lower-tail weight (default 0.5)")
    add("--estimator", default="mvar", help="RiskPO arm's estimator (default mvar)")
    add("--form", choices=("paper", "reference_code"), default="paper",
        help="Mixed-VaR form (default paper)")
    add("--center", action=argparse.BooleanOptionalAction, default=True,
        help="centre RiskPO advantages per bundle (default on; see README)")
    add("--lr", type=float, default=1e-4, help="RL learning rate, both arms (default 1e-4)")
    add("--riskpo-lr", type=float, default=None, help="RiskPO arm's learning rate (default --lr)")
    add("--grpo-trainer", choices=("riskpo", "trl"), default="riskpo",
        help="GRPO arm through RiskPOTrainer(estimator='grpo') or TRL's GRPOTrainer")
    add("--warm-steps", type=int, default=800, help="max supervised warm-start steps (default 800)")
    add("--warm-batch", type=int, default=256, help="warm-start batch size (default 256)")
    add("--warm-lr", type=float, default=2e-3, help="warm-start learning rate (default 2e-3)")
    add("--warm-target", type=float, default=0.5,
        help="stop the warm start at this sampled validation pass@1 (default 0.5)")
    add("--warm-start", type=Path, default=None,
        help="reuse the warm start saved in this file when its settings match (else train "
        "and save it there); every run also saves OUT/warm_start.pt")
    add("--max-digits", type=int, default=4, help="hardest level, digits (default 4)")
    add("--eval-questions", type=int, default=200, help="held-out questions (default 200)")
    add("--eval-every", type=int, default=50, help="RL steps between evaluations (default 50)")
    add("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    add("--no-plot", action="store_true", help="skip report.png")
    add("--quick", action="store_true",
        help="a smoke run in < 2 minutes: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))


def _resolve(args: argparse.Namespace) -> argparse.Namespace:
    args = copy.copy(args)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    for name in ("steps", "group_size", "prompts_per_step", "bundle_size", "eval_questions",
                 "eval_every", "max_digits"):
        if getattr(args, name) < 1:
            raise ValueError(f"{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    if args.group_size < 2:
        raise ValueError(f"group-size: GRPO needs at least 2 completions per prompt, got {args.group_size}")
    if args.riskpo_lr is None:
        args.riskpo_lr = args.lr
    from ..riskpo import AdvantageOptions

    AdvantageOptions(  # validates the RiskPO options before any training
        estimator=args.estimator, bundle_size=args.bundle_size, alpha=args.alpha, beta=args.beta,
        omega=args.omega, form=args.form, center=args.center,
    )
    return args


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {name!r} requested but CUDA is not available")
    return device


def _eval_dict(ev: Evaluation) -> dict[str, Any]:
    return {
        "pass@k": {str(k): v for k, v in ev.pass_at.items()},
        "pass@k_by_level": {
            str(level): {str(k): v for k, v in row.items()} for level, row in ev.pass_at_by_level.items()
        },
        "final_entropy": ev.entropy,
    }


class _JsonLines:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.handle = path.open("w")

    def write(self, record: dict[str, Any]) -> None:
        self.handle.write(json.dumps(record) + "\n")
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


def _progress(total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="riskfast demo", unit="step", disable=not enabled,
                dynamic_ncols=True, leave=True)


def _mean(values: Sequence[float]) -> float | None:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else None


def _train_method(
    method: str,
    args: argparse.Namespace,
    start_state: dict[str, torch.Tensor],
    tokenizer: Any,
    test_questions: Sequence[Any],
    device: torch.device,
    writer: _JsonLines,
    progress: Any,
    t0: float,
) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from ..integrations.trl import RiskPOConfig, RiskPOTrainer

    model = build_model(tokenizer, args.model_size, seed=args.seed)
    model.load_state_dict(start_state)
    model.to(device)
    questions = sample_questions(args.steps * args.prompts_per_step, "train",
                                 max_digits=args.max_digits, seed=args.seed + 1)
    dataset = Dataset.from_list([{"prompt": q.prompt, "answer": q.answer} for q in questions])

    is_riskpo = method == "riskpo"
    lr = args.riskpo_lr if is_riskpo else args.lr
    common: dict[str, Any] = {
        "output_dir": str(args.out / method / "trainer"),
        "max_steps": args.steps,
        "per_device_train_batch_size": args.prompts_per_step * args.group_size,
        "num_generations": args.group_size,
        "max_completion_length": args.max_digits + 3,
        "learning_rate": lr,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "temperature": 1.0,
        "bf16": False,
        "activation_checkpointing": False,
        "report_to": "none",
        "logging_steps": 1,
        "save_strategy": "no",
        "disable_tqdm": True,
        "seed": args.seed,
        "use_cpu": device.type == "cpu",
        "dataloader_num_workers": 0,
    }
    use_trl_grpo = (not is_riskpo) and args.grpo_trainer == "trl"
    if use_trl_grpo:
        config: Any = GRPOConfig(**common)
        trainer_cls: Any = GRPOTrainer
        trainer_name = "trl.GRPOTrainer"
        estimator, ratio_level, center, bundle_size = "grpo (TRL)", "token", False, 1
    elif is_riskpo:
        config = RiskPOConfig(
            **common, estimator=args.estimator, bundle_size=args.bundle_size,
            risk_alpha=args.alpha, risk_beta=args.beta, omega=args.omega, form=args.form,
            center=args.center, ratio_level="sequence", bundle_seed=args.seed,
        )
        trainer_cls = RiskPOTrainer
        trainer_name = "riskfast.RiskPOTrainer"
        estimator, ratio_level, center, bundle_size = (
            f"{args.estimator} ({args.form})", "sequence", args.center, args.bundle_size
        )
    else:
        config = RiskPOConfig(**common, estimator="grpo", bundle_size=1, ratio_level="token",
                              bundle_seed=args.seed)
        trainer_cls = RiskPOTrainer
        trainer_name = "riskfast.RiskPOTrainer(estimator='grpo')"
        estimator, ratio_level, center, bundle_size = "grpo", "token", False, 1

    rewards: list[float] = []
    train_entropy: list[float] = []
    last_time = [time.perf_counter()]

    def run_eval(step: int, mdl: Any) -> Evaluation:
        ev = evaluate(mdl, tokenizer, test_questions, num_samples=max(KS), ks=KS,
                      seed=args.seed + 1000, max_new_tokens=args.max_digits + 3)
        writer.write({
            "kind": "eval", "method": method, "step": step,
            "pass@k": {str(k): v for k, v in ev.pass_at.items()},
            "entropy": ev.entropy, "elapsed_seconds": time.perf_counter() - t0,
        })
        return ev

    class Recorder(TrainerCallback):
        def on_log(self, _args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if not logs or "reward" not in logs:
                return
            now = time.perf_counter()
            record = {
                "kind": "train",
                "method": method,
                "step": int(state.global_step),
                "reward_mean": logs.get("reward"),
                "reward_std": logs.get("reward_std"),
                "quantile_alpha": logs.get("riskpo/quantile_alpha"),
                "quantile_beta": logs.get("riskpo/quantile_beta"),
                "entropy": logs.get("entropy"),
                "clip_frac": logs.get("clip_ratio/region_mean"),
                "advantage_mean": logs.get("riskpo/advantage_mean"),
                "advantage_std": logs.get("riskpo/advantage_std"),
                "zero_advantage_bundle_frac": logs.get(
                    "riskpo/zero_advantage_bundle_frac", logs.get("frac_reward_zero_std")
                ),
                "completion_length": logs.get("completions/mean_length"),
                "step_seconds": now - last_time[0],
                "elapsed_seconds": now - t0,
            }
            last_time[0] = now
            rewards.append(float(record["reward_mean"]))
            if record["entropy"] is not None:
                train_entropy.append(float(record["entropy"]))
            writer.write(record)
            progress.update(1)
            progress.set_postfix(phase=method, reward=f"{record['reward_mean']:.2f}",
                                 entropy=f"{(record['entropy'] or 0):.2f}")

        def on_step_end(self, _args: Any, state: Any, control: Any, **kw: Any) -> None:
            step = int(state.global_step)
            if step % args.eval_every == 0 and step < args.steps:
                run_eval(step, kw["model"])
                last_time[0] = time.perf_counter()

    started = time.perf_counter()
    run_eval(0, model)
    trainer = trainer_cls(
        model=model, reward_funcs=[exact_match_reward], args=config, train_dataset=dataset,
        processing_class=tokenizer, callbacks=[Recorder()],
    )
    trainer.remove_callback(PrinterCallback)  # the progress bar replaces TRL's log printing
    trainer.train()
    final = run_eval(args.steps, trainer.model)
    window = max(1, min(20, len(rewards) // 5))
    result = {
        **_eval_dict(final),
        "train_entropy_last": _mean(train_entropy[-window:]),
        "reward_first": _mean(rewards[:window]),
        "reward_last": _mean(rewards[-window:]),
        "steps": args.steps,
        "learning_rate": lr,
        "center": center,
        "estimator": estimator,
        "trainer": trainer_name,
        "ratio_level": ratio_level,
        "bundle_size": bundle_size,
        "seconds": time.perf_counter() - started,
    }
    return result


def _plot(path: Path, metrics_path: Path, summary: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train: dict[str, list[dict[str, Any]]] = {}
    evals: dict[str, list[dict[str, Any]]] = {}
    for line in metrics_path.read_text().splitlines():
        record = json.loads(line)
        (train if record["kind"] == "train" else evals).setdefault(record["method"], []).append(record)
    colors = {"grpo": "tab:blue", "riskpo": "tab:red"}
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))

    def smooth(values: list[float], width: int = 10) -> list[float]:
        out, acc = [], []
        for v in values:
            acc.append(v)
            if len(acc) > width:
                acc.pop(0)
            out.append(sum(acc) / len(acc))
        return out

    ax = axes[0, 0]
    for method, rows in train.items():
        steps = [r["step"] for r in rows]
        ax.plot(steps, [r["reward_mean"] for r in rows], color=colors.get(method), alpha=0.25)
        ax.plot(steps, smooth([r["reward_mean"] for r in rows]), color=colors.get(method), label=method)
    ax.set(title="training reward (mean over the step's completions)", xlabel="RL step", ylabel="reward")
    ax.legend()
    ax = axes[0, 1]
    for method, rows in train.items():
        ax.plot([r["step"] for r in rows], smooth([r["entropy"] for r in rows]),
                color=colors.get(method), label=f"{method} (train)")
    for method, rows in evals.items():
        ax.plot([r["step"] for r in rows], [r["entropy"] for r in rows], "o--",
                color=colors.get(method), label=f"{method} (held-out samples)")
    ax.set(title="policy entropy per token (nats)", xlabel="RL step", ylabel="entropy")
    ax.legend(fontsize=8)
    ax = axes[1, 0]
    for method, rows in evals.items():
        for k, style in (("1", "o-"), ("16", "s--")):
            ax.plot([r["step"] for r in rows], [r["pass@k"][k] for r in rows], style,
                    color=colors.get(method), label=f"{method} pass@{k}")
    ax.set(title="held-out pass@1 and pass@16 during RL", xlabel="RL step", ylabel="pass@k")
    ax.legend(fontsize=8)
    ax = axes[1, 1]
    ks = [int(k) for k in summary["warm_start"]["pass@k"]]
    ax.plot(ks, list(summary["warm_start"]["pass@k"].values()), "k:", marker="^", label="warm start")
    for method, row in summary["methods"].items():
        ax.plot(ks, [row["pass@k"][str(k)] for k in ks], marker="o", color=colors.get(method),
                label=method)
    ax.set_xscale("log", base=2)
    ax.set(title="held-out pass@k after RL", xlabel="k", ylabel="pass@k")
    ax.legend()
    config = summary["config"]
    fig.suptitle(
        f"GRPO vs RiskPO on reversed-digit addition: {config['model_size']} model, "
        f"{config['steps']} RL steps, seed {config['seed']}", fontsize=11
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_table(summary: dict[str, Any]) -> str:
    """The final comparison as plain text (readable without the output files)."""
    rows = [("warm start", "-", "-", summary["warm_start"], None)]
    for method, row in summary["methods"].items():
        rows.append((method, f"{row['learning_rate']:g}", "yes" if row["center"] else "no", row, row))
    head = (f"{'method':<11}{'lr':>8}{'center':>8}" + "".join(f"{'pass@' + str(k):>9}" for k in KS)
            + f"{'entropy':>9}{'reward first->last':>21}")
    lines = [head, "-" * len(head)]
    for name, lr, center, row, train in rows:
        reward = "" if train is None else f"{train['reward_first']:.3f} -> {train['reward_last']:.3f}"
        lines.append(
            f"{name:<11}{lr:>8}{center:>8}"
            + "".join(f"{row['pass@k'][str(k)]:>9.3f}" for k in KS)
            + f"{row['final_entropy']:>9.3f}{reward:>21}"
        )
    config = summary["config"]
    lines.append(
        f"held-out: {summary['task']['test_questions']} questions x {max(KS)} samples (temperature 1), "
        f"unbiased pass@k; {config['steps']} RL steps of {config['prompts_per_step']} prompts x "
        f"G={config['group_size']}; RiskPO B={config['bundle_size']}, alpha={config['alpha']}, "
        f"beta={config['beta']}, omega={config['omega']}; seed {config['seed']} (one seed: "
        "differences of a few points are within run-to-run noise)."
    )
    return "\n".join(lines)


def run_training(args: argparse.Namespace) -> dict[str, Any]:
    """Run the demo described in the module docstring; returns the summary dict.

    ``args`` is a namespace from a parser set up by :func:`add_train_arguments`.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = _resolve(args)
    # Fail before the warm start, not after it, when an optional dependency is missing.
    from ..integrations import trl as _trl  # noqa: F401 - raises a clear ImportError

    if not args.no_plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError as err:
            raise ImportError(
                f"report.png needs matplotlib ({err}); pip install matplotlib, or pass --no-plot"
            ) from err
    if args.threads:
        torch.set_num_threads(args.threads)
    device = _device(args.device)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    methods = list(METHODS) if args.method == "both" else [args.method]
    t0 = time.perf_counter()

    tokenizer = build_tokenizer()
    model = build_model(tokenizer, args.model_size, seed=args.seed).to(device)
    test_questions = sample_questions(args.eval_questions, "test", max_digits=args.max_digits,
                                      seed=args.seed, unique=True)
    val_questions = sample_questions(100, "val", max_digits=args.max_digits, seed=args.seed,
                                     unique=True)
    warm_key = {k: getattr(args, k) for k in WARM_START_KEYS}
    cached = _load_warm_start(args.warm_start, warm_key)
    total = (0 if cached else args.warm_steps) + args.steps * len(methods)
    progress = _progress(total, enabled=True)
    writer = _JsonLines(out / "metrics.jsonl")
    try:
        if cached:
            model.load_state_dict(cached["state"])
            warm_log = cached["log"]
        else:
            warm_log = warm_start(
                model, tokenizer, steps=args.warm_steps, batch_size=args.warm_batch,
                lr=args.warm_lr, max_digits=args.max_digits, seed=args.seed,
                target=args.warm_target, val_questions=val_questions, progress=progress,
            )
        saved = {"key": warm_key, "log": warm_log,
                 "state": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
        for path in {out / "warm_start.pt", *([args.warm_start] if args.warm_start else [])}:
            torch.save(saved, path)
        warm_eval = evaluate(model, tokenizer, test_questions, num_samples=max(KS), ks=KS,
                             seed=args.seed + 1000, max_new_tokens=args.max_digits + 3)
        warm_seconds = time.perf_counter() - t0
        start_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        del model
        results: dict[str, Any] = {}
        for method in methods:
            results[method] = _train_method(method, args, start_state, tokenizer, test_questions,
                                            device, writer, progress, t0)
    finally:
        writer.close()
        progress.close()

    summary: dict[str, Any] = {
        "config": {
            key: (str(value) if isinstance(value, Path) else value)
            for key, value in vars(args).items() if not callable(value)
        },
        "device": str(device),
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
        },
        "task": {
            "name": "reversed-digit addition",
            "levels": list(range(1, args.max_digits + 1)),
            "test_questions": len(test_questions),
            "samples_per_question": max(KS),
        },
        "warm_start": {
            **_eval_dict(warm_eval),
            "reused": bool(cached),
            "steps": warm_log["steps"],
            "val_pass@1": warm_log["val_pass@1"],
            "seconds": warm_seconds,
        },
        "methods": results,
        "seconds": time.perf_counter() - t0,
    }
    try:
        import trl

        summary["environment"]["trl"] = trl.__version__
    except ImportError:  # pragma: no cover - the demo needs TRL anyway
        pass
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if not args.no_plot:
        _plot(out / "report.png", out / "metrics.jsonl", summary)
    print(format_table(summary))
    print(f"wrote {out / 'metrics.jsonl'}, {out / 'summary.json'}"
          + ("" if args.no_plot else f", {out / 'report.png'}")
          + f" in {summary['seconds']:.0f} s")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m riskfast.demo.train``: the demo without the ``riskfast`` CLI."""
    parser = argparse.ArgumentParser(prog="python -m riskfast.demo.train", description=__doc__.split("\n")[0])
    add_train_arguments(parser)
    run_training(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
