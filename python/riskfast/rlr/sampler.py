"""The denoising chain with per-step log-densities (spec ``rlr.md``, "The chain").

* :func:`transition_coefficients` - the scalars of one DDIM (any eta) or DDPM step of a
  diffusers scheduler, the previous timestep taken from ``scheduler.timesteps``;
* :func:`step_with_logprob` - one step: ``prev_sample``, ``mean``, ``std``, ``log_prob``;
* :func:`sample_chain` - ``B`` chains on any denoiser with the diffusers call
  convention, with classifier-free guidance and a per-step prompt schedule
  (:class:`PromptSchedule`, the spec's DCoT stages), recording ``x_t`` per step and on
  request the log-densities, model outputs and means, without autograd graphs.

Numbering. ``scheduler.timesteps`` runs from noise to data; position ``k = 0 .. T-1``
is the ``k``-th step taken. The spec counts steps from data: step ``s = T - k`` maps
``x_s`` to ``x_{s-1}``, step ``T`` starts at ``x_T`` (the noise) and step 1 produces
``x_0``. The previous timestep of position ``k`` is ``timesteps[k + 1]`` (``-1`` after
the last: diffusers' "final" alpha-bar). Diffusers' ``DDIMScheduler.step`` uses
``t - num_train_timesteps // T`` instead, which equals the schedule's next entry with
"leading" spacing only; with "linspace" or "trailing" spacing riskfast follows the
schedule (its steps then differ from ``DDIMScheduler.step``'s, on purpose: the chain
visits the timesteps it was given). ``DDPMScheduler.step`` already follows the schedule.

The formulas (mean, Gaussian density) are owned by :mod:`riskfast.ops.transition`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .._checks import (
    require_bool,
    require_choice,
    require_floating,
    require_int,
    require_number,
    require_same_device,
    require_same_shape,
    require_tensor,
)
from ..ops.transition import (
    REDUCTIONS,
    TRANSITION_BACKENDS,
    TransitionCoefficients,
    math_dtype,
    transition_log_prob,
    transition_log_prob_into,
    transition_mean,
)

__all__ = [
    "Chain",
    "PromptSchedule",
    "StepOutput",
    "call_denoiser",
    "check_scheduler",
    "sample_chain",
    "step_with_logprob",
    "transition_coefficients",
]

_DDPM_VARIANCES = ("fixed_small", "fixed_small_log", "fixed_large")


# --------------------------------------------------------------------------------------
# The scheduler: which sampler, and the scalars of one step
# --------------------------------------------------------------------------------------


def _scheduler_kind(scheduler: Any) -> str:
    """``"ddim"`` or ``"ddpm"``; a ``TypeError`` naming ``scheduler`` otherwise."""
    try:
        from diffusers import DDIMScheduler, DDPMScheduler
    except (
        ImportError
    ) as err:  # pragma: no cover - diffusers is a dependency of riskfast[diffusion]
        raise TypeError(f"scheduler: riskfast.rlr needs diffusers ({err})") from None
    if isinstance(scheduler, DDIMScheduler):
        return "ddim"
    if isinstance(scheduler, DDPMScheduler):
        return "ddpm"
    raise TypeError(
        f"scheduler: expected a diffusers DDIMScheduler or DDPMScheduler, got {type(scheduler).__name__}"
    )


def check_scheduler(scheduler: Any) -> list[int]:
    """Validate ``scheduler`` and return its timesteps (noise to data) as ints."""
    kind = _scheduler_kind(scheduler)
    if getattr(scheduler, "num_inference_steps", None) is None:
        raise ValueError(
            "scheduler: its timesteps are not set; call scheduler.set_timesteps(num_steps) first"
        )
    timesteps = [int(t) for t in scheduler.timesteps]
    if not timesteps:
        raise ValueError("scheduler: scheduler.timesteps is empty")
    config = scheduler.config
    if getattr(config, "thresholding", False):
        raise ValueError(
            "scheduler: dynamic thresholding (config.thresholding=True) is not supported; "
            "use clip_sample or neither"
        )
    if kind == "ddpm" and config.variance_type not in _DDPM_VARIANCES:
        raise ValueError(
            f"scheduler: DDPMScheduler variance_type must be one of {list(_DDPM_VARIANCES)}, "
            f"got {config.variance_type!r}"
        )
    return timesteps


def transition_coefficients(
    scheduler: Any, timestep: int | torch.Tensor, eta: float = 1.0
) -> TransitionCoefficients:
    """The scalars of the step taken at ``timestep`` (``riskfast.ops.transition``).

    DDIM (Song et al., eq. 12): with ``a`` the alpha-bar of ``timestep`` and ``a_prev``
    that of the schedule's next entry (diffusers' ``final_alpha_cumprod`` after the
    last), ``sigma = eta sqrt((1 - a_prev) / (1 - a)) sqrt(1 - a / a_prev)``,
    ``mean = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - sigma^2) eps_hat``.
    DDPM (Ho et al., eq. 7): the posterior mean, ``sigma`` from ``variance_type``
    (``fixed_small`` clamped at ``1e-20`` as diffusers does; 0 at ``t = 0``); ``eta``
    must be 1 (DDPM has no eta). ``x0_hat`` is clipped when ``config.clip_sample``.

    Args:
        scheduler: a diffusers ``DDIMScheduler`` or ``DDPMScheduler`` with timesteps set.
        timestep: an entry of ``scheduler.timesteps``.
        eta: DDIM noise level in ``[0, 1]``.
    """
    kind = _scheduler_kind(scheduler)
    timesteps = check_scheduler(scheduler)
    eta = require_number("eta", eta, low=0.0, high=1.0)
    if isinstance(timestep, torch.Tensor):
        if timestep.numel() != 1:
            raise ValueError(f"timestep: expected one timestep, got shape {tuple(timestep.shape)}")
        timestep = int(timestep.item())
    if isinstance(timestep, bool) or not isinstance(timestep, int):
        raise TypeError(f"timestep: expected an int, got {type(timestep).__name__}")
    if timestep not in timesteps:
        raise ValueError(f"timestep: {timestep} is not in scheduler.timesteps {timesteps}")
    position = timesteps.index(timestep)
    prev_timestep = timesteps[position + 1] if position + 1 < len(timesteps) else -1
    config = scheduler.config
    alphas = scheduler.alphas_cumprod
    a_t = float(alphas[timestep])
    clip_range = float(config.clip_sample_range) if config.clip_sample else None
    if kind == "ddim":
        a_prev = (
            float(alphas[prev_timestep])
            if prev_timestep >= 0
            else float(scheduler.final_alpha_cumprod)
        )
        variance = (1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)
        sigma = eta * math.sqrt(max(variance, 0.0))
        return TransitionCoefficients(
            alpha_prod_t=a_t,
            coef_x0=math.sqrt(a_prev),
            coef_eps=math.sqrt(max(1.0 - a_prev - sigma * sigma, 0.0)),
            coef_sample=0.0,
            sigma=sigma,
            prediction_type=config.prediction_type,
            clip_range=clip_range,
        )
    if eta != 1.0:
        raise ValueError(f"eta: DDPMScheduler has no eta (its steps are ancestral); got {eta}")
    a_prev = float(alphas[prev_timestep]) if prev_timestep >= 0 else 1.0
    alpha_t = a_t / a_prev
    beta_t = 1.0 - alpha_t
    if timestep == 0:
        sigma = 0.0
    elif config.variance_type == "fixed_large":
        sigma = math.sqrt(beta_t)
    else:
        sigma = math.sqrt(max((1.0 - a_prev) / (1.0 - a_t) * beta_t, 1e-20))
    return TransitionCoefficients(
        alpha_prod_t=a_t,
        coef_x0=math.sqrt(a_prev) * beta_t / (1.0 - a_t),
        coef_eps=0.0,
        coef_sample=math.sqrt(alpha_t) * (1.0 - a_prev) / (1.0 - a_t),
        sigma=sigma,
        prediction_type=config.prediction_type,
        clip_range=clip_range,
    )


# --------------------------------------------------------------------------------------
# One step
# --------------------------------------------------------------------------------------


@dataclass
class StepOutput:
    """One step ``x_t -> x_{t-1}``.

    Attributes:
        prev_sample: ``[B, ...]`` ``x_{t-1}`` in the dtype of ``sample``.
        mean: ``[B, ...]`` the Gaussian mean (float32, or float64 for float64 inputs).
        std: ``sigma_t`` (0 for a deterministic step).
        log_prob: ``[B]`` ``log N(prev_sample; mean, std^2 I)`` in the math dtype, or
            ``None`` when ``std == 0`` (eta = 0, or DDPM's last step at t = 0): a
            deterministic step has no density.
        pred_original_sample: ``None`` (kept out to save memory; see
            :func:`riskfast.ops.transition.predict_original_and_noise`).
    """

    prev_sample: torch.Tensor
    mean: torch.Tensor
    std: float
    log_prob: torch.Tensor | None
    pred_original_sample: torch.Tensor | None = None


def add_step_noise(
    mean: torch.Tensor, sigma: float, noise: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """``x_{t-1} = mean + sigma * noise`` in ``dtype`` (``mean`` alone when ``sigma = 0``)."""
    if sigma > 0.0:
        return (mean + sigma * noise.to(mean.dtype)).to(dtype)
    return mean.to(dtype)


def _randn_like(reference: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped like ``reference``, drawn on the generator's device."""
    device = reference.device if generator is None else generator.device
    noise = torch.randn(reference.shape, generator=generator, device=device, dtype=reference.dtype)
    return noise.to(reference.device)


def step_with_logprob(
    scheduler: Any,
    model_output: torch.Tensor,
    timestep: int | torch.Tensor,
    sample: torch.Tensor,
    *,
    eta: float = 1.0,
    noise: torch.Tensor | None = None,
    prev_sample: torch.Tensor | None = None,
    reduce: str = "sum",
    generator: torch.Generator | None = None,
    backend: str = "auto",
) -> StepOutput:
    """One denoising step with the log-density of the step taken.

    ``prev_sample = mean + std * noise``; with ``prev_sample`` given, that sample is
    scored instead (DDPO's recomputation of stored trajectories). Works with diffusers
    ``DDIMScheduler`` (any eta in [0, 1]) and ``DDPMScheduler`` (eta 1); epsilon-,
    sample- and v-prediction; batched. The previous timestep is the next entry of
    ``scheduler.timesteps`` (module docstring): this equals ``DDIMScheduler.step``
    given the same noise for "leading" spacing and follows the schedule for
    "linspace"/"trailing", where diffusers' DDIM rule skips to ``t - 1000 // T``.

    Args:
        scheduler: DDIM or DDPM scheduler with timesteps set.
        model_output: ``[B, ...]`` the denoiser's output at ``(sample, timestep)``.
        timestep: an entry of ``scheduler.timesteps``.
        sample: ``[B, ...]`` ``x_t``.
        eta: DDIM noise level (``0``: deterministic, ``log_prob`` is ``None``).
        noise: ``[B, ...]`` standard normal noise (drawn from ``generator`` if omitted).
        prev_sample: ``[B, ...]`` a given ``x_{t-1}`` to score (exclusive with ``noise``).
        reduce: ``"sum"`` over non-batch dimensions (the true score) or ``"mean"``
            (DDPO's convention).
        generator: for the noise when neither ``noise`` nor ``prev_sample`` is given.
        backend: of the log-density op (``riskfast.ops.transition_log_prob``).
    Returns:
        :class:`StepOutput`; ``log_prob`` is ``[B]`` float32 (float64 for float64 inputs).
    """
    model_output = require_tensor("model_output", model_output)
    sample = require_tensor("sample", sample)
    require_floating("model_output", model_output)
    require_floating("sample", sample)
    if sample.dim() < 1 or sample.shape[0] == 0:
        raise ValueError(f"sample: expected shape [B, ...] with B >= 1, got {tuple(sample.shape)}")
    require_same_shape("model_output", model_output, "sample", sample)
    require_same_device("model_output", model_output, "sample", sample)
    require_choice("reduce", reduce, REDUCTIONS)
    require_choice("backend", backend, TRANSITION_BACKENDS)
    if noise is not None and prev_sample is not None:
        raise ValueError("noise: give either noise or prev_sample, not both")
    for name, tensor in (("noise", noise), ("prev_sample", prev_sample)):
        if tensor is not None:
            require_tensor(name, tensor)
            require_floating(name, tensor)
            require_same_shape(name, tensor, "sample", sample)
            require_same_device(name, tensor, "sample", sample)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
    coefficients = transition_coefficients(scheduler, timestep, eta)
    mean = transition_mean(sample, model_output, coefficients)
    sigma = coefficients.sigma
    if prev_sample is None:
        if sigma > 0.0 and noise is None:
            noise = _randn_like(sample, generator)
        prev_sample = add_step_noise(mean, sigma, noise, sample.dtype)
    log_prob = None
    if sigma > 0.0:
        log_prob = transition_log_prob(
            prev_sample, sample, model_output, coefficients, reduce=reduce, backend=backend
        )
    return StepOutput(prev_sample=prev_sample, mean=mean, std=sigma, log_prob=log_prob)


# --------------------------------------------------------------------------------------
# Conditioning: the diffusers call convention, guidance and the DCoT prompt schedule
# --------------------------------------------------------------------------------------


class PromptSchedule:
    """Per-step conditioning by stage: the spec's Diffusive Chain-of-Thought (DCoT).

    The chain's steps, counted from the noise, are split into stages (default equal
    parts: coarse, middle and fine for three); every step is conditioned on its
    stage's keyword arguments (e.g. ``{"encoder_hidden_states": emb}`` or
    ``{"class_labels": labels}``).

    Args:
        stages: one mapping of denoiser keyword arguments per stage, from the stage
            nearest the noise to the one nearest the data.
        boundaries: ``len(stages) - 1`` increasing fractions in ``(0, 1)``: stage ``i``
            covers positions ``k`` (``k / T`` from the noise) with
            ``boundaries[i-1] <= k / T < boundaries[i]``. Default: equal parts.
    """

    def __init__(
        self, stages: Sequence[Mapping[str, Any]], boundaries: Sequence[float] | None = None
    ) -> None:
        if isinstance(stages, Mapping) or not isinstance(stages, Sequence) or not stages:
            raise TypeError("stages: expected a non-empty sequence of keyword-argument mappings")
        for index, stage in enumerate(stages):
            if not isinstance(stage, Mapping):
                raise TypeError(f"stages[{index}]: expected a mapping, got {type(stage).__name__}")
        count = len(stages)
        if boundaries is None:
            boundaries = [i / count for i in range(1, count)]
        if isinstance(boundaries, (str, bytes)) or not isinstance(boundaries, Sequence):
            raise TypeError("boundaries: expected a sequence of floats")
        if len(boundaries) != count - 1:
            raise ValueError(f"boundaries: expected {count - 1} values, got {len(boundaries)}")
        values = [
            require_number(f"boundaries[{i}]", b, low=0.0, high=1.0, low_open=True, high_open=True)
            for i, b in enumerate(boundaries)
        ]
        if any(b >= c for b, c in itertools.pairwise(values)):
            raise ValueError(f"boundaries: must increase strictly, got {values}")
        self.stages = [dict(stage) for stage in stages]
        self.boundaries = values

    def stage_of(self, position: int, num_steps: int) -> int:
        """Stage index of position ``position`` (0 = the first step, from ``x_T``)."""
        num_steps = require_int("num_steps", num_steps, low=1)
        position = require_int("position", position, low=0, high=num_steps - 1)
        fraction = position / num_steps
        return sum(1 for b in self.boundaries if fraction >= b)

    def cond_at(self, position: int, num_steps: int) -> dict[str, Any]:
        return self.stages[self.stage_of(position, num_steps)]

    def stage_steps(self, num_steps: int) -> list[tuple[int, int]]:
        """Per stage, its steps ``(lowest s, highest s)`` in the spec's numbering.

        Handy for ``RLRConfig(window_start=(a, b))``: focus learning on one stage.
        Stages with no step get ``(0, -1)``.
        """
        num_steps = require_int("num_steps", num_steps, low=1)
        spans: list[list[int]] = [[] for _ in self.stages]
        for position in range(num_steps):
            spans[self.stage_of(position, num_steps)].append(num_steps - position)
        return [(min(s), max(s)) if s else (0, -1) for s in spans]

    def __repr__(self) -> str:
        return f"PromptSchedule(stages={len(self.stages)}, boundaries={self.boundaries})"


Conditioning = Mapping[str, Any] | PromptSchedule | None


def _check_conditioning(name: str, value: Any) -> None:
    if value is not None and not isinstance(value, (Mapping, PromptSchedule)):
        raise TypeError(
            f"{name}: expected a mapping of denoiser keyword arguments, a PromptSchedule or "
            f"None, got {type(value).__name__}"
        )


def call_denoiser(
    denoiser: Callable[..., Any], sample: torch.Tensor, timestep: int, kwargs: Mapping[str, Any]
) -> torch.Tensor:
    """``denoiser(sample, t, **kwargs)`` with ``t`` a ``[B]`` int64 tensor; its ``.sample``.

    Accepts what diffusers' UNets return (an object with ``.sample``, or a tuple whose
    first entry is the output) and plain tensors; the output must have the shape of
    ``sample``.
    """
    if not callable(denoiser):
        raise TypeError(f"denoiser: expected a callable, got {type(denoiser).__name__}")
    sample = require_tensor("sample", sample)
    if sample.dim() < 1:
        raise ValueError(f"sample: expected shape [B, ...], got {tuple(sample.shape)}")
    timestep = require_int("timestep", timestep, low=0)
    if not isinstance(kwargs, Mapping):
        raise TypeError(
            f"kwargs: expected a mapping of denoiser keyword arguments, got {type(kwargs).__name__}"
        )
    t = torch.full((sample.shape[0],), timestep, dtype=torch.long, device=sample.device)
    out = denoiser(sample, t, **kwargs)
    if hasattr(out, "sample") and isinstance(out.sample, torch.Tensor):
        out = out.sample
    elif isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            f"denoiser: expected a tensor or an object with .sample, got {type(out).__name__}"
        )
    if out.shape != sample.shape:
        raise ValueError(
            f"denoiser: output shape {tuple(out.shape)} differs from the sample's "
            f"{tuple(sample.shape)} (learned-variance outputs are not supported)"
        )
    return out


