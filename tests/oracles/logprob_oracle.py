"""Independent float64 reference for the token log-prob ops (spec: spec/kernels.md).

Plain Python loops over Python floats, on purpose slow and obvious, to check
``riskfast.ops`` (its Triton kernels, its chunked PyTorch path and its vectorised
reference alike). It never imports riskfast or torch.

For one token with logits ``x_j`` (``j < V``), temperature ``T`` and target ``t``:

* ``z_j = x_j / T``, ``p_j = exp(z_j) / sum_k exp(z_k)``;
* ``logp = log p_t``, ``entropy = -sum_j p_j log p_j`` (terms with ``p_j = 0`` are 0);
* the gradient of ``g * logp + g_H * entropy`` with respect to ``x_j`` is derived
  below from ``d log p_i / d z_j = 1[i = j] - p_j``.

A logit of ``-inf`` is a masked vocabulary entry: ``p_j = 0``, and it contributes
nothing to the entropy and receives no gradient.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

NEG_INF = float("-inf")


def softmax_row(z: Sequence[float]) -> list[float]:
    """``p_j = exp(z_j - m) / sum_k exp(z_k - m)`` with ``m = max z`` (one finite z at least)."""
    m = max(z)
    if m == NEG_INF:
        raise ValueError("a row needs at least one finite logit")
    e = [0.0 if zj == NEG_INF else math.exp(zj - m) for zj in z]
    total = math.fsum(e)
    return [ej / total for ej in e]


def log_softmax_row(z: Sequence[float]) -> list[float]:
    """``log p_j = z_j - m - log sum_k exp(z_k - m)``; ``-inf`` for masked entries."""
    m = max(z)
    log_total = math.log(math.fsum(0.0 if zj == NEG_INF else math.exp(zj - m) for zj in z))
    return [NEG_INF if zj == NEG_INF else zj - m - log_total for zj in z]


def token_logprob_entropy(
    logits: Sequence[float], target: int, temperature: float = 1.0
) -> tuple[float, float]:
    """``(log p_target, entropy)`` of one token."""
    z = [x / temperature for x in logits]
    p = softmax_row(z)
    log_p = log_softmax_row(z)
    entropy = -math.fsum(pj * lj for pj, lj in zip(p, log_p, strict=True) if pj > 0.0)
    return log_p[target], entropy


def token_logit_gradient(
    logits: Sequence[float],
    target: int,
    temperature: float,
    grad_logp: float,
    grad_entropy: float,
) -> list[float]:
    """``d(g logp + g_H entropy) / d x_j`` for one token.

    With ``d log p_i / d z_j = 1[i = j] - p_j``:

    * ``d logp / d z_j = 1[j = t] - p_j``;
    * ``d entropy / d z_j = -sum_i p_i (1 + log p_i)(1[i = j] - p_j)
      = -p_j (log p_j + entropy)`` (the ``1`` terms cancel since ``sum p = 1``);

    and ``d z_j / d x_j = 1 / T``.
    """
    z = [x / temperature for x in logits]
    p = softmax_row(z)
    log_p = log_softmax_row(z)
    _, entropy = token_logprob_entropy(logits, target, temperature)
    grad = []
    for j, (pj, lj) in enumerate(zip(p, log_p, strict=True)):
        d_logp = (1.0 if j == target else 0.0) - pj
        d_entropy = -pj * (lj + entropy) if pj > 0.0 else 0.0
        grad.append((grad_logp * d_logp + grad_entropy * d_entropy) / temperature)
    return grad


def linear_logits(
    hidden: Sequence[Sequence[float]],
    weight: Sequence[Sequence[float]],
    bias: Sequence[float] | None = None,
) -> list[list[float]]:
    """``hidden @ weight.T + bias`` by loops: ``[N][V]``."""
    out = []
    for h_row in hidden:
        row = []
        for v, w_row in enumerate(weight):
            value = math.fsum(a * b for a, b in zip(h_row, w_row, strict=True))
            row.append(value + (bias[v] if bias is not None else 0.0))
        out.append(row)
    return out


def linear_gradients(
    hidden: Sequence[Sequence[float]],
    weight: Sequence[Sequence[float]],
    bias: Sequence[float] | None,
    targets: Sequence[int],
    temperature: float,
    grad_logp: Sequence[float],
    grad_entropy: Sequence[float],
) -> tuple[list[list[float]], list[list[float]], list[float]]:
    """Gradients of ``sum_n g_n logp_n + g_H,n entropy_n`` to ``(hidden, weight, bias)``.

    Chain rule through ``x = hidden @ weight.T + bias``:
    ``dhidden[n][k] = sum_v dx[n][v] weight[v][k]``,
    ``dweight[v][k] = sum_n dx[n][v] hidden[n][k]``, ``dbias[v] = sum_n dx[n][v]``.
    """
    logits = linear_logits(hidden, weight, bias)
    dx = [
        token_logit_gradient(row, t, temperature, g, gh)
        for row, t, g, gh in zip(logits, targets, grad_logp, grad_entropy, strict=True)
    ]
    n_tokens, n_vocab, width = len(hidden), len(weight), len(hidden[0])
    d_hidden = [
        [math.fsum(dx[n][v] * weight[v][k] for v in range(n_vocab)) for k in range(width)]
        for n in range(n_tokens)
    ]
    d_weight = [
        [math.fsum(dx[n][v] * hidden[n][k] for n in range(n_tokens)) for k in range(width)]
        for v in range(n_vocab)
    ]
    d_bias = [math.fsum(dx[n][v] for n in range(n_tokens)) for v in range(n_vocab)]
    return d_hidden, d_weight, d_bias
