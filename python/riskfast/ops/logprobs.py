"""Token log-probs (and entropy) from logits or from hidden states: the public ops.

Spec: ``spec/kernels.md``, "Public signatures (riskfast.ops)", "selective log-probs
from logits" and "fused linear log-probs".

For scaled logits ``z = logits / temperature`` (or ``(hidden @ weight.T + bias) /
temperature``), ``p = softmax(z)`` and ``lse = logsumexp(z)``:

* ``logp = z[target] - lse`` (clamped at 0), ``entropy = -sum_j p_j log p_j``;
* backward: ``dz_j = g (1[j = target] - p_j) - g_H p_j (log p_j + entropy)`` and
  ``dlogits = dz / temperature``.

A ``-inf`` logit (or bias entry) is a masked vocabulary entry: ``p_j = 0``, it adds
nothing to the entropy (``0 log 0 = 0``) and gets a zero gradient, on every backend.
Each row needs one finite logit at least; ``+inf`` and NaN logits are not supported
and not detected: the logits (and ``hidden``/``weight`` of the fused op) are not scanned,
because a scan would add a full pass over ``[N, V]``. What such a row gets is undefined
and differs by backend (NaN, or ``-inf`` log-prob with a NaN gradient entry); other rows
are unaffected. Check ``torch.isfinite(logits).all()`` yourself where a model can
overflow (fp16 logits).

Backends (``backend=``):

* ``"triton"`` - the kernels of ``riskfast.kernels`` (CUDA, or the CPU interpreter when
  ``TRITON_INTERPRET=1``); bf16/fp16/fp32 inputs;
* ``"torch"`` - a chunked PyTorch implementation (any device, float64 too) with the same
  memory behaviour: chunks of tokens, recomputation in backward, never ``[N, V]`` in
  ``fused_linear_logprobs`` (``selective_logprobs`` writes only ``dlogits`` full-size);
* ``"reference"`` - the plain references of :mod:`riskfast.ops.reference` (autograd);
* ``"auto"`` (default) - ``"triton"`` for bf16/fp16/fp32 CUDA tensors when Triton is
  installed, ``"torch"`` otherwise.

Both autograd functions share one ``torch.autograd.Function`` per op; the backend only
supplies the forward and backward computations. In the torch backend the formulas
above are owned by :func:`_chunk_stats` and :func:`_chunk_dlogits`; in Triton by the
``@triton.jit`` helpers of ``kernels/selective_logprobs.py``.
"""

from __future__ import annotations

from typing import Any

import torch

from .._checks import (
    require_bool,
    require_choice,
    require_floating,
    require_int,
    require_integer,
    require_ndim,
    require_number,
    require_same_device,
    require_tensor,
)
from ._kernels import load_kernels as _load_kernels
from ._kernels import require_triton, triton_available
from .reference import fused_linear_logprobs_reference, selective_logprobs_reference

__all__ = ["BACKENDS", "fused_linear_logprobs", "selective_logprobs"]

BACKENDS = ("auto", "triton", "torch", "reference")
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The torch backend keeps its fp32 [chunk, V] temporaries near this size by default.
_TORCH_CHUNK_BYTES = 64 << 20

LogprobResult = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


# --------------------------------------------------------------------------------------
# Loading the Triton kernels (lazily: importing riskfast must not need Triton)
# --------------------------------------------------------------------------------------


def _resolve_backend(backend: str, name: str, tensor: torch.Tensor) -> str:
    """Pick the backend for ``tensor`` (named ``name`` in errors)."""
    require_choice("backend", backend, BACKENDS)
    if backend == "auto":
        use_triton = tensor.is_cuda and tensor.dtype in _TRITON_DTYPES and triton_available()
        return "triton" if use_triton else "torch"
    if backend == "triton":
        if tensor.dtype not in _TRITON_DTYPES:
            raise TypeError(
                f"{name}: the Triton backend takes float16, bfloat16 or float32, got {tensor.dtype}"
            )
        require_triton(tensor)
    return backend


# --------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------


def _check_targets(targets: Any, n: int, v: int, ref_name: str, ref: torch.Tensor) -> torch.Tensor:
    targets = require_tensor("targets", targets)
    require_integer("targets", targets)
    if targets.shape != (n,):
        raise ValueError(f"targets: expected shape ({n},) to match {ref_name}, got {tuple(targets.shape)}")
    require_same_device("targets", targets, ref_name, ref)
    if n > 0:
        low, high = torch.stack(torch.aminmax(targets)).tolist()  # the op's one host read
        if low < 0 or high >= v:
            raise ValueError(f"targets: values must lie in [0, {v}), got min {low}, max {high}")
    return targets



