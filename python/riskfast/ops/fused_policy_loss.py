"""The RiskPO/GRPO clipped policy loss computed inside the chunked LM-head pass.

Spec: ``riskpo.md`` section 4 (the loss) and ``spec/kernels.md`` ("fused linear
log-probs": never ``[N, V]``, fp32 accumulation, deterministic). Issue 15.

:func:`fused_linear_policy_loss` takes the hidden states ``[N, T, H]`` of ``N``
responses and the output layer ``weight[V, H]`` (``bias[V]``) instead of log-probs, and
returns what :func:`riskfast.riskpo.policy_loss` returns on the log-probs of
``(hidden @ weight.T + bias) / temperature``. It walks over chunks of response tokens
(padding is never projected); per chunk it computes the logits once, their row
statistics (log-prob of the target, log-sum-exp, entropy), the policy loss's gradient
with respect to those log-probs and entropies, ``dlogits``, and right away the chunk's
``grad_hidden = dlogits @ weight`` and ``grad_weight += dlogits.T @ hidden``. The loss
is a scalar, so the only thing backward still needs is its incoming gradient, one
number that scales the stored gradients: backward does no matmul.

Cost in multiply-adds (``N H V`` counts every response token once):

* ``ratio_level="token"``: one pass, ``3 N H V`` (logits, ``grad_hidden``,
  ``grad_weight``), whatever the chunk size: each token's gradient depends on its own
  log-prob only (and on the aggregation weights, which the mask fixes beforehand).
* ``ratio_level="sequence"``: a token's gradient depends on every log-prob of its
  response (``s = exp(mean_t(logp - old_logp))``). Chunks are made of whole responses,
  so this is one pass too, ``3 N H V``, for every response with at most ``chunk_size``
  tokens. A longer response takes the exact two-pass scheme: its log-probs first
  (``N_long H V``), then the loss's gradients, then its logits again with the gradient
  (``3 N_long H V``): ``4 N_long H V`` for those tokens.
* Without gradients (``torch.no_grad()``, or no input that requires one): one
  forward pass, ``N H V``.

For comparison, the plain loss (``[N, V]`` logits, ``log_softmax``, autograd) does
``3 N H V`` with ``[N, V]`` buffers, and ``fused_linear_logprobs`` followed by
:func:`~riskfast.riskpo.policy_loss` does ``4 N H V`` (its backward recomputes the
logits). Peak extra memory here: the chunk's buffers (on the torch path one fp32
``[chunk, V]`` tensor, turned into the logits' gradient in place, two with an entropy
gradient, plus ``[rows, V]`` temporaries of 4 MiB; fp32 logits plus their gradient in
the input dtype on the Triton path),
the ``[V, H]`` fp32 accumulator of ``grad_weight`` (held from the forward to the
backward) and ``grad_hidden``; ``O(N T)`` for the per-token values.

The loss formulas are :mod:`riskfast.riskpo.loss`'s (imported inside the functions,
since ``riskfast.riskpo`` itself calls ``riskfast.ops``): each chunk's gradient is
autograd of :func:`~riskfast.riskpo.loss.token_policy_loss` on the chunk's responses
(``[rows, T]`` tensors whose log-probs and entropies are leaves), with the whole
batch's normaliser as ``num_items``; the returned loss and metrics are
:func:`~riskfast.riskpo.loss.token_policy_loss` on all the log-probs at the end (no
autograd there). The log-prob formulas are :mod:`riskfast.ops.logprobs`'s
(``_chunk_stats``/``_chunk_dlogits`` on the torch path) and the Triton kernels'
(``kernels/fused_linear_policy_loss.py``, which launches the log-prob kernels' helpers).

Backends (``backend=``): ``"triton"`` (CUDA, or the CPU interpreter), ``"torch"``
(chunked PyTorch, any device, float64 too), ``"reference"`` (``[N, V]`` logits from
:func:`~riskfast.ops.fused_linear_logprobs_reference`, then
:func:`~riskfast.riskpo.policy_loss`, autograd: the oracle), ``"auto"`` as the other ops.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .._checks import (
    require_bool,
    require_int,
    require_integer,
    require_same_device,
    require_same_shape,
    require_tensor,
)
from .logprobs import (
    _check_output_layer,
    _check_temperature,
    _chunk_dlogits,
    _chunk_stats,
    _load_kernels,
    _math_dtype,
    _resolve_backend,
    _TorchBackend,
)
from .reference import fused_linear_logprobs_reference

__all__ = ["fused_linear_policy_loss"]

_TORCH_CHUNK_BYTES = 32 << 20
"""The torch path's ``[chunk, V]`` buffers hold about this much by default: one buffer
(the logits, turned into their gradient in place) without an entropy gradient, two with
it. Each chunk's two matmuls with the weight read the whole ``[V, H]`` matrix again, so
fewer, bigger chunks are faster on a CPU: at the issue's shape (``V = 32,000``) 262
tokens per chunk took 0.98x the dense loss's CPU time, 131 tokens 1.025x, 512 tokens
0.99x (one thread, interleaved; ``benchmarks/RESULTS.md``, issue 15). Smaller chunks save
memory for time: each extra chunk also reads and writes the ``[V, H]`` accumulator of
``grad_weight`` once more. At the CPU spec shape (N = 256, H = 2,048, V = 32,000, one
thread) one chunk of 256 tokens took 0.96-0.98x the dense loss's CPU time with 41-68 MiB
of working memory, two chunks of 128 tokens (``chunk_size=128``) 1.02-1.04x with 25 MiB,
against the dense loss's 95-126 MiB."""

