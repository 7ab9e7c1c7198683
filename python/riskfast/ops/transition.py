"""The denoising transition and its log-density: the public op and its reference.

Spec: ``spec/rlr.md``, "The chain" and "What the C++/CUDA extension accumulates"
(fused transition log-density). One step of the chain ``x_t -> x_{t-1}`` is Gaussian,

    x_{t-1} ~ N(mean, sigma^2 I),
    mean = c_x0 * x0_hat + c_eps * eps_hat + c_sample * x_t,

where ``(x0_hat, eps_hat)`` come from the model output by the prediction type
(``a = alpha_prod_t``, the cumulative alpha-bar of ``t``; ``m`` the model output):

* ``"epsilon"``:      ``x0_hat = (x_t - sqrt(1 - a) m) / sqrt(a)``,  ``eps_hat = m``;
* ``"sample"``:       ``x0_hat = m``,  ``eps_hat = (x_t - sqrt(a) x0_hat) / sqrt(1 - a)``;
* ``"v_prediction"``: ``x0_hat = sqrt(a) x_t - sqrt(1 - a) m``,
  ``eps_hat = sqrt(a) m + sqrt(1 - a) x_t``;

and ``x0_hat`` is clamped to ``[-clip_range, clip_range]`` after ``eps_hat`` is formed
when ``clip_range`` is set (diffusers' ``clip_sample``). The coefficients
(:class:`TransitionCoefficients`) say which sampler this is; ``riskfast.rlr`` derives
them from a diffusers scheduler: DDIM with noise level eta has
``(c_x0, c_eps, c_sample) = (sqrt(a_prev), sqrt(1 - a_prev - sigma^2), 0)``, DDPM's
posterior mean ``(sqrt(a_prev) beta_t / (1 - a), 0, sqrt(alpha_t) (1 - a_prev) / (1 - a))``.

The log-density is summed over every non-batch dimension (``reduce="sum"``, the true
score), or divided by their count (``reduce="mean"``, DDPO's convention):

    log N(x; mean, sigma^2 I) = -||x - mean||^2 / (2 sigma^2) - D log sigma - D/2 log(2 pi).

Math runs in float32 for 16-bit and float32 inputs and in float64 when any input is
float64; results come back in that dtype. One function owns each formula:
:func:`predict_original_and_noise`, :func:`transition_mean`,
:func:`gaussian_log_density`, :func:`clamp_log_ratio`.

Backends (``backend=``): ``"reference"`` (these PyTorch functions, autograd),
``"compiled"`` (the fused operator of ``riskfast._C``: one pass over the data),
``"auto"`` (compiled where the extension provides it, the reference otherwise).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

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

__all__ = [
    "PREDICTION_TYPES",
    "REDUCTIONS",
    "TRANSITION_BACKENDS",
    "TransitionCoefficients",
    "clamp_log_ratio",
    "gaussian_log_density",
    "predict_original_and_noise",
    "transition_log_prob",
    "transition_log_prob_into",
    "transition_log_prob_reference",
    "transition_mean",
]

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
REDUCTIONS = ("sum", "mean")
TRANSITION_BACKENDS = ("auto", "compiled", "reference")
_LOG_2PI = math.log(2.0 * math.pi)


class TransitionCoefficients(NamedTuple):
    """Scalars of one transition ``x_t -> x_{t-1}`` (module docstring for the formulas).

    ``alpha_prod_t`` in ``(0, 1)``; ``sigma >= 0`` (0: a deterministic step, which has
    no log-density); ``clip_range`` ``None`` or ``> 0``.
    """

    alpha_prod_t: float
    coef_x0: float
    coef_eps: float
    coef_sample: float
    sigma: float
    prediction_type: str = "epsilon"
    clip_range: float | None = None


def math_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any tensor is float64, float32 otherwise (16-bit inputs included)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def predict_original_and_noise(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    alpha_prod_t: float,
    prediction_type: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x0_hat, eps_hat)`` from the model output (module docstring), unclamped."""
    root_a, root_b = math.sqrt(alpha_prod_t), math.sqrt(1.0 - alpha_prod_t)
    if prediction_type == "epsilon":
        return (sample - root_b * model_output) / root_a, model_output
    if prediction_type == "sample":
        return model_output, (sample - root_a * model_output) / root_b
    if prediction_type == "v_prediction":
        return root_a * sample - root_b * model_output, root_a * model_output + root_b * sample
    raise ValueError(
        f"prediction_type: expected one of {list(PREDICTION_TYPES)}, got {prediction_type!r}"
    )