def _check_output_layer(hidden: Any, weight: Any, bias: Any, hidden_shape: str) -> tuple:
    """Check ``hidden`` (``hidden_shape``, e.g. ``"[N, H]"``; its last dimension is H),
    ``weight[V, H]`` (``V >= 1``) and ``bias[V]`` or ``None``: floating tensors of one
    dtype on one device. Returns them; errors name the argument."""
    hidden = require_tensor("hidden", hidden)
    weight = require_tensor("weight", weight)
    require_floating("hidden", hidden)
    require_floating("weight", weight)
    require_ndim("hidden", hidden, hidden_shape.count(",") + 1, hidden_shape)
    require_ndim("weight", weight, 2, "[V, H]")
    h_dim, v = hidden.shape[-1], weight.shape[0]
    if weight.shape[1] != h_dim:
        raise ValueError(
            f"weight: expected shape [V, {h_dim}] to match hidden {tuple(hidden.shape)}, "
            f"got {tuple(weight.shape)}"
        )
    if v < 1:
        raise ValueError("weight: the vocabulary dimension V must be >= 1, got 0")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight: dtype {weight.dtype} does not match hidden {hidden.dtype}")
    require_same_device("weight", weight, "hidden", hidden)
    if bias is not None:
        bias = require_tensor("bias", bias)
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias: dtype {bias.dtype} does not match hidden {hidden.dtype}")
        if bias.shape != (v,):
            raise ValueError(f"bias: expected shape ({v},) to match weight, got {tuple(bias.shape)}")
        require_same_device("bias", bias, "hidden", hidden)
    return hidden, weight, bias


MIN_TEMPERATURE = 1e-4
"""The smallest temperature the ops take: below it, ``1 / temperature`` can carry ordinary
logits past the float32 range, and the log-probs to NaN (logits up to about 3e34 in
magnitude stay finite at this bound)."""


def _check_temperature(temperature: Any) -> float:
    value = require_number("temperature", temperature, low=0.0, low_open=True)
    if value < MIN_TEMPERATURE:
        raise ValueError(
            f"temperature: must be >= {MIN_TEMPERATURE:g} (1/temperature would take the "
            f"logits past the float32 range and the log-probs to NaN), got {value!r}"
        )
    return value