def _rows_of(kwargs: Mapping[str, Any], base_batch: int, repeats: int, rows: slice) -> dict:
    """Keyword arguments for the chains ``rows`` of ``repeats`` stacked copies of the batch.

    A tensor whose first dimension is ``base_batch`` is per sample: it is repeated like
    the chains and sliced to ``rows``; anything else is passed unchanged.
    """
    out = {}
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == base_batch:
            if repeats > 1:
                value = value.repeat(repeats, *([1] * (value.dim() - 1)))
            value = value[rows]
        out[key] = value
    return out


class GuidedDenoiser:
    """The model output of one step: conditioning by step, classifier-free guidance.

    ``model_output = u + w (c - u)`` with ``c``, ``u`` the conditioned and
    unconditioned outputs and ``w = guidance_scale`` (``w = 1``: ``c`` alone, one call).
    Counts the samples it evaluates (``evaluations``: one per sample per denoiser call).
    """

    def __init__(
        self,
        denoiser: Callable[..., Any],
        timesteps: Sequence[int],
        *,
        cond: Conditioning = None,
        uncond: Conditioning = None,
        guidance_scale: float = 1.0,
        base_batch: int,
        repeats: int = 1,
    ) -> None:
        if not callable(denoiser):
            raise TypeError(f"denoiser: expected a callable, got {type(denoiser).__name__}")
        if isinstance(timesteps, (str, bytes)) or not isinstance(timesteps, Sequence):
            raise TypeError(
                f"timesteps: expected a sequence of ints, got {type(timesteps).__name__}"
            )
        base_batch = require_int("base_batch", base_batch, low=1)
        repeats = require_int("repeats", repeats, low=1)
        _check_conditioning("cond", cond)
        _check_conditioning("uncond", uncond)
        guidance_scale = require_number("guidance_scale", guidance_scale)
        if guidance_scale != 1.0 and uncond is None:
            raise ValueError(
                "uncond: classifier-free guidance (guidance_scale != 1) needs the unconditioned "
                "keyword arguments (e.g. empty-prompt embeddings)"
            )
        self.denoiser = denoiser
        self.timesteps = list(timesteps)
        self.cond, self.uncond = cond, uncond
        self.guidance_scale = guidance_scale
        self.base_batch, self.repeats = base_batch, repeats
        self.evaluations = 0

    def _kwargs(self, which: Conditioning, position: int, rows: slice) -> dict:
        if which is None:
            return {}
        if isinstance(which, PromptSchedule):
            which = which.cond_at(position, len(self.timesteps))
        return _rows_of(which, self.base_batch, self.repeats, rows)

    def __call__(self, sample: torch.Tensor, step: int, rows: slice | None = None) -> torch.Tensor:
        """Model output for chains ``rows`` at spec step ``step`` (``x_step`` = ``sample``)."""
        position = len(self.timesteps) - step
        timestep = self.timesteps[position]
        rows = slice(0, self.base_batch * self.repeats) if rows is None else rows
        # Counted before the call: a checkpoint's recomputation may stop inside the
        # denoiser once it has rebuilt what backward needs, and it still cost a forward.
        self.evaluations += sample.shape[0] * (1 if self.guidance_scale == 1.0 else 2)
        out = call_denoiser(
            self.denoiser, sample, timestep, self._kwargs(self.cond, position, rows)
        )
        if self.guidance_scale == 1.0:
            return out
        unguided = call_denoiser(
            self.denoiser, sample, timestep, self._kwargs(self.uncond, position, rows)
        )
        return unguided + self.guidance_scale * (out - unguided)


