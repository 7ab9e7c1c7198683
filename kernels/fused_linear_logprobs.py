"""Triton kernels: token log-probs from hidden states, never materialising ``[N, V]``.

Spec: ``spec/kernels.md``, "fused linear log-probs" (matrix bound). The scaled logits
are ``z = (hidden @ weight.T + bias) / temperature``; the outputs and their gradients
are those of ``selective_logprobs.py`` applied to ``z``, and the formulas are the same
``@triton.jit`` helpers (``tile_stats``, ``merge_stats``, ``finalize_stats``,
``dlogits_tile``), imported from there.

Forward (``2 N H V`` flops, no ``[N, V]`` buffer at all): a 1-D grid of
``(token block, vocabulary split)`` programs; each computes ``[BLOCK_N, BLOCK_V]``
logit tiles with ``tl.dot`` over ``H`` and folds them into a streaming log-sum-exp
state; a second small kernel merges the ``[N, splits]`` partial states in a fixed
order (deterministic). Splitting the vocabulary keeps every SM busy when ``N`` is small.

Backward (recomputation, ``6 N H V`` flops; ``8 N H V`` in all): over chunks of
``chunk`` tokens, one kernel recomputes the logit tiles and writes
``dz = dlogits * (1 / temperature)`` for the chunk into a ``[chunk, V]`` buffer (in the
matmul dtype: ``chunk * V * 2`` bytes for bf16/fp16, ``* 4`` for fp32), then
``grad_hidden[chunk] = dz @ weight`` and ``grad_weight += dz.T @ hidden[chunk]`` run as
``tl.dot`` matmuls with fp32 accumulation (``matmul="triton"``) or cuBLAS
(``matmul="torch"``), and ``grad_bias += dz.sum(0)``. Everything is accumulated in a
fixed order: no atomics, deterministic.

Matmul operands stay in the input dtype on a GPU (bf16/fp16 tensor cores; fp32 with
``input_precision="ieee"`` so fp32 meets the 1e-5 tolerance, not TF32). Under the CPU
interpreter they are cast to fp32 right after ``tl.load`` (its bf16 is wrong).

This module imports nothing of riskfast (only torch and triton).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .selective_logprobs import (
    dlogits_tile,
    finalize_stats,
    is_interpreting,
    merge_stats,
    tile_stats,
)

__all__ = [
    "fused_linear_logprobs_backward",
    "fused_linear_logprobs_forward",
    "matmul",
]

# Engine of the backward's two gradient matmuls when the caller does not pick one:
# "triton" (tl.dot, _matmul_kernel) or "torch" (cuBLAS). benchmarks/gpu_check.py times both;
# on an H200 (2026-11-30, benchmarks/RESULTS.md) cuBLAS made fused fwd+bwd 1.15x (N=4096,
# H=2048, V=32000) and 1.21x (N=8192, H=4096, V=128256) faster than tl.dot.
MATMUL_BACKEND = "torch"

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _dot_config(dtype: torch.dtype) -> tuple[tl.dtype, str]:
    """``(operand dtype, input_precision)`` for ``tl.dot`` on inputs of ``dtype``."""
    if is_interpreting() or dtype == torch.float32:
        return tl.float32, "ieee"
    return _TL_DTYPES[dtype], "tf32"  # precision is ignored for 16-bit operands


@triton.jit
def _logits_tile(
    hidden_ptr, weight_ptr, bias_ptr, rows_left, cols_left, H,
    stride_hn, stride_hh, stride_wv, stride_wh, inv_temperature,
    HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Scaled logits ``z[BLOCK_N, BLOCK_V]`` (fp32) of one tile; ``-inf`` where masked.

    The pointers are already offset to the tile's first row and column (64-bit scalar
    arithmetic in the caller); the tile's own offsets are 32-bit (the launcher checks
    that ``BLOCK * stride`` fits), which keeps the pointer tiles out of the registers
    that the accumulator and the softmax statistics need. ``rows_left`` and
    ``cols_left`` are the valid rows and columns from the tile's start.
    """
    r = tl.arange(0, BLOCK_N)
    c = tl.arange(0, BLOCK_V)
    k = tl.arange(0, BLOCK_H)
    row_mask = r < rows_left
    col_mask = c < cols_left
    h_ptrs = hidden_ptr + (r[:, None] * stride_hn + k[None, :] * stride_hh)
    # weight tile loaded as [BLOCK_H, BLOCK_V] (transposed view, no copy)
    w_ptrs = weight_ptr + (c[None, :] * stride_wv + k[:, None] * stride_wh)
    acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    for h0 in range(0, H, BLOCK_H):
        k_mask = k < H - h0
        h = tl.load(h_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0).to(DOT_DTYPE)
        w = tl.load(w_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0).to(DOT_DTYPE)
        acc = tl.dot(h, w, acc, input_precision=INPUT_PRECISION)
        h_ptrs += BLOCK_H * stride_hh
        w_ptrs += BLOCK_H * stride_wh
    if HAS_BIAS:
        b = tl.load(bias_ptr + c, mask=col_mask, other=0.0).to(tl.float32)
        acc += b[None, :]
    mask = row_mask[:, None] & col_mask[None, :]
    return tl.where(mask, acc * inv_temperature, float("-inf"))


