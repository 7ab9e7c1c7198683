"""Plain PyTorch references of the token log-prob ops: the oracles of the tests.

Written the obvious way, independently of the kernels and of the chunked CPU path:
materialise the ``[N, V]`` logits, ``log_softmax``, gather; entropy ``-sum p log p``
(``0 log 0 = 0``: a ``-inf`` logit is a masked vocabulary entry).
Gradients come from autograd. Spec: ``spec/kernels.md``, "Public signatures".

Math runs in fp32 for bf16/fp16/fp32 inputs (the values are upcast first, so a bf16
input is compared against the fp32 reference on the same bf16 values) and in float64
for float64 inputs. No argument checks: call through ``riskfast.ops`` for those.
"""

from __future__ import annotations

import torch

__all__ = ["fused_linear_logprobs_reference", "selective_logprobs_reference"]


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def selective_logprobs_reference(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``log_softmax(logits / temperature)[n, targets[n]]`` and optionally the entropy.

    Args:
        logits: ``[N, V]`` floating.
        targets: ``[N]`` integer in ``[0, V)``.
    Returns:
        ``logp[N]`` (fp32, or float64 for float64 logits), or ``(logp, entropy)``.
    """
    scaled = logits.to(_math_dtype(logits.dtype)) / temperature
    log_probs = torch.log_softmax(scaled, dim=-1)
    logp = log_probs.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    if not return_entropy:
        return logp
    # A -inf logit (a masked vocabulary entry) has p = 0 and adds nothing: 0 log 0 = 0,
    # with the -inf replaced before the product so that autograd sees no 0 * inf either.
    probs = log_probs.exp()
    entropy = -(probs * log_probs.masked_fill(probs == 0, 0.0)).sum(dim=-1)
    return logp, entropy


def fused_linear_logprobs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of ``targets`` under ``(hidden @ weight.T + bias) / temperature``.

    Args:
        hidden: ``[N, H]``; weight: ``[V, H]``; bias: ``[V]`` or ``None``.
        targets: ``[N]`` integer in ``[0, V)``.
    Returns:
        As :func:`selective_logprobs_reference`; materialises the ``[N, V]`` logits.
    """
    dtype = _math_dtype(hidden.dtype)
    logits = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        logits = logits + bias.to(dtype)
    return selective_logprobs_reference(
        logits, targets, temperature=temperature, return_entropy=return_entropy
    )
