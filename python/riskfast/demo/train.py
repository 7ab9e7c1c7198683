"""``riskfast demo``: GRPO vs RiskPO, trained for real on a verifiable task.

What it does, on the embedded defaults (no download, CPU or CUDA):

1. builds the reversed-digit addition task (:mod:`riskfast.demo.task`): a character
   tokenizer, a small Qwen2 model from a config (``mini``, 133k parameters), training /
   validation / held-out test questions of 1 to 3 digits;
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

Both arms share the prompts, group size, seeds and every training knob (updates per
rollout, weight decay, dual clip, gradient clip, loss aggregation); each has its own
learning rate (``--grpo-lr``, ``--riskpo-lr``, or ``--lr`` for both; by default the
rate ``riskfast study`` selected for it, :data:`DEMO_LR`). The defaults are one seed of
the README's study (150 steps of 100 prompts x G = 8, i.e. 20 bundles of 5 per step).
The RiskPO arm's options come from a named preset (``--preset``, :mod:`riskfast.demo.presets`: the
paper's configuration or the official scripts'), and each can be overridden on the
command line. The summary records every arm's options and the machine it ran on. One
seed says little: ``riskfast study`` (:mod:`riskfast.demo.study`) compares arms over
seeds with each arm's learning rate tuned on a validation split.

Reproducibility: on one machine a run is a function of the seed and the settings, bit
for bit. Across machines it is not: another CPU (its vector instruction set, the BLAS
kernels MKL picks for it) or another torch build changes float32 results in the last
bits, and sampling turns those into other rollouts. ``--threads`` (default 1) pins
torch's intra-op threads so the thread count cannot add to this; the README's section on
reproducibility gives the measurements.
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ._plot import require_matplotlib
from .presets import BUILTIN, PRESETS, RISKPO_KEYS, TRAINING_KEYS, preset_values
from .task import (
    Evaluation,
    build_model,
    build_tokenizer,
    evaluate,
    exact_match_reward,
    rl_questions,
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
    "preset",
    "riskpo_options",
    "training",
    "seconds",
)
"""Fields of each entry of ``summary["methods"]`` (and ``warm_start`` has ``pass@k``,
``pass@k_by_level``, ``final_entropy``)."""

QUICK = {
    "steps": 40,
    "prompts_per_step": 10,
    "model_size": "tiny",
    "max_digits": 2,
    "warm_steps": 600,
    "warm_batch": 128,
    "warm_lr": 5e-3,
    "warm_target": None,
    "eval_questions": 60,
    "eval_every": 20,
}
"""What ``--quick`` changes: a smoke run (tiny model, short phases), < 2 minutes. An
option given on the command line wins over it (``--quick --steps 5``)."""

DEFAULTS = {
    "steps": 150,
    "prompts_per_step": 100,
    "model_size": "mini",
    "max_digits": 3,
    "warm_steps": 800,
    "warm_batch": 256,
    "warm_lr": 3e-3,
    "warm_target": 0.4,
    "eval_questions": 200,
    "eval_every": 25,
}
"""The demo's defaults of the options :data:`QUICK` changes (the parser leaves them unset,
so that an option given with ``--quick`` wins): one seed of ``riskfast study``'s
configuration (the README's study), so ``riskfast demo --seed S`` retrains that study's
runs of seed S bit for bit on one machine."""

DEMO_LR = {"grpo": 3e-4, "paper": 3e-5, "official-math": 3e-5, "official-hard-math": 3e-5}
"""Each arm's default learning rate: the rate ``riskfast study`` selected on validation in
most seeds (README, "GRPO vs RiskPO over seeds": GRPO 3e-4 in 3 of 3 seeds, both RiskPO
presets 3e-5 in 2 of 3); official-hard-math was not in the study and takes
official-math's."""

_UNSET: Any = object()
"""Parser default of ``--warm-target``, whose ``None`` (never stop) is a legal value."""

DEFAULT_PRESET = "official-math"
"""The demo's RiskPO arm when ``--preset`` is not given: the configuration the README's
study supports (of the two it compared, the one with the higher pass@8, pass@16 and
entropy; both were below GRPO at pass@1-4)."""


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


def _optional_float(text: str) -> float:
    """``--dual-clip``: a float, or ``none``/``off`` for 0 (off)."""
    return 0.0 if text.lower() in ("none", "off") else float(text)


def add_riskpo_arguments(parser: argparse.ArgumentParser) -> None:
    """The RiskPO arm's options (each defaults to the preset's value)."""
    group = parser.add_argument_group(
        "RiskPO arm (default: the preset's value, see --preset; spec riskpo.md sections 1-4)"
    )
    add = group.add_argument
    bool_flag = argparse.BooleanOptionalAction
    add("--estimator", default=None, help="advantage estimator (mvar, rvar, cvar, upper)")
    add("--form", choices=("paper", "reference_code"), default=None, help="Mixed-VaR form")
    add("--bundle-size", type=int, default=None, help="questions per bundle, B")
    add("--alpha", type=float, default=None, help="lower quantile level")
    add("--beta", type=float, default=None, help="upper quantile level")
    add("--omega", type=float, default=None, help="lower-tail weight (form paper)")
    add("--w-mix", type=float, default=None, help="mixing weight (form reference_code)")
    add("--natural-baseline", action=bool_flag, default=None,
        help="keep the range-VaR baseline term c (a - b) (form reference_code)")
    add("--normalize", action=bool_flag, default=None,
        help="divide advantages by the bundle's score std + 1e-6")
    add("--center", action=bool_flag, default=None,
        help="subtract each bundle's mean advantage (neither the paper nor the official code does)")
    add("--credit", choices=("uniform", "std", "score", "sum_mean"), default=None,
        help="how a member's advantage is shared among its responses")
    add("--score", choices=("sum", "mean"), default=None, help="member score")
    add("--quantile", choices=("empirical", "tracker"), default=None,
        help="per-bundle quantiles or a run-wide tracker")
    add("--tracker-gamma", type=float, default=None, help="step size of the quantile tracker")
    add("--shuffle-bundles", action=bool_flag, default=None,
        help="random bundles and members (else consecutive prompts, j-th responses)")
    add("--ratio-level", choices=("sequence", "token"), default=None,
        help="importance ratio of the RiskPO loss")


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """Training knobs both arms share (each defaults to the preset's value)."""
    group = parser.add_argument_group("training, both arms (default: the preset's value)")
    add = group.add_argument
    add("--updates-per-rollout", type=int, default=None,
        help="optimizer steps per generation batch, each on a share of it (official: 2)")
    add("--weight-decay", type=float, default=None, help="AdamW weight decay (official: 0.01)")
    add("--dual-clip", type=_optional_float, default=None,
        help="dual-clip constant c > 1 for negative advantages, or 0/none for off (official: 3)")
    add("--max-grad-norm", type=float, default=None, help="gradient clip (default 1)")
    add("--clip-epsilon", type=float, default=None, help="ratio clip range (default 0.2)")
    add("--loss-type", choices=("dapo", "bnpo", "grpo", "dr_grpo"), default=None,
        help="loss aggregation, TRL's loss_type (default dapo: token mean)")
    add("--kl-coef", type=float, default=None, help="k3 KL coefficient to the start (default 0)")
    add("--entropy-coef", type=float, default=None, help="entropy bonus (default 0)")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the demo's options to ``parser`` (the ``riskfast demo`` subcommand)."""
    add = parser.add_argument
    add("--method", choices=("both", *METHODS), default="both",
        help="which arm(s) to train from the shared warm start (default both)")
    add("--preset", choices=sorted(PRESETS), default=None,
        help=f"RiskPO arm and training configuration (default {DEFAULT_PRESET}): "
        + "; ".join(f"{p.name}: {p.summary}" for p in PRESETS.values()))
    add("--steps", type=int, default=None, help="RL steps (rollouts) per method (default 150)")
    add("--seed", type=int, default=0, help="seed of task, model, warm start and RL (default 0)")
    add("--out", type=Path, default=Path("riskfast_out/demo"),
        help="output folder (default riskfast_out/demo)")
    add("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    add("--model-size", choices=("tiny", "mini", "small", "medium"), default=None,
        help="model size (default mini, 133k parameters)")
    add("--group-size", type=int, default=8, help="completions per prompt, G (default 8)")
    add("--prompts-per-step", type=int, default=None,
        help="prompts per RL step (default 100: 20 bundles of 5)")
    add("--lr", type=float, default=None,
        help="RL learning rate of both arms (default: each arm's rate selected by riskfast "
        "study: " + ", ".join(f"{k} {v:g}" for k, v in DEMO_LR.items()) + ")")
    add("--grpo-lr", type=float, default=None, help="GRPO arm's learning rate (default --lr)")
    add("--riskpo-lr", type=float, default=None, help="RiskPO arm's learning rate (default --lr)")
    add("--grpo-trainer", choices=("riskpo", "trl"), default="riskpo",
        help="GRPO arm through RiskPOTrainer(estimator='grpo') or TRL's GRPOTrainer")
    add("--warm-steps", type=int, default=None, help="max supervised warm-start steps (default 800)")
    add("--warm-batch", type=int, default=None, help="warm-start batch size (default 256)")
    add("--warm-lr", type=float, default=None, help="warm-start learning rate (default 3e-3)")
    add("--warm-target", type=float, default=_UNSET,
        help="stop the warm start at this sampled validation pass@1 (default 0.4; > 1: never)")
    add("--warm-start", type=Path, default=None,
        help="reuse the warm start saved in this file when its settings match (else train "
        "and save it there); every run also saves OUT/warm_start.pt")
    add("--max-digits", type=int, default=None, help="hardest level, digits (default 3)")
    add_train_questions_argument(parser)
    add("--eval-questions", type=int, default=None, help="held-out questions (default 200)")
    add("--eval-every", type=int, default=None, help="RL steps between evaluations (default 25)")
    add("--threads", type=int, default=1,
        help="torch intra-op CPU threads (default 1: steadiest on a shared machine; 1 and 2 "
        "threads gave bitwise-equal runs on the development machine, see the README)")
    add("--no-plot", action="store_true", help="skip report.png")
    add("--quick", action="store_true",
        help="a smoke run in < 2 minutes: " + ", ".join(f"{k}={v}" for k, v in QUICK.items())
        + " (options given on the command line win)")
    add_riskpo_arguments(parser)
    add_training_arguments(parser)


def add_train_questions_argument(parser: argparse.ArgumentParser) -> None:
    """``--train-questions``, shared by ``riskfast demo`` and ``riskfast study``."""
    parser.add_argument(
        "--train-questions", type=int, default=None,
        help="RL from a fixed training set of this many questions, in epochs (the official "
        "scripts run about 14-15 epochs over their dataset; steps x prompts-per-step / N "
        "epochs here); default: a fresh training question for every prompt")


def resolve_options(args: argparse.Namespace, preset: str | None) -> dict[str, Any]:
    """Every RiskPO and training option: the command line's value where given, else
    ``preset``'s, else :data:`riskfast.demo.presets.BUILTIN`. Validated (``ValueError``
    naming the option) before anything trains."""
    values = preset_values(preset)
    for key in (*RISKPO_KEYS, *TRAINING_KEYS):
        given = getattr(args, key, None)
        if given is not None:
            values[key] = given
    check_options(values)
    return values


def check_options(values: dict[str, Any]) -> None:
    """Validate a full option set (see :func:`resolve_options`)."""
    from ..riskpo import AdvantageOptions

    def flag(key: str) -> str:
        return key.replace("_", "-")

    try:
        AdvantageOptions(**advantage_options(values))
    except (TypeError, ValueError) as err:
        name, colon, rest = str(err).partition(":")
        if colon and name in _ADVANTAGE_FLAG:
            raise type(err)(f"{_ADVANTAGE_FLAG[name]}:{rest}") from None
        raise
    if values["ratio_level"] not in ("sequence", "token"):
        raise ValueError(f"ratio-level: must be 'sequence' or 'token', got {values['ratio_level']!r}")
    if values["tracker_gamma"] <= 0:
        raise ValueError(f"tracker-gamma: must be > 0, got {values['tracker_gamma']}")
    if values["updates_per_rollout"] < 1:
        raise ValueError(f"updates-per-rollout: must be >= 1, got {values['updates_per_rollout']}")
    dual = values["dual_clip"]
    if dual != 0.0 and not (isinstance(dual, float | int) and dual > 1.0):
        raise ValueError(f"dual-clip: must be > 1, or 0 for off, got {dual}")
    for key in ("weight_decay", "kl_coef", "entropy_coef"):
        if values[key] < 0:
            raise ValueError(f"{flag(key)}: must be >= 0, got {values[key]}")
    for key in ("max_grad_norm", "clip_epsilon"):
        if not values[key] > 0:
            raise ValueError(f"{flag(key)}: must be > 0, got {values[key]}")


_ADVANTAGE_FLAG = {
    "estimator": "estimator",
    "bundle_size": "bundle-size",
    "alpha": "alpha",
    "beta": "beta",
    "omega": "omega",
    "form": "form",
    "w_mix": "w-mix",
    "natural_baseline": "natural-baseline",
    "normalize": "normalize",
    "center": "center",
    "credit": "credit",
    "score": "score",
    "quantile": "quantile",
    "shuffle": "shuffle-bundles",
}


def advantage_options(values: dict[str, Any]) -> dict[str, Any]:
    """The :class:`riskfast.riskpo.AdvantageOptions` keywords of an option set."""
    return {
        "estimator": values["estimator"],
        "bundle_size": values["bundle_size"],
        "alpha": values["alpha"],
        "beta": values["beta"],
        "omega": values["omega"],
        "form": values["form"],
        "w_mix": values["w_mix"],
        "natural_baseline": values["natural_baseline"],
        "normalize": values["normalize"],
        "center": values["center"],
        "credit": values["credit"],
        "score": values["score"],
        "quantile": values["quantile"],
        "shuffle": values["shuffle_bundles"],
    }


def _resolve(args: argparse.Namespace) -> argparse.Namespace:
    args = copy.copy(args)
    for key, value in DEFAULTS.items():
        if getattr(args, key) is (_UNSET if key == "warm_target" else None):
            setattr(args, key, QUICK[key] if args.quick and key in QUICK else value)
    check_common(args)
    if args.preset is None:
        args.preset = DEFAULT_PRESET
    args.options = resolve_options(args, args.preset)
    if args.grpo_lr is None:
        args.grpo_lr = DEMO_LR["grpo"] if args.lr is None else args.lr
    if args.riskpo_lr is None:
        args.riskpo_lr = DEMO_LR[args.preset] if args.lr is None else args.lr
    for name in ("lr", "grpo_lr", "riskpo_lr"):
        if getattr(args, name) is not None and not getattr(args, name) > 0:
            raise ValueError(f"{name.replace('_', '-')}: must be > 0, got {getattr(args, name)}")
    if args.grpo_trainer == "trl" and args.method != "riskpo":
        unsupported = [k for k in ("dual_clip", "kl_coef") if args.options[k] != BUILTIN[k]]
        if args.options["loss_type"] != "dapo":
            unsupported.append("loss_type")
        if unsupported:
            raise ValueError(
                f"grpo-trainer: the TRL GRPOTrainer arm is run with TRL's own loss; "
                f"{', '.join(k.replace('_', '-') for k in unsupported)} would not reach it: "
                "use --grpo-trainer riskpo, or turn them off (--dual-clip 0, --kl-coef 0, "
                "--loss-type dapo)"
            )
    return args


def check_common(args: argparse.Namespace) -> None:
    """Validate the sizes both the demo and the study use (``ValueError`` naming the flag)."""
    for name in ("steps", "group_size", "prompts_per_step", "eval_questions", "eval_every",
                 "max_digits", "warm_batch"):
        if getattr(args, name) < 1:
            raise ValueError(f"{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    if args.warm_steps < 0:
        raise ValueError(f"warm-steps: must be >= 0, got {args.warm_steps}")
    if args.group_size < 2:
        raise ValueError(f"group-size: GRPO needs at least 2 completions per prompt, got {args.group_size}")
    if args.max_digits > 9:
        raise ValueError(f"max-digits: must be in 1..9, got {args.max_digits}")
    if getattr(args, "train_questions", None) is not None and args.train_questions < 1:
        raise ValueError(f"train-questions: must be >= 1, got {args.train_questions}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"threads: must be >= 1, got {args.threads}")


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


@dataclass(frozen=True)
class Arm:
    """One trained arm: what trains it and with which options.

    Attributes:
        name: the arm's label (``"grpo"``, ``"riskpo"``, or a preset name in a study).
        method: ``"grpo"`` or ``"riskpo"``.
        learning_rate: its learning rate.
        options: every RiskPO and training option (:func:`resolve_options`); the GRPO
            arm reads only the training ones.
        preset: the preset the options came from (None for the GRPO arm).
        grpo_trainer: ``"riskpo"`` (RiskPOTrainer with ``estimator="grpo"``) or ``"trl"``.
    """

    name: str
    method: str
    learning_rate: float
    options: dict[str, Any]
    preset: str | None = None
    grpo_trainer: str = "riskpo"

    def describe(self) -> dict[str, Any]:
        """The options that shape this arm's training, for summaries."""
        training = {k: self.options[k] for k in TRAINING_KEYS}
        if self.method != "riskpo":
            return {"estimator": "grpo", "ratio_level": "token", "training": training}
        return {
            "riskpo_options": {k: self.options[k] for k in RISKPO_KEYS},
            "training": training,
        }


@dataclass(frozen=True)
class RunSettings:
    """What every arm of one comparison shares (the sampling budget and the task)."""

    steps: int
    prompts_per_step: int
    group_size: int
    max_digits: int
    model_size: str
    seed: int
    eval_every: int
    train_questions: int | None = None
    """``None``: every RL prompt a fresh training-pool draw; ``N``: epochs over a fixed set
    of ``N`` training questions (:func:`riskfast.demo.task.rl_questions`)."""


def check_budget(settings: RunSettings, options: dict[str, Any]) -> None:
    """A generation batch must split into ``updates_per_rollout`` equal shares."""
    completions = settings.prompts_per_step * settings.group_size
    updates = options["updates_per_rollout"]
    if completions % updates:
        raise ValueError(
            f"updates-per-rollout: {completions} completions per step (prompts-per-step x "
            f"group-size) do not split into {updates} equal updates"
        )


def train_arm(
    arm: Arm,
    settings: RunSettings,
    start_state: dict[str, torch.Tensor],
    tokenizer: Any,
    device: torch.device,
    *,
    output_dir: Path,
    evaluate_at: Callable[[int, Any], dict[str, Any]],
    record: Callable[[dict[str, Any]], None],
    progress: Any = None,
    t0: float | None = None,
) -> tuple[dict[str, Any], Any]:
    """Train one arm by RL from ``start_state``; returns its training summary and model.

    ``evaluate_at(step, model)`` runs at step 0, every ``settings.eval_every`` RL steps
    and after the last one (its return value for the last step is kept as ``final``);
    ``record(line)`` receives every ``kind: "train"`` line (:data:`TRAIN_RECORD_FIELDS`).
    An RL step is one generation batch of ``prompts_per_step x group_size`` completions,
    followed by ``updates_per_rollout`` optimizer steps on equal shares of it.
    """
    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from ..integrations.trl import RiskPOConfig, RiskPOTrainer

    t0 = time.perf_counter() if t0 is None else t0
    options = arm.options
    check_budget(settings, options)
    updates = int(options["updates_per_rollout"])
    model = build_model(tokenizer, settings.model_size, seed=settings.seed)
    model.load_state_dict(start_state)
    model.to(device)
    questions = rl_questions(settings.steps * settings.prompts_per_step,
                             max_digits=settings.max_digits, seed=settings.seed + 1,
                             train_questions=settings.train_questions)
    dataset = Dataset.from_list([{"prompt": q.prompt, "answer": q.answer} for q in questions])

    common: dict[str, Any] = {
        "output_dir": str(output_dir),
        "max_steps": settings.steps * updates,
        "per_device_train_batch_size": settings.prompts_per_step * settings.group_size // updates,
        "steps_per_generation": updates,
        "num_generations": settings.group_size,
        "max_completion_length": settings.max_digits + 3,
        "learning_rate": arm.learning_rate,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "weight_decay": float(options["weight_decay"]),
        "max_grad_norm": float(options["max_grad_norm"]),
        "epsilon": float(options["clip_epsilon"]),
        "loss_type": options["loss_type"],
        "beta": float(options["kl_coef"]),
        "entropy_coef": float(options["entropy_coef"]),
        "temperature": 1.0,
        "bf16": False,
        "activation_checkpointing": False,
        "report_to": "none",
        "logging_steps": 1,
        "save_strategy": "no",
        "disable_tqdm": True,
        "seed": settings.seed,
        "use_cpu": device.type == "cpu",
        "dataloader_num_workers": 0,
    }
    dual_clip = float(options["dual_clip"]) or None
    is_riskpo = arm.method == "riskpo"
    if not is_riskpo and arm.grpo_trainer == "trl":
        config: Any = GRPOConfig(**common)
        trainer_cls: Any = GRPOTrainer
        trainer_name, estimator, ratio_level, center, bundle_size = (
            "trl.GRPOTrainer", "grpo (TRL)", "token", False, 1
        )
    elif is_riskpo:
        config = RiskPOConfig(
            **common,
            estimator=options["estimator"],
            bundle_size=options["bundle_size"],
            risk_alpha=options["alpha"],
            risk_beta=options["beta"],
            omega=options["omega"],
            form=options["form"],
            w_mix=options["w_mix"],
            natural_baseline=options["natural_baseline"],
            normalize=options["normalize"],
            center=options["center"],
            credit=options["credit"],
            score=options["score"],
            quantile_mode=options["quantile"],
            tracker_gamma=options["tracker_gamma"],
            shuffle_bundles=options["shuffle_bundles"],
            ratio_level=options["ratio_level"],
            dual_clip=dual_clip,
            bundle_seed=settings.seed,
        )
        trainer_cls = RiskPOTrainer
        trainer_name = "riskfast.RiskPOTrainer"
        estimator = f"{options['estimator']} ({options['form']})"
        ratio_level, center, bundle_size = (
            options["ratio_level"], options["center"], options["bundle_size"]
        )
    else:
        config = RiskPOConfig(**common, estimator="grpo", bundle_size=1, ratio_level="token",
                              dual_clip=dual_clip, bundle_seed=settings.seed)
        trainer_cls = RiskPOTrainer
        trainer_name = "riskfast.RiskPOTrainer(estimator='grpo')"
        estimator, ratio_level, center, bundle_size = "grpo", "token", False, 1

    rewards: list[float] = []
    train_entropy: list[float] = []
    last_time = [time.perf_counter()]
    evaluations: dict[int, Any] = {}

    pending: dict[str, Any] = {}
    per_update: dict[str, list[float]] = {"entropy": [], "clip_frac": []}

    class Recorder(TrainerCallback):
        """One ``train`` line per RL step: the rollout's reward and advantage statistics
        (logged by its first optimizer step) with the entropy and clip fraction averaged
        over all its ``updates_per_rollout`` optimizer steps (the first one's ratio is 1)."""

        def on_log(self, _args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if not logs:
                return
            if "reward" in logs:
                pending.clear()
                pending.update({
                    "kind": "train",
                    "method": arm.name,
                    "step": math.ceil(int(state.global_step) / updates),
                    "reward_mean": logs.get("reward"),
                    "reward_std": logs.get("reward_std"),
                    "quantile_alpha": logs.get("riskpo/quantile_alpha"),
                    "quantile_beta": logs.get("riskpo/quantile_beta"),
                    "advantage_mean": logs.get("riskpo/advantage_mean"),
                    "advantage_std": logs.get("riskpo/advantage_std"),
                    "zero_advantage_bundle_frac": logs.get(
                        "riskpo/zero_advantage_bundle_frac", logs.get("frac_reward_zero_std")
                    ),
                    "completion_length": logs.get("completions/mean_length"),
                })
                per_update["entropy"].clear()
                per_update["clip_frac"].clear()
            for key, name in (("entropy", "entropy"), ("clip_frac", "clip_ratio/region_mean")):
                if logs.get(name) is not None:
                    per_update[key].append(float(logs[name]))
            if not pending or int(state.global_step) % updates:
                return
            now = time.perf_counter()
            line = {
                **pending,
                "entropy": _mean(per_update["entropy"]),
                "clip_frac": _mean(per_update["clip_frac"]),
                "step_seconds": now - last_time[0],
                "elapsed_seconds": now - t0,
            }
            pending.clear()
            last_time[0] = now
            rewards.append(float(line["reward_mean"]))
            if line["entropy"] is not None:
                train_entropy.append(float(line["entropy"]))
            record(line)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(phase=arm.name, reward=f"{line['reward_mean']:.2f}",
                                     entropy=f"{(line['entropy'] or 0):.2f}")

        def on_step_end(self, _args: Any, state: Any, control: Any, **kw: Any) -> None:
            if int(state.global_step) % updates:
                return
            step = int(state.global_step) // updates
            if step % settings.eval_every == 0 and step < settings.steps:
                evaluations[step] = evaluate_at(step, kw["model"])
                last_time[0] = time.perf_counter()

    started = time.perf_counter()
    evaluations[0] = evaluate_at(0, model)
    trainer = trainer_cls(
        model=model, reward_funcs=[exact_match_reward], args=config, train_dataset=dataset,
        processing_class=tokenizer, callbacks=[Recorder()],
    )
    trainer.remove_callback(PrinterCallback)  # the progress bar replaces TRL's log printing
    trainer.train()
    final = evaluate_at(settings.steps, trainer.model)
    window = max(1, min(20, len(rewards) // 5))
    result = {
        "final": final,
        "train_entropy_last": _mean(train_entropy[-window:]),
        "reward_first": _mean(rewards[:window]),
        "reward_last": _mean(rewards[-window:]),
        "steps": settings.steps,
        "learning_rate": arm.learning_rate,
        "center": center,
        "estimator": estimator,
        "trainer": trainer_name,
        "ratio_level": ratio_level,
        "bundle_size": bundle_size,
        "preset": arm.preset,
        "riskpo_options": {k: options[k] for k in RISKPO_KEYS} if is_riskpo else None,
        "training": {k: options[k] for k in TRAINING_KEYS},
        "seconds": time.perf_counter() - started,
    }
    return result, trainer.model


def demo_arms(args: argparse.Namespace) -> list[Arm]:
    """The demo's arms from resolved arguments (:func:`_resolve`)."""
    arms = {
        "grpo": Arm("grpo", "grpo", args.grpo_lr, args.options, None, args.grpo_trainer),
        "riskpo": Arm("riskpo", "riskpo", args.riskpo_lr, args.options, args.preset),
    }
    return [arms[m] for m in (METHODS if args.method == "both" else (args.method,))]


def machine_info(device: torch.device | None = None) -> dict[str, Any]:
    """What a result depends on besides the seed: CPU, threads, BLAS, library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    config = torch.__config__.show()
    blas = next((b for b in ("MKL", "OpenBLAS", "BLIS", "Accelerate") if f"BLAS_INFO={b.lower()}" in
                 config.replace(" ", "").lower() or f"USE_{b.upper()}=ON" in config), "unknown")
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        # the vector instruction set torch's CPU kernels dispatch to (AVX2, AVX512, ...):
        # another one changes float32 results in the last bits, hence the rollouts
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "blas": blas,
        "mkl": torch.backends.mkl.is_available(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "device": str(device) if device is not None else None,
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "MKL_CBWR",
                                            "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY",
                                            "ONEDNN_MAX_CPU_ISA", "ONEDNN_DEFAULT_FPMATH_MODE")
                if k in os.environ},
    }
    for name in ("transformers", "trl", "numpy"):
        try:
            module = __import__(name)
            info[name] = module.__version__
        except ImportError:  # pragma: no cover - the demo needs them
            pass
    return info


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


def train_set_text(config: dict[str, Any]) -> str:
    """`` (epochs over a fixed set of N training questions)``, or nothing when unset."""
    size = config.get("train_questions")
    if size is None:
        return ""
    epochs = config["steps"] * config["prompts_per_step"] / size
    return f" ({epochs:g} epochs over a fixed set of {size} training questions)"


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
    options = config["options"]
    riskpo = (
        f"RiskPO preset {config['preset']}: {options['estimator']} ({options['form']}), "
        f"B={options['bundle_size']}, alpha={options['alpha']}, beta={options['beta']}, "
        + (f"omega={options['omega']}" if options["form"] == "paper" else f"w_mix={options['w_mix']}")
        + f", credit {options['credit']}, {options['ratio_level']} ratio"
    )
    lines.append(
        f"held-out: {summary['task']['test_questions']} questions x {max(KS)} samples (temperature 1), "
        f"unbiased pass@k; {config['steps']} RL steps of {config['prompts_per_step']} prompts x "
        f"G={config['group_size']}{train_set_text(config)}, {options['updates_per_rollout']} update(s) per step; {riskpo}; "
        f"seed {config['seed']} (one seed: differences of a few points are within run-to-run "
        "noise; riskfast study compares over seeds)."
    )
    return "\n".join(lines)


def prepare_warm_start(
    args: argparse.Namespace,
    tokenizer: Any,
    device: torch.device,
    *,
    cache: Path | None,
    saves: Sequence[Path] = (),
    progress: Any = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any], bool]:
    """The supervised warm start of ``args.seed``: loaded from ``cache`` when its settings
    (:data:`WARM_START_KEYS`) match, else trained (and saved to ``cache`` and ``saves``).

    Returns ``(state_dict, log, reused)``.
    """
    model = build_model(tokenizer, args.model_size, seed=args.seed).to(device)
    warm_key = {k: getattr(args, k) for k in WARM_START_KEYS}
    cached = _load_warm_start(cache, warm_key)
    if cached:
        model.load_state_dict(cached["state"])
        warm_log = cached["log"]
    else:
        val_questions = sample_questions(100, "val", max_digits=args.max_digits, seed=args.seed,
                                         unique=True)
        warm_log = warm_start(
            model, tokenizer, steps=args.warm_steps, batch_size=args.warm_batch,
            lr=args.warm_lr, max_digits=args.max_digits, seed=args.seed,
            target=args.warm_target, val_questions=val_questions, progress=progress,
        )
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    saved = {"key": warm_key, "log": warm_log, "state": state}
    for path in {*saves, *([cache] if cache is not None and not cached else [])}:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(f"{path}.tmp")
        torch.save(saved, tmp)
        os.replace(tmp, path)
    return state, warm_log, bool(cached)


def evaluate_state(
    state: dict[str, torch.Tensor] | Any,
    tokenizer: Any,
    questions: Sequence[Any],
    *,
    model_size: str,
    max_digits: int,
    seed: int,
    device: torch.device,
) -> Evaluation:
    """Held-out pass@k and entropy of a state dict (or a model), on the demo's sampler."""
    if isinstance(state, dict):
        model = build_model(tokenizer, model_size, seed=seed).to(device)
        model.load_state_dict(state)
    else:
        model = state
    return evaluate(model, tokenizer, questions, num_samples=max(KS), ks=KS, seed=seed + 1000,
                    max_new_tokens=max_digits + 3)


def run_training(args: argparse.Namespace) -> dict[str, Any]:
    """Run the demo described in the module docstring; returns the summary dict.

    ``args`` is a namespace from a parser set up by :func:`add_train_arguments`.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = _resolve(args)
    settings = RunSettings(args.steps, args.prompts_per_step, args.group_size, args.max_digits,
                           args.model_size, args.seed, args.eval_every, args.train_questions)
    arms = demo_arms(args)
    for arm in arms:
        check_budget(settings, arm.options)
    # Fail before the warm start, not after it, when an optional dependency is missing.
    from ..integrations import trl as _trl  # noqa: F401 - raises a clear ImportError

    require_matplotlib(args.no_plot)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = _device(args.device)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    tokenizer = build_tokenizer()
    test_questions = sample_questions(args.eval_questions, "test", max_digits=args.max_digits,
                                      seed=args.seed, unique=True)
    warm_reusable = _load_warm_start(args.warm_start, {k: getattr(args, k) for k in WARM_START_KEYS})
    total = (0 if warm_reusable else args.warm_steps) + args.steps * len(arms)
    progress = _progress(total, enabled=True)
    writer = _JsonLines(out / "metrics.jsonl")
    try:
        start_state, warm_log, reused = prepare_warm_start(
            args, tokenizer, device, cache=args.warm_start, saves=[out / "warm_start.pt"],
            progress=progress,
        )
        warm_eval = evaluate_state(start_state, tokenizer, test_questions, model_size=args.model_size,
                                   max_digits=args.max_digits, seed=args.seed, device=device)
        warm_seconds = time.perf_counter() - t0
        results: dict[str, Any] = {}
        for arm in arms:

            def evaluate_at(step: int, model: Any, arm: Arm = arm) -> Evaluation:
                ev = evaluate_state(model, tokenizer, test_questions, model_size=args.model_size,
                                    max_digits=args.max_digits, seed=args.seed, device=device)
                writer.write({
                    "kind": "eval", "method": arm.name, "step": step,
                    "pass@k": {str(k): v for k, v in ev.pass_at.items()},
                    "entropy": ev.entropy, "elapsed_seconds": time.perf_counter() - t0,
                })
                return ev

            result, _ = train_arm(
                arm, settings, start_state, tokenizer, device, output_dir=out / arm.name / "trainer",
                evaluate_at=evaluate_at, record=writer.write, progress=progress, t0=t0,
            )
            final = result.pop("final")
            results[arm.name] = {**_eval_dict(final), **result}
    finally:
        writer.close()
        progress.close()

    summary: dict[str, Any] = {
        "config": {
            key: (str(value) if isinstance(value, Path) else value)
            for key, value in vars(args).items() if not callable(value)
        },
        "device": str(device),
        "environment": machine_info(device),
        "task": {
            "name": "reversed-digit addition",
            "levels": list(range(1, args.max_digits + 1)),
            "test_questions": len(test_questions),
            "samples_per_question": max(KS),
        },
        "warm_start": {
            **_eval_dict(warm_eval),
            "reused": reused,
            "steps": warm_log["steps"],
            "val_pass@1": warm_log["val_pass@1"],
            "seconds": warm_seconds,
        },
        "methods": results,
        "seconds": time.perf_counter() - t0,
    }
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