_TORCH_MIN_CHUNK_TOKENS = 256
_TORCH_MAX_CHUNK_BYTES = 256 << 20
"""With a large vocabulary 32 MiB holds few tokens, and each chunk still reads the
``[V, H]`` weight twice and the ``grad_weight`` accumulator once more: at N = 512,
H = 4,096, V = 128,256 (one thread) 65-token chunks took 1.12x the dense loss's CPU time,
256-token chunks (125 MiB) 0.95x, one chunk of 512 0.98x. So a chunk holds at least 256
tokens while they fit in 256 MiB."""

_ROW_BLOCK_BYTES = 4 << 20
"""Temporaries of the log-sum-exp and the entropy are taken over this many bytes of
rows at a time, so that they add ``[rows, V]``, not a second ``[chunk, V]`` buffer."""


# --------------------------------------------------------------------------------------
# Per-chunk computations of each backend
# --------------------------------------------------------------------------------------


@dataclass
class _ChunkState:
    """What a chunk's statistics leave for its gradient (backend-specific)."""

    logits: torch.Tensor
    lse: torch.Tensor


class _TorchChunks:
    """Chunked PyTorch: the formulas of ``_chunk_stats`` and ``_chunk_dlogits``."""

    name = "torch"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, inv_temperature: float):
        self.dtype = _math_dtype(weight.dtype)
        # 16-bit weights are upcast once ([V, H], weight-sized, not [N, V]).
        self.weight = weight.to(self.dtype)
        self.bias = None if bias is None else bias.to(self.dtype)
        self.inv_temperature = inv_temperature

    def default_chunk(self, n: int, v: int, entropy_grad: bool) -> int:
        row_bytes = (2 if entropy_grad else 1) * 4 * max(v, 1)
        # _TORCH_CHUNK_BYTES, but at least _TORCH_MIN_CHUNK_TOKENS tokens while those
        # fit in _TORCH_MAX_CHUNK_BYTES (large vocabularies)
        floor = min(_TORCH_MIN_CHUNK_TOKENS, _TORCH_MAX_CHUNK_BYTES // row_bytes)
        return max(1, _TORCH_CHUNK_BYTES // row_bytes, floor)

    def prepare(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.to(self.dtype)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Scaled logits ``(h @ weight.T + bias) / temperature`` of the chunk."""
        if self.inv_temperature != 1.0:
            return _TorchBackend._linear_chunk(h, self.weight, self.bias, self.inv_temperature)
        # the same product without the pass that multiplies by 1
        return h @ self.weight.T if self.bias is None else torch.addmm(self.bias, h, self.weight.T)

    def stats(self, h: torch.Tensor, targets: torch.Tensor, with_entropy: bool):
        z = self.logits(h)
        row_block = max(1, _ROW_BLOCK_BYTES // (z.element_size() * max(z.shape[1], 1)))
        logp, lse, entropy = _chunk_stats(z, targets, with_entropy, row_block=row_block)
        # With the entropy, _chunk_stats leaves log p = z - lse in z (its buffer is
        # reused, no third [C, V] tensor): _chunk_dlogits then subtracts 0.
        return logp, lse, entropy, _ChunkState(z, torch.zeros_like(lse) if with_entropy else lse)

    def recompute(self, h: torch.Tensor, lse: torch.Tensor) -> _ChunkState:
        return _ChunkState(self.logits(h), lse)

    def grads(
        self,
        state,
        h,
        targets,
        entropy,
        grad_logp,
        grad_entropy,
        grad_weight,
        grad_bias,
        need_hidden: bool,
    ):
        dz = _chunk_dlogits(
            state.logits,
            targets,
            state.lse,
            entropy,
            grad_logp.to(self.dtype),
            None if grad_entropy is None else grad_entropy.to(self.dtype),
            self.inv_temperature,
        )
        grad_h = dz @ self.weight if need_hidden else None
        if grad_weight is not None:
            grad_weight.addmm_(dz.T, h)
        if grad_bias is not None:
            grad_bias += dz.sum(0)
        return grad_h

    def grad_weight_buffer(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.zeros(weight.shape, device=weight.device, dtype=self.dtype)


class _TritonChunks:
    """The kernels of ``kernels/fused_linear_policy_loss.py``."""

    name = "triton"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, inv_temperature: float):
        kernels = _load_kernels()
        self.kernels = kernels.fused_linear_policy_loss
        self.matmul_backend = kernels.fused_linear_logprobs.MATMUL_BACKEND
        self.weight, self.bias, self.inv_temperature = weight, bias, inv_temperature
        self.dtype = torch.float32

    def default_chunk(self, n: int, v: int, entropy_grad: bool) -> int:
        return self.kernels.default_policy_chunk_size(n, v, self.weight.element_size())

    def prepare(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden

    def stats(self, h: torch.Tensor, targets: torch.Tensor, with_entropy: bool):
        z = self.kernels.chunk_logits(h, self.weight, self.bias)
        logp, lse, entropy = self.kernels.chunk_stats(
            z, targets, self.inv_temperature, with_entropy
        )
        return logp, lse, entropy, _ChunkState(z, lse)

    def recompute(self, h: torch.Tensor, lse: torch.Tensor) -> _ChunkState:
        return _ChunkState(self.kernels.chunk_logits(h, self.weight, self.bias), lse)

    def grads(
        self,
        state,
        h,
        targets,
        entropy,
        grad_logp,
        grad_entropy,
        grad_weight,
        grad_bias,
        need_hidden: bool,
    ):
        grad_h = torch.empty_like(h) if need_hidden else None
        self.kernels.chunk_grads(
            state.logits,
            h,
            self.weight,
            targets,
            state.lse,
            entropy,
            grad_logp,
            grad_entropy,
            self.inv_temperature,
            grad_hidden=grad_h,
            grad_weight=grad_weight,
            grad_bias=grad_bias,
            matmul_backend=self.matmul_backend,
        )
        return grad_h

    def grad_weight_buffer(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.zeros(weight.shape, device=weight.device, dtype=torch.float32)


_CHUNKS: dict[str, type] = {"torch": _TorchChunks, "triton": _TritonChunks}


# --------------------------------------------------------------------------------------
# The pass over chunks
# --------------------------------------------------------------------------------------


@dataclass
class _Plan:
    """Checked inputs of one call and what the forward leaves for the caller."""

    targets: torch.Tensor
    inputs: Any  # riskfast.riskpo.loss.TokenInputs (logp, entropy: placeholders)
    advantages: torch.Tensor
    token_weights: torch.Tensor | None
    options: Any  # PolicyLossOptions
    on_policy: bool
    with_entropy: bool
    entropy_grad: bool
    lengths: list[int]
    normaliser: float
    chunk_size: int | None
    backend: str
    inv_temperature: float
    loss: torch.Tensor | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    logp: torch.Tensor | None = None


def _normaliser(lengths: list[int], agg: str, num_items: float | None) -> float:
    """The divisor :func:`riskfast.riskpo.loss.aggregate` applies to the whole batch.

    ``num_items`` when given; otherwise the number of response tokens (``token-mean``)
    or of responses with at least one token (the ``seq-mean-*`` modes), at least 1.
    Every chunk's loss is divided by it, so that the chunks' gradients add up to the
    batch's.
    """
    if num_items is not None:
        return float(num_items)
    count = sum(lengths) if agg == "token-mean" else sum(1 for n in lengths if n > 0)
    return float(max(count, 1))


def _run(plan: _Plan, hidden, weight, bias, needs: tuple[bool, bool, bool]):
    """Every chunk of ``plan``: fills ``plan.loss``, ``plan.metrics``, ``plan.logp``.

    Returns ``(grad_hidden, grad_weight, grad_bias)`` (None where not needed) for a loss
    gradient of 1.
    """
    from ..riskpo.loss import TokenInputs, token_policy_loss

    inputs, options = plan.inputs, plan.options
    mask = inputs.mask
    n, t = mask.shape
    dtype = inputs.dtype
    impl = _CHUNKS[plan.backend](weight, bias, plan.inv_temperature)
    need_h, need_w, need_b = needs
    need_b = need_b and bias is not None
    any_grad = need_h or need_w or need_b
    grad_hidden = torch.zeros_like(hidden) if need_h else None
    grad_weight = impl.grad_weight_buffer(weight) if need_w else None
    grad_bias = torch.zeros(bias.shape, device=bias.device, dtype=impl.dtype) if need_b else None

    logp_all = torch.zeros((n, t), device=mask.device, dtype=dtype)
    entropy_all = torch.zeros_like(logp_all) if plan.with_entropy else None
    positions = mask.nonzero()  # [M, 2], response by response, tokens in order
    rows_of, cols_of = positions[:, 0], positions[:, 1]
    starts = [0]
    for length in plan.lengths:
        starts.append(starts[-1] + length)
    chunk = plan.chunk_size or impl.default_chunk(
        int(positions.shape[0]), weight.shape[0], plan.entropy_grad
    )

    def block_grads(
        rows: torch.Tensor | slice,
        bi: torch.Tensor,
        bt: torch.Tensor,
        logp: torch.Tensor,
        entropy: torch.Tensor | None,
    ):
        """``dL/dlogp`` and ``dL/dentropy`` at positions ``(bi, bt)`` of the responses
        ``rows``: autograd of the policy loss on those responses alone, divided by the
        whole batch's normaliser. Other response tokens of these rows (only with the
        token ratio, whose gradients are local) hold the old log-probs and entropy 0."""
        block_mask = mask[rows]
        old = None if plan.on_policy else inputs.old_logp[rows]
        filler = torch.zeros_like(block_mask, dtype=dtype) if old is None else old
        logp_leaf = torch.where(
            block_mask, filler, torch.zeros((), dtype=dtype, device=mask.device)
        )
        logp_leaf[bi, bt] = logp.to(dtype)
        logp_leaf.requires_grad_(True)
        leaves = [logp_leaf]
        entropy_leaf = None
        if entropy is not None:
            entropy_leaf = torch.zeros_like(logp_leaf, requires_grad=False)
            entropy_leaf[bi, bt] = entropy.to(dtype)
            if plan.entropy_grad:
                entropy_leaf.requires_grad_(True)
                leaves.append(entropy_leaf)
        block = TokenInputs(
            logp=logp_leaf,
            old_logp=logp_leaf.detach() if old is None else old,
            mask=block_mask,
            ref_logp=None if inputs.ref_logp is None else inputs.ref_logp[rows],
            entropy=entropy_leaf,
            num_items=plan.normaliser,
        )
        weights = None if plan.token_weights is None else plan.token_weights[rows]
        with torch.enable_grad():
            loss, _ = token_policy_loss(
                block, plan.advantages[rows], options, token_weights=weights
            )
            grads = torch.autograd.grad(loss, leaves)
        grad_entropy = grads[1][bi, bt] if plan.entropy_grad else None
        return grads[0][bi, bt], grad_entropy

    def gather(first: int, stop: int):
        bi, bt = rows_of[first:stop], cols_of[first:stop]
        return bi, bt, impl.prepare(hidden[bi, bt]), plan.targets[bi, bt]

    def store(bi, bt, logp, entropy):
        logp_all[bi, bt] = logp.to(dtype)
        if entropy_all is not None:
            entropy_all[bi, bt] = entropy.to(dtype)

    def apply_grads(state, bi, bt, h, targets, entropy, grad_logp, grad_entropy):
        grad_h = impl.grads(
            state, h, targets, entropy, grad_logp, grad_entropy, grad_weight, grad_bias, need_h
        )
        if grad_hidden is not None:
            grad_hidden[bi, bt] = grad_h.to(grad_hidden.dtype)

    # One pass: chunks of tokens (token ratio) or of whole responses (sequence ratio).
    one_pass: list[tuple[int, int, slice]] = []
    long_rows: list[int] = []
    if options.ratio_level == "token":
        total = starts[-1]
        for first in range(0, total, chunk):
            stop = min(first + chunk, total)
            r0, r1 = int(rows_of[first]), int(rows_of[stop - 1]) + 1
            one_pass.append((first, stop, slice(r0, r1)))
    else:
        open_from = None  # first response of the chunk being filled
        for i, length in enumerate(plan.lengths):
            if length == 0:
                continue
            full = open_from is not None and starts[i + 1] - starts[open_from] > chunk
            if open_from is not None and (length > chunk or full):
                one_pass.append((starts[open_from], starts[i], slice(open_from, i)))
                open_from = None
            if length > chunk:
                long_rows.append(i)
            elif open_from is None:
                open_from = i
        if open_from is not None:
            one_pass.append((starts[open_from], starts[n], slice(open_from, n)))

    for first, stop, rows in one_pass:
        bi, bt, h, targets = gather(first, stop)
        logp, lse, entropy, state = impl.stats(h, targets, plan.with_entropy)
        store(bi, bt, logp, entropy)
        if any_grad:
            local_i = bi - rows.start
            grad_logp, grad_entropy = block_grads(rows, local_i, bt, logp, entropy)
            apply_grads(state, bi, bt, h, targets, entropy, grad_logp, grad_entropy)
        del state

    if long_rows:  # sequence ratio, responses longer than a chunk: two passes
        pieces = []
        for i in long_rows:
            for first in range(starts[i], starts[i + 1], chunk):
                pieces.append((first, min(first + chunk, starts[i + 1])))
        saved = []
        for first, stop in pieces:
            bi, bt, h, targets = gather(first, stop)
            logp, lse, entropy, state = impl.stats(h, targets, plan.with_entropy)
            del state
            store(bi, bt, logp, entropy)
            saved.append((logp, lse, entropy))
        if any_grad:
            rows = torch.tensor(long_rows, device=mask.device)
            local_of = torch.full((n,), -1, dtype=torch.long, device=mask.device)
            local_of[rows] = torch.arange(len(long_rows), device=mask.device)
            sel = torch.cat([torch.arange(a, b, device=mask.device) for a, b in pieces])
            bi_all, bt_all = rows_of[sel], cols_of[sel]
            grad_logp_all, grad_entropy_all = block_grads(
                rows,
                local_of[bi_all],
                bt_all,
                logp_all[bi_all, bt_all],
                None if entropy_all is None else entropy_all[bi_all, bt_all],
            )
            offset = 0
            for (first, stop), (logp, lse, entropy) in zip(pieces, saved):
                bi, bt, h, targets = gather(first, stop)
                part = slice(offset, offset + stop - first)
                offset += stop - first
                state = impl.recompute(h, lse)
                apply_grads(
                    state,
                    bi,
                    bt,
                    h,
                    targets,
                    entropy,
                    grad_logp_all[part],
                    None if grad_entropy_all is None else grad_entropy_all[part],
                )
                del state

    # The loss and its metrics: the policy loss on every log-prob (no autograd).
    final = TokenInputs(
        logp=logp_all,
        old_logp=logp_all if plan.on_policy else inputs.old_logp,
        mask=mask,
        ref_logp=inputs.ref_logp,
        entropy=entropy_all,
        num_items=inputs.num_items,
    )
    loss, metrics = token_policy_loss(
        final, plan.advantages, options, token_weights=plan.token_weights
    )
    plan.loss, plan.metrics, plan.logp = loss.detach(), metrics, logp_all
    if grad_weight is not None:
        grad_weight = grad_weight.to(weight.dtype)
    if grad_bias is not None:
        grad_bias = grad_bias.to(bias.dtype)
    return grad_hidden, grad_weight, grad_bias


class _FusedPolicyLossFunction(torch.autograd.Function):
    """Forward: every chunk, gradients included; backward: scales them by one number."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, plan):
        needs = tuple(bool(x) for x in ctx.needs_input_grad[:3])
        ctx.grads = _run(plan, hidden, weight, bias, needs)
        return plan.loss.clone()

    @staticmethod
    def backward(ctx, grad_loss):
        grads = ctx.grads
        if grads is None:
            raise RuntimeError(
                "fused_linear_policy_loss: its gradients are computed once, in the forward "
                "pass, and handed over by the first backward; call the loss again to "
                "backpropagate a second time"
            )
        ctx.grads = None
        # Scaled in place: no second [V, H] tensor. A CPU scalar is read for free, and
        # the usual loss.backward() (gradient 1) then costs nothing.
        unit = grad_loss.device.type == "cpu" and float(grad_loss) == 1.0
        if not unit:
            for grad in grads:
                if grad is not None:
                    grad.mul_(grad_loss.to(grad.device))
        return (*grads, None)


# --------------------------------------------------------------------------------------
# The public op
# --------------------------------------------------------------------------------------


def _check_token_tensor(name: str, value: Any, targets: torch.Tensor) -> torch.Tensor:
    value = require_tensor(name, value)
    require_same_shape(name, value, "targets", targets)
    require_same_device(name, value, "targets", targets)
    return value


def fused_linear_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    old_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    ratio_level: str = "sequence",
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: float | None = None,
    beta_kl: float = 0.0,
    entropy_coef: float = 0.0,
    agg: str = "token-mean",
    max_len: int | None = None,
    num_items: float | None = None,
    token_weights: torch.Tensor | None = None,
    temperature: float = 1.0,
    compute_entropy: bool = False,
    return_logp: bool = False,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, dict[str, float]] | tuple[torch.Tensor, dict[str, float], torch.Tensor]:
    """:func:`riskfast.riskpo.policy_loss` of the log-probs of an output layer, fused.

    Equals ``policy_loss(logp, old_logp, advantages, mask, ...)`` with ``logp[i, t] =
    log_softmax((hidden[i, t] @ weight.T + bias) / temperature)[targets[i, t]]`` (and the
    entropy of that distribution as ``entropy`` when ``entropy_coef != 0``), values and
    gradients, without materialising ``[N, T, V]``; the costs and the two-pass case are
    in the module docstring. Every option has :func:`~riskfast.riskpo.policy_loss`'s
    meaning and default.

    Args:
        hidden: ``[N, T, H]`` hidden states of ``N`` responses (bf16, fp16, fp32; float64
            on the torch path), any strides; only response tokens are read.
        weight: ``[V, H]`` output layer, same dtype and device.
        targets: ``[N, T]`` integer token ids; those on response tokens in ``[0, V)``
            (padding may hold anything, e.g. ``-100``).
        old_logp: ``[N, T]`` behaviour log-probs, or None for on-policy data: the
            current log-probs, detached (ratio 1, gradient kept), as TRL does with one
            iteration per generation.
        advantages: ``[N]`` or ``[N, T]``; mask: ``[N, T]``, nonzero on response tokens.
        bias: ``[V]`` or None (a ``-inf`` entry masks that vocabulary entry).
        ref_logp, ratio_level, eps_low, eps_high, dual_clip, beta_kl, entropy_coef, agg,
            max_len, num_items, token_weights: as in :func:`~riskfast.riskpo.policy_loss`.
        temperature: ``>= 1e-4``, divides the logits.
        compute_entropy: also report the mean entropy (``metrics["entropy"]``); implied
            by ``entropy_coef != 0``. Costs one more pass over each chunk's logits.
        return_logp: also return the ``[N, T]`` log-probs (detached; 0 off the response).
        chunk_size: response tokens per chunk, ``>= 1``; default on the torch path:
            32 MiB of fp32 buffers (one buffer, two with ``entropy_coef != 0``) or 256
            tokens, whichever is more, within 256 MiB; 1 GiB of buffers on the Triton
            path. Smaller chunks hold less memory and take a little longer
            (``_TORCH_CHUNK_BYTES`` and ``_TORCH_MIN_CHUNK_TOKENS`` have the figures). With
            ``ratio_level="sequence"`` a response longer than this takes two passes.
        backend: ``"auto"``, ``"triton"``, ``"torch"`` or ``"reference"`` (module doc).

    Returns:
        ``(loss, metrics)`` as :func:`~riskfast.riskpo.policy_loss` (``loss`` 0-dim fp32,
        float64 for float64 inputs, differentiable in ``hidden``, ``weight``, ``bias``),
        or ``(loss, metrics, logp)`` with ``return_logp``. The gradients are computed in
        the forward call (when grad mode is on and an input requires one) and handed
        over by the first backward; a second backward through the same call raises.

    Raises:
        TypeError / ValueError naming the offending argument, before anything is
        computed (a NaN or ``+inf`` logit gives a NaN log-prob, refused naming ``logp``
        as :func:`~riskfast.riskpo.policy_loss` does).
    """
    from ..riskpo.loss import PolicyLossOptions, check_token_inputs, policy_loss

    hidden, weight, bias = _check_output_layer(hidden, weight, bias, "[N, T, H]")
    n, t, _ = hidden.shape
    v = weight.shape[0]
    targets = require_tensor("targets", targets)
    require_integer("targets", targets)
    if targets.shape != (n, t):
        raise ValueError(
            f"targets: expected shape ({n}, {t}) to match hidden {tuple(hidden.shape)}, "
            f"got {tuple(targets.shape)}"
        )
    require_same_device("targets", targets, "hidden", hidden)
    on_policy = old_logp is None
    if not on_policy:
        old_logp = _check_token_tensor("old_logp", old_logp, targets)
    mask = _check_token_tensor("mask", mask, targets)
    if ref_logp is not None:
        ref_logp = _check_token_tensor("ref_logp", ref_logp, targets)
    advantages = require_tensor("advantages", advantages)
    require_same_device("advantages", advantages, "targets", targets)
    if token_weights is not None:
        token_weights = require_tensor("token_weights", token_weights)
        require_same_device("token_weights", token_weights, "targets", targets)
    temperature = _check_temperature(temperature)
    compute_entropy = require_bool("compute_entropy", compute_entropy)
    return_logp = require_bool("return_logp", return_logp)
    if chunk_size is not None:
        chunk_size = require_int("chunk_size", chunk_size, low=1)
    backend = _resolve_backend(backend, "hidden", hidden)
    options = PolicyLossOptions(
        ratio_level=ratio_level, eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip,
        beta_kl=beta_kl, entropy_coef=entropy_coef, agg=agg, max_len=max_len,
    )  # fmt: skip
    with_entropy = compute_entropy or options.entropy_coef != 0

    if backend == "reference":
        return _reference(
            hidden,
            weight,
            bias,
            targets,
            old_logp,
            advantages,
            mask,
            ref_logp,
            token_weights,
            options,
            num_items,
            temperature,
            with_entropy,
            return_logp,
            policy_loss,
        )

    # The token-level inputs, checked as policy_loss checks them (shapes, the inputs the
    # options need, finiteness on the response: one host read); the log-probs and
    # entropies they will be computed from are stood in for by zeros.
    placeholder = torch.zeros((n, t), device=hidden.device, dtype=_math_dtype(hidden.dtype))
    per_response = {"advantages": advantages}
    if token_weights is not None:
        per_response["token_weights"] = token_weights
    inputs, checked = check_token_inputs(
        placeholder, placeholder if on_policy else old_logp, mask, ref_logp=ref_logp,
        entropy=placeholder if with_entropy else None, num_items=num_items,
        options=options, per_response=per_response,
    )  # fmt: skip
    # Response lengths and the range of the targets on response tokens: one host read.
    on_response = targets[inputs.mask]
    extremes = torch.stack(torch.aminmax(on_response)) if on_response.numel() else on_response[:0]
    summary = torch.cat([inputs.mask.sum(dim=1), extremes.long()]).tolist()
    lengths, extremes = summary[:n], summary[n:]
    if extremes and (extremes[0] < 0 or extremes[1] >= v):
        raise ValueError(
            f"targets: values on response tokens must lie in [0, {v}), got min "
            f"{extremes[0]}, max {extremes[1]}"
        )
    plan = _Plan(
        targets=targets,
        inputs=inputs,
        advantages=checked["advantages"],
        token_weights=checked.get("token_weights"),
        options=options,
        on_policy=on_policy,
        with_entropy=with_entropy,
        entropy_grad=options.entropy_coef != 0,
        lengths=[int(x) for x in lengths],
        normaliser=_normaliser(lengths, options.agg, inputs.num_items),
        chunk_size=chunk_size,
        backend=backend,
        inv_temperature=1.0 / temperature,
    )
    differentiable = (hidden, weight) if bias is None else (hidden, weight, bias)
    if torch.is_grad_enabled() and any(x.requires_grad for x in differentiable):
        loss = _FusedPolicyLossFunction.apply(hidden, weight, bias, plan)
    else:
        _run(plan, hidden, weight, bias, (False, False, False))
        loss = plan.loss
    if return_logp:
        return loss, plan.metrics, plan.logp
    return loss, plan.metrics


def _reference(
    hidden,
    weight,
    bias,
    targets,
    old_logp,
    advantages,
    mask,
    ref_logp,
    token_weights,
    options,
    num_items,
    temperature,
    with_entropy,
    return_logp,
    policy_loss,
):
    """The oracle: ``[N * T, V]`` logits, ``log_softmax``, then ``policy_loss`` (autograd)."""
    n, t, h_dim = hidden.shape
    on_mask = mask != 0
    safe_targets = torch.where(on_mask, targets, torch.zeros_like(targets))
    out = fused_linear_logprobs_reference(
        hidden.reshape(n * t, h_dim), weight, safe_targets.reshape(-1), bias=bias,
        temperature=temperature, return_entropy=True,
    )  # fmt: skip
    logp, entropy = (x.view(n, t) for x in out)
    loss, metrics = policy_loss(
        logp, logp.detach() if old_logp is None else old_logp, advantages, mask,
        ratio_level=options.ratio_level, eps_low=options.eps_low, eps_high=options.eps_high,
        dual_clip=options.dual_clip, ref_logp=ref_logp, beta_kl=options.beta_kl,
        entropy=entropy if with_entropy else None, entropy_coef=options.entropy_coef,
        agg=options.agg, max_len=options.max_len, num_items=num_items,
        token_weights=token_weights,
    )  # fmt: skip
    if return_logp:
        return loss, metrics, torch.where(on_mask, logp.detach(), torch.zeros_like(logp))
    return loss, metrics
