"""Triton kernels of the fused linear policy loss: one chunk's logits, stats and gradients.

Spec: ``spec/kernels.md``, "fused linear log-probs" (matrix bound), applied to a loss.
``riskfast.ops.fused_linear_policy_loss`` walks over chunks of response tokens; for
each chunk it needs the row statistics of the logits (log-prob of the target,
log-sum-exp, entropy), then, once the policy loss has turned those into per-token
gradients ``dL/dlogp`` and ``dL/dentropy``, the gradients of the hidden states and of
the output layer. Doing both from one logits computation is what saves the backward
pass's recomputation (``6 N H V`` flops per pass instead of ``8 N H V``):

1. :func:`chunk_logits` - ``z = hidden @ weight.T + bias`` for the chunk, written to a
   ``[chunk, V]`` fp32 buffer by ``_chunk_logits_kernel`` (``tl.dot`` over ``H`` with
   fp32 accumulation; ``2 C H V`` flops);
2. :func:`chunk_stats` - the chunk's ``(logp, lse, entropy)``: the selective kernel
   (``selective_logprobs.py``) over that buffer with ``1 / temperature``;
3. :func:`chunk_grads` - ``dlogits`` by the selective backward kernel (the formula of
   ``dlogits_tile``), written in the matmul dtype (over the fp32 buffer itself for fp32
   inputs), then ``grad_hidden[chunk] = dlogits @ weight`` and ``grad_weight +=
   dlogits.T @ hidden[chunk]`` (``4 C H V`` flops; ``tl.dot`` or cuBLAS, as the
   ``fused_linear_logprobs`` backward, :data:`fused_linear_logprobs.MATMUL_BACKEND`),
   ``grad_bias += dlogits.sum(0)``.

Every formula is the one of the log-prob kernels (``tile_stats``/``merge_stats``/
``finalize_stats``/``dlogits_tile`` through the selective kernels, ``_logits_tile`` of
``fused_linear_logprobs.py`` for the logits); this file only adds the launch that keeps
a chunk's logits for its gradient. Extra memory per chunk: ``chunk * V * 4`` bytes (the
logits) plus ``chunk * V * 2`` for bf16/fp16 inputs (their gradient in the matmul dtype).
No atomics: every reduction runs in a fixed order (deterministic).

This module imports nothing of riskfast (only torch, triton and its sibling kernels).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fused_linear_logprobs import (
    _addmm_fp32_,
    _dot_config,
    _fit_tile_offsets,
    _logits_tile,
    _tile_blocks,
    default_chunk_size,
    matmul,
)
from .selective_logprobs import selective_logprobs_backward, selective_logprobs_forward

__all__ = ["chunk_grads", "chunk_logits", "chunk_stats", "default_policy_chunk_size"]


@triton.jit
def _chunk_logits_kernel(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    out_ptr,
    N,
    V,
    H,
    stride_hn,
    stride_hh,
    stride_wv,
    stride_wh,
    stride_on,
    num_n_blocks,
    HAS_BIAS: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """One ``[BLOCK_N, BLOCK_V]`` tile of ``hidden @ weight.T + bias`` into ``out`` (fp32).

    Token blocks vary fastest: neighbouring programs share a weight tile (read from L2),
    and a chunk's hidden rows are few enough to stay there.
    """
    pid = tl.program_id(0)
    pid_n = pid % num_n_blocks
    pid_v = pid // num_n_blocks
    row0 = pid_n.to(tl.int64) * BLOCK_N
    col0 = pid_v.to(tl.int64) * BLOCK_V
    rows_left = tl.minimum(N - row0, BLOCK_N).to(tl.int32)
    cols_left = tl.minimum(V - col0, BLOCK_V).to(tl.int32)
    z = _logits_tile(
        hidden_ptr + row0 * stride_hn,
        weight_ptr + col0 * stride_wv,
        bias_ptr + col0,
        rows_left,
        cols_left,
        H,
        stride_hn,
        stride_hh,
        stride_wv,
        stride_wh,
        1.0,
        HAS_BIAS,
        DOT_DTYPE,
        INPUT_PRECISION,
        BLOCK_N,
        BLOCK_V,
        BLOCK_H,
    )
    r = tl.arange(0, BLOCK_N)
    c = tl.arange(0, BLOCK_V)
    mask = (r < rows_left)[:, None] & (c < cols_left)[None, :]
    out = out_ptr + row0 * stride_on + col0
    tl.store(out + (r[:, None] * stride_on + c[None, :]), z, mask=mask)


def default_policy_chunk_size(n: int, v: int, element_size: int) -> int:
    """Tokens per chunk: the fp32 logits plus their 16-bit gradient within 1 GiB."""
    extra = 0 if element_size == 4 else element_size
    return default_chunk_size(n, v, 4 + extra)


def chunk_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``hidden[C, H] @ weight[V, H].T + bias`` as fp32 ``[C, V]`` (no temperature).

    bf16/fp16/fp32 inputs, any strides (copied only when a tile's 32-bit offsets could
    overflow); ``out`` (fp32, ``[C, V]`` row-major) is written when given.
    """
    c, h_dim = hidden.shape
    v = weight.shape[0]
    if out is None:
        out = torch.empty((c, v), device=hidden.device, dtype=torch.float32)
    if c == 0:
        return out
    bn, bv, bh, warps, stages = _tile_blocks(hidden.dtype)
    hidden = _fit_tile_offsets(hidden, max(bn, bh), "hidden")
    weight = _fit_tile_offsets(weight, max(bv, bh), "weight")
    dot_dtype, precision = _dot_config(hidden.dtype)
    num_n = triton.cdiv(c, bn)
    _chunk_logits_kernel[(num_n * triton.cdiv(v, bv),)](
        hidden,
        weight,
        bias if bias is not None else weight,
        out,
        c,
        v,
        h_dim,
        hidden.stride(0),
        hidden.stride(1),
        weight.stride(0),
        weight.stride(1),
        out.stride(0),
        num_n,
        HAS_BIAS=bias is not None,
        DOT_DTYPE=dot_dtype,
        INPUT_PRECISION=precision,
        BLOCK_N=bn,
        BLOCK_V=bv,
        BLOCK_H=bh,
        num_warps=warps,
        num_stages=stages,
    )
    return out


