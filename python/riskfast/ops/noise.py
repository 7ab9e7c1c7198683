"""Counter-based noise for RLR's zeroth-order term: the public ops.

Spec: ``spec/rlr.md`` ("What the C++/CUDA extension accumulates", counter-based noise)
and ``spec/kernels.md`` (contracts). The stream and the arithmetic of applying it are
defined in :mod:`riskfast.ops.philox`, which also holds the plain PyTorch reference.

* :func:`philox_normal` - a slice of the standard normal stream of a seed;
* :func:`perturb_` - ``x += scale * u(seed)`` on a list of tensors, in place;
* :func:`accumulate_noise_` - ``x += sum_i scales[i] * u(seeds[i])``, in place, one pass.

A list of tensors is one stream (its elements flattened in order), so a parameter's
noise does not depend on how the list is split, and ``perturb_(xs, seed, -scale)``
undoes ``perturb_(xs, seed, scale)`` up to rounding (one rounding of ``x`` each way).
Seeds are ints in ``[0, 2**63)``; nothing here touches a global generator.

Backends (``backend=``): ``"reference"`` (PyTorch, any device), ``"compiled"`` (the
operators of ``riskfast._C``: one pass, every seed at once; CPU, and CUDA when built
with it), ``"auto"`` (compiled when the extension provides the op for the tensors'
device, the reference otherwise). The compiled CPU op computes the float32 log, sqrt,
sin and cos with the functions torch's own CPU kernels use (MKL's vector math in
torch's x86 builds), so its stream is bitwise the reference's on the same machine
(tests check it); the CUDA op uses CUDA's ``logf``/``sqrtf``/``sinf``/``cosf`` as
torch's CUDA kernels do. The CPU and CUDA streams differ by a few float32 ulps where
those libraries differ (``benchmarks/gpu_check.py`` measures it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .._checks import require_choice, require_int, require_number
from .philox import accumulate_noise_reference_, philox_normal_reference

__all__ = ["NOISE_BACKENDS", "accumulate_noise_", "perturb_", "philox_normal"]

NOISE_BACKENDS = ("auto", "compiled", "reference")
_SEED_LIMIT = 2**63
# Elements addressable by an offset: kept well inside int64 so that every
# implementation indexes the stream with 64-bit integers.
_STREAM_LENGTH = 2**62
_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _compiled_noise_ops(device: torch.device) -> Any | None:
    """The compiled noise operators for ``device``, or ``None`` when not built.

    ``riskfast._C`` registers ``riskfast::philox_normal_fill_`` and
    ``riskfast::accumulate_noise_`` per device (:mod:`riskfast.ops._compiled`); the
    returned object has ``philox_normal(numel, seed, offset, device, dtype)`` and
    ``accumulate_noise_(tensors, seeds, scales)``.
    """
    from ._compiled import noise_ops_for

    return noise_ops_for(device)


def _resolve_backend(backend: Any, device: torch.device) -> str:
    require_choice("backend", backend, NOISE_BACKENDS)
    if backend == "reference":
        return backend
    ops = _compiled_noise_ops(device)
    if ops is None:
        if backend == "compiled":
            raise RuntimeError(
                f"backend: 'compiled' noise ops are not available for {device.type} tensors in "
                "this build of riskfast._C (see riskfast.build_info()); use backend='reference'"
            )
        return "reference"
    return "compiled"


def _check_seed(name: str, seed: Any) -> int:
    seed = require_int(name, seed, low=0)
    if seed >= _SEED_LIMIT:
        raise ValueError(f"{name}: must be < 2**63, got {seed}")
    return seed


def _tensor_list(name: str, tensors: Any) -> list[torch.Tensor]:
    """A tensor or a non-empty sequence of tensors, as a list (element types checked)."""
    if isinstance(tensors, torch.Tensor):
        return [tensors]
    if not isinstance(tensors, (list, tuple)):
        raise TypeError(
            f"{name}: expected a tensor or a list of tensors, got {type(tensors).__name__}"
        )
    tensors = list(tensors)
    if not tensors:
        raise ValueError(f"{name}: expected at least one tensor, got an empty list")
    if not all(isinstance(tensor, torch.Tensor) for tensor in tensors):
        index = next(i for i, t in enumerate(tensors) if not isinstance(t, torch.Tensor))
        raise TypeError(
            f"{name}[{index}]: expected a torch.Tensor, got {type(tensors[index]).__name__}"
        )
    # One device, checked here for every backend: the dispatcher would send a list that
    # mixes in a meta tensor to the fake kernel, which checks nothing.
    device = tensors[0].device
    if not all(tensor.device == device for tensor in tensors):
        index = next(i for i, t in enumerate(tensors) if t.device != device)
        raise ValueError(
            f"{name}[{index}]: on {tensors[index].device}, but {name}[0] is on {device}"
        )
    return tensors


def _check_tensor_list(name: str, tensors: list[torch.Tensor]) -> None:
    """Floating, contiguous tensors (what the in-place write needs).

    The compiled ops make the same checks in C++ with the same names and error types
    (``csrc/op_checks.h``, before any write), so only the reference path runs these: on a
    list of 256 tensors they cost about 25 us of host time per call.
    """
    for index, tensor in enumerate(tensors):
        if tensor.dtype not in _FLOATING:
            raise TypeError(
                f"{name}[{index}]: expected float16, bfloat16, float32 or float64, got {tensor.dtype}"
            )
        if not tensor.is_contiguous():
            raise ValueError(f"{name}[{index}]: must be contiguous (the noise is applied in place)")


def philox_normal(
    numel: int,
    seed: int,
    offset: int = 0,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    backend: str = "auto",
) -> torch.Tensor:
    """Elements ``offset .. offset + numel - 1`` of the standard normal stream of ``seed``.

    Args:
        numel: how many numbers (>= 0).
        seed: in ``[0, 2**63)``.
        offset: index of the first element in the stream (>= 0).
        device, dtype: of the result (float16, bfloat16, float32 or float64); the
            numbers are computed in float32 and cast.
    Returns:
        ``[numel]`` tensor. Stream layout: :mod:`riskfast.ops.philox`.
    """
    numel = require_int("numel", numel, low=0)
    seed = _check_seed("seed", seed)
    offset = require_int("offset", offset, low=0)
    if offset + numel > _STREAM_LENGTH:
        raise ValueError(f"offset: offset + numel must be <= 2**62, got {offset + numel}")
    if not isinstance(dtype, torch.dtype) or dtype not in _FLOATING:
        raise TypeError(f"dtype: expected float16, bfloat16, float32 or float64, got {dtype!r}")
    try:
        device = torch.device("cpu") if device is None else torch.device(device)
    except (TypeError, RuntimeError) as err:
        raise TypeError(f"device: expected a torch.device or a device string ({err})") from None
    if _resolve_backend(backend, device) == "compiled":
        return _compiled_noise_ops(device).philox_normal(numel, seed, offset, device, dtype)
    if device.type == "meta":
        raise ValueError("device: 'meta' holds no values; a noise stream needs a real device")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device} asked for, but CUDA is not available here")
    return philox_normal_reference(numel, seed, offset, device=device, dtype=dtype)


def accumulate_noise_(
    tensors: torch.Tensor | Sequence[torch.Tensor],
    seeds: Sequence[int],
    scales: Sequence[float],
    *,
    backend: str = "auto",
) -> None:
    """Add ``sum_i scales[i] * u(seeds[i])`` to the stream of ``tensors``, in place.

    Args:
        tensors: a floating tensor or a list of them, contiguous, on one device. Each
            is read and written once (accumulation in float32, or float64 for float64
            tensors); autograd does not see the write.
        seeds: ints in ``[0, 2**63)``; scales: finite floats, as many as ``seeds``.
    RLR uses it to add ``sum_{i in C} coef * u_i`` to the gradients in one pass.
    """
    tensors = _tensor_list("tensors", tensors)
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence):
        raise TypeError(f"seeds: expected a sequence of ints, got {type(seeds).__name__}")
    if isinstance(scales, (str, bytes)) or not isinstance(scales, Sequence):
        raise TypeError(f"scales: expected a sequence of floats, got {type(scales).__name__}")
    if len(seeds) != len(scales):
        raise ValueError(f"scales: expected {len(seeds)} values (one per seed), got {len(scales)}")
    seeds = [_check_seed(f"seeds[{i}]", s) for i, s in enumerate(seeds)]
    scales = [require_number(f"scales[{i}]", s) for i, s in enumerate(scales)]
    compiled = _resolve_backend(backend, tensors[0].device) == "compiled"
    if not compiled or not seeds:  # (no seeds: the op is not called, so check here)
        _check_tensor_list("tensors", tensors)
    if not seeds:
        return
    if compiled:  # the op checks the tensors itself, before writing
        _compiled_noise_ops(tensors[0].device).accumulate_noise_(tensors, seeds, scales)
        return
    accumulate_noise_reference_(tensors, seeds, scales)


def perturb_(
    tensors: torch.Tensor | Sequence[torch.Tensor],
    seed: int,
    scale: float,
    *,
    backend: str = "auto",
) -> None:
    """Add ``scale * u(seed)`` to the stream of ``tensors``, in place.

    RLR perturbs the trainable parameters with it (``theta + sigma_p u_i``); the same
    call with ``-scale`` undoes it up to rounding. Arguments as in
    :func:`accumulate_noise_` with a single seed and scale.
    """
    tensors = _tensor_list("tensors", tensors)
    seed = _check_seed("seed", seed)
    scale = require_number("scale", scale)
    if _resolve_backend(backend, tensors[0].device) == "compiled":
        # the op checks the tensors itself, before writing
        _compiled_noise_ops(tensors[0].device).accumulate_noise_(tensors, [seed], [scale])
        return
    _check_tensor_list("tensors", tensors)
    accumulate_noise_reference_(tensors, (seed,), (scale,))
