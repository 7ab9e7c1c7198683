"""Triton kernels: token log-probs (and entropy) from logits, one pass over the vocabulary.

Spec: ``spec/kernels.md``, "selective log-probs from logits" (memory bound). For each
token ``n`` with scaled logits ``z = logits[n] / temperature`` over a vocabulary of
``V`` entries:

* ``lse = log sum_j exp(z_j)``, computed with an online (streaming) log-sum-exp;
* ``logp = z[target] - lse`` (clamped at 0: a log-probability is never positive);
* ``entropy = -sum_j p_j log p_j = lse - sum_j p_j z_j`` with ``p = softmax(z)``.

Backward (``d/dz``; ``dlogits = dz / temperature``) with ``g``, ``g_H`` the incoming
gradients of ``logp`` and ``entropy``::

    dz_j = g * (1[j = target] - p_j) - g_H * p_j * (log p_j + entropy)

The formulas live in the ``@triton.jit`` helpers below (``tile_stats``,
``merge_stats``, ``finalize_stats``, ``dlogits_tile``); the fused linear kernels
(``fused_linear_logprobs.py``) call the same helpers, so each formula has one owner in
Triton. All arithmetic runs in fp32 whatever the input dtype (bf16, fp16, fp32); values
are cast to fp32 right after ``tl.load`` (which also keeps the CPU interpreter, whose
bf16 arithmetic is wrong, exact).

The streaming state of a row is ``(m, s, w)``: ``m`` the running maximum of ``z``,
``s = sum exp(z - m)``, ``w = sum exp(z - m) * (z - m)``. Then ``lse = m + log s`` and
``entropy = log s - w / s``; keeping ``z - m`` instead of ``z`` avoids cancellation
when the logits are large.

This module imports nothing of riskfast (only torch and triton).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

__all__ = [
    "is_interpreting",
    "selective_logprobs_backward",
    "selective_logprobs_forward",
]


def is_interpreting() -> bool:
    """True when this process's kernels run on Triton's CPU interpreter.

    Triton decides once, when a ``@triton.jit`` function is defined, from
    ``TRITON_INTERPRET`` as Triton reads it; a setting changed after
    ``riskfast.kernels`` was imported changes nothing. So the answer comes from a kernel
    defined here (an interpreted kernel is not a ``JITFunction``), not from the variable.
    """
    return not isinstance(_selective_logprobs_fwd_kernel, JITFunction)


# --------------------------------------------------------------------------------------
# Shared @triton.jit helpers: one owner per formula (also used by fused_linear_logprobs).
# --------------------------------------------------------------------------------------


@triton.jit
def tile_stats(z):
    """Streaming state ``(m, s, w)`` of each row of a ``[BLOCK_N, BLOCK_V]`` fp32 tile.

    Masked entries must hold ``-inf``; a row with no valid entry gives ``(-inf, 0, 0)``.
    """
    m = tl.max(z, axis=1)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    shifted = z - m_safe[:, None]
    p = tl.exp(shifted)
    s = tl.sum(p, axis=1)
    # p == 0 where z == -inf: avoid 0 * (-inf).
    w = tl.sum(tl.where(p > 0.0, p * shifted, 0.0), axis=1)
    return m, s, w


@triton.jit
def merge_stats(m_a, s_a, w_a, m_b, s_b, w_b):
    """Merge two streaming states of the same rows (associative, order-stable)."""
    m = tl.maximum(m_a, m_b)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    shift_a = m_a - m_safe
    shift_b = m_b - m_safe
    scale_a = tl.exp(shift_a)
    scale_b = tl.exp(shift_b)
    s = s_a * scale_a + s_b * scale_b
    # sum exp(z - m) (z - m) = scale * (w_old + (m_old - m) * s_old); guard empty states.
    w = tl.where(s_a > 0.0, scale_a * (w_a + shift_a * s_a), 0.0) + tl.where(
        s_b > 0.0, scale_b * (w_b + shift_b * s_b), 0.0
    )
    return m, s, w


@triton.jit
def finalize_stats(m, s, w, target_z):
    """``(logp, lse, entropy)`` from a row's final state and its target's scaled logit."""
    log_s = tl.log(s)
    lse = m + log_s
    logp = tl.minimum(target_z - lse, 0.0)
    entropy = tl.maximum(log_s - w / s, 0.0)
    return logp, lse, entropy


@triton.jit
def dlogits_tile(z, is_target, lse, entropy, grad_logp, grad_entropy, inv_temperature,
                 HAS_GRAD_ENTROPY: tl.constexpr):
    """``dlogits`` of a ``[BLOCK_N, BLOCK_V]`` tile of scaled logits ``z`` (fp32).

    ``lse``, ``entropy``, ``grad_logp``, ``grad_entropy`` are per-row ``[BLOCK_N]``;
    masked entries of ``z`` must hold ``-inf`` (they get a zero gradient).
    """
    log_p = z - lse[:, None]
    p = tl.exp(log_p)
    dz = grad_logp[:, None] * (tl.where(is_target, 1.0, 0.0) - p)
    if HAS_GRAD_ENTROPY:
        dz -= grad_entropy[:, None] * tl.where(p > 0.0, p * (log_p + entropy[:, None]), 0.0)
    return dz * inv_temperature


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _column_offsets(cols, stride, WIDE_COLUMNS: tl.constexpr):
    """Element offsets of the columns ``cols`` (int32) within a row.

    32-bit unless ``(V - 1) * stride`` can overflow int32 (a transposed view of a large
    tensor): narrow offsets keep the register count low, and with it the number of
    programs each SM holds, which a memory-bound kernel needs.
    """
    # One return after a constexpr if/else: Triton's GPU compiler checks that every
    # return of a function has one type, also one that follows a statically taken branch
    # (the interpreter does not), so an early int64 return beside an int32 one fails.
    if WIDE_COLUMNS:
        offsets = cols.to(tl.int64) * stride
    else:
        offsets = cols * stride
    return offsets


@triton.jit
def _selective_logprobs_fwd_kernel(
    logits_ptr, targets_ptr, logp_ptr, lse_ptr, entropy_ptr,
    N, V, stride_n, stride_v, inv_temperature,
    RETURN_ENTROPY: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    WIDE_COLUMNS: tl.constexpr,
):
    # One program per BLOCK_N rows (1-D grid: axis 0 has no 65,535 limit).
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    target = tl.load(targets_ptr + rows, mask=row_mask, other=0).to(tl.int32)
    row_ptr = logits_ptr + rows * stride_n  # int64: N * V exceeds 2**31 at real sizes

    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    w = tl.zeros([BLOCK_N], tl.float32)
    target_z = tl.zeros([BLOCK_N], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)  # int32: V < 2**31
        mask = row_mask[:, None] & (cols < V)[None, :]
        x = tl.load(row_ptr[:, None] + _column_offsets(cols, stride_v, WIDE_COLUMNS)[None, :],
                    mask=mask, other=0.0)
        z = tl.where(mask, x.to(tl.float32) * inv_temperature, float("-inf"))
        # The target is picked out of the tile (no separate gather, no OOB access).
        target_z += tl.sum(tl.where(cols[None, :] == target[:, None], z, 0.0), axis=1)
        m_t, s_t, w_t = tile_stats(z)
        m, s, w = merge_stats(m, s, w, m_t, s_t, w_t)

    logp, lse, entropy = finalize_stats(m, s, w, target_z)
    tl.store(logp_ptr + rows, logp, mask=row_mask)
    tl.store(lse_ptr + rows, lse, mask=row_mask)
    if RETURN_ENTROPY:
        tl.store(entropy_ptr + rows, entropy, mask=row_mask)


@triton.jit
def _selective_logprobs_bwd_kernel(
    logits_ptr, targets_ptr, lse_ptr, entropy_ptr, grad_logp_ptr, grad_entropy_ptr,
    dlogits_ptr,
    N, V, stride_n, stride_v, stride_dn, stride_dv, inv_temperature,
    HAS_GRAD_ENTROPY: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    WIDE_COLUMNS: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    target = tl.load(targets_ptr + rows, mask=row_mask, other=0).to(tl.int32)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    grad_logp = tl.load(grad_logp_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    if HAS_GRAD_ENTROPY:
        entropy = tl.load(entropy_ptr + rows, mask=row_mask, other=0.0)
        grad_entropy = tl.load(grad_entropy_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    else:
        entropy = tl.zeros([BLOCK_N], tl.float32)
        grad_entropy = tl.zeros([BLOCK_N], tl.float32)
    row_ptr = logits_ptr + rows * stride_n
    out_ptr = dlogits_ptr + rows * stride_dn
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)  # int32: V < 2**31
        mask = row_mask[:, None] & (cols < V)[None, :]
        x = tl.load(row_ptr[:, None] + _column_offsets(cols, stride_v, WIDE_COLUMNS)[None, :],
                    mask=mask, other=0.0)
        z = tl.where(mask, x.to(tl.float32) * inv_temperature, float("-inf"))
        dz = dlogits_tile(z, cols[None, :] == target[:, None], lse, entropy, grad_logp,
                          grad_entropy, inv_temperature, HAS_GRAD_ENTROPY)
        tl.store(out_ptr[:, None] + _column_offsets(cols, stride_dv, WIDE_COLUMNS)[None, :],
                 dz.to(dlogits_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------


def _default_blocks(n: int, v: int, element_size: int) -> tuple[int, int, int]:
    """``(BLOCK_N, BLOCK_V, num_warps)``: one row per program on a GPU, many on the CPU."""
    if is_interpreting():
        # ~1.5 ms per program instance on the interpreter: few, large programs.
        return 16, min(triton.next_power_of_2(max(v, 16)), 256), 4
    block_v = min(triton.next_power_of_2(max(v, 16)), 8192 if element_size <= 2 else 4096)
    return 1, block_v, 8 if block_v >= 2048 else 4


def _wide_columns(v: int, *strides: int) -> bool:
    """True when a column offset ``(v - 1 + BLOCK) * stride`` may not fit in int32."""
    return max(strides) * (v + 8192) >= 2**31


def selective_logprobs_forward(
    logits: torch.Tensor,
    targets: torch.Tensor,
    inv_temperature: float,
    return_entropy: bool,
    *,
    block_n: int | None = None,
    block_v: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Launch the forward kernel.

    Args:
        logits: ``[N, V]`` bf16, fp16 or fp32, any strides (read in place, not copied).
        targets: ``[N]`` integer, values in ``[0, V)`` (checked by the caller).
        inv_temperature: ``1 / temperature``.
        return_entropy: also write the per-token entropy.
        block_n, block_v, num_warps: overrides of the tile (powers of two) and of the
            warps per program, for tests and ``benchmarks/gpu_check.py``'s sweeps.

    Returns:
        ``(logp[N], lse[N], entropy[N] or None)``, fp32; ``lse`` is of the scaled logits
        and is what the backward needs.
    """
    n, v = logits.shape
    targets = targets.contiguous()
    logp = torch.empty(n, device=logits.device, dtype=torch.float32)
    lse = torch.empty(n, device=logits.device, dtype=torch.float32)
    entropy = torch.empty(n, device=logits.device, dtype=torch.float32) if return_entropy else None
    if n == 0:
        return logp, lse, entropy
    bn, bv, warps = _default_blocks(n, v, logits.element_size())
    bn, bv, warps = block_n or bn, block_v or bv, num_warps or warps
    _selective_logprobs_fwd_kernel[(triton.cdiv(n, bn),)](
        logits, targets, logp, lse, entropy if entropy is not None else lse,
        n, v, logits.stride(0), logits.stride(1), float(inv_temperature),
        RETURN_ENTROPY=return_entropy, BLOCK_N=bn, BLOCK_V=bv,
        WIDE_COLUMNS=_wide_columns(v, logits.stride(1)), num_warps=warps,
    )
    return logp, lse, entropy