# --------------------------------------------------------------------------------------
# The chain runner
# --------------------------------------------------------------------------------------


@dataclass
class Chain:
    """What a sampling pass recorded (no autograd graph is kept).

    Attributes (``T`` steps, ``B`` chains; position ``k`` is the ``k``-th step taken):
        timesteps: the ``T`` timesteps, noise to data.
        samples: ``T + 1`` tensors ``[B, ...]``: ``samples[k]`` is the input of position
            ``k`` (``x_{T-k}`` in the spec's numbering); ``samples[-1]`` is ``x_0``.
        sigmas: ``T`` floats, the std of each step (0 where deterministic).
        log_probs: ``[B, T]`` (float32 or float64) when asked, else ``None``; a column
            whose ``sigmas`` entry is 0 holds 0 and has no meaning (no density).
        model_outputs, means: ``T`` tensors each when asked, else ``None``.
        evaluations: samples evaluated by the denoiser (twice per sample with guidance).
    """

    timesteps: list[int]
    samples: list[torch.Tensor]
    sigmas: list[float]
    log_probs: torch.Tensor | None = None
    model_outputs: list[torch.Tensor] | None = None
    means: list[torch.Tensor] | None = None
    evaluations: int = 0
    coefficients: list[TransitionCoefficients] = field(default_factory=list)

    @property
    def x0(self) -> torch.Tensor:
        return self.samples[-1]