def transition_mean(
    sample: torch.Tensor, model_output: torch.Tensor, coefficients: TransitionCoefficients
) -> torch.Tensor:
    """The mean of ``x_{t-1}`` given ``x_t = sample`` (shape of ``sample``, math dtype).

    Differentiable in ``sample`` and ``model_output``; no argument checks (the public
    :func:`transition_log_prob` and ``riskfast.rlr`` check).
    """
    dtype = math_dtype(sample, model_output)
    sample, model_output = sample.to(dtype), model_output.to(dtype)
    original, noise = predict_original_and_noise(
        sample, model_output, coefficients.alpha_prod_t, coefficients.prediction_type
    )
    if coefficients.clip_range is not None:
        original = original.clamp(-coefficients.clip_range, coefficients.clip_range)
    mean = coefficients.coef_x0 * original
    if coefficients.coef_eps != 0.0:
        mean = mean + coefficients.coef_eps * noise
    if coefficients.coef_sample != 0.0:
        mean = mean + coefficients.coef_sample * sample
    return mean


def gaussian_log_density(
    x: torch.Tensor, mean: torch.Tensor, sigma: float, reduce: str = "sum"
) -> torch.Tensor:
    """``log N(x; mean, sigma^2 I)`` per sample: ``[batch]`` in the math dtype.

    Sums over all non-batch dimensions (``reduce="sum"``) or averages (``"mean"``).
    ``sigma > 0``.
    """
    dtype = math_dtype(x, mean)
    diff = (x.to(dtype) - mean.to(dtype)).reshape(x.shape[0], -1)
    dims = diff.shape[1]
    squared = diff.square().sum(dim=1)
    log_prob = squared * (-0.5 / sigma**2) - dims * (math.log(sigma) + 0.5 * _LOG_2PI)
    return log_prob / dims if reduce == "mean" else log_prob


def clamp_log_ratio(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, bound: float
) -> torch.Tensor:
    """``old + clamp(log_prob - old, -bound, bound)``: the PPO-style guard on log-ratios."""
    old = old_log_prob.to(log_prob.dtype)
    return old + (log_prob - old).clamp(-bound, bound)


