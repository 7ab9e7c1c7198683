"""The compiled operators of ``riskfast._C`` as torch custom ops: fakes, autograd, calls.

The schemas are declared in C++ (``csrc/ops_schema.cpp``, namespace ``riskfast``) with
per-device kernels (``TORCH_LIBRARY_IMPL`` for CPU, and CUDA when built with it) and the
autograd formula of the transition log-density (``csrc/transition_autograd.cpp``, in C++
for its host time). This module, named there by ``set_python_module``, adds what torch
needs from Python: a fake (meta) kernel per op, so that ``torch.compile`` can trace
them. It imports without the extension (then
:data:`AVAILABLE` is False and nothing is registered); the public ops in
:mod:`riskfast.ops.noise` and :mod:`riskfast.ops.transition` ask it, per device,
whether a compiled kernel exists.

Ops (``torch.ops.riskfast.*``):

* ``philox_normal_fill_(out, seed, offset)`` - fills ``out`` with stream numbers
  ``offset ..`` of ``seed``;
* ``accumulate_noise_(tensors, seeds, scales)`` - ``x += sum_i scales[i] u(seeds[i])``
  over the list (one stream);
* ``transition_log_prob(x_prev, sample, model_output, <scalars>, return_mean)`` ->
  ``(log_prob [B], mean or [0])``, with ``transition_log_prob_backward``;
* ``transition_log_prob_into_(log_probs, step, x_prev, sample, model_output,
  <scalars>)`` - writes ``log_probs[:, step]`` (not differentiable).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .._extension import load_extension

__all__ = [
    "AVAILABLE",
    "OPS",
    "compiled_devices",
    "noise_ops_for",
    "transition_op_for",
]

_C = load_extension()
AVAILABLE = _C is not None
OPS = (
    "philox_normal_fill_",
    "accumulate_noise_",
    "transition_log_prob",
    "transition_log_prob_backward",
    "transition_log_prob_into_",
)
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def compiled_devices(op: str) -> list[str]:
    """Device types with a compiled kernel for ``riskfast::<op>`` (empty without ``_C``)."""
    if not AVAILABLE:
        return []
    return [
        device
        for device, key in _DISPATCH_KEYS.items()
        if torch._C._dispatch_has_kernel_for_dispatch_key(f"riskfast::{op}", key)
    ]


# Fixed once the extension is loaded (its kernels register when it is); a plain dict so
# that torch.compile traces the dispatch of the public ops without a graph break.
_KERNEL_DEVICES = {op: frozenset(compiled_devices(op)) for op in OPS}


def _has_kernel(op: str, device: torch.device) -> bool:
    return device.type in _KERNEL_DEVICES[op]


# ----------------------------------------------------------------------------- noise
class _NoiseOps:
    """What :mod:`riskfast.ops.noise` calls (arguments already validated there)."""

    @staticmethod
    def philox_normal(
        numel: int, seed: int, offset: int, device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        out = torch.empty(numel, device=device, dtype=dtype)
        torch.ops.riskfast.philox_normal_fill_(out, seed, offset)
        return out

    @staticmethod
    def accumulate_noise_(
        tensors: Sequence[torch.Tensor], seeds: Sequence[int], scales: Sequence[float]
    ) -> None:
        # The write is invisible to autograd, as in the reference (parameters that
        # require grad are perturbed in place).
        with torch.no_grad():
            torch.ops.riskfast.accumulate_noise_(list(tensors), list(seeds), list(scales))


_NOISE_OPS = _NoiseOps()


def noise_ops_for(device: torch.device) -> _NoiseOps | None:
    """The compiled noise ops for ``device``, or ``None`` when none was compiled for it."""
    if _has_kernel("philox_normal_fill_", device) and _has_kernel("accumulate_noise_", device):
        return _NOISE_OPS
    return None


# ------------------------------------------------------------------------ transition
def _scalars(coefficients: Any) -> tuple:
    """The op's scalar arguments from a ``TransitionCoefficients``."""
    clip = coefficients.clip_range
    return (
        float(coefficients.alpha_prod_t),
        float(coefficients.coef_x0),
        float(coefficients.coef_eps),
        float(coefficients.coef_sample),
        float(coefficients.sigma),
        str(coefficients.prediction_type),
        None if clip is None else float(clip),
    )


def _one_dtype(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The op takes one dtype: mixed inputs are cast (exactly) to the math dtype."""
    if len({t.dtype for t in tensors}) == 1:
        return tensors
    math = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    return tuple(t.to(math) for t in tensors)


def transition_log_prob(
    x_prev: torch.Tensor,
    sample: torch.Tensor,
    model_output: torch.Tensor,
    coefficients: Any,
    reduce: str,
    return_mean: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(log_prob [B], mean or None)`` through ``riskfast::transition_log_prob``."""
    x_prev, sample, model_output = _one_dtype(x_prev, sample, model_output)
    log_prob, mean = torch.ops.riskfast.transition_log_prob(
        x_prev, sample, model_output, *_scalars(coefficients), reduce, return_mean
    )
    return log_prob, (mean if return_mean else None)


def transition_log_prob_into_(
    log_probs: torch.Tensor,
    step: int,
    x_prev: torch.Tensor,
    sample: torch.Tensor,
    model_output: torch.Tensor,
    coefficients: Any,
    reduce: str,
) -> None:
    """``log_probs[:, step] = log_prob`` through ``riskfast::transition_log_prob_into_``."""
    x_prev, sample, model_output = _one_dtype(x_prev, sample, model_output)
    torch.ops.riskfast.transition_log_prob_into_(
        log_probs, step, x_prev, sample, model_output, *_scalars(coefficients), reduce
    )


class _TransitionOps:
    transition_log_prob = staticmethod(transition_log_prob)
    transition_log_prob_into_ = staticmethod(transition_log_prob_into_)


_TRANSITION_OPS = _TransitionOps()


def transition_op_for(device: torch.device) -> _TransitionOps | None:
    """The compiled transition ops for ``device``, or ``None`` when not compiled for it."""
    if all(
        _has_kernel(op, device)
        for op in (
            "transition_log_prob",
            "transition_log_prob_backward",
            "transition_log_prob_into_",
        )
    ):
        return _TRANSITION_OPS
    return None


# ---------------------------------------------------------- fakes and autograd (once)
def _math_dtype(sample: torch.Tensor) -> torch.dtype:
    return torch.float64 if sample.dtype == torch.float64 else torch.float32


def _register() -> None:
    lib = "riskfast::"

    @torch.library.register_fake(lib + "philox_normal_fill_")
    def _(out, seed, offset):
        return None

    @torch.library.register_fake(lib + "accumulate_noise_")
    def _(tensors, seeds, scales):
        return None

    @torch.library.register_fake(lib + "transition_log_prob")
    def _(x_prev, sample, model_output, *scalars_and_flags):
        return_mean = scalars_and_flags[-1]
        dtype = _math_dtype(sample)
        log_prob = sample.new_empty((sample.shape[0],), dtype=dtype)
        mean = sample.new_empty(sample.shape if return_mean else (0,), dtype=dtype)
        return log_prob, mean

    @torch.library.register_fake(lib + "transition_log_prob_backward")
    def _(grad_log_prob, grad_mean, x_prev, sample, model_output, *scalars_and_mask):
        mask = scalars_and_mask[-1]
        return tuple(sample.new_empty(sample.shape if needed else (0,)) for needed in mask)

    @torch.library.register_fake(lib + "transition_log_prob_into_")
    def _(log_probs, step, x_prev, sample, model_output, *scalars):
        return None


if AVAILABLE:
    _register()