def sample_chain(
    denoiser: Callable[..., Any],
    scheduler: Any,
    x_T: torch.Tensor,
    *,
    eta: float = 1.0,
    generator: torch.Generator | None = None,
    cond: Conditioning = None,
    uncond: Conditioning = None,
    guidance_scale: float = 1.0,
    return_log_probs: bool = False,
    return_model_outputs: bool = False,
    return_means: bool = False,
    reduce: str = "sum",
    backend: str = "auto",
) -> Chain:
    """Run ``B`` chains from ``x_T`` over ``scheduler.timesteps``, without autograd.

    Args:
        denoiser: ``denoiser(x_t, t, **kwargs)`` returning a tensor or an object with
            ``.sample`` (diffusers ``UNet2DModel``, ``UNet2DConditionModel``, or any
            callable); ``t`` is a ``[B]`` int64 tensor.
        scheduler: DDIM or DDPM scheduler with timesteps set.
        x_T: ``[B, ...]`` starting noise (floating).
        eta: DDIM noise level (1 for DDPM).
        generator: draws the step noises (on its device), in order of the steps.
        cond: keyword arguments for the denoiser, the same at every step (a mapping) or
            by stage (a :class:`PromptSchedule`); tensors whose first dimension is
            ``B`` are per chain.
        uncond, guidance_scale: classifier-free guidance (module docstring of
            :class:`GuidedDenoiser`).
        return_log_probs, return_model_outputs, return_means: what else to record.
        reduce: of the log-densities (``"sum"`` or ``"mean"``).
        backend: of the log-density op (``riskfast.ops.transition_log_prob_into``, which
            fills the ``[B, T]`` buffer column by column).
    Returns:
        :class:`Chain`.
    """
    x_T = require_tensor("x_T", x_T)
    require_floating("x_T", x_T)
    if x_T.dim() < 2 or x_T.shape[0] == 0:
        raise ValueError(f"x_T: expected shape [B, ...] with B >= 1, got {tuple(x_T.shape)}")
    timesteps = check_scheduler(scheduler)
    eta = require_number("eta", eta, low=0.0, high=1.0)
    for name, flag in (
        ("return_log_probs", return_log_probs),
        ("return_model_outputs", return_model_outputs),
        ("return_means", return_means),
    ):
        require_bool(name, flag)
    require_choice("reduce", reduce, REDUCTIONS)
    require_choice("backend", backend, TRANSITION_BACKENDS)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
    coefficients = [transition_coefficients(scheduler, t, eta) for t in timesteps]
    model = GuidedDenoiser(
        denoiser,
        timesteps,
        cond=cond,
        uncond=uncond,
        guidance_scale=guidance_scale,
        base_batch=x_T.shape[0],
    )
    num_steps = len(timesteps)
    samples = [x_T.detach()]
    outputs: list[torch.Tensor] = []
    means: list[torch.Tensor] = []
    log_probs = (
        torch.zeros(x_T.shape[0], num_steps, device=x_T.device, dtype=math_dtype(x_T))
        if return_log_probs
        else None
    )
    with torch.no_grad():
        for position, coeff in enumerate(coefficients):
            x = samples[-1]
            out = model(x, num_steps - position)
            mean = transition_mean(x, out, coeff)
            noise = _randn_like(x, generator) if coeff.sigma > 0.0 else None
            x_prev = add_step_noise(mean, coeff.sigma, noise, x.dtype)
            if log_probs is not None and coeff.sigma > 0.0:
                transition_log_prob_into(
                    log_probs, position, x_prev, x, out, coeff, reduce=reduce, backend=backend
                )
            samples.append(x_prev)
            if return_model_outputs:
                outputs.append(out)
            if return_means:
                means.append(mean)
    return Chain(
        timesteps=timesteps,
        samples=samples,
        sigmas=[c.sigma for c in coefficients],
        log_probs=log_probs,
        model_outputs=outputs if return_model_outputs else None,
        means=means if return_means else None,
        evaluations=model.evaluations,
        coefficients=coefficients,
    )