@triton.jit
def _local_targets(target, col0, BLOCK_V: tl.constexpr):
    """``target - col0`` as int32 where it falls in ``[0, BLOCK_V)``, else ``-1``."""
    local = target - col0
    return tl.where((local >= 0) & (local < BLOCK_V), local, -1).to(tl.int32)


@triton.jit
def _fused_fwd_partial_kernel(
    hidden_ptr, weight_ptr, bias_ptr, targets_ptr, part_ptr,
    N, V, H, stride_hn, stride_hh, stride_wv, stride_wh, inv_temperature,
    num_splits, tiles_per_split,
    HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Partial state ``(m, s, w, target_z)`` of one token block over one vocabulary split.

    ``part`` is ``[4, N, num_splits]`` fp32.
    """
    pid = tl.program_id(0)
    pid_n = pid // num_splits
    pid_s = pid % num_splits
    row0 = pid_n.to(tl.int64) * BLOCK_N
    rows = row0 + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    target = tl.load(targets_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    v_start = pid_s.to(tl.int64) * tiles_per_split * BLOCK_V
    v_end = tl.minimum(v_start + tiles_per_split * BLOCK_V, V)
    hidden_ptr += row0 * stride_hn
    rows_left = tl.minimum(N - row0, BLOCK_N).to(tl.int32)
    c = tl.arange(0, BLOCK_V)

    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    w = tl.zeros([BLOCK_N], tl.float32)
    target_z = tl.zeros([BLOCK_N], tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        z = _logits_tile(hidden_ptr, weight_ptr + v0 * stride_wv, bias_ptr + v0,
                         rows_left, tl.minimum(v_end - v0, BLOCK_V).to(tl.int32), H,
                         stride_hn, stride_hh, stride_wv, stride_wh, inv_temperature,
                         HAS_BIAS, DOT_DTYPE, INPUT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
        # The target is picked out of the tile (no separate gather, no OOB access).
        local = _local_targets(target, v0, BLOCK_V)
        target_z += tl.sum(tl.where(c[None, :] == local[:, None], z, 0.0), axis=1)
        m_t, s_t, w_t = tile_stats(z)
        m, s, w = merge_stats(m, s, w, m_t, s_t, w_t)

    out = part_ptr + rows * num_splits + pid_s
    plane = N * num_splits
    tl.store(out, m, mask=row_mask)
    tl.store(out + plane, s, mask=row_mask)
    tl.store(out + 2 * plane, w, mask=row_mask)
    tl.store(out + 3 * plane, target_z, mask=row_mask)


@triton.jit
def _fused_fwd_merge_kernel(
    part_ptr, logp_ptr, lse_ptr, entropy_ptr, N, num_splits,
    BLOCK_N: tl.constexpr,
):
    """Merge the splits of each row in split order and write ``logp, lse, entropy``."""
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    plane = N * num_splits
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    w = tl.zeros([BLOCK_N], tl.float32)
    target_z = tl.zeros([BLOCK_N], tl.float32)
    for j in range(num_splits):
        at = part_ptr + rows * num_splits + j
        m_j = tl.load(at, mask=row_mask, other=float("-inf"))
        s_j = tl.load(at + plane, mask=row_mask, other=0.0)
        w_j = tl.load(at + 2 * plane, mask=row_mask, other=0.0)
        target_z += tl.load(at + 3 * plane, mask=row_mask, other=0.0)
        m, s, w = merge_stats(m, s, w, m_j, s_j, w_j)
    logp, lse, entropy = finalize_stats(m, s, w, target_z)
    tl.store(logp_ptr + rows, logp, mask=row_mask)
    tl.store(lse_ptr + rows, lse, mask=row_mask)
    tl.store(entropy_ptr + rows, entropy, mask=row_mask)


@triton.jit
def _fused_bwd_dlogits_kernel(
    hidden_ptr, weight_ptr, bias_ptr, targets_ptr, lse_ptr, entropy_ptr,
    grad_logp_ptr, grad_entropy_ptr, dz_ptr,
    N, V, H, stride_hn, stride_hh, stride_wv, stride_wh, stride_dn, inv_temperature,
    num_v_blocks,
    HAS_BIAS: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr, DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Recompute one ``[BLOCK_N, BLOCK_V]`` logit tile and write its ``dlogits`` to ``dz``.

    Pointers are already offset to the chunk; ``dz`` is ``[N_chunk, V]`` row-major.
    """
    pid = tl.program_id(0)
    pid_n = pid // num_v_blocks
    pid_v = pid % num_v_blocks
    row0 = pid_n.to(tl.int64) * BLOCK_N
    col0 = pid_v.to(tl.int64) * BLOCK_V
    rows = row0 + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    target = tl.load(targets_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    grad_logp = tl.load(grad_logp_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    if HAS_GRAD_ENTROPY:
        entropy = tl.load(entropy_ptr + rows, mask=row_mask, other=0.0)
        grad_entropy = tl.load(grad_entropy_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    else:
        entropy = tl.zeros([BLOCK_N], tl.float32)
        grad_entropy = tl.zeros([BLOCK_N], tl.float32)
    rows_left = tl.minimum(N - row0, BLOCK_N).to(tl.int32)
    cols_left = tl.minimum(V - col0, BLOCK_V).to(tl.int32)
    z = _logits_tile(hidden_ptr + row0 * stride_hn, weight_ptr + col0 * stride_wv,
                     bias_ptr + col0, rows_left, cols_left, H,
                     stride_hn, stride_hh, stride_wv, stride_wh, inv_temperature,
                     HAS_BIAS, DOT_DTYPE, INPUT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
    r = tl.arange(0, BLOCK_N)
    c = tl.arange(0, BLOCK_V)
    local = _local_targets(target, col0, BLOCK_V)
    dz = dlogits_tile(z, c[None, :] == local[:, None], lse, entropy, grad_logp,
                      grad_entropy, inv_temperature, HAS_GRAD_ENTROPY)
    mask = (r < rows_left)[:, None] & (c < cols_left)[None, :]
    out = dz_ptr + row0 * stride_dn + col0
    tl.store(out + (r[:, None] * stride_dn + c[None, :]),
             dz.to(dz_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _matmul_kernel(
    a_ptr, b_ptr, c_ptr, M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    ACCUMULATE: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """``c = a @ b`` (``c += a @ b`` with ``ACCUMULATE``), fp32 accumulation, any strides."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # grouped ordering: neighbouring programs share tiles of b in L2
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_m
    pid_n = (pid % group) // group_m
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        a = tl.load(a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak,
                    mask=(rm < M)[:, None] & (rk < K)[None, :], other=0.0).to(DOT_DTYPE)
        b = tl.load(b_ptr + rk[:, None] * stride_bk + rn[None, :] * stride_bn,
                    mask=(rk < K)[:, None] & (rn < N)[None, :], other=0.0).to(DOT_DTYPE)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    c_at = c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    if ACCUMULATE:
        acc += tl.load(c_at, mask=mask, other=0.0).to(tl.float32)
    tl.store(c_at, acc.to(c_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------


def _tile_blocks(dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """``(BLOCK_N, BLOCK_V, BLOCK_H, num_warps, num_stages)`` of the logit tiles.

    On a GPU: 128 x 128 x 64 tiles, 8 warps, 3 stages for 16-bit operands (tensor-core
    dots); 64 x 128 x 32 tiles and 2 stages for fp32, whose IEEE-precision dot needs more
    registers (larger tiles or 3 stages spill on sm_90 with Triton 3.6 or 3.9:
    ``tests/compile_kernels_for_gpu.py --no-spills``).
    """
    if is_interpreting():
        return 32, 64, 64, 4, 1
    if dtype == torch.float32:
        return 64, 128, 32, 8, 2
    return 128, 128, 64, 8, 3


def matmul(
    a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, *, accumulate: bool = False
) -> torch.Tensor:
    """``out = a @ b`` (or ``out += a @ b``) with ``tl.dot``; ``a[M, K]``, ``b[K, N]``.

    Any strides (a transposed view costs nothing); fp32 accumulation; ``out`` may be
    fp32 or the operand dtype. Deterministic (each output tile owned by one program).
    """
    m, k = a.shape
    k2, n = b.shape
    if k != k2 or out.shape != (m, n):
        raise ValueError(f"matmul: shapes {tuple(a.shape)} @ {tuple(b.shape)} -> {tuple(out.shape)}")
    if m == 0 or n == 0:
        return out
    dot_dtype, precision = _dot_config(a.dtype if a.dtype == b.dtype else torch.float32)
    if is_interpreting():
        bm, bn, bk, warps, stages = 64, 64, 64, 4, 1
    else:  # the logit tiles' configuration (no spills on sm_90)
        bm, bn, bk, warps, stages = _tile_blocks(
            torch.float32 if dot_dtype == tl.float32 else a.dtype
        )
    if k == 0:
        if not accumulate:
            out.zero_()
        return out
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _matmul_kernel[grid](
        a, b, out, m, n, k,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
        ACCUMULATE=accumulate, DOT_DTYPE=dot_dtype, INPUT_PRECISION=precision,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=stages,
    )
    return out


def _fit_tile_offsets(t: torch.Tensor, block: int, name: str) -> torch.Tensor:
    """``t``, or a contiguous copy of it when a tile's offsets could overflow int32.

    The kernels address a ``[block, block]`` tile with 32-bit offsets
    ``i * stride(0) + j * stride(1)`` from a 64-bit base pointer; a view whose strides
    make those reach ``2**31`` (over ``2**31 / 128`` elements) is copied first.
    """
    if sum(t.stride()) * block < 2**31:
        return t
    t = t.contiguous()
    if sum(t.stride()) * block >= 2**31:
        raise ValueError(
            f"{name}: rows of {t.shape[-1]} elements are too long for the kernels' 32-bit "
            "tile offsets"
        )
    return t


_ADDMM_OUT_DTYPE: dict[str, bool] = {}  # device type -> does torch.addmm take out_dtype?


def _addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with 16-bit ``a``, ``b`` and an fp32 ``acc`` (cuBLAS).

    Where torch has the mixed-precision ``addmm`` (``out_dtype``; CUDA) the product
    accumulates into ``acc`` directly; elsewhere it falls back to a 16-bit product plus
    its fp32 copy, two ``[V, H]`` temporaries. Which one ran is remembered per device
    type; both are checked against the reference in the tests (the first on a GPU).
    """
    kind = acc.device.type
    if _ADDMM_OUT_DTYPE.get(kind, True):
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            _ADDMM_OUT_DTYPE[kind] = True
            return
        except (RuntimeError, TypeError, NotImplementedError):
            _ADDMM_OUT_DTYPE[kind] = False
    acc += (a @ b).float()


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


def fused_linear_logprobs_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    inv_temperature: float,
    *,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward: ``(logp[N], lse[N], entropy[N])``, fp32, with no ``[N, V]`` buffer.

    Args:
        hidden: ``[N, H]``; weight: ``[V, H]``; bias: ``[V]`` or ``None`` (same dtype,
            bf16/fp16/fp32, any strides; copied only when a stride times the tile size
            overflows int32).
        targets: ``[N]`` integer in ``[0, V)`` (checked by the caller).
        inv_temperature: ``1 / temperature``.
        num_splits: vocabulary splits (default: enough programs for ~4 waves of SMs).
    Extra memory: ``4 * N * num_splits`` fp32 partial states.
    """
    n, h_dim = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    targets = targets.contiguous()
    logp = torch.empty(n, device=dev, dtype=torch.float32)
    lse = torch.empty(n, device=dev, dtype=torch.float32)
    entropy = torch.empty(n, device=dev, dtype=torch.float32)
    if n == 0:
        return logp, lse, entropy
    bn, bv, bh, warps, stages = _tile_blocks(hidden.dtype)
    hidden = _fit_tile_offsets(hidden, max(bn, bh), "hidden")
    weight = _fit_tile_offsets(weight, max(bv, bh), "weight")
    row_blocks = triton.cdiv(n, bn)
    v_tiles = triton.cdiv(v, bv)
    if num_splits is None:
        num_splits = max(1, min(v_tiles, triton.cdiv(4 * _num_sms(dev), row_blocks)))
    tiles_per_split = triton.cdiv(v_tiles, max(1, min(num_splits, v_tiles)))
    num_splits = triton.cdiv(v_tiles, tiles_per_split)  # no empty split
    part = torch.empty((4, n, num_splits), device=dev, dtype=torch.float32)
    dot_dtype, precision = _dot_config(hidden.dtype)
    _fused_fwd_partial_kernel[(row_blocks * num_splits,)](
        hidden, weight, bias if bias is not None else weight, targets, part,
        n, v, h_dim, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        float(inv_temperature), num_splits, tiles_per_split,
        HAS_BIAS=bias is not None, DOT_DTYPE=dot_dtype, INPUT_PRECISION=precision,
        BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh, num_warps=warps, num_stages=stages,
    )
    merge_block = 256 if is_interpreting() else 128
    _fused_fwd_merge_kernel[(triton.cdiv(n, merge_block),)](
        part, logp, lse, entropy, n, num_splits, BLOCK_N=merge_block, num_warps=4,
    )
    return logp, lse, entropy


def default_chunk_size(n: int, v: int, element_size: int, budget_bytes: int = 1 << 30) -> int:
    """Tokens per backward chunk: the ``[chunk, V]`` buffer stays within ``budget_bytes``."""
    chunk = max(1, budget_bytes // max(1, v * element_size))
    chunk = 1 << (chunk.bit_length() - 1)  # a power of two: whole tiles
    return max(1, min(chunk, n))


def fused_linear_logprobs_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    inv_temperature: float,
    *,
    chunk_size: int | None = None,
    needs_grad: tuple[bool, bool, bool] = (True, True, True),
    matmul_backend: str | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Backward by recomputation: ``(grad_hidden, grad_weight, grad_bias)``.

    Args:
        hidden, weight, bias, targets, lse, entropy: as in the forward.
        grad_logp, grad_entropy: ``[N]`` incoming gradients (``grad_entropy`` may be None).
        chunk_size: tokens per chunk (default :func:`default_chunk_size`, a 1 GiB buffer).
        needs_grad: which of ``(hidden, weight, bias)`` need a gradient.
        matmul_backend: ``"triton"`` (``tl.dot``) or ``"torch"`` (cuBLAS) for the two
            gradient matmuls of each chunk; default :data:`MATMUL_BACKEND`.
    Extra memory: one ``[chunk, V]`` buffer in the matmul dtype, plus fp32 accumulators
    for ``grad_weight``/``grad_bias`` when they are 16-bit and there is more than one chunk.
    """
    n, h_dim = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    matmul_backend = matmul_backend or MATMUL_BACKEND
    if matmul_backend not in ("triton", "torch"):
        raise ValueError(f"matmul_backend: expected 'triton' or 'torch', got {matmul_backend!r}")
    need_h, need_w, need_b = needs_grad
    need_b = need_b and bias is not None
    dot_dtype, precision = _dot_config(hidden.dtype)
    buf_dtype = hidden.dtype
    chunk = chunk_size or default_chunk_size(n, v, hidden.element_size())
    multi = n > chunk
    acc_dtype = torch.float32 if multi else weight.dtype
    grad_hidden = torch.empty_like(hidden) if need_h else None
    grad_weight = torch.zeros(weight.shape, device=dev, dtype=acc_dtype) if need_w else None
    grad_bias = torch.zeros(v, device=dev, dtype=torch.float32) if need_b else None
    has_grad_entropy = grad_entropy is not None
    targets = targets.contiguous()
    grad_logp = grad_logp.contiguous()
    grad_entropy = grad_entropy.contiguous() if has_grad_entropy else None
    bn, bv, bh, warps, stages = _tile_blocks(hidden.dtype)
    hidden = _fit_tile_offsets(hidden, max(bn, bh), "hidden")
    weight = _fit_tile_offsets(weight, max(bv, bh), "weight")
    v_blocks = triton.cdiv(v, bv)
    dz = torch.empty((min(chunk, n), v), device=dev, dtype=buf_dtype) if n else None
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        rows = stop - start
        h_chunk = hidden[start:stop]
        dz_chunk = dz[:rows]
        _fused_bwd_dlogits_kernel[(triton.cdiv(rows, bn) * v_blocks,)](
            h_chunk, weight, bias if bias is not None else weight, targets[start:stop],
            lse[start:stop], entropy[start:stop] if has_grad_entropy else lse[start:stop],
            grad_logp[start:stop],
            grad_entropy[start:stop] if has_grad_entropy else grad_logp[start:stop],
            dz_chunk,
            rows, v, h_dim, h_chunk.stride(0), h_chunk.stride(1), weight.stride(0),
            weight.stride(1), dz_chunk.stride(0), float(inv_temperature), v_blocks,
            HAS_BIAS=bias is not None, HAS_GRAD_ENTROPY=has_grad_entropy,
            DOT_DTYPE=dot_dtype, INPUT_PRECISION=precision,
            BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh, num_warps=warps, num_stages=stages,
        )
        if matmul_backend == "triton":
            if grad_hidden is not None:
                matmul(dz_chunk, weight, grad_hidden[start:stop])
            if grad_weight is not None:
                matmul(dz_chunk.t(), h_chunk, grad_weight, accumulate=start > 0)
        else:  # "torch": cuBLAS
            if grad_hidden is not None:
                torch.mm(dz_chunk, weight, out=grad_hidden[start:stop])
            if grad_weight is not None:
                if acc_dtype == buf_dtype:
                    grad_weight.addmm_(dz_chunk.t(), h_chunk)
                else:
                    _addmm_fp32_(grad_weight, dz_chunk.t(), h_chunk)
        if grad_bias is not None:
            grad_bias += dz_chunk.sum(0, dtype=torch.float32)
    if grad_weight is not None and grad_weight.dtype != weight.dtype:
        grad_weight = grad_weight.to(weight.dtype)
    if grad_bias is not None:
        grad_bias = grad_bias.to(bias.dtype)
    return grad_hidden, grad_weight, grad_bias
