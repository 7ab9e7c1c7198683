"""Counter-based Gaussian noise: the plain PyTorch reference of RLR's noise ops.

Spec: ``spec/rlr.md``, "What the C++/CUDA extension accumulates" (counter-based
noise). RLR's zeroth-order term perturbs the trainable parameters by
``sigma_p * u_i`` at step ``i`` and later adds ``u_i`` to the gradients; ``u_i`` is
never stored, only regenerated from its seed. This module defines the stream, so that
every implementation (this reference, the compiled CPU op and the CUDA op of
``riskfast._C``) gives the same numbers.

The stream of a seed. Element ``n`` (``n = offset + k`` for the ``k``-th element of a
request) is lane ``n % 4`` of the Philox4x32-10 block with

* counter ``(n // 4) mod 2**32, (n // 4) >> 32, 0, 0``,
* key ``seed mod 2**32, seed >> 32`` (``0 <= seed < 2**63``);

the block's four 32-bit words ``r0..r3`` become uniforms ``v = (2 (r >> 9) + 1) / 2**24``
in ``(0, 1)`` (exact in float32) and Box-Muller pairs

    z0 = sqrt(-2 log v0) cos(2 pi v1),   z1 = sqrt(-2 log v0) sin(2 pi v1),
    z2, z3 likewise from (v2, v3),

all in float32. A list of tensors is one stream: the elements of the list, flattened
in order, take consecutive ``n``, so how the list is split into tensors changes
nothing.

Applying the noise (``perturb_`` and ``accumulate_noise_``): ``x`` is read in its
accumulation dtype (float64 for float64 tensors, float32 otherwise), the noise cast to
it, ``x + scale * u`` formed as a product then a sum (two roundings, no fused
multiply-add), and the result written back in ``x``'s dtype; ``accumulate_noise_`` adds
its terms in the order given. No argument checks here: :mod:`riskfast.ops.noise` has them.

Philox4x32-10: Salmon, Moraes, Dror and Shaw, "Parallel random numbers: as easy as
1, 2, 3" (SC 2011); the multipliers and key increments are theirs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "PHILOX_KEY_INCREMENTS",
    "PHILOX_MULTIPLIERS",
    "PHILOX_ROUNDS",
    "accumulate_noise_reference_",
    "perturb_reference_",
    "philox4x32",
    "philox_normal_reference",
]

PHILOX_MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)
PHILOX_KEY_INCREMENTS = (0x9E3779B9, 0xBB67AE85)
PHILOX_ROUNDS = 10
_MASK32 = 0xFFFFFFFF
# Elements of the stream generated per Philox call when applying noise (bounds memory).
_SPAN = 1 << 22
# float32(2 pi): the angle is v * _TWO_PI in float32 in every implementation.
_TWO_PI = float(torch.tensor(2.0 * math.pi, dtype=torch.float32))


def _mulhilo(multiplier: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of ``multiplier * x`` for uint32 values held in int64.

    The 64-bit product is formed from 16-bit halves of ``x`` so that no intermediate
    leaves int64's range (every partial product is below ``2**48``).
    """
    low_part = (x & 0xFFFF) * multiplier
    high_part = (x >> 16) * multiplier
    low_sum = low_part + ((high_part & 0xFFFF) << 16)
    return (high_part >> 16) + (low_sum >> 32), low_sum & _MASK32


