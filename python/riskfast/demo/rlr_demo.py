"""``riskfast demo rlr``: RLR against DDPO, AlignProp and DRaFT on digits, nothing downloaded.

What it does, on the embedded defaults (CPU or CUDA):

1. pretrains (or loads from the cache, keyed by its settings) a tiny class-conditional
   ``UNet2DModel`` on the 8 x 8 handwritten digits inside scikit-learn, and a small
   digit classifier on the same images (:mod:`riskfast.demo.rlr_digits`);
2. the alignment task: the UNet sampled unconditionally (its "no class" label) draws
   any digit; the reward is the classifier's log-probability of one target digit
   (``--target``, default 3; differentiable), and the hit rate (the classifier's top
   class is the target; not differentiable) is reported beside it;
3. from that same start, trains LoRA adapters (r = 4 on the attention projections)
   with :class:`riskfast.rlr.RLRTrainer` for each method - ``rlr``, ``ddpo``,
   ``alignprop``, ``draft`` (``--dcot`` adds two RLR arms: the window restricted to
   the middle third of the chain, and that plus a DCoT prompt schedule whose coarse
   stage is conditioned on the target) - with the same seeds and the same budget of
   denoiser evaluations (``--budget``), each at its learning rate (``LEARNING_RATES``,
   tuned on a validation seed over a small grid: ``--lr-grid`` reruns the search);
4. evaluates a fixed set of samples (same noises for every method) at regular points
   of the budget: reward, hit rate, diversity (mean pairwise distance);
5. writes ``metrics.jsonl``, ``summary.json`` and ``report.png`` (reward against model
   evaluations per method, and samples before and after each) into ``--out`` and
   prints a table.

Several seeds (``--seeds 0 1 2``) give the mean and spread per method.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ._plot import require_matplotlib
from .rlr_digits import (
    NULL_CLASS,
    DigitClassifier,
    DigitSetup,
    build_unet,
    load_digit_images,
    nearest_data_distance,
    pairwise_diversity,
    pretrained,
    target_hit,
    target_log_prob,
)

METHODS = ("rlr", "ddpo", "alignprop", "draft")
DCOT_METHODS = ("rlr-window", "rlr-dcot")
NON_DIFFERENTIABLE_METHODS = ("rlr", "ddpo", *DCOT_METHODS)
"""The methods that train on a reward without a gradient (``--reward hit``)."""
ALL_METHODS = METHODS + DCOT_METHODS

LEARNING_RATES = {
    "rlr": 1e-2,
    "ddpo": 1e-2,
    "alignprop": 1e-2,
    "draft": 1e-2,
    "rlr-window": 1e-2,
    "rlr-dcot": 1e-2,
}
"""Each method's learning rate (AdamW on the LoRA adapters) on the defaults, tuned per
method on the grid ``LR_GRID`` (3e-2 added where the best was 1e-2 and the criterion
not saturated) with ``--lr-grid ... --seeds 100``: a validation seed, whose training
noises and evaluation set are not those of the reported seeds 0-2. Criterion: the
reward's area under the curve (``reward_auc``, the mean evaluation log-probability over
the evaluation points), not the final value. The DCoT arms take ``rlr``'s rate, so that
they differ from it only in the window range and the prompts. The grid and its outcome:
benchmarks/RESULTS.md, "RLR demo (issue 14)"."""

LR_GRID = (1e-3, 3e-3, 1e-2)

SUMMARY_METHOD_FIELDS = (
    "final_reward_mean",
    "reward_auc",
    "final_reward_std",
    "final_hit_rate",
    "initial_reward_mean",
    "initial_hit_rate",
    "reward_per_model_evaluation",
    "diversity_initial",
    "diversity_final",
    "data_distance_initial",
    "data_distance_final",
    "peak_memory_mib",
    "model_evaluations",
    "steps",
    "learning_rate",
    "seconds",
    "per_seed",
)
"""Fields of each entry of ``summary["methods"]`` (means over seeds; ``*_std`` over the
evaluation samples, averaged over seeds; ``per_seed`` holds each seed's values).
``reward_auc``: the mean evaluation reward over the evaluation points after the start
(the area under the reward curve per unit of budget: how fast the reward rose), the
criterion of the learning-rate grid. Besides these, ``final_reward_seed_std`` and
``final_hit_rate_seed_std`` (std over seeds) and ``final_reward_mean_ci95``,
``final_hit_rate_ci95``, ``reward_per_model_evaluation_ci95`` (half-width of the 95%
t-interval of the mean over seeds; None for one seed). ``data_distance_*``: the mean L2 distance from each
evaluation sample to its nearest real digit (how far the samples left the data)."""

QUICK = {
    "budget": 2000,
    "batch_size": 4,
    "eval_samples": 16,
    "eval_points": 2,
    "setup": DigitSetup(block_out_channels=(16, 32), unet_steps=150, classifier_steps=150),
}
"""What ``--quick`` overrides: a smoke run in under 2 minutes, pretraining included."""


def add_rlr_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``riskfast demo rlr``."""
    add = parser.add_argument
    add(
        "--methods",
        nargs="+",
        choices=ALL_METHODS,
        default=None,
        help=f"methods to train (default {' '.join(METHODS)}; --dcot adds "
        f"{' '.join(DCOT_METHODS)})",
    )
    add(
        "--dcot",
        action="store_true",
        help="also train the DCoT arms (window restricted to the middle stage; plus a "
        "prompt schedule whose coarse stage is conditioned on the target)",
    )
    add("--seeds", nargs="+", type=int, default=[0], help="seeds (default 0)")
    add("--target", type=int, default=3, help="the digit the reward asks for (default 3)")
    add(
        "--budget",
        type=int,
        default=60_000,
        help="denoiser evaluations per method and seed (default 60000)",
    )
    add("--batch-size", type=int, default=8, help="starts per gradient estimate (default 8)")
    add("--steps", type=int, default=10, help="sampling steps T (default 10)")
    add(
        "--lr",
        nargs="+",
        default=[],
        metavar="METHOD=LR",
        help="override learning rates, e.g. --lr rlr=1e-3 ddpo=3e-3",
    )
    add(
        "--lr-grid",
        nargs="+",
        type=float,
        default=None,
        metavar="LR",
        help=f"run every method at each of these learning rates (e.g. "
        f"{' '.join(f'{v:g}' for v in LR_GRID)}) and report the best per method by "
        "reward_auc (the mean evaluation reward over the curve); tune on a seed you do "
        "not report (the defaults were tuned with --seeds 100)",
    )
    add(
        "--reward",
        choices=("logprob", "hit"),
        default="logprob",
        help="the training reward: the classifier's log-probability of the target "
        "(differentiable; default) or its hit, 1 when the top class is the target (no "
        "gradient: rlr with fo_steps=0 and ddpo only); both are evaluated either way",
    )
    add(
        "--rest",
        choices=("zo", "lr", "none"),
        default="lr",
        help="rlr's estimator for the steps outside FO and the window (default lr)",
    )
    add("--eval-samples", type=int, default=128, help="fixed evaluation samples (default 128)")
    add(
        "--eval-points",
        type=int,
        default=8,
        help="evaluations spread over the budget, besides the start (default 8)",
    )
    add(
        "--out",
        type=Path,
        default=Path("riskfast_out/demo_rlr"),
        help="output folder (default riskfast_out/demo_rlr)",
    )
    add(
        "--cache-dir",
        type=Path,
        default=None,
        help="where the pretrained UNet and classifier are cached (default "
        "~/.cache/riskfast/rlr_digits)",
    )
    add("--device", default="cpu", help="cpu (default) or cuda")
    add(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: the run is many small calls)",
    )
    add("--no-plot", action="store_true", help="skip report.png")
    add(
        "--quick",
        action="store_true",
        help="a smoke run in under 2 minutes: "
        + ", ".join(f"{k}={v}" for k, v in QUICK.items() if k != "setup")
        + ", a smaller UNet "
        "pretrained for 150 steps",
    )


