"""Argument checks shared by every public entry point.

Each helper raises ``TypeError`` for a wrong kind of object and ``ValueError`` for a
wrong value, and the message always starts with the argument's name so that a user
can tell at a glance which input to fix.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch

INT64_MAX = 2**63 - 1
"""Largest integer a tensor (and most torch arguments) can hold."""
UINT64_MAX = 2**64 - 1
"""Largest seed ``torch.Generator.manual_seed`` accepts."""

_REAL_DTYPES = (
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
)


def as_tensor(name: str, value: Any) -> torch.Tensor:
    """Return ``value`` as a tensor; lists and tuples of numbers are accepted."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (list, tuple)):
        try:
            return torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"{name}: expected a tensor or a list of numbers ({err})") from None
    raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")


def require_tensor(name: str, value: Any) -> torch.Tensor:
    """Accept only a tensor (no lists): used for token-level inputs."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    return value


def require_real(name: str, tensor: torch.Tensor) -> None:
    if tensor.dtype not in _REAL_DTYPES:
        raise TypeError(
            f"{name}: expected a real (bool, integer or floating) dtype, got {tensor.dtype}"
        )


def require_floating(name: str, tensor: torch.Tensor) -> None:
    if not tensor.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point dtype, got {tensor.dtype}")


def require_integer(name: str, tensor: torch.Tensor) -> None:
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer dtype, got {tensor.dtype}")


def require_ndim(name: str, tensor: torch.Tensor, ndim: int | Iterable[int], what: str) -> None:
    allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    if tensor.dim() not in allowed:
        raise ValueError(f"{name}: expected shape {what}, got {tuple(tensor.shape)}")


def require_same_shape(name: str, tensor: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if tensor.shape != ref.shape:
        raise ValueError(
            f"{name}: shape {tuple(tensor.shape)} does not match {ref_name} {tuple(ref.shape)}"
        )


def require_same_device(name: str, tensor: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if tensor.device != ref.device:
        raise ValueError(f"{name}: on {tensor.device}, but {ref_name} is on {ref.device}")


def require_finite(name: str, tensor: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    """Raise when ``tensor`` holds NaN or inf (only where ``mask`` is true, if given)."""
    if not tensor.is_floating_point():
        return
    bad = ~torch.isfinite(tensor)
    if mask is not None:
        bad = bad & mask
    if bool(bad.any()):
        where = torch.nonzero(bad)[:5].tolist()
        raise ValueError(f"{name}: holds non-finite values (first positions {where})")


def require_all_finite(
    checks: Sequence[tuple[str, torch.Tensor | None, torch.Tensor | None]],
) -> None:
    """:func:`require_finite` for several ``(name, tensor, mask)`` at the cost of one host read.

    ``None`` tensors and non-floating ones are skipped; the first non-finite tensor in
    ``checks`` order is reported (with its positions, read only then).
    """
    present = [(n, t, m) for n, t, m in checks if t is not None and t.is_floating_point()]
    if not present:
        return
    # Tensors of one shape under one mask share a pass: AND their finiteness, then mask.
    groups: dict[tuple[int, tuple[int, ...]], list[tuple[torch.Tensor, Any]]] = {}
    for _, tensor, mask in present:
        groups.setdefault((id(mask), tuple(tensor.shape)), []).append((tensor, mask))
    flags = []
    for members in groups.values():
        finite = torch.isfinite(members[0][0])
        for tensor, _ in members[1:]:
            finite &= torch.isfinite(tensor)
        mask = members[0][1]
        flags.append((~finite & mask if mask is not None else ~finite).any())
    if not any(torch.stack(flags).tolist()):
        return
    for name, tensor, mask in present:
        require_finite(name, tensor, mask)


def require_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")
    return value


def require_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Check a finite real scalar inside ``[low, high]`` (open ends when asked)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
            value = value.item()
        else:
            raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    try:
        value = float(value)
    except OverflowError:  # an int beyond the float range
        raise ValueError(f"{name}: must be finite, got an integer beyond the float range") from None
    if not math.isfinite(value):
        raise ValueError(f"{name}: must be finite, got {value}")
    if low is not None and (value < low or (low_open and value == low)):
        bound = f"> {low}" if low_open else f">= {low}"
        raise ValueError(f"{name}: must be {bound}, got {value}")
    if high is not None and (value > high or (high_open and value == high)):
        bound = f"< {high}" if high_open else f"<= {high}"
        raise ValueError(f"{name}: must be {bound}, got {value}")
    return value


def set_number(obj: Any, name: str, **bounds: Any) -> None:
    """:func:`require_number` on ``obj.<name>``, stored back as the float it returns (a
    config given ``torch.tensor(0.5)`` or ``1`` keeps ``0.5`` or ``1.0``); works on frozen
    dataclasses."""
    object.__setattr__(obj, name, require_number(name, getattr(obj, name), **bounds))


def require_int(name: str, value: Any, *, low: int | None = None, high: int | None = None) -> int:
    """Check a Python ``int`` (not a bool) in ``[low, high]``; pass ``high=INT64_MAX`` for
    anything that becomes a tensor size or index, so that a huge value is named here
    instead of overflowing inside torch."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if low is not None and value < low:
        raise ValueError(f"{name}: must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name}: must be <= {high}, got {value}")
    return value


def require_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
    return value


def checked_generator_state(value: Any, generator: torch.Generator) -> torch.Tensor:
    """A saved ``torch.Generator`` state that ``generator`` can take (else ``ValueError``)."""
    reference = generator.get_state()
    if not isinstance(value, torch.Tensor) or value.dtype != reference.dtype:
        got = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"state: generator must be a uint8 tensor (a generator state), got {got}")
    if value.shape != reference.shape:
        raise ValueError(
            f"state: generator state has shape {tuple(value.shape)}, a {generator.device} "
            f"generator's has {tuple(reference.shape)}"
        )
    value = value.detach().cpu().clone()
    try:  # torch checks the content too (an all-zero mt19937 state is refused)
        torch.Generator(device=generator.device).set_state(value)
    except RuntimeError as err:
        raise ValueError(f"state: generator is not a valid generator state ({err})") from None
    return value
