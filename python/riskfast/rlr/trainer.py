"""Training a diffusers model on a reward with RLR or a baseline: :class:`RLRTrainer`.

One optimizer step of :class:`RLRTrainer` (``config.rlr.estimator``):

* ``rlr``, ``draft``, ``alignprop``, ``full``, ``zo`` (and registered estimators): per
  micro-batch, ``batch_size`` starts per process (noise ``x_T`` and prompts drawn for
  the union of the processes from the trainer's generator, the same on every rank, each
  rank taking its rows), one :func:`~riskfast.rlr.estimate_grad` call (``sync``: one
  process on the union); then ``.grad`` is averaged over the micro-batches and the
  processes (one all-reduce through ``accelerate``), clipped, and the optimizer steps.
* ``ddpo``: DDPO as its paper runs it (Black et al. 2023, "Training diffusion models
  with reinforcement learning"): sample ``batch_size x gradient_accumulation_steps``
  trajectories per process with their log-densities, normalise the rewards per prompt
  (a running buffer per prompt, :class:`PerPromptStatTracker`), then ``ddpo_epochs``
  PPO epochs over the stored trajectories in ``ddpo_minibatches`` minibatches: the
  clipped surrogate ``max(-A r, -A clip(r, 1 - eps, 1 + eps))`` (``eps =
  ddpo_clip_range``, ``A`` clipped to ``+-ddpo_adv_clip``) over the scored steps,
  averaged, one optimizer step per minibatch.

Models: a diffusers pipeline (``StableDiffusionPipeline``, ``DDPMPipeline``, anything with
``unet`` and ``scheduler``; ``vae``, ``text_encoder``, ``tokenizer`` used when present)
or a UNet with ``scheduler=``. The sampler needs a ``DDIMScheduler`` or
``DDPMScheduler``; any other scheduler (Stable Diffusion's PNDM) is replaced by a
``DDIMScheduler`` built from its config. Latent models decode ``x_0`` with the VAE
(``vae.decode(x_0 / scaling_factor)``, differentiable) before the reward.

Trainable weights: LoRA adapters on the attention projections (peft; ``finetune="lora"``,
default) or the whole UNet (``finetune="full"``); the VAE and text encoder stay frozen.
Rewards: ``reward_fn(images, prompts) -> [N]`` with ``images`` ``[N, C, H, W]`` (the
decoded images in ``[-1, 1]`` for latent models, ``x_0`` otherwise) and ``prompts`` the
chains' prompts (a list of strings, a ``[N]`` int64 tensor of class labels, or a
``[N]`` int64 tensor of indices into ``prompt_embeds``).

Several processes: launch with ``accelerate launch`` (or ``torchrun``); no model wrapper
is needed because the estimators differentiate the trainable tensors directly and the
trainer all-reduces their gradients itself.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .._checks import (
    checked_generator_state,
    require_bool,
    require_choice,
    require_finite,
    require_int,
    require_ndim,
    require_number,
    require_real,
    require_tensor,
    set_number,
)
from ..ops.transition import transition_log_prob
from .config import RLRConfig
from .estimators import RLRState, estimate_grad, window_starts
from .lora import (
    LORA_TARGET_MODULES,
    add_lora,
    save_lora_weights,
)
from .sampler import GuidedDenoiser, PromptSchedule, sample_chain

__all__ = [
    "FINETUNE_MODES",
    "MIXED_PRECISIONS",
    "REPORT_TO",
    "DCoT",
    "PerPromptStatTracker",
    "RLRTrainer",
    "TrainerConfig",
]

FINETUNE_MODES = ("lora", "full")
MIXED_PRECISIONS = ("no", "bf16")
REPORT_TO = ("auto", "none", "tensorboard", "wandb")
_SEED_HIGH = 2**62
_STATE_FILE = "trainer_state.pt"
_WEIGHTS_FILE = "unet_trainable.safetensors"


@dataclass(frozen=True)
class TrainerConfig:
    """Options of :class:`RLRTrainer` (validated at construction; errors name the field).

    Attributes:
        rlr: the estimator and its options (:class:`~riskfast.rlr.RLRConfig`); change
            ``rlr.estimator`` to compare ``"rlr"`` with ``"ddpo"``, ``"alignprop"``,
            ``"draft"``, ``"full"`` or ``"zo"`` under the same trainer.
        max_steps: optimizer steps of :meth:`RLRTrainer.train`.
        max_model_evaluations: stop :meth:`RLRTrainer.train` once this many denoiser
            evaluations (samples through the UNet, all processes) are spent (the
            budget of a fair comparison); ``None``: ``max_steps`` only.
        learning_rate, adam_betas, adam_eps, weight_decay: AdamW's.
        batch_size: starts (noises ``x_T``) per process per gradient estimate; RLR with
            ``rest="zo"`` runs each twice (antithetic pairs).
        gradient_accumulation_steps: estimates averaged per optimizer step (DDPO: the
            sampled batch is ``batch_size x gradient_accumulation_steps`` per process).
        max_grad_norm: gradient-norm clipping after the average (``None``: none).
        mixed_precision: ``"no"`` or ``"bf16"`` (autocast through accelerate; fp16 would
            need loss scaling, which the estimators do not do).
        seed: of the adapters' initialisation, the batches and every estimator draw.
        num_inference_steps: T, the sampling chain's steps.
        finetune: ``"lora"`` (adapters on ``lora_target_modules``, rank ``lora_rank``,
            alpha ``lora_alpha`` or the rank) or ``"full"``.
        ddpo_epochs, ddpo_minibatches, ddpo_clip_range, ddpo_adv_clip: DDPO's PPO
            epochs over a sampled batch, minibatches per epoch (one optimizer step
            each), ratio clip range (the paper's 1e-4) and advantage clip (5).
        ddpo_buffer_size, ddpo_min_count: the per-prompt reward statistics (DDPO's
            tracker: the last ``buffer_size`` rewards per prompt; the whole batch's
            mean and std until a prompt has ``min_count``).
        eval_samples, eval_every: a fixed evaluation set (noises, prompts and step
            noises drawn once from ``seed``) sampled every ``eval_every`` steps and at
            the start and end of :meth:`RLRTrainer.train` (0: never).
        log_every: steps between ``metrics.jsonl`` lines (and tracker logs).
        checkpoint_every: steps between checkpoints in ``output_dir`` (0: none).
        output_dir: where ``metrics.jsonl``, checkpoints and the final adapters go
            (``None``: nothing is written).
        report_to: ``"auto"`` (TensorBoard when installed; W&B when installed and
            ``WANDB_API_KEY`` or ``WANDB_MODE`` is set), ``"none"``, ``"tensorboard"``
            or ``"wandb"``; ``metrics.jsonl`` is always written.
        progress: a progress bar with the reward (main process).
        cpu: run on the CPU even when CUDA is present.
    """

    rlr: RLRConfig = field(default_factory=RLRConfig)
    max_steps: int = 100
    max_model_evaluations: int | None = None
    learning_rate: float = 1e-4
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "no"
    seed: int = 0
    num_inference_steps: int = 10
    finetune: str = "lora"
    lora_rank: int = 4
    lora_alpha: float | None = None
    lora_target_modules: tuple[str, ...] = LORA_TARGET_MODULES
    ddpo_epochs: int = 1
    ddpo_minibatches: int = 1
    ddpo_clip_range: float = 1e-4
    ddpo_adv_clip: float = 5.0
    ddpo_buffer_size: int = 32
    ddpo_min_count: int = 16
    eval_samples: int = 0
    eval_every: int = 0
    log_every: int = 1
    checkpoint_every: int = 0
    output_dir: str | None = None
    report_to: str = "auto"
    progress: bool = True
    cpu: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.rlr, RLRConfig):
            raise TypeError(f"rlr: expected an RLRConfig, got {type(self.rlr).__name__}")
        require_int("max_steps", self.max_steps, low=0)
        if self.max_model_evaluations is not None:
            require_int("max_model_evaluations", self.max_model_evaluations, low=1)
        set_number(self, "learning_rate", low=0.0)
        betas = self.adam_betas
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"adam_betas: expected a pair, got {betas!r}")
        for i, beta in enumerate(betas):
            require_number(f"adam_betas[{i}]", beta, low=0.0, high=1.0, high_open=True)
        object.__setattr__(self, "adam_betas", (float(betas[0]), float(betas[1])))
        set_number(self, "adam_eps", low=0.0, low_open=True)
        set_number(self, "weight_decay", low=0.0)
        require_int("batch_size", self.batch_size, low=1)
        require_int("gradient_accumulation_steps", self.gradient_accumulation_steps, low=1)
        if self.max_grad_norm is not None:
            set_number(self, "max_grad_norm", low=0.0, low_open=True)
        require_choice("mixed_precision", self.mixed_precision, MIXED_PRECISIONS)
        require_int("seed", self.seed, low=0)
        require_int("num_inference_steps", self.num_inference_steps, low=1)
        require_choice("finetune", self.finetune, FINETUNE_MODES)
        require_int("lora_rank", self.lora_rank, low=1)
        if self.lora_alpha is not None:
            set_number(self, "lora_alpha", low=0.0, low_open=True)
        targets = self.lora_target_modules
        if isinstance(targets, str) or not all(isinstance(t, str) for t in targets) or not targets:
            raise TypeError("lora_target_modules: expected a non-empty sequence of module names")
        object.__setattr__(self, "lora_target_modules", tuple(targets))
        require_int("ddpo_epochs", self.ddpo_epochs, low=1)
        require_int("ddpo_minibatches", self.ddpo_minibatches, low=1)
        set_number(self, "ddpo_clip_range", low=0.0, low_open=True)
        set_number(self, "ddpo_adv_clip", low=0.0, low_open=True)
        require_int("ddpo_buffer_size", self.ddpo_buffer_size, low=1)
        require_int("ddpo_min_count", self.ddpo_min_count, low=1)
        require_int("eval_samples", self.eval_samples, low=0)
        require_int("eval_every", self.eval_every, low=0)
        require_int("log_every", self.log_every, low=1)
        require_int("checkpoint_every", self.checkpoint_every, low=0)
        if self.output_dir is not None and not isinstance(self.output_dir, (str, os.PathLike)):
            raise TypeError(f"output_dir: expected a path, got {type(self.output_dir).__name__}")
        require_choice("report_to", self.report_to, REPORT_TO)
        require_bool("progress", self.progress)
        require_bool("cpu", self.cpu)
        if self.rlr.estimator == "ddpo":
            samples = self.batch_size * self.gradient_accumulation_steps
            if samples < self.ddpo_minibatches:
                raise ValueError(
                    f"ddpo_minibatches: {self.ddpo_minibatches} minibatches of "
                    f"{samples} sampled trajectories per process"
                )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["rlr"] = self.rlr.to_dict()
        return out


class DCoT:
    """Diffusive Chain-of-Thought for the trainer: a prompt per stage, a window stage.

    Args:
        stages: per stage (nearest the noise first), the prompt pool the chains use in
            that stage, aligned with the trainer's pool: a chain given prompt ``i`` is
            conditioned on ``stages[k][i]`` during stage ``k``. Each pool is of the
            trainer's kind (strings, ``[P, L, D]`` embeddings, or class labels).
        boundaries: fractions of the chain where stages change (default equal parts,
            :class:`~riskfast.rlr.PromptSchedule`).
        window_stage: restrict RLR's window start ``j`` to this stage's steps (spec:
            the estimator stays unbiased for any fixed range); ``None`` leaves
            ``rlr.window_start`` as configured.
    """

    def __init__(
        self,
        stages: Sequence[Any],
        boundaries: Sequence[float] | None = None,
        window_stage: int | None = None,
    ) -> None:
        if isinstance(stages, (str, Mapping)) or not isinstance(stages, Sequence) or not stages:
            raise TypeError("stages: expected a non-empty sequence of prompt pools")
        # PromptSchedule validates the boundaries against the stage count.
        PromptSchedule([{} for _ in stages], boundaries)
        if window_stage is not None:
            require_int("window_stage", window_stage, low=0)
            if window_stage >= len(stages):
                raise ValueError(
                    f"window_stage: expected a stage index below {len(stages)}, got {window_stage}"
                )
        self.stages = list(stages)
        self.boundaries = None if boundaries is None else list(boundaries)
        self.window_stage = window_stage

    def window_range(self, num_steps: int, fo_steps: int, window: int) -> tuple[int, int]:
        """``(a, b)``: window starts within the window stage (and the allowed range)."""
        if self.window_stage is None:
            raise ValueError("window_stage: is None, so there is no window range to give")
        schedule = PromptSchedule([{} for _ in self.stages], self.boundaries)
        low, high = schedule.stage_steps(num_steps)[self.window_stage]
        if low > high:
            raise ValueError(
                f"window_stage: stage {self.window_stage} has none of the {num_steps} steps"
            )
        allowed = window_starts(num_steps, fo_steps, window, "uniform")
        a, b = max(low, allowed[0]), min(high, allowed[-1])
        if a > b:
            raise ValueError(
                f"window_stage: stage {self.window_stage} (steps {low}..{high}) holds no "
                f"window start in {allowed[0]}..{allowed[-1]} (fo_steps={fo_steps}, "
                f"window={window}, {num_steps} steps)"
            )
        return a, b


class PerPromptStatTracker:
    """DDPO's per-prompt reward normalisation: ``A = (R - mean_p) / (std_p + 1e-6)``.

    ``mean_p``, ``std_p``: of the last ``buffer_size`` rewards of prompt ``p`` (this batch
    included), or of the whole batch while ``p`` has fewer than ``min_count``.
    """

    def __init__(self, buffer_size: int, min_count: int) -> None:
        self.buffer_size = require_int("buffer_size", buffer_size, low=1)
        self.min_count = require_int("min_count", min_count, low=1)
        self.buffers: dict[Any, deque] = {}

    def update(self, keys: Sequence[Any], rewards: torch.Tensor) -> torch.Tensor:
        """Push ``rewards[N]`` (finite) under their prompt ``keys`` (``N`` hashables) and
        return the advantages; on bad input raises before any buffer changes."""
        rewards = require_tensor("rewards", rewards)
        require_real("rewards", rewards)
        require_ndim("rewards", rewards, 1, "[N]")
        require_finite("rewards", rewards)
        if isinstance(keys, (str, bytes)) or not isinstance(keys, Sequence):
            raise TypeError(f"keys: expected a sequence of prompt keys, got {type(keys).__name__}")
        rewards = rewards.detach().double().cpu()
        if len(keys) != rewards.shape[0]:
            raise ValueError(f"keys: expected {rewards.shape[0]} keys, got {len(keys)}")
        try:
            dict.fromkeys(keys)
        except TypeError as err:
            raise TypeError(f"keys: every key must be hashable ({err})") from None
        advantages = torch.empty_like(rewards)
        batch_mean, batch_std = rewards.mean(), rewards.std(unbiased=False)
        for key in dict.fromkeys(keys):
            rows = torch.tensor([k == key for k in keys])
            buffer = self.buffers.setdefault(key, deque(maxlen=self.buffer_size))
            buffer.extend(rewards[rows].tolist())
            if len(buffer) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                values = torch.tensor(list(buffer), dtype=torch.float64)
                mean, std = values.mean(), values.std(unbiased=False)
            advantages[rows] = (rewards[rows] - mean) / (std + 1e-6)
        return advantages

    def state_dict(self) -> dict[str, Any]:
        return {"buffers": [(k, list(v)) for k, v in self.buffers.items()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; checks all of it before replacing anything
        (``ValueError``/``TypeError`` naming ``state``)."""
        if not isinstance(state, dict) or not isinstance(state.get("buffers"), (list, tuple)):
            raise TypeError("state: expected {'buffers': [(key, [reward, ...]), ...]}")
        buffers: dict[Any, deque] = {}
        for entry in state["buffers"]:
            if not isinstance(entry, (list, tuple)) or len(entry) != 2:
                raise TypeError(f"state: buffer entry {entry!r} is not a (key, rewards) pair")
            key, values = entry
            try:
                duplicate = key in buffers
            except TypeError:
                raise TypeError(f"state: key {key!r} is not hashable") from None
            if duplicate:
                raise ValueError(f"state: key {key!r} appears twice")
            if not isinstance(values, (list, tuple)) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                for v in values
            ):
                raise ValueError(f"state: the rewards of key {key!r} are not finite numbers")
            buffers[key] = deque((float(v) for v in values), maxlen=self.buffer_size)
        self.buffers = buffers