def transition_log_prob_reference(
    x_prev: torch.Tensor,
    sample: torch.Tensor,
    model_output: torch.Tensor,
    coefficients: TransitionCoefficients,
    *,
    reduce: str = "sum",
    old_log_prob: torch.Tensor | None = None,
    log_ratio_bound: float = 20.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log_prob [batch], mean)``: the plain composition of the formulas above."""
    mean = transition_mean(sample, model_output, coefficients)
    log_prob = gaussian_log_density(x_prev, mean, coefficients.sigma, reduce)
    if old_log_prob is not None:
        log_prob = clamp_log_ratio(log_prob, old_log_prob, log_ratio_bound)
    return log_prob, mean


def check_coefficients(coefficients: Any, *, need_sigma: bool) -> TransitionCoefficients:
    """Validate a :class:`TransitionCoefficients` (errors name ``coefficients.<field>``)."""
    if not isinstance(coefficients, TransitionCoefficients):
        raise TypeError(
            f"coefficients: expected TransitionCoefficients, got {type(coefficients).__name__}"
        )
    require_number(
        "coefficients.alpha_prod_t",
        coefficients.alpha_prod_t,
        low=0.0,
        high=1.0,
        low_open=True,
        high_open=True,
    )
    for field in ("coef_x0", "coef_eps", "coef_sample"):
        require_number(f"coefficients.{field}", getattr(coefficients, field))
    require_number("coefficients.sigma", coefficients.sigma, low=0.0, low_open=need_sigma)
    require_choice("coefficients.prediction_type", coefficients.prediction_type, PREDICTION_TYPES)
    if coefficients.clip_range is not None:
        require_number("coefficients.clip_range", coefficients.clip_range, low=0.0, low_open=True)
    return coefficients


def _compiled_transition_op(device: torch.device) -> Any | None:
    """The compiled fused transition ops for ``device``, or ``None`` when not built.

    The returned object (:mod:`riskfast.ops._compiled`) has
    ``transition_log_prob(x_prev, sample, model_output, coefficients, reduce,
    return_mean) -> (log_prob, mean or None)`` and ``transition_log_prob_into_(log_probs,
    step, x_prev, sample, model_output, coefficients, reduce)``.
    """
    from ._compiled import transition_op_for

    return transition_op_for(device)


def _check_step_tensors(
    x_prev: Any, sample: Any, model_output: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x_prev = require_tensor("x_prev", x_prev)
    sample = require_tensor("sample", sample)
    model_output = require_tensor("model_output", model_output)
    for name, tensor in (("x_prev", x_prev), ("sample", sample), ("model_output", model_output)):
        require_floating(name, tensor)
    if sample.dim() < 1 or sample.shape[0] == 0:
        raise ValueError(f"sample: expected shape [B, ...] with B >= 1, got {tuple(sample.shape)}")
    require_same_shape("x_prev", x_prev, "sample", sample)
    require_same_shape("model_output", model_output, "sample", sample)
    require_same_device("x_prev", x_prev, "sample", sample)
    require_same_device("model_output", model_output, "sample", sample)
    return x_prev, sample, model_output


def _resolve_backend(backend: Any, device: torch.device) -> Any | None:
    """The compiled ops to call, or ``None`` for the reference."""
    require_choice("backend", backend, TRANSITION_BACKENDS)
    compiled = None if backend == "reference" else _compiled_transition_op(device)
    if backend == "compiled" and compiled is None:
        raise RuntimeError(
            f"backend: the 'compiled' transition op is not available for {device.type} "
            "tensors in this build of riskfast._C (see riskfast.build_info()); use "
            "backend='reference'"
        )
    return compiled


def transition_log_prob(
    x_prev: torch.Tensor,
    sample: torch.Tensor,
    model_output: torch.Tensor,
    coefficients: TransitionCoefficients,
    *,
    reduce: str = "sum",
    old_log_prob: torch.Tensor | None = None,
    log_ratio_bound: float = 20.0,
    return_mean: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-density of the transition ``sample -> x_prev`` (module docstring), per sample.

    Args:
        x_prev: ``[B, ...]`` the taken step ``x_{t-1}``.
        sample: ``[B, ...]`` ``x_t``; model_output: ``[B, ...]`` the model's output at
            ``(x_t, t)``. Floating, one device, equal shapes.
        coefficients: the step's scalars; ``sigma`` must be > 0.
        reduce: ``"sum"`` (default) or ``"mean"`` over the non-batch dimensions.
        old_log_prob: ``[B]`` stored log-densities; when given the result is
            ``old + clamp(log_prob - old, -log_ratio_bound, log_ratio_bound)``.
        return_mean: also return the mean (``[B, ...]``).
    Returns:
        ``log_prob [B]`` (float32, or float64 when an input is float64), or
        ``(log_prob, mean)``. Differentiable in ``sample`` and ``model_output`` (and
        ``x_prev``).
    """
    x_prev, sample, model_output = _check_step_tensors(x_prev, sample, model_output)
    coefficients = check_coefficients(coefficients, need_sigma=True)
    require_choice("reduce", reduce, REDUCTIONS)
    log_ratio_bound = require_number("log_ratio_bound", log_ratio_bound, low=0.0, low_open=True)
    if old_log_prob is not None:
        old_log_prob = require_tensor("old_log_prob", old_log_prob)
        require_floating("old_log_prob", old_log_prob)
        if old_log_prob.shape != (sample.shape[0],):
            raise ValueError(
                f"old_log_prob: expected shape ({sample.shape[0]},), got {tuple(old_log_prob.shape)}"
            )
        require_same_device("old_log_prob", old_log_prob, "sample", sample)
    return_mean = require_bool("return_mean", return_mean)
    compiled = _resolve_backend(backend, sample.device)
    if compiled is not None:
        log_prob, mean = compiled.transition_log_prob(
            x_prev, sample, model_output, coefficients, reduce, return_mean
        )
        if old_log_prob is not None:
            log_prob = clamp_log_ratio(log_prob, old_log_prob, log_ratio_bound)
    else:
        log_prob, mean = transition_log_prob_reference(
            x_prev,
            sample,
            model_output,
            coefficients,
            reduce=reduce,
            old_log_prob=old_log_prob,
            log_ratio_bound=log_ratio_bound,
        )
    return (log_prob, mean) if return_mean else log_prob