def _own_options() -> dict[str, Any]:
    parser = argparse.ArgumentParser()
    add_rlr_demo_arguments(parser)
    return vars(parser.parse_args([]))


def _resolve(args: argparse.Namespace) -> argparse.Namespace:
    # Only this demo's options (the CLI's namespace also carries the RiskPO demo's).
    args = argparse.Namespace(
        **{key: getattr(args, key, default) for key, default in _own_options().items()}
    )
    args.setup = DigitSetup()
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    if args.methods is None:
        base = METHODS if args.reward == "logprob" else NON_DIFFERENTIABLE_METHODS
        args.methods = list(base) + (list(DCOT_METHODS) if args.dcot else [])
    if args.reward == "hit":
        needs_gradient = [m for m in args.methods if m not in NON_DIFFERENTIABLE_METHODS]
        if needs_gradient:
            raise ValueError(
                f"methods: {needs_gradient} backpropagate the reward, and --reward hit has no "
                "gradient (rlr runs with fo_steps=0 on it; ddpo needs none)"
            )
    for name in ("budget", "batch_size", "steps", "eval_samples", "eval_points"):
        if getattr(args, name) < 1:
            raise ValueError(f"{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    if args.steps < 4:
        raise ValueError(f"steps: RLR's window needs T >= 4 here, got {args.steps}")
    if not 0 <= args.target <= 9:
        raise ValueError(f"target: expected a digit 0..9, got {args.target}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"threads: must be >= 1, got {args.threads}")
    rates = dict(LEARNING_RATES)
    for item in args.lr:
        method, _, value = item.partition("=")
        if method not in ALL_METHODS:
            raise ValueError(f"lr: unknown method {method!r} in {item!r}")
        try:
            rates[method] = float(value)
        except ValueError:
            raise ValueError(f"lr: expected METHOD=LR, got {item!r}") from None
        if not rates[method] > 0:
            raise ValueError(f"lr: must be > 0, got {item!r}")
    args.learning_rates = rates
    if args.lr_grid is not None and not all(v > 0 for v in args.lr_grid):
        raise ValueError(f"lr-grid: learning rates must be > 0, got {args.lr_grid}")
    return args


def _scheduler(num_steps: int) -> Any:
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        timestep_spacing="trailing",
        set_alpha_to_one=False,
        clip_sample=True,
    )
    scheduler.set_timesteps(num_steps)
    return scheduler


def _trainer_config(method: str, args: argparse.Namespace, seed: int, lr: float) -> Any:
    from riskfast.rlr import RLRConfig, TrainerConfig

    estimator = {"rlr-window": "rlr", "rlr-dcot": "rlr"}.get(method, method)
    options: dict[str, Any] = {"estimator": estimator}
    if estimator == "rlr":
        options.update(rest=args.rest, fo_steps=1 if args.reward == "logprob" else 0, window=2)
    return TrainerConfig(
        rlr=RLRConfig(**options),
        max_steps=10**9,
        max_model_evaluations=args.budget,
        learning_rate=lr,
        batch_size=args.batch_size,
        max_grad_norm=1.0,
        seed=seed,
        num_inference_steps=args.steps,
        finetune="lora",
        lora_rank=4,
        ddpo_minibatches=2,
        eval_samples=args.eval_samples,
        progress=False,
        report_to="none",
        cpu=args.device == "cpu",
    )


def _status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _release_free_memory() -> None:
    """Hand glibc's free heap pages back to the OS (``malloc_trim``), so that memory a
    previous run freed does not hide this run's peak; a no-op where that is unavailable."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _PeakMemory:
    """Peak extra memory of a block: CUDA's allocator peak, or on Linux the resident set's
    high-water mark (reset through ``/proc/self/clear_refs``) minus the resident set before,
    after the free heap pages are returned to the OS (``malloc_trim``)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        else:
            _release_free_memory()
            try:
                with open("/proc/self/clear_refs", "w") as handle:
                    handle.write("5")
            except OSError:
                pass
            self.before = _status_bytes("VmRSS")

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.before
        else:
            high = _status_bytes("VmHWM")
            self.peak = None if high is None or self.before is None else high - self.before

    @property
    def mib(self) -> float | None:
        return None if self.peak is None else max(self.peak, 0) / 2**20


def _run_method(
    method: str,
    seed: int,
    lr: float,
    args: argparse.Namespace,
    weights: dict[str, Any],
    classifier: DigitClassifier,
    accelerator: Any,
    writer: Any,
    progress: Any,
    tag: str = "",
) -> dict[str, Any]:
    from riskfast.rlr import DCoT, RLRTrainer

    device = accelerator.device
    data = load_digit_images()[0]
    unet = build_unet(args.setup.block_out_channels)
    unet.load_state_dict(weights)
    target = args.target

    def log_prob(images: torch.Tensor, prompts: Any) -> torch.Tensor:
        return target_log_prob(classifier, images, torch.full((images.shape[0],), target))

    def hit(images: torch.Tensor, prompts: Any) -> torch.Tensor:
        return target_hit(classifier, images, torch.full((images.shape[0],), target))

    reward = log_prob if args.reward == "logprob" else hit

    dcot = None
    if method in DCOT_METHODS:
        coarse = [target] if method == "rlr-dcot" else [NULL_CLASS]
        dcot = DCoT(stages=[coarse, [NULL_CLASS], [NULL_CLASS]], window_stage=1)
    config = _trainer_config(method, args, seed, lr)
    trainer = RLRTrainer(
        unet,
        reward,
        config,
        scheduler=_scheduler(args.steps),
        class_labels=[NULL_CLASS],
        dcot=dcot,
        eval_metrics={"hit": hit, "log_prob": log_prob},
        accelerator=accelerator,
    )
    label = f"{method}{tag}"
    started = time.perf_counter()

    def evaluation() -> dict[str, Any]:
        result = trainer.evaluate()
        images = result.pop("images")
        record = {
            "kind": "eval",
            "method": label,
            "seed": seed,
            "learning_rate": lr,
            "step": trainer.step,
            "model_evaluations": trainer.model_evaluations,
            "reward_mean": result["eval/log_prob"],
            "reward_std": result["eval/log_prob_std"],
            "hit_rate": result["eval/hit"],
            "diversity": pairwise_diversity(images),
            "data_distance": nearest_data_distance(images, data),
            "elapsed_seconds": time.perf_counter() - started,
        }
        writer(record)
        return {**record, "images": images.cpu()}

    first = evaluation()
    curve: list[float] = []
    every = args.budget / args.eval_points
    next_eval = every
    counted = 0
    memory = _PeakMemory(device)
    with memory:
        while not trainer.budget_spent():
            metrics = trainer.training_step()
            writer(
                {
                    "kind": "train",
                    "method": label,
                    "seed": seed,
                    "step": trainer.step,
                    "model_evaluations": trainer.model_evaluations,
                    "reward_mean": metrics["reward_mean"],
                    "reward_std": metrics["reward_std"],
                    "grad_norm": metrics.get("grad_norm"),
                    "step_seconds": metrics["step_seconds"],
                }
            )
            if progress is not None:
                spent = min(trainer.model_evaluations, args.budget)
                progress.update(spent - counted)
                counted = spent
                progress.set_postfix(
                    method=label, seed=seed, reward=f"{metrics['reward_mean']:.2f}"
                )
            if trainer.model_evaluations >= next_eval and not trainer.budget_spent():
                curve.append(evaluation()["reward_mean"])
                next_eval += every
    last = evaluation()
    curve.append(last["reward_mean"])
    spent = trainer.model_evaluations
    return {
        "initial_reward_mean": first["reward_mean"],
        "initial_hit_rate": first["hit_rate"],
        "final_reward_mean": last["reward_mean"],
        "final_reward_std": last["reward_std"],
        "final_hit_rate": last["hit_rate"],
        "reward_auc": sum(curve) / len(curve),
        "reward_per_model_evaluation": (last["reward_mean"] - first["reward_mean"]) / spent,
        "diversity_initial": first["diversity"],
        "diversity_final": last["diversity"],
        "data_distance_initial": first["data_distance"],
        "data_distance_final": last["data_distance"],
        "peak_memory_mib": memory.mib,
        "model_evaluations": spent,
        "steps": trainer.step,
        "learning_rate": lr,
        "seconds": time.perf_counter() - started,
        "images_initial": first["images"],
        "images_final": last["images"],
    }


def _mean(values: Sequence[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _spread(values: Sequence[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.stdev(values) if len(values) > 1 else None


# Student's t quantile 0.975 for 1..30 degrees of freedom (beyond: the normal's 1.96).
_T975 = (
    12.70620, 4.30265, 3.18245, 2.77645, 2.57058, 2.44691, 2.36462, 2.30600, 2.26216, 2.22814,
    2.20099, 2.17881, 2.16037, 2.14479, 2.13145, 2.11991, 2.10982, 2.10092, 2.09302, 2.08596,
    2.07961, 2.07387, 2.06866, 2.06390, 2.05954, 2.05553, 2.05183, 2.04841, 2.04523, 2.04227,
)  # fmt: skip


def _ci95(values: Sequence[float | None]) -> float | None:
    """Half-width of the 95% t-interval of the mean over seeds (None for one seed)."""
    values = [v for v in values if v is not None]
    if len(values) < 2:
        return None
    df = len(values) - 1
    quantile = _T975[df - 1] if df <= len(_T975) else 1.96
    return quantile * statistics.stdev(values) / math.sqrt(len(values))


def _aggregate(runs: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Means over seeds, the spread of the seeds' final reward and hit rate (standard
    deviation, and the half-width of the mean's 95% t-interval), per-seed rows."""
    rows = [runs[s] for s in sorted(runs)]
    keep = [f for f in SUMMARY_METHOD_FIELDS if f != "per_seed"]
    out: dict[str, Any] = {field: _mean([r[field] for r in rows]) for field in keep}
    for field in ("steps", "model_evaluations"):
        values = {r[field] for r in rows}
        if len(values) == 1:  # the same on every seed: keep the count an int
            out[field] = values.pop()
    out["final_reward_seed_std"] = _spread([r["final_reward_mean"] for r in rows])
    out["final_hit_rate_seed_std"] = _spread([r["final_hit_rate"] for r in rows])
    for field in ("final_reward_mean", "final_hit_rate", "reward_per_model_evaluation"):
        out[f"{field}_ci95"] = _ci95([r[field] for r in rows])
    out["per_seed"] = {str(seed): {f: runs[seed][f] for f in keep} for seed in sorted(runs)}
    return out


def _plot(path: Path, metrics_path: Path, summary: dict[str, Any], images: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, dict[int, list[tuple[int, float, float]]]] = {}
    for line in metrics_path.read_text().splitlines():
        record = json.loads(line)
        if record["kind"] != "eval":
            continue
        curves.setdefault(record["method"], {}).setdefault(record["seed"], []).append(
            (record["model_evaluations"], record["reward_mean"], record["hit_rate"])
        )
    methods = list(summary["methods"])
    colors = dict(zip(methods, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 3))
    columns = len(methods) + 1
    fig = plt.figure(figsize=(max(12, 2.2 * columns), 9))
    grid = fig.add_gridspec(2, columns, height_ratios=(1.2, 1.0))
    for index, (key, title) in enumerate(
        ((1, "evaluation reward: log p(target)"), (2, "evaluation hit rate"))
    ):
        half = columns // 2
        ax = fig.add_subplot(grid[0, index * half : (index + 1) * half if index == 0 else columns])
        for method in methods:
            seeds = curves.get(method, {})
            for n, (seed, points) in enumerate(sorted(seeds.items())):
                xs = [p[0] for p in points]
                ys = [p[key] for p in points]
                ax.plot(
                    xs,
                    ys,
                    "o-",
                    ms=3,
                    color=colors[method],
                    alpha=0.85,
                    label=method if n == 0 else None,
                )
        ax.set(title=title, xlabel="denoiser evaluations (budget)")
        ax.legend(fontsize=8)

    def tile(batch: torch.Tensor, count: int = 16) -> Any:
        batch = batch[:count].clamp(-1, 1)
        side = math.ceil(math.sqrt(batch.shape[0]))
        canvas = -torch.ones(side * 9 - 1, side * 9 - 1)  # white gaps (gray_r)
        for i, image in enumerate(batch):
            r, c = divmod(i, side)
            canvas[r * 9 : r * 9 + 8, c * 9 : c * 9 + 8] = image[0]
        return canvas.numpy()

    ax = fig.add_subplot(grid[1, 0])
    ax.imshow(tile(images["start"]), cmap="gray_r", vmin=-1, vmax=1)
    ax.set_title("start (pretrained)", fontsize=9)
    ax.axis("off")
    for index, method in enumerate(methods, start=1):
        ax = fig.add_subplot(grid[1, index])
        ax.imshow(tile(images[method]), cmap="gray_r", vmin=-1, vmax=1)
        row = summary["methods"][method]
        ax.set_title(f"{method}\nhit {row['final_hit_rate']:.2f}", fontsize=9)
        ax.axis("off")
    config = summary["config"]
    fig.suptitle(
        f"Steering a digit diffusion model to the digit {config['target']}: "
        f"{config['budget']} denoiser evaluations per method, seeds {config['seeds']}",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_table(summary: dict[str, Any]) -> str:
    """The comparison as plain text (means over seeds; +- the seeds' standard deviation)."""

    def spread(value: float | None, digits: int) -> str:
        return "" if value is None else f"+-{value:.{digits}f}"

    head = (
        f"{'method':<12}{'lr':>7}{'steps':>7}{'log p(target) start->end':>27}{'':>8}"
        f"{'auc':>8}{'hit start->end':>16}{'':>6}{'diversity':>15}{'to data':>15}"
        f"{'peak MiB':>9}{'s':>6}"
    )
    lines = [head, "-" * len(head)]
    for method, row in summary["methods"].items():
        memory = row["peak_memory_mib"]
        lines.append(
            f"{method:<12}{row['learning_rate']:>7.0e}{row['steps']:>7.0f}"
            f"{row['initial_reward_mean']:>17.3f} -> {row['final_reward_mean']:>6.3f}"
            f"{spread(row['final_reward_seed_std'], 3):>8}{row['reward_auc']:>8.3f}"
            f"{row['initial_hit_rate']:>8.2f} -> {row['final_hit_rate']:>4.2f}"
            f"{spread(row['final_hit_rate_seed_std'], 2):>6}"
            f"{row['diversity_initial']:>7.2f} -> {row['diversity_final']:>4.2f}"
            f"{row['data_distance_initial']:>7.2f} -> {row['data_distance_final']:>4.2f}"
            f"{'' if memory is None else f'{memory:.0f}':>9}{row['seconds']:>6.0f}"
        )
    config = summary["config"]
    fo = "K = 1" if config["reward"] == "logprob" else "K = 0"
    lines.append(
        f"Training reward: {'log p(target)' if config['reward'] == 'logprob' else 'hit'} "
        f"(target digit {config['target']}); {config['budget']} denoiser evaluations per "
        f"method and seed; {config['batch_size']} starts per estimate, T = {config['steps']}, "
        f"LoRA r = 4; rlr rest={config['rest']}, {fo}, h = 2; seeds {config['seeds']}. "
        f"Evaluated on {config['eval_samples']} fixed samples: log p(target), hit (top class is "
        "the target), diversity (mean pairwise L2), to data (mean L2 to the nearest real "
        "digit); auc: mean log p(target) over the evaluation points; +-: std over seeds."
    )
    return "\n".join(lines)


def run_rlr_demo(args: argparse.Namespace) -> dict[str, Any]:
    """Run the demo of the module docstring; returns the summary dict."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = _resolve(args)
    try:
        import diffusers  # noqa: F401
        import peft  # noqa: F401
        import sklearn  # noqa: F401
    except ImportError as err:
        raise ImportError(
            f"the RLR demo needs diffusers, peft and scikit-learn ({err}); "
            "pip install 'riskfast[diffusion]'"
        ) from err
    require_matplotlib(args.no_plot)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device: {args.device!r} requested but CUDA is not available")
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> dict[str, Any]:
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    accelerator = Accelerator(cpu=args.device == "cpu")
    device = accelerator.device
    print(
        f"riskfast demo rlr: pretrained digit UNet and classifier (cache "
        f"{args.cache_dir or 'default'})",
        file=sys.stderr,
    )
    pre_bar = tqdm(
        total=args.setup.unet_steps,
        desc="pretraining the digit UNet",
        unit="step",
        dynamic_ncols=True,
        leave=False,
    )
    try:
        pre = pretrained(args.setup, args.cache_dir, progress=pre_bar)
    finally:
        pre_bar.close()
    classifier = DigitClassifier()
    classifier.load_state_dict(pre["classifier"])
    classifier.requires_grad_(False)
    classifier.to(device).eval()

    rates = {
        m: ([args.learning_rates[m]] if args.lr_grid is None else list(args.lr_grid))
        for m in args.methods
    }
    runs_total = sum(len(v) for v in rates.values()) * len(args.seeds)
    progress = tqdm(
        total=runs_total * args.budget,
        desc="riskfast demo rlr",
        unit="eval",
        mininterval=2.0,
        unit_scale=True,
        dynamic_ncols=True,
    )
    metrics_path = out / "metrics.jsonl"
    handle = metrics_path.open("w")

    def write(record: dict[str, Any]) -> None:
        handle.write(json.dumps(record) + "\n")
        handle.flush()

    results: dict[str, dict[int, dict[str, Any]]] = {}
    grid: dict[str, dict[str, Any]] = {}
    images: dict[str, torch.Tensor] = {}
    try:
        for method in args.methods:
            for lr in rates[method]:
                tag = "" if args.lr_grid is None else f"@{lr:g}"
                runs = {}
                for seed in args.seeds:
                    runs[seed] = _run_method(
                        method,
                        seed,
                        lr,
                        args,
                        pre["unet"],
                        classifier,
                        accelerator,
                        write,
                        progress,
                        tag,
                    )
                grid.setdefault(method, {})[f"{lr:g}"] = _aggregate(runs)
                if method not in results or (
                    _mean([r["reward_auc"] for r in runs.values()])
                    > _mean([r["reward_auc"] for r in results[method].values()])
                ):
                    results[method] = runs
    finally:
        handle.close()
        progress.close()

    first_seed = args.seeds[0]
    methods = {}
    for method, runs in results.items():
        methods[method] = _aggregate(runs)
        images[method] = runs[first_seed]["images_final"]
        if "start" not in images and method in METHODS:
            images["start"] = runs[first_seed]["images_initial"]
    if "start" not in images:
        images["start"] = next(iter(results.values()))[first_seed]["images_initial"]
    config = {
        key: (str(value) if isinstance(value, Path) else value)
        for key, value in vars(args).items()
        if key not in ("setup", "run", "lr") and not callable(value)
    }
    summary: dict[str, Any] = {
        "config": config,
        "setup": {
            **{k: v for k, v in vars(args.setup).items()},
            "unet_loss": pre["unet_loss"],
            "classifier_accuracy": pre["classifier_accuracy"],
            "pretraining_seconds": pre["seconds"],
            "cached": pre["cached"],
        },
        "device": str(device),
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
        },
        "methods": methods,
        "seconds": time.perf_counter() - t0,
    }
    if args.lr_grid is not None:
        summary["lr_grid"] = {
            method: {
                lr: {
                    "reward_auc": row["reward_auc"],
                    "final_reward_mean": row["final_reward_mean"],
                    "final_hit_rate": row["final_hit_rate"],
                }
                for lr, row in by_lr.items()
            }
            for method, by_lr in grid.items()
        }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if not args.no_plot:
        _plot(out / "report.png", metrics_path, summary, images)
    print(format_table(summary))
    if args.lr_grid is not None:
        for method, by_lr in summary["lr_grid"].items():
            cells = ", ".join(
                f"{lr}: auc {row['reward_auc']:.3f}, final {row['final_reward_mean']:.3f}"
                for lr, row in by_lr.items()
            )
            print(f"lr grid {method}: {cells}")
    print(
        f"wrote {metrics_path}, {out / 'summary.json'}"
        + ("" if args.no_plot else f", {out / 'report.png'}")
        + f" in {summary['seconds']:.0f} s"
    )
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m riskfast.demo.rlr_demo``: the demo without the ``riskfast`` CLI."""
    parser = argparse.ArgumentParser(
        prog="python -m riskfast.demo.rlr_demo", description=__doc__.split("\n")[0]
    )
    add_rlr_demo_arguments(parser)
    run_rlr_demo(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