# --------------------------------------------------------------------------------------
# The torch backend: chunked, recomputing, formulas owned here
# --------------------------------------------------------------------------------------


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_stats(
    z: torch.Tensor, targets: torch.Tensor, with_entropy: bool, row_block: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(logp, lse, entropy or None)`` per row of scaled logits ``z[C, V]`` (fp32/fp64).

    Overwrites ``z`` (only when ``with_entropy``); at most one more ``[C, V]`` buffer, or
    one ``[row_block, V]`` buffer when ``row_block`` is given (the same values, the
    log-sum-exp and the entropy taken ``row_block`` rows at a time).
    """
    rows = [slice(0, z.shape[0])]
    if row_block is not None and z.shape[0] > 0:
        rows = [slice(i, i + row_block) for i in range(0, z.shape[0], row_block)]
    lse = torch.cat([torch.logsumexp(z[r], dim=-1) for r in rows])
    logp = (z.gather(1, targets[:, None].long()).squeeze(1) - lse).clamp_(max=0.0)
    if not with_entropy:
        return logp, lse, None
    # clamp: a -inf logit has p = 0; keep 0 * log p finite
    log_p = z.sub_(lse[:, None]).clamp_(min=torch.finfo(z.dtype).min)
    # entropy = -sum_j p_j log p_j, as a batched dot product (no [C, V] product buffer)
    entropy = torch.cat(
        [torch.bmm(log_p[r].exp()[:, None, :], log_p[r, :, None]).view(-1) for r in rows]
    )
    return logp, lse, entropy.neg_().clamp_(min=0.0)


def _chunk_dlogits(
    z: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    inv_temperature: float,
) -> torch.Tensor:
    """``dlogits[C, V] = dz / temperature`` of the chunk (formula in the module doc).

    ``dz_j = -g_H p_j (log p_j + H) - g p_j + g 1[j = target]``. Overwrites ``z``;
    with an entropy gradient allocates one more ``[C, V]`` tensor, without it none;
    returns one of the two.
    """
    g = (grad_logp * inv_temperature)[:, None]
    log_p = z.sub_(lse[:, None])
    if grad_entropy is None or entropy is None:
        return log_p.exp_().mul_(-g).scatter_add_(1, targets[:, None].long(), g.to(z.dtype))
    p = log_p.exp()
    # p_j (log p_j + H) before g_H: it is bounded (|p log p| <= 1/e, p H <= H), so the
    # product with g_H cannot overflow. A -inf logit (or one so low that p_j = 0)
    # has its log p_j clamped to the lowest finite value, so 0 * log p_j stays 0.
    dz = log_p.clamp_(min=torch.finfo(z.dtype).min).add_(entropy[:, None]).mul_(p)
    dz.mul_(-(grad_entropy * inv_temperature)[:, None]).addcmul_(p, g, value=-1.0)
    return dz.scatter_add_(1, targets[:, None].long(), g.to(dz.dtype))


def _scaled(logits: torch.Tensor, dtype: torch.dtype, inv_temperature: float) -> torch.Tensor:
    """A fresh ``dtype`` copy of ``logits * inv_temperature`` (consumed in place)."""
    if inv_temperature == 1.0:
        return logits.to(dtype, copy=True)
    return logits.to(dtype) * inv_temperature


def _rows_per_chunk(v: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        return chunk_size
    return max(1, _TORCH_CHUNK_BYTES // (4 * max(v, 1)))


class _TorchBackend:
    """Chunked PyTorch implementation: no ``[N, V]`` temporary beyond the outputs."""

    @staticmethod
    def selective_forward(logits, targets, inv_temperature, return_entropy, chunk_size=None):
        n, v = logits.shape
        dtype = _math_dtype(logits.dtype)
        logp = torch.empty(n, device=logits.device, dtype=dtype)
        lse = torch.empty_like(logp)
        entropy = torch.empty_like(logp) if return_entropy else None
        step = _rows_per_chunk(v, chunk_size)
        for start in range(0, n, step):
            rows = slice(start, min(start + step, n))
            z = _scaled(logits[rows], dtype, inv_temperature)
            logp[rows], lse[rows], ent = _chunk_stats(z, targets[rows], return_entropy)
            if ent is not None:
                entropy[rows] = ent
        return logp, lse, entropy if return_entropy else None

    @staticmethod
    def selective_backward(logits, targets, lse, entropy, grad_logp, grad_entropy,
                           inv_temperature, chunk_size=None):
        n, v = logits.shape
        dtype = _math_dtype(logits.dtype)
        dlogits = torch.empty_like(logits)
        step = _rows_per_chunk(v, chunk_size)
        for start in range(0, n, step):
            rows = slice(start, min(start + step, n))
            z = _scaled(logits[rows], dtype, inv_temperature)
            dlogits[rows] = _chunk_dlogits(
                z, targets[rows], lse[rows], None if entropy is None else entropy[rows],
                grad_logp[rows].to(dtype),
                None if grad_entropy is None else grad_entropy[rows].to(dtype),
                inv_temperature,
            )
        return dlogits

    @staticmethod
    def _linear_chunk(h, weight, bias, inv_temperature):
        z = h @ weight.T if bias is None else torch.addmm(bias, h, weight.T)
        return z.mul_(inv_temperature)

    @staticmethod
    def fused_forward(hidden, weight, bias, targets, inv_temperature, return_entropy,
                      chunk_size=None):
        n = hidden.shape[0]
        v = weight.shape[0]
        dtype = _math_dtype(hidden.dtype)
        # 16-bit weights are upcast once ([V, H], weight-sized, not [N, V]).
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        logp = torch.empty(n, device=hidden.device, dtype=dtype)
        lse = torch.empty_like(logp)
        entropy = torch.empty_like(logp) if return_entropy else None
        step = _rows_per_chunk(v, chunk_size)
        for start in range(0, n, step):
            rows = slice(start, min(start + step, n))
            z = _TorchBackend._linear_chunk(hidden[rows].to(dtype), w, b, inv_temperature)
            logp[rows], lse[rows], ent = _chunk_stats(z, targets[rows], return_entropy)
            if ent is not None:
                entropy[rows] = ent
        return logp, lse, entropy if return_entropy else None

    @staticmethod
    def fused_backward(hidden, weight, bias, targets, lse, entropy, grad_logp, grad_entropy,
                       inv_temperature, chunk_size=None, needs_grad=(True, True, True)):
        n = hidden.shape[0]
        v = weight.shape[0]
        dtype = _math_dtype(hidden.dtype)
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        need_h, need_w, need_b = needs_grad
        grad_hidden = torch.empty_like(hidden) if need_h else None
        grad_weight = torch.zeros(weight.shape, device=weight.device, dtype=dtype) if need_w else None
        grad_bias = (
            torch.zeros(v, device=weight.device, dtype=dtype) if need_b and bias is not None else None
        )
        grad_logp = grad_logp.to(dtype)
        grad_entropy = None if grad_entropy is None else grad_entropy.to(dtype)
        step = _rows_per_chunk(v, chunk_size)
        for start in range(0, n, step):
            rows = slice(start, min(start + step, n))
            h = hidden[rows].to(dtype)
            z = _TorchBackend._linear_chunk(h, w, b, inv_temperature)
            dz = _chunk_dlogits(
                z, targets[rows], lse[rows], None if entropy is None else entropy[rows],
                grad_logp[rows],
                None if grad_entropy is None else grad_entropy[rows], inv_temperature,
            )
            if grad_hidden is not None:
                grad_hidden[rows] = dz @ w
            if grad_weight is not None:
                grad_weight.addmm_(dz.T, h)
            if grad_bias is not None:
                grad_bias += dz.sum(0)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias


class _TritonBackend:
    """The kernels of ``riskfast.kernels``, loaded on first use."""

    @staticmethod
    def selective_forward(logits, targets, inv_temperature, return_entropy, chunk_size=None):
        kernels = _load_kernels()
        return kernels.selective_logprobs.selective_logprobs_forward(
            logits, targets, inv_temperature, return_entropy
        )

    @staticmethod
    def selective_backward(logits, targets, lse, entropy, grad_logp, grad_entropy,
                           inv_temperature, chunk_size=None):
        kernels = _load_kernels()
        return kernels.selective_logprobs.selective_logprobs_backward(
            logits, targets, lse, entropy, grad_logp.float(),
            None if grad_entropy is None else grad_entropy.float(), inv_temperature,
        )

    @staticmethod
    def fused_forward(hidden, weight, bias, targets, inv_temperature, return_entropy,
                      chunk_size=None):
        kernels = _load_kernels()
        return kernels.fused_linear_logprobs.fused_linear_logprobs_forward(
            hidden, weight, bias, targets, inv_temperature
        )

    @staticmethod
    def fused_backward(hidden, weight, bias, targets, lse, entropy, grad_logp, grad_entropy,
                       inv_temperature, chunk_size=None, needs_grad=(True, True, True)):
        kernels = _load_kernels()
        return kernels.fused_linear_logprobs.fused_linear_logprobs_backward(
            hidden, weight, bias, targets, lse, entropy, grad_logp.float(),
            None if grad_entropy is None else grad_entropy.float(), inv_temperature,
            chunk_size=chunk_size, needs_grad=needs_grad,
        )


_BACKENDS: dict[str, type] = {"torch": _TorchBackend, "triton": _TritonBackend}


# --------------------------------------------------------------------------------------
# Autograd functions (one per op, shared by the backends)
# --------------------------------------------------------------------------------------


class _SelectiveLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, inv_temperature, return_entropy, backend):
        impl = _BACKENDS[backend]
        logp, lse, entropy = impl.selective_forward(logits, targets, inv_temperature, return_entropy)
        ctx.impl, ctx.inv_temperature = impl, inv_temperature
        ctx.has_entropy = entropy is not None
        if entropy is None:
            entropy = logp.new_empty(0)
            ctx.mark_non_differentiable(entropy)
        ctx.save_for_backward(logits, targets, lse, entropy)
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, targets, lse, entropy = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        if grad_logp is None:
            grad_logp = torch.zeros_like(lse)
        if not ctx.has_entropy:
            grad_entropy = None
        dlogits = ctx.impl.selective_backward(
            logits, targets, lse, entropy if ctx.has_entropy else None,
            grad_logp, grad_entropy, ctx.inv_temperature,
        )
        return dlogits, None, None, None, None


class _FusedLinearLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, inv_temperature, return_entropy,
                chunk_size, backend):
        impl = _BACKENDS[backend]
        logp, lse, entropy = impl.fused_forward(
            hidden, weight, bias, targets, inv_temperature, return_entropy, chunk_size
        )
        ctx.impl, ctx.inv_temperature, ctx.chunk_size = impl, inv_temperature, chunk_size
        ctx.has_entropy = return_entropy
        if not return_entropy:
            entropy = logp.new_empty(0)
            ctx.mark_non_differentiable(entropy)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        if not any(needs):
            return (None,) * 8
        if grad_logp is None:
            grad_logp = torch.zeros_like(lse)
        if not ctx.has_entropy:
            entropy, grad_entropy = None, None
        grads = ctx.impl.fused_backward(
            hidden, weight, bias, targets, lse, entropy, grad_logp, grad_entropy,
            ctx.inv_temperature, ctx.chunk_size, needs,
        )
        return (*grads, None, None, None, None, None)


# --------------------------------------------------------------------------------------
# Public ops
# --------------------------------------------------------------------------------------


def selective_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    backend: str = "auto",
) -> LogprobResult:
    """Per-token ``log_softmax(logits / temperature)[target]`` and optionally the entropy.

    Spec: ``spec/kernels.md``, "Public signatures": ``selective_logprobs(logits[N, V],
    targets[N], *, temperature=1.0, return_entropy=False)``.

    Args:
        logits: ``[N, V]`` bf16, fp16, fp32 (or float64, torch backends only); any strides.
            ``-inf`` entries are masked (probability 0, no gradient; module doc).
        targets: ``[N]`` integer token ids in ``[0, V)``, on the device of ``logits``.
        temperature: ``>= 1e-4`` (``MIN_TEMPERATURE``); the logits are divided by it.
        return_entropy: also return ``entropy[N] = -sum_j p_j log p_j``.
        backend: ``"auto"``, ``"triton"``, ``"torch"`` or ``"reference"`` (module doc).

    Returns:
        ``logp[N]`` (fp32; float64 for float64 logits), ``<= 0``, or ``(logp, entropy)``.
        Both are differentiable with respect to ``logits``.

    Raises:
        TypeError / ValueError naming the offending argument.
    """
    logits = require_tensor("logits", logits)
    require_floating("logits", logits)
    require_ndim("logits", logits, 2, "[N, V]")
    n, v = logits.shape
    if v < 1:
        raise ValueError("logits: the vocabulary dimension V must be >= 1, got 0")
    targets = _check_targets(targets, n, v, "logits", logits)
    temperature = _check_temperature(temperature)
    return_entropy = require_bool("return_entropy", return_entropy)
    backend = _resolve_backend(backend, "logits", logits)
    if backend == "reference":
        return selective_logprobs_reference(
            logits, targets, temperature=temperature, return_entropy=return_entropy
        )
    logp, entropy = _SelectiveLogprobsFunction.apply(
        logits, targets, 1.0 / temperature, return_entropy, backend
    )
    return (logp, entropy) if return_entropy else logp


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> LogprobResult:
    """Log-probs of ``targets`` under ``(hidden @ weight.T + bias) / temperature``.

    Spec: ``spec/kernels.md``, "Public signatures" and "fused linear log-probs". Never
    materialises the ``[N, V]`` logits (except ``backend="reference"``): the forward
    streams over the vocabulary, the backward recomputes the logits chunk by chunk
    (``chunk_size`` tokens at a time; at most ``chunk * V`` elements live at once).

    Args:
        hidden: ``[N, H]`` bf16, fp16, fp32 (or float64, torch backends only).
        weight: ``[V, H]``, same dtype and device as ``hidden``.
        targets: ``[N]`` integer token ids in ``[0, V)``.
        bias: ``[V]`` or ``None``, same dtype and device; a ``-inf`` entry masks that
            vocabulary entry (probability 0, no gradient; module doc).
        temperature: ``>= 1e-4`` (``MIN_TEMPERATURE``).
        return_entropy: also return the per-token entropy (differentiable).
        chunk_size: tokens per chunk, ``>= 1``; default: a buffer of about 64 MiB (torch)
            or 1 GiB (Triton backward).
        backend: ``"auto"``, ``"triton"``, ``"torch"`` or ``"reference"``.

    Returns:
        ``logp[N]`` (fp32; float64 for float64 inputs), or ``(logp, entropy)``;
        differentiable with respect to ``hidden``, ``weight`` and ``bias``.
    """
    hidden, weight, bias = _check_output_layer(hidden, weight, bias, "[N, H]")
    n, v = hidden.shape[0], weight.shape[0]
    targets = _check_targets(targets, n, v, "hidden", hidden)
    temperature = _check_temperature(temperature)
    return_entropy = require_bool("return_entropy", return_entropy)
    if chunk_size is not None:
        chunk_size = require_int("chunk_size", chunk_size, low=1)
    backend = _resolve_backend(backend, "hidden", hidden)
    if backend == "reference":
        return fused_linear_logprobs_reference(
            hidden, weight, targets, bias=bias, temperature=temperature,
            return_entropy=return_entropy,
        )
    logp, entropy = _FusedLinearLogprobsFunction.apply(
        hidden, weight, bias, targets, 1.0 / temperature, return_entropy, chunk_size, backend
    )
    return (logp, entropy) if return_entropy else logp