def chunk_stats(
    logits: torch.Tensor, targets: torch.Tensor, inv_temperature: float, return_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(logp[C], lse[C], entropy[C] or None)`` of ``logits / temperature`` (fp32)."""
    return selective_logprobs_forward(logits, targets, inv_temperature, return_entropy)


def chunk_grads(
    logits: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    inv_temperature: float,
    *,
    grad_hidden: torch.Tensor | None,
    grad_weight: torch.Tensor | None,
    grad_bias: torch.Tensor | None,
    matmul_backend: str = "triton",
) -> None:
    """Gradients of one chunk from its kept logits; consumes ``logits``.

    Args:
        logits: the chunk's fp32 ``[C, V]`` buffer from :func:`chunk_logits` (overwritten
            by ``dlogits`` for fp32 inputs).
        hidden: the chunk's ``[C, H]`` rows; weight: ``[V, H]`` (bf16/fp16/fp32).
        lse, entropy: from :func:`chunk_stats`; grad_logp, grad_entropy: ``[C]`` fp32
            gradients of the loss with respect to the chunk's log-probs and entropies
            (``grad_entropy`` may be None).
        grad_hidden: ``[C, H]`` written (``dlogits @ weight``), or None.
        grad_weight: ``[V, H]`` accumulated (``+= dlogits.T @ hidden``), fp32 or the
            weight's dtype, or None; grad_bias: ``[V]`` fp32 accumulated, or None.
        matmul_backend: ``"triton"`` (``tl.dot``) or ``"torch"`` (cuBLAS).
    """
    if logits.shape[0] == 0:
        return
    out = logits if hidden.dtype == torch.float32 else torch.empty_like(logits, dtype=hidden.dtype)
    dz = selective_logprobs_backward(
        logits,
        targets,
        lse,
        entropy,
        grad_logp.float(),
        None if grad_entropy is None else grad_entropy.float(),
        inv_temperature,
        out=out,
    )
    if matmul_backend == "triton":
        if grad_hidden is not None:
            matmul(dz, weight, grad_hidden)
        if grad_weight is not None:
            matmul(dz.t(), hidden, grad_weight, accumulate=True)
    else:  # "torch": cuBLAS
        if grad_hidden is not None:
            torch.mm(dz, weight, out=grad_hidden)
        if grad_weight is not None:
            if grad_weight.dtype == dz.dtype:
                grad_weight.addmm_(dz.t(), hidden)
            else:
                _addmm_fp32_(grad_weight, dz.t(), hidden)
    if grad_bias is not None:
        grad_bias += dz.sum(0, dtype=torch.float32)