def transition_log_prob_into(
    log_probs: torch.Tensor,
    step: int,
    x_prev: torch.Tensor,
    sample: torch.Tensor,
    model_output: torch.Tensor,
    coefficients: TransitionCoefficients,
    *,
    reduce: str = "sum",
    backend: str = "auto",
) -> torch.Tensor:
    """Write the step's log-densities into column ``step`` of a ``[B, T]`` buffer.

    The step-batched form for sampling: a sampler that takes ``T`` steps keeps one
    ``log_probs`` buffer ``[B, T]`` and, after step ``t`` draws ``x_prev`` from
    ``sample``, calls ``transition_log_prob_into(log_probs, t, x_prev, sample,
    model_output, coefficients)``; DDPO-style ratios and the likelihood-ratio terms
    read the buffer later (as ``old_log_prob`` of :func:`transition_log_prob`). The
    compiled op writes the column directly (no ``[B]`` temporary, no extra launch).

    Args:
        log_probs: ``[B, T]`` float32 or float64 buffer on the inputs' device (any
            strides); written in place, invisible to autograd.
        step: column to write, ``0 <= step < T``.
        x_prev, sample, model_output, coefficients, reduce: as in
            :func:`transition_log_prob`.
    Returns:
        ``log_probs[:, step]`` (a view of the buffer). Not differentiable: use
        :func:`transition_log_prob` for gradients.
    """
    log_probs = require_tensor("log_probs", log_probs)
    x_prev, sample, model_output = _check_step_tensors(x_prev, sample, model_output)
    if log_probs.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"log_probs: expected float32 or float64, got {log_probs.dtype}")
    if log_probs.dim() != 2 or log_probs.shape[0] != sample.shape[0]:
        raise ValueError(
            f"log_probs: expected shape [B, T] with B = {sample.shape[0]}, got "
            f"{tuple(log_probs.shape)}"
        )
    require_same_device("log_probs", log_probs, "sample", sample)
    step = require_int("step", step, low=0)
    if step >= log_probs.shape[1]:
        raise ValueError(f"step: must be < T = {log_probs.shape[1]}, got {step}")
    coefficients = check_coefficients(coefficients, need_sigma=True)
    require_choice("reduce", reduce, REDUCTIONS)
    compiled = _resolve_backend(backend, sample.device)
    with torch.no_grad():
        if compiled is not None:
            compiled.transition_log_prob_into_(
                log_probs, step, x_prev, sample, model_output, coefficients, reduce
            )
        else:
            log_prob, _ = transition_log_prob_reference(
                x_prev, sample, model_output, coefficients, reduce=reduce
            )
            log_probs[:, step] = log_prob
    return log_probs[:, step]