def selective_logprobs_backward(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    inv_temperature: float,
    *,
    out: torch.Tensor | None = None,
    block_n: int | None = None,
    block_v: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Launch the backward kernel: ``dlogits[N, V]`` in the dtype of ``logits``.

    Reads ``logits`` once and writes ``dlogits`` once, straight from registers: the only
    full-size tensor is the gradient itself (``out`` if given; it may alias ``logits``
    when the caller no longer needs them, since each tile is read before it is written).

    Args:
        logits, targets, lse, entropy: as saved by the forward (``entropy`` needed only
            with ``grad_entropy``).
        grad_logp: ``[N]`` incoming gradient of the log-probs.
        grad_entropy: ``[N]`` incoming gradient of the entropy, or ``None``.
        inv_temperature: ``1 / temperature``.
        block_n, block_v, num_warps: overrides, as in the forward.
    """
    n, v = logits.shape
    dlogits = torch.empty_like(logits) if out is None else out
    if n == 0:
        return dlogits
    has_grad_entropy = grad_entropy is not None
    if has_grad_entropy and entropy is None:
        raise ValueError("entropy: needed by the backward when grad_entropy is given")
    targets = targets.contiguous()
    grad_logp = grad_logp.contiguous()
    grad_entropy = grad_entropy.contiguous() if grad_entropy is not None else None
    bn, bv, warps = _default_blocks(n, v, logits.element_size())
    bn, bv, warps = block_n or bn, block_v or bv, num_warps or warps
    _selective_logprobs_bwd_kernel[(triton.cdiv(n, bn),)](
        logits, targets, lse,
        entropy if has_grad_entropy else lse,
        grad_logp,
        grad_entropy if has_grad_entropy else grad_logp,
        dlogits,
        n, v, logits.stride(0), logits.stride(1), dlogits.stride(0), dlogits.stride(1),
        float(inv_temperature),
        HAS_GRAD_ENTROPY=has_grad_entropy, BLOCK_N=bn, BLOCK_V=bv,
        WIDE_COLUMNS=_wide_columns(v, logits.stride(1), dlogits.stride(1)), num_warps=warps,
    )
    return dlogits