class _AccelerateSync:
    """:class:`~riskfast.rlr.GradientSync` over ``accelerate`` (its ``gather``)."""

    def __init__(self, accelerator: Any) -> None:
        self.accelerator = accelerator
        self.rank = int(accelerator.process_index)
        self.world_size = int(accelerator.num_processes)

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.gather(tensor.contiguous())


def _prompt_kind(prompts: Any, prompt_embeds: Any, class_labels: Any) -> str | None:
    given = [
        name
        for name, value in (
            ("prompts", prompts),
            ("prompt_embeds", prompt_embeds),
            ("class_labels", class_labels),
        )
        if value is not None
    ]
    if len(given) > 1:
        raise ValueError(f"{given[1]}: give one of prompts, prompt_embeds, class_labels")
    return given[0] if given else None


class RLRTrainer:
    """Reward fine-tuning of a diffusers model with RLR or a baseline estimator.

    Args:
        model: a pipeline (``unet`` and ``scheduler`` attributes; ``vae``,
            ``text_encoder``, ``tokenizer`` used when present) or a UNet.
        reward_fn: ``reward_fn(images, prompts) -> [N]`` (module docstring);
            differentiable for the first-order estimators.
        config: :class:`TrainerConfig`.
        scheduler: required with a bare UNet; overrides the pipeline's otherwise.
        vae: a latent model's decoder (overrides the pipeline's).
        text_encoder, tokenizer: with a bare UNet, the text encoder (e.g. a
            ``CLIPTextModel``) and its tokenizer that encode string ``prompts`` as Stable
            Diffusion's ``encode_prompt`` does (padded to ``tokenizer.model_max_length``,
            the encoder's last hidden state); give both or neither. A pipeline uses its
            own ``encode_prompt``.
        prompts: a list of strings (encoded once by the text encoder), or
        prompt_embeds: ``[P, L, D]`` text embeddings (``encoder_hidden_states``), or
        class_labels: ``[P]`` class ids (a ``UNet2DModel`` with class embeddings); the
            pool from which every chain draws its prompt uniformly. None of them: an
            unconditional model.
        negative_prompt_embeds: ``[L, D]`` (or ``[1, L, D]``) unconditioned embeddings,
        uncond_class_label: or the class id of "no class", for classifier-free guidance
            (``rlr.guidance_scale != 1``).
        dcot: a :class:`DCoT` prompt schedule.
        eval_metrics: ``{name: fn(images, prompts) -> [E]}`` logged on the evaluation
            set besides the reward (e.g. a non-differentiable hit rate).
        accelerator: an ``accelerate.Accelerator`` to use (default: one made from the
            config: ``cpu``, ``mixed_precision``, trackers).

    Attributes: ``unet``, ``scheduler``, ``accelerator``, ``optimizer``,
    ``trainable_parameters``, ``step`` (optimizer steps taken), ``model_evaluations``
    (denoiser evaluations spent, all processes), ``history`` (logged records).
    """

    def __init__(
        self,
        model: Any,
        reward_fn: Callable[[torch.Tensor, Any], torch.Tensor],
        config: TrainerConfig | None = None,
        *,
        scheduler: Any = None,
        vae: Any = None,
        text_encoder: Any = None,
        tokenizer: Any = None,
        prompts: Sequence[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        class_labels: Sequence[int] | torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        uncond_class_label: int | None = None,
        dcot: DCoT | None = None,
        eval_metrics: Mapping[str, Callable[[torch.Tensor, Any], torch.Tensor]] | None = None,
        accelerator: Any = None,
    ) -> None:
        config = TrainerConfig() if config is None else config
        if not isinstance(config, TrainerConfig):
            raise TypeError(f"config: expected a TrainerConfig, got {type(config).__name__}")
        if not callable(reward_fn):
            raise TypeError(f"reward_fn: expected a callable, got {type(reward_fn).__name__}")
        if dcot is not None and not isinstance(dcot, DCoT):
            raise TypeError(f"dcot: expected a DCoT, got {type(dcot).__name__}")
        eval_metrics = dict(eval_metrics or {})
        for name, fn in eval_metrics.items():
            if not isinstance(name, str) or not callable(fn):
                raise TypeError("eval_metrics: expected {name: callable}")
        unet = model if isinstance(model, torch.nn.Module) else getattr(model, "unet", None)
        if not isinstance(unet, torch.nn.Module):
            raise TypeError(
                f"model: expected a diffusers pipeline (with .unet) or a UNet, got "
                f"{type(model).__name__}"
            )
        scheduler = scheduler if scheduler is not None else getattr(model, "scheduler", None)
        if scheduler is None:
            raise ValueError("scheduler: required when model is a bare UNet")
        vae = vae if vae is not None else getattr(model, "vae", None)
        kind = _prompt_kind(prompts, prompt_embeds, class_labels)
        if kind == "prompts" and (
            isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts) or not prompts
        ):
            raise TypeError("prompts: expected a non-empty list of strings")
        if (text_encoder is None) != (tokenizer is None):
            missing = "tokenizer" if tokenizer is None else "text_encoder"
            raise ValueError(f"{missing}: give text_encoder and tokenizer together")
        if text_encoder is not None:
            if not isinstance(model, torch.nn.Module):
                raise ValueError(
                    "text_encoder: only with a bare UNet (a pipeline encodes with its own)"
                )
            if not isinstance(text_encoder, torch.nn.Module):
                raise TypeError(
                    f"text_encoder: expected a torch module, got {type(text_encoder).__name__}"
                )
            if not callable(tokenizer):
                raise TypeError(f"tokenizer: expected a tokenizer, got {type(tokenizer).__name__}")
        if kind == "prompts" and not hasattr(model, "encode_prompt") and text_encoder is None:
            raise ValueError(
                "prompts: strings need a pipeline with encode_prompt, or text_encoder and "
                "tokenizer with a bare UNet; or give prompt_embeds instead"
            )
        if config.rlr.guidance_scale != 1.0 and kind in ("prompt_embeds", "class_labels"):
            missing = "negative_prompt_embeds" if kind == "prompt_embeds" else "uncond_class_label"
            if (negative_prompt_embeds if kind == "prompt_embeds" else uncond_class_label) is None:
                raise ValueError(f"{missing}: classifier-free guidance needs it")
        scheduler = self._sampling_scheduler(scheduler, config.num_inference_steps)
        if config.finetune == "lora":
            # Checked before anything changes (add_lora checks again).
            names = [name for name, _ in unet.named_modules()]
            if not any(
                name == t or name.endswith("." + t)
                for name in names
                for t in config.lora_target_modules
            ):
                raise ValueError(
                    f"lora_target_modules: none of {list(config.lora_target_modules)} is a "
                    f"module of {type(unet).__name__} (finetune='full' trains it whole)"
                )

        self.config = config
        self.dcot = dcot
        self.accelerator = accelerator if accelerator is not None else self._make_accelerator()
        self.device = self.accelerator.device
        self.is_main = bool(self.accelerator.is_main_process)
        self.world_size = int(self.accelerator.num_processes)
        self.rank = int(self.accelerator.process_index)
        self.sync = _AccelerateSync(self.accelerator) if self.world_size > 1 else None
        if config.eval_samples % self.world_size:
            raise ValueError(
                f"eval_samples: {config.eval_samples} is not a multiple of the "
                f"{self.world_size} processes"
            )
        # The prompts (encoded once), DCoT's stages and the estimator's config: checked
        # before the model changes.
        self.pipeline = None if isinstance(model, torch.nn.Module) else model
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.prompt_kind = kind
        self.prompt_texts = list(prompts) if kind == "prompts" else None
        self.pool, self.pool_size = self._prompt_pool(kind, prompts, prompt_embeds, class_labels)
        self.uncond = self._uncond(kind, negative_prompt_embeds, uncond_class_label)
        self.stage_pools = None
        if dcot is not None:
            if kind is None:
                raise ValueError("dcot: needs prompts, prompt_embeds or class_labels")
            self.stage_pools = [
                self._prompt_pool(kind, *self._as_kind(kind, pool))[0] for pool in dcot.stages
            ]
            for index, pool in enumerate(self.stage_pools):
                if _pool_length(pool) != self.pool_size:
                    raise ValueError(
                        f"dcot: stage {index} has {_pool_length(pool)} prompts, the pool "
                        f"{self.pool_size}"
                    )
        self.rlr_config = self._estimator_config()

        torch.manual_seed(config.seed)  # the adapters' initialisation
        self.unet = unet.to(self.device)
        self.scheduler = scheduler
        self.vae = vae
        if vae is not None:
            vae.requires_grad_(False)
            vae.to(self.device).eval()
        for encoder in (
            text_encoder,
            getattr(model, "text_encoder", None),
            getattr(model, "text_encoder_2", None),
        ):
            if isinstance(encoder, torch.nn.Module):
                encoder.requires_grad_(False)
        if config.finetune == "lora":
            self.trainable_parameters = add_lora(
                unet,
                rank=config.lora_rank,
                alpha=config.lora_alpha,
                target_modules=config.lora_target_modules,
            )
        else:
            unet.requires_grad_(True)
            self.trainable_parameters = list(unet.parameters())
        self.unet.to(self.device)
        self.reward_fn = reward_fn
        self.eval_metrics = eval_metrics
        self.rlr_state = RLRState()
        self.stat_tracker = PerPromptStatTracker(config.ddpo_buffer_size, config.ddpo_min_count)
        self.optimizer = torch.optim.AdamW(
            self.trainable_parameters,
            lr=config.learning_rate,
            betas=config.adam_betas,
            eps=config.adam_eps,
            weight_decay=config.weight_decay,
        )
        # Every draw of the trainer (batches and estimator draws): the same on every rank.
        self.generator = torch.Generator().manual_seed(config.seed)
        self.step = 0
        self.model_evaluations = 0
        self.history: list[dict[str, Any]] = []
        self.output_dir = Path(config.output_dir) if config.output_dir is not None else None
        self._eval_set = self._make_eval_set() if config.eval_samples else None
        self._metrics_file = None
        self._trackers_started = False

    # ------------------------------------------------------------------ set-up
    @staticmethod
    def _sampling_scheduler(scheduler: Any, num_steps: int) -> Any:
        from diffusers import DDIMScheduler, DDPMScheduler

        if not hasattr(scheduler, "config"):
            raise TypeError(
                f"scheduler: expected a diffusers scheduler, got {type(scheduler).__name__}"
            )
        if isinstance(scheduler, (DDIMScheduler, DDPMScheduler)):
            scheduler = copy.deepcopy(scheduler)
        else:
            scheduler = DDIMScheduler.from_config(scheduler.config)
        scheduler.set_timesteps(num_steps)
        return scheduler

    def _make_accelerator(self) -> Any:
        from accelerate import Accelerator

        trackers = self._trackers()
        return Accelerator(
            cpu=self.config.cpu,
            mixed_precision=self.config.mixed_precision,
            log_with=trackers or None,
            project_dir=self.config.output_dir,
        )

    def _trackers(self) -> list[str]:
        choice = self.config.report_to
        if choice == "none" or self.config.output_dir is None and choice == "auto":
            return []
        if choice in ("tensorboard", "wandb"):
            return [choice]
        found = []
        try:
            import tensorboard  # noqa: F401

            found.append("tensorboard")
        except ImportError:
            pass
        if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE"):
            try:
                import wandb  # noqa: F401

                found.append("wandb")
            except ImportError:
                pass
        return found

    def _as_kind(self, kind: str | None, pool: Any) -> tuple[Any, Any, Any]:
        return (
            pool if kind == "prompts" else None,
            pool if kind == "prompt_embeds" else None,
            pool if kind == "class_labels" else None,
        )

    def _prompt_pool(
        self, kind: str | None, prompts: Any, prompt_embeds: Any, class_labels: Any
    ) -> tuple[Any, int]:
        if kind is None:
            return None, 1
        if kind == "prompts":
            embeds = self._encode(list(prompts))
            return embeds, embeds.shape[0]
        if kind == "prompt_embeds":
            if not isinstance(prompt_embeds, torch.Tensor) or prompt_embeds.dim() != 3:
                raise ValueError(
                    "prompt_embeds: expected a [P, L, D] tensor, got "
                    f"{getattr(prompt_embeds, 'shape', type(prompt_embeds).__name__)}"
                )
            if not prompt_embeds.is_floating_point():
                raise TypeError(f"prompt_embeds: expected floating, got {prompt_embeds.dtype}")
            return prompt_embeds.detach().to(self.device), prompt_embeds.shape[0]
        labels = torch.as_tensor(class_labels)
        if labels.dim() != 1 or labels.numel() == 0 or labels.is_floating_point():
            raise ValueError("class_labels: expected a non-empty [P] sequence of class ids")
        return labels.to(torch.long).to(self.device), labels.numel()

    def _encode(self, prompts: list[str]) -> torch.Tensor:
        """``[P, L, D]`` text embeddings of ``prompts``: the pipeline's ``encode_prompt``,
        or, for a bare UNet, the last hidden state of ``text_encoder`` on the prompts
        padded and truncated to ``tokenizer.model_max_length`` (what Stable Diffusion's
        ``encode_prompt`` computes without LoRA scaling or clip skip)."""
        with torch.no_grad():
            if self.pipeline is not None:
                embeds = self.pipeline.encode_prompt(prompts, self.device, 1, False)[0]
            else:
                tokens = self.tokenizer(
                    prompts,
                    padding="max_length",
                    max_length=self.tokenizer.model_max_length,
                    truncation=True,
                    return_tensors="pt",
                )
                config = getattr(self.text_encoder, "config", None)
                mask = (
                    tokens.attention_mask if getattr(config, "use_attention_mask", False) else None
                )
                device = next(self.text_encoder.parameters()).device
                embeds = self.text_encoder(
                    tokens.input_ids.to(device),
                    attention_mask=None if mask is None else mask.to(device),
                )[0].to(self.device)
        return embeds.detach()

    def _uncond(self, kind: str | None, negative: Any, uncond_label: Any) -> Any:
        if self.config.rlr.guidance_scale == 1.0 or kind is None:
            return None
        if kind == "prompts" and negative is None:
            return self._encode([""])[0]
        if kind in ("prompts", "prompt_embeds"):
            negative = torch.as_tensor(negative).detach().to(self.device)
            return negative[0] if negative.dim() == 3 else negative
        require_int("uncond_class_label", uncond_label, low=0)
        return int(uncond_label)

    def _estimator_config(self) -> RLRConfig:
        config = self.config.rlr
        T = self.config.num_inference_steps
        if self.dcot is not None and self.dcot.window_stage is not None:
            if config.estimator != "rlr":
                raise ValueError("dcot: window_stage applies to estimator='rlr'")
            config = replace(
                config,
                window_start=self.dcot.window_range(T, config.fo_steps, config.window),
            )
        return config

    def _make_eval_set(self) -> dict[str, Any]:
        generator = torch.Generator().manual_seed(self.config.seed + 1)
        count = self.config.eval_samples
        x_T = torch.randn((count, *self._latent_shape()), generator=generator)
        indices = torch.randint(0, self.pool_size, (count,), generator=generator)
        noise_seed = int(torch.randint(0, _SEED_HIGH, (1,), generator=generator))
        rows = slice(
            self.rank * count // self.world_size, (self.rank + 1) * count // self.world_size
        )
        return {"x_T": x_T[rows], "indices": indices[rows], "noise_seed": noise_seed + self.rank}

    def _latent_shape(self) -> tuple[int, ...]:
        config = self.unet.config
        size = config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        return (config.in_channels, *size)

    # ------------------------------------------------------------------ batches
    def _draw_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``x_T`` ``[batch_size, ...]`` and prompt indices ``[batch_size]`` of this rank.

        Drawn for the union of the ranks from the shared generator (so one process with
        ``world_size * batch_size`` draws the same), this rank's rows kept.
        """
        b, world = self.config.batch_size, self.world_size
        x_T = torch.randn((world * b, *self._latent_shape()), generator=self.generator)
        indices = torch.randint(0, self.pool_size, (world * b,), generator=self.generator)
        rows = slice(self.rank * b, (self.rank + 1) * b)
        dtype = next(iter(self.unet.parameters())).dtype
        return x_T[rows].to(self.device, dtype), indices[rows]

    def _cond(self, indices: torch.Tensor) -> Any:
        """The denoiser's keyword arguments for chains with these prompt indices."""
        if self.prompt_kind is None:
            return None
        if self.stage_pools is not None:
            return PromptSchedule(
                [self._cond_of(pool, indices) for pool in self.stage_pools],
                self.dcot.boundaries,
            )
        return self._cond_of(self.pool, indices)

    def _cond_of(self, pool: Any, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        rows = indices.to(pool.device)
        if self.prompt_kind == "class_labels":
            return {"class_labels": pool[rows]}
        dtype = next(iter(self.unet.parameters())).dtype
        return {"encoder_hidden_states": pool[rows].to(dtype)}

    def _uncond_of(self, count: int) -> Any:
        if self.uncond is None:
            return None
        if self.prompt_kind == "class_labels":
            return {"class_labels": torch.full((count,), self.uncond, device=self.device)}
        dtype = next(iter(self.unet.parameters())).dtype
        return {"encoder_hidden_states": self.uncond.to(dtype).expand(count, *self.uncond.shape)}

    def prompts_of(self, indices: torch.Tensor) -> Any:
        """What ``reward_fn`` gets as ``prompts`` for chains with these prompt indices:
        the strings, the class labels ``[N]``, or the indices ``[N]`` into
        ``prompt_embeds`` (``None`` for an unconditional model)."""
        if self.prompt_kind is None:
            return None
        if self.prompt_kind == "prompts":
            return [self.prompt_texts[int(i)] for i in indices]
        if self.prompt_kind == "class_labels":
            return self.pool[indices.to(self.pool.device)]
        return indices.to(self.device)

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Images from the chain's ``x_0``: the VAE's decoding for latent models."""
        if self.vae is None:
            return x0
        scale = getattr(self.vae.config, "scaling_factor", 1.0)
        return self.vae.decode(x0 / scale).sample

    def _reward_for(self, indices: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """``estimate_grad``'s ``reward_fn(x_0)``: chains ``b`` and ``b + B`` share a prompt."""
        base = indices.shape[0]

        def reward(x0: torch.Tensor) -> torch.Tensor:
            repeats = x0.shape[0] // base
            prompts = self.prompts_of(indices.repeat(repeats))
            return self.reward_fn(self.decode(x0), prompts).reshape(-1)

        return reward

    # ------------------------------------------------------------------ one step
    def accumulate_gradient(self) -> dict[str, Any]:
        """Set ``.grad`` of the trainable tensors to this step's gradient estimate.

        The mean over ``gradient_accumulation_steps`` estimates and over the processes
        (equal on every rank). Not for ``ddpo``, whose step is a PPO loop
        (:meth:`training_step`). Returns the step's metrics.
        """
        if self.config.rlr.estimator == "ddpo":
            raise ValueError("rlr: estimator='ddpo' trains by PPO epochs; call training_step()")
        self.optimizer.zero_grad(set_to_none=True)
        records = []
        accumulation = self.config.gradient_accumulation_steps
        state = self.rlr_state if self.rlr_config.window_start == "grad_norm" else None
        for _ in range(accumulation):
            x_T, indices = self._draw_batch()
            with self.accelerator.autocast():
                records.append(
                    estimate_grad(
                        self.unet,
                        self.scheduler,
                        self._reward_for(indices),
                        x_T,
                        config=self.rlr_config,
                        generator=self.generator,
                        cond=self._cond(indices),
                        uncond=self._uncond_of(x_T.shape[0]),
                        parameters=self.trainable_parameters,
                        state=state,
                        sync=self.sync,
                    )
                )
        self._average_gradients(scale=1.0 / accumulation)
        evaluations = sum(r["model_evaluations"] for r in records)
        self.model_evaluations += evaluations
        metrics = {
            "reward_mean": sum(r["reward_mean"] for r in records) / accumulation,
            "reward_std": sum(r["reward_std"] for r in records) / accumulation,
            "model_evaluations": evaluations,
        }
        for key in records[0]:
            if key.startswith("grad_norm/") or key in ("window_start", "zo_coefficient"):
                values = [r[key] for r in records if key in r]
                metrics[key] = values[-1] if key == "window_start" else sum(values) / len(values)
        return metrics

    def _average_gradients(self, scale: float) -> None:
        """``.grad <- scale * mean over ranks of .grad`` (one flat all-reduce)."""
        grads = []
        for p in self.trainable_parameters:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        if self.world_size > 1:
            flat = torch.cat([g.reshape(-1) for g in grads])
            flat = self.accelerator.reduce(flat, reduction="mean")
            offset = 0
            for g in grads:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
        if scale != 1.0:
            for g in grads:
                g.mul_(scale)

    def apply_gradients(self) -> float:
        """Clip (``max_grad_norm``) and take the optimizer step; returns the pre-clip norm."""
        if self.config.max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(
                self.trainable_parameters, self.config.max_grad_norm
            )
        else:
            norm = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(p.grad) for p in self.trainable_parameters])
            )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def training_step(self) -> dict[str, Any]:
        """One optimizer step (DDPO: one sampling round and its PPO epochs); metrics."""
        started = time.perf_counter()
        if self.config.rlr.estimator == "ddpo":
            metrics = self._ddpo_round()
        else:
            metrics = self.accumulate_gradient()
            metrics["grad_norm"] = self.apply_gradients()
        self.step += 1
        metrics["step"] = self.step
        metrics["total_model_evaluations"] = self.model_evaluations
        metrics["step_seconds"] = time.perf_counter() - started
        return metrics

    # ------------------------------------------------------------------ DDPO
    def _ddpo_round(self) -> dict[str, Any]:
        cfg, rlr = self.config, self.config.rlr
        T = len(self.scheduler.timesteps)
        chains, starts = [], []
        for _ in range(cfg.gradient_accumulation_steps):
            x_T, indices = self._draw_batch()
            starts.append(indices)
            chains.append((x_T, indices))
        x_T = torch.cat([c[0] for c in chains])
        indices = torch.cat(starts)
        noise_seed = int(torch.randint(0, _SEED_HIGH, (1,), generator=self.generator))
        noise_gen = torch.Generator(device=self.device).manual_seed(noise_seed + self.rank)
        cond, uncond = self._cond(indices), self._uncond_of(x_T.shape[0])
        with torch.no_grad(), self.accelerator.autocast():
            chain = sample_chain(
                self.unet,
                self.scheduler,
                x_T,
                eta=rlr.eta,
                generator=noise_gen,
                cond=cond,
                uncond=uncond,
                guidance_scale=rlr.guidance_scale,
                return_log_probs=True,
            )
            rewards = self._reward_for(indices)(chain.x0).detach()
        evaluations = chain.evaluations
        union_rewards = self._gather(rewards.double())
        union_indices = self._gather(indices.to(self.device))
        advantages = self.stat_tracker.update(union_indices.tolist(), union_rewards)
        count = x_T.shape[0]
        local = advantages[self.rank * count : (self.rank + 1) * count].to(self.device)
        samples = chain.samples  # position k: x_{T-k}
        old_log_probs = chain.log_probs
        coefficients = chain.coefficients
        timesteps = chain.timesteps
        scored = max(1, round(rlr.ddpo_step_fraction * T))
        clipped, kls, losses = [], [], []
        grad_norm = 0.0
        for _ in range(cfg.ddpo_epochs):
            order = torch.randperm(count, generator=self.generator)
            for rows in order.chunk(cfg.ddpo_minibatches):
                rows = rows.sort().values
                positions = torch.randperm(T, generator=self.generator)[:scored].sort().values
                model = GuidedDenoiser(
                    self.unet,
                    timesteps,
                    cond=self._cond(indices[rows]),
                    uncond=self._uncond_of(rows.numel()),
                    guidance_scale=rlr.guidance_scale,
                    base_batch=rows.numel(),
                )
                rows = rows.to(self.device)
                self.optimizer.zero_grad(set_to_none=True)
                for k in positions.tolist():
                    coeff = coefficients[k]
                    if coeff.sigma <= 0.0:
                        continue
                    x_t = samples[k][rows]
                    with self.accelerator.autocast():
                        out = model(x_t, T - k)
                        log_prob = transition_log_prob(
                            samples[k + 1][rows], x_t, out, coeff, backend=rlr.backend
                        )
                    advantage = (
                        local[rows].to(log_prob.dtype).clamp(-cfg.ddpo_adv_clip, cfg.ddpo_adv_clip)
                    )
                    ratio = torch.exp(log_prob - old_log_probs[rows, k].to(log_prob.dtype))
                    unclipped = -advantage * ratio
                    clipped_loss = -advantage * ratio.clamp(
                        1.0 - cfg.ddpo_clip_range, 1.0 + cfg.ddpo_clip_range
                    )
                    loss = torch.maximum(unclipped, clipped_loss).mean() / len(positions)
                    loss.backward()
                    with torch.no_grad():
                        losses.append(float(loss) * len(positions))
                        clipped.append(
                            float(((ratio - 1.0).abs() > cfg.ddpo_clip_range).double().mean())
                        )
                        kls.append(float(0.5 * (log_prob - old_log_probs[rows, k]).square().mean()))
                self._average_gradients(scale=1.0)
                grad_norm = self.apply_gradients()
                evaluations += model.evaluations
        evaluations = int(self._gather(torch.tensor([evaluations], device=self.device)).sum())
        self.model_evaluations += evaluations
        return {
            "reward_mean": float(union_rewards.mean()),
            "reward_std": float(union_rewards.std()) if union_rewards.numel() > 1 else 0.0,
            "model_evaluations": evaluations,
            "ddpo/loss": sum(losses) / max(1, len(losses)),
            "ddpo/clip_fraction": sum(clipped) / max(1, len(clipped)),
            "ddpo/approx_kl": sum(kls) / max(1, len(kls)),
            "grad_norm": grad_norm,
        }

    def _gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if self.sync is None else self.sync.gather(tensor)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def sample(
        self,
        x_T: torch.Tensor,
        indices: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Images sampled from ``x_T`` with prompt indices ``indices`` (no gradient).

        The trainer's chain: ``num_inference_steps`` steps at ``rlr.eta`` with its
        guidance and DCoT schedule; ``generator`` draws the step noises.
        """
        if indices is None:
            indices = torch.zeros(x_T.shape[0], dtype=torch.long)
        x_T = x_T.to(self.device, next(iter(self.unet.parameters())).dtype)
        with self.accelerator.autocast():
            chain = sample_chain(
                self.unet,
                self.scheduler,
                x_T,
                eta=self.config.rlr.eta,
                generator=generator,
                cond=self._cond(indices),
                uncond=self._uncond_of(x_T.shape[0]),
                guidance_scale=self.config.rlr.guidance_scale,
            )
            return self.decode(chain.x0).float()

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Reward (and ``eval_metrics``) of the fixed evaluation set, all processes.

        Returns ``eval/reward_mean``, ``eval/reward_std``, ``eval/<name>`` and
        ``eval/<name>_std`` (mean and std over the set of each ``eval_metrics`` entry), and
        ``images`` (``[E, C, H, W]``, on every rank) for the caller to keep.
        """
        if self._eval_set is None:
            raise ValueError("eval_samples: is 0; set it to evaluate")
        data = self._eval_set
        generator = torch.Generator(device=self.device).manual_seed(data["noise_seed"])
        images = self.sample(data["x_T"], data["indices"], generator)
        prompts = self.prompts_of(data["indices"])
        rewards = self._gather(self.reward_fn(images, prompts).reshape(-1).double())
        out = {
            "eval/reward_mean": float(rewards.mean()),
            "eval/reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
        }
        for name, fn in self.eval_metrics.items():
            values = self._gather(torch.as_tensor(fn(images, prompts)).reshape(-1).double())
            out[f"eval/{name}"] = float(values.mean())
            out[f"eval/{name}_std"] = float(values.std()) if values.numel() > 1 else 0.0
        out["images"] = self._gather(images.contiguous())
        return out

    # ------------------------------------------------------------------ the loop
    def train(
        self, callback: Callable[[RLRTrainer, dict[str, Any]], None] | None = None
    ) -> list[dict[str, Any]]:
        """Run to ``max_steps`` (or the evaluation budget), logging, evaluating, saving.

        ``callback(trainer, record)`` is called after every logged record. Returns
        :attr:`history`.
        """
        cfg = self.config
        progress = self._progress()
        try:
            if self._eval_set is not None and cfg.eval_every:
                self._log(self._eval_record(), callback)
            while self.step < cfg.max_steps and not self.budget_spent():
                metrics = self.training_step()
                if self.step % cfg.log_every == 0:
                    self._log({"kind": "train", **metrics}, callback)
                if progress is not None:
                    if self.config.max_model_evaluations is None:
                        progress.update(1)
                    else:
                        progress.update(min(self.model_evaluations, progress.total) - progress.n)
                    progress.set_postfix(
                        reward=f"{metrics['reward_mean']:.3f}",
                        evals=self.model_evaluations,
                    )
                if (
                    self._eval_set is not None
                    and cfg.eval_every
                    and self.step % cfg.eval_every == 0
                ):
                    self._log(self._eval_record(), callback)
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
            if self._eval_set is not None and cfg.eval_every and self.step % cfg.eval_every:
                self._log(self._eval_record(), callback)
            if self.output_dir is not None:
                self.save_lora_weights(self.output_dir / "final")
        finally:
            if progress is not None:
                progress.close()
            self.close()
        return self.history

    def budget_spent(self) -> bool:
        budget = self.config.max_model_evaluations
        return budget is not None and self.model_evaluations >= budget

    def _eval_record(self) -> dict[str, Any]:
        result = self.evaluate()
        result.pop("images")
        return {
            "kind": "eval",
            "step": self.step,
            "total_model_evaluations": self.model_evaluations,
            **result,
        }

    def _progress(self) -> Any:
        if not (self.config.progress and self.is_main):
            return None
        from tqdm.auto import tqdm

        budget = self.config.max_model_evaluations
        if budget is not None:  # the budget, not max_steps, ends such a run: count evaluations
            return tqdm(
                total=budget,
                initial=min(self.model_evaluations, budget),
                desc=f"riskfast {self.config.rlr.estimator}",
                unit="eval",
                unit_scale=True,
                dynamic_ncols=True,
            )
        return tqdm(
            total=self.config.max_steps,
            initial=self.step,
            desc=f"riskfast {self.config.rlr.estimator}",
            unit="step",
            dynamic_ncols=True,
        )

    def _log(self, record: dict[str, Any], callback: Any) -> None:
        self.history.append(record)
        if self.is_main and self.output_dir is not None:
            if self._metrics_file is None:
                self.output_dir.mkdir(parents=True, exist_ok=True)
                self._metrics_file = (self.output_dir / "metrics.jsonl").open("a")
            self._metrics_file.write(json.dumps(record) + "\n")
            self._metrics_file.flush()
        if getattr(self.accelerator, "log_with", None):
            if not self._trackers_started:
                self.accelerator.init_trackers("riskfast-rlr", config=_flat(self.config.to_dict()))
                self._trackers_started = True
            numbers = {k: v for k, v in record.items() if isinstance(v, (int, float))}
            self.accelerator.log(numbers, step=self.step)
        if callback is not None:
            callback(self, record)

    def close(self) -> None:
        """Close ``metrics.jsonl`` and the trackers (:meth:`train` does on return)."""
        if self._metrics_file is not None:
            self._metrics_file.close()
            self._metrics_file = None
        if self._trackers_started:
            self.accelerator.end_training()
            self._trackers_started = False

    # ------------------------------------------------------------------ saving
    def save_lora_weights(self, directory: str | os.PathLike) -> Path:
        """The trained weights in ``directory``: the adapters in the diffusers format
        (``pytorch_lora_weights.safetensors``; :func:`riskfast.rlr.load_lora_weights`
        or ``pipeline.load_lora_weights``), or the UNet (``finetune="full"``,
        ``unet.save_pretrained``). Written by the main process."""
        directory = Path(directory)
        if self.is_main:
            if self.config.finetune == "lora":
                save_lora_weights(self.unet, directory)
            else:
                self.unet.save_pretrained(directory / "unet")
        self.accelerator.wait_for_everyone()
        return directory

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs besides the trainable weights."""
        return {
            "step": self.step,
            "model_evaluations": self.model_evaluations,
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "rlr_state": self.rlr_state.state_dict(),
            "stat_tracker": self.stat_tracker.state_dict(),
            "config": self.config.to_dict(),
            "world_size": self.world_size,
        }

    def save_checkpoint(self, directory: str | os.PathLike | None = None) -> Path:
        """Save adapters (or trainable weights), optimizer, RNG streams, step and states.

        Default ``output_dir/checkpoint-<step>``. :meth:`load_checkpoint` restores it so
        that the run continues as if it had not stopped (bit for bit on the CPU).
        """
        if directory is None:
            if self.output_dir is None:
                raise ValueError("directory: required when config.output_dir is None")
            directory = self.output_dir / f"checkpoint-{self.step}"
        directory = Path(directory)
        if self.is_main:
            from safetensors.torch import save_file

            directory.mkdir(parents=True, exist_ok=True)
            if self.config.finetune == "lora":
                save_lora_weights(self.unet, directory)
            weights = {
                f"{i}": p.detach().contiguous().cpu()
                for i, p in enumerate(self.trainable_parameters)
            }
            save_file(weights, str(directory / _WEIGHTS_FILE))
            torch.save(self.state_dict(), directory / _STATE_FILE)
        self.accelerator.wait_for_everyone()
        return directory

    def load_checkpoint(self, directory: str | os.PathLike) -> None:
        """Restore a :meth:`save_checkpoint` directory into this trainer (every rank)."""
        from safetensors.torch import load_file

        directory = Path(directory)
        state_path, weights_path = directory / _STATE_FILE, directory / _WEIGHTS_FILE
        if not state_path.is_file() or not weights_path.is_file():
            raise ValueError(f"directory: {directory} is not a checkpoint of RLRTrainer")
        state = torch.load(state_path, weights_only=False)
        missing = (
            sorted(set(self.state_dict()) - set(state)) if isinstance(state, dict) else ["all"]
        )
        if missing:
            raise ValueError(f"directory: {state_path.name} lacks {missing}")
        if state["config"] != self.config.to_dict():
            differ = sorted(
                k for k in state["config"] if state["config"][k] != self.config.to_dict().get(k)
            )
            raise ValueError(f"directory: saved with another config (fields {differ})")
        if state["world_size"] != self.world_size:
            raise ValueError(
                f"directory: saved by {state['world_size']} processes, resumed by {self.world_size}"
            )
        weights = load_file(str(weights_path))
        # Everything is checked before anything is restored: a refused checkpoint leaves
        # the weights, optimizer, generators, RNG streams and states as they were.
        if sorted(weights) != sorted(str(i) for i in range(len(self.trainable_parameters))):
            raise ValueError("directory: its weights do not match the trainable tensors")
        for i, p in enumerate(self.trainable_parameters):
            if weights[str(i)].shape != p.shape:
                raise ValueError(f"directory: tensor {i} has shape {tuple(weights[str(i)].shape)}")
        saved_groups = (
            state["optimizer"].get("param_groups") if isinstance(state["optimizer"], dict) else None
        )
        if not isinstance(saved_groups, list) or [
            len(g.get("params", ())) for g in saved_groups
        ] != [len(g["params"]) for g in self.optimizer.param_groups]:
            raise ValueError("directory: its optimizer state does not match this optimizer")
        for name, generator in (
            ("generator", self.generator),
            ("torch_rng", torch.default_generator),
        ):
            try:
                checked_generator_state(state[name], generator)
            except ValueError as err:
                raise ValueError(f"directory: its {name} is refused ({err})") from None
        for name in ("step", "model_evaluations"):
            if isinstance(state[name], bool) or not isinstance(state[name], int) or state[name] < 0:
                raise ValueError(f"directory: its {name} {state[name]!r} is not an int >= 0")
        for name, target in (("rlr_state", self.rlr_state), ("stat_tracker", self.stat_tracker)):
            try:
                copy.deepcopy(target).load_state_dict(state[name])
            except (TypeError, ValueError) as err:
                raise ValueError(f"directory: its {name} is refused ({err})") from None
        with torch.no_grad():
            for i, p in enumerate(self.trainable_parameters):
                p.copy_(weights[str(i)].to(p.device, p.dtype))
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.rlr_state.load_state_dict(state["rlr_state"])
        self.stat_tracker.load_state_dict(state["stat_tracker"])
        self.step = state["step"]
        self.model_evaluations = state["model_evaluations"]


def _pool_length(pool: Any) -> int:
    return int(pool.shape[0])


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = (
                value if isinstance(value, (int, float, str, bool)) else str(value)
            )
    return out