def philox4x32(counter: Sequence[torch.Tensor], key: tuple[int, int]) -> list[torch.Tensor]:
    """Philox4x32-10 on int64 tensors holding 32-bit words.

    Args:
        counter: four int64 tensors of one shape, each word in ``[0, 2**32)``.
        key: two ints in ``[0, 2**32)``.
    Returns:
        the four output words, int64 tensors in ``[0, 2**32)``.
    """
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for round_index in range(PHILOX_ROUNDS):
        if round_index:
            k0 = (k0 + PHILOX_KEY_INCREMENTS[0]) & _MASK32
            k1 = (k1 + PHILOX_KEY_INCREMENTS[1]) & _MASK32
        hi0, lo0 = _mulhilo(PHILOX_MULTIPLIERS[0], c0)
        hi1, lo1 = _mulhilo(PHILOX_MULTIPLIERS[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return [c0, c1, c2, c3]


def _uniform(word: torch.Tensor) -> torch.Tensor:
    """``(2 (r >> 9) + 1) / 2**24`` in float32: 2**23 values, symmetric in (0, 1)."""
    return ((word >> 9) * 2 + 1).to(torch.float32) * (2.0**-24)


def philox_normal_reference(
    numel: int,
    seed: int,
    offset: int = 0,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Elements ``offset .. offset + numel - 1`` of the standard normal stream of ``seed``.

    Returns a ``[numel]`` tensor of ``dtype`` on ``device`` (computed in float32, then
    cast). The layout of the stream is in the module docstring.
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    if numel == 0:
        return torch.empty(0, device=device, dtype=dtype)
    first_block, last_block = offset // 4, (offset + numel - 1) // 4
    blocks = torch.arange(first_block, last_block + 1, device=device, dtype=torch.int64)
    zeros = torch.zeros_like(blocks)
    r0, r1, r2, r3 = philox4x32(
        (blocks & _MASK32, blocks >> 32, zeros, zeros), (seed & _MASK32, seed >> 32)
    )
    radius01 = torch.sqrt(-2.0 * torch.log(_uniform(r0)))
    angle01 = _uniform(r1) * _TWO_PI
    radius23 = torch.sqrt(-2.0 * torch.log(_uniform(r2)))
    angle23 = _uniform(r3) * _TWO_PI
    lanes = torch.stack(
        (
            radius01 * torch.cos(angle01),
            radius01 * torch.sin(angle01),
            radius23 * torch.cos(angle23),
            radius23 * torch.sin(angle23),
        ),
        dim=1,
    ).reshape(-1)
    start = offset - 4 * first_block
    return lanes[start : start + numel].to(dtype)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def accumulate_noise_reference_(
    tensors: Sequence[torch.Tensor], seeds: Sequence[int], scales: Sequence[float]
) -> None:
    """``x += sum_i scales[i] * u(seeds[i])`` over the stream of the list ``tensors``.

    In place, terms in the order of ``seeds``. The stream is generated for spans of up to
    ``_SPAN`` elements across tensor boundaries (one Philox call per seed and span, so
    many small tensors cost as little as one large one) and each piece of a tensor is
    read once in its accumulation dtype and written once. Tensors must be contiguous
    (the public op checks).
    """
    sizes = [t.numel() for t in tensors]
    total = sum(sizes)
    if total == 0 or not seeds:
        return
    device = tensors[0].device
    with torch.no_grad():
        for span_start in range(0, total, _SPAN):
            span_end = min(total, span_start + _SPAN)
            noises = [
                philox_normal_reference(span_end - span_start, seed, span_start, device=device)
                for seed in seeds
            ]
            offset = 0
            for tensor, size in zip(tensors, sizes):
                low, high = max(offset, span_start), min(offset + size, span_end)
                if low < high:
                    flat = tensor.view(-1)[low - offset : high - offset]
                    acc_dtype = _accumulation_dtype(tensor.dtype)
                    acc = flat.to(acc_dtype, copy=True)
                    for noise, scale in zip(noises, scales, strict=True):
                        acc = acc + noise[low - span_start : high - span_start].to(acc_dtype) * scale
                    flat.copy_(acc)
                offset += size


def perturb_reference_(tensors: Sequence[torch.Tensor], seed: int, scale: float) -> None:
    """``x += scale * u(seed)`` over the stream of the list ``tensors`` (in place)."""
    accumulate_noise_reference_(tensors, (seed,), (scale,))
