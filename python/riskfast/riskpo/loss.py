"""The RiskPO policy loss: a clipped likelihood-ratio surrogate at token level.

Spec: ``riskpo.md`` section 4. Drop-in for GRPO-family trainers: it takes per-token
log-probs under the current and the behaviour policy, per-response (or per-token)
advantages and the response mask, and returns a scalar loss plus metrics.
"""

from __future__ import annotations

from typing import Any

import torch

from .._checks import (
    require_choice,
    require_finite,
    require_floating,
    require_int,
    require_ndim,
    require_number,
    require_real,
    require_same_device,
    require_same_shape,
    require_tensor,
)

RATIO_LEVELS = ("sequence", "token")
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
LOG_RATIO_CLAMP = 20.0
"""Log-ratios are clamped to +-20 before ``exp`` (as verl does), so finite input never
overflows float32."""


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any input is float64 (exact gradchecks), else float32."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def _check_token_tensor(name: str, value: Any, logp: torch.Tensor) -> torch.Tensor:
    value = require_tensor(name, value)
    require_floating(name, value)
    require_same_shape(name, value, "logp", logp)
    require_same_device(name, value, "logp", logp)
    return value


def _check_response_or_token(name: str, value: Any, logp: torch.Tensor) -> torch.Tensor:
    """A real tensor of shape ``[N]`` (one value per response) or ``[N, T]``."""
    value = require_tensor(name, value)
    require_real(name, value)
    require_same_device(name, value, "logp", logp)
    if value.shape not in (logp.shape[:1], logp.shape):
        raise ValueError(
            f"{name}: expected shape [N] {tuple(logp.shape[:1])} or [N, T] "
            f"{tuple(logp.shape)}, got {tuple(value.shape)}"
        )
    return value


def _on_tokens(
    name: str, value: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """``[N]`` or ``[N, T]`` values as ``[N, T]`` (detached, 0 outside the response),
    checked finite on the response tokens."""
    value = value.detach().to(dtype)
    if value.dim() == 1:
        value = value[:, None].expand(mask.shape)
    value = torch.where(mask, value, torch.zeros_like(value))
    require_finite(name, value, mask)
    return value


def log_ratios(
    logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, ratio_level: str
) -> torch.Tensor:
    """``[N, T]`` log importance ratio at every token (0 outside the response).

    ``"token"``: ``logp_t - old_logp_t``. ``"sequence"``: the response's length-normalised
    ``mean_t(logp - old_logp)`` (GSPO), repeated at each of its tokens; differentiable, so
    its gradient reaches every token with weight ``1 / len``. Clamped to +-20.
    """
    diff = torch.where(mask, logp - old_logp, torch.zeros_like(logp))
    if ratio_level == "token":
        return torch.clamp(diff, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    lengths = mask.sum(dim=1, keepdim=True).clamp_min(1).to(diff.dtype)
    per_sequence = torch.clamp(
        diff.sum(dim=1, keepdim=True) / lengths, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP
    )
    return torch.where(mask, per_sequence.expand_as(diff), torch.zeros_like(diff))


def clipped_surrogate(
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    eps_low: float,
    eps_high: float,
    dual_clip: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token ``-min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)`` with optional dual clip.

    Returns the loss and two boolean tensors: where the clipped branch was taken, and
    where the dual clip ``-c A`` (for ``A < 0``) bound it.
    """
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(unclipped, clipped)
    was_clipped = clipped > unclipped
    if dual_clip is None:
        return loss, was_clipped, torch.zeros_like(was_clipped)
    bound = -advantages * dual_clip
    dual = (advantages < 0) & (loss > bound)
    return torch.where(dual, bound, loss), was_clipped, dual


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(policy || reference): ``exp(d) - d - 1``, ``d = ref - logp`` (clamped +-20)."""
    d = torch.clamp(ref_logp - logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.exp(d) - d - 1.0


def aggregate(
    token_loss: torch.Tensor,
    mask: torch.Tensor,
    agg: str,
    *,
    max_len: int | None = None,
    num_items: float | None = None,
) -> torch.Tensor:
    """Reduce ``[N, T]`` per-token losses to a scalar (verl's ``loss_agg_mode``).

    ``token-mean``: sum over response tokens / (``num_items`` or their count).
    ``seq-mean-token-mean`` / ``-token-sum`` / ``-token-sum-norm``: per-sequence mean,
    sum, or sum / ``max_len`` (default ``T``), summed over sequences with at least one
    response token and divided by ``num_items`` or that count. No response token: 0.
    """
    masked = torch.where(mask, token_loss, torch.zeros_like(token_loss))
    if agg == "token-mean":
        count = mask.sum().to(masked.dtype)
        total = masked.sum()
    else:
        lengths = mask.sum(dim=1).to(masked.dtype)
        per_sequence = masked.sum(dim=1)
        if agg == "seq-mean-token-mean":
            per_sequence = per_sequence / lengths.clamp_min(1.0)
        elif agg == "seq-mean-token-sum-norm":
            per_sequence = per_sequence / float(max_len if max_len is not None else mask.shape[1])
        count = (lengths > 0).sum().to(masked.dtype)
        total = per_sequence.sum()
    if num_items is not None:
        return total / num_items
    return total / count.clamp_min(1.0)


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ratio_level: str = "sequence",
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: float | None = None,
    ref_logp: torch.Tensor | None = None,
    beta_kl: float = 0.0,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    agg: str = "token-mean",
    max_len: int | None = None,
    num_items: float | None = None,
    token_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped policy-gradient loss of RiskPO (spec ``riskpo.md`` section 4).

    Per token: ``pg_t = -min(s A, clip(s, 1 - eps_low, 1 + eps_high) A)`` (dual clip
    ``min(pg_t, -c A)`` where ``A < 0`` when ``dual_clip = c``), plus
    ``beta_kl * k3(ref, logp)``, minus ``entropy_coef * entropy_t``; then aggregated
    with ``agg``. ``s`` is the sequence ratio ``exp(mean_t(logp - old_logp))``
    (``ratio_level="sequence"``, default) or the token ratio.

    Args:
        logp: ``[N, T]`` log-probs of the taken tokens under the current policy
            (differentiable).
        old_logp: ``[N, T]`` log-probs under the behaviour policy (no gradient).
        advantages: ``[N]`` per response or ``[N, T]`` per token (no gradient).
        mask: ``[N, T]``, nonzero (or True) on response tokens. Values elsewhere in the
            other tensors are ignored, whatever they hold.
        ratio_level: ``"sequence"`` or ``"token"``.
        eps_low, eps_high: clip range, ``>= 0``.
        dual_clip: ``c > 1`` bounding the loss of negative advantages, or None.
        ref_logp: ``[N, T]`` reference log-probs, needed when ``beta_kl > 0``.
        beta_kl: coefficient of the k3 KL penalty.
        entropy: ``[N, T]`` per-token policy entropy (differentiable), optional.
        entropy_coef: coefficient of the entropy bonus (needs ``entropy``).
        agg: ``"token-mean"``, ``"seq-mean-token-mean"``, ``"seq-mean-token-sum"`` or
            ``"seq-mean-token-sum-norm"`` (verl's meanings).
        max_len: divisor of ``seq-mean-token-sum-norm`` (default ``T``).
        num_items: global normaliser replacing the local token (or sequence) count, for
            data-parallel runs.
        token_weights: ``[N, T]`` (or ``[N]``) weights multiplying the clipped surrogate
            of each token before aggregation (no gradient), e.g. the truncated importance
            weights of a rollout engine whose log-probs differ from the trainer's.

    Returns:
        ``(loss, metrics)``: a 0-dim tensor (float32, float64 for float64 inputs) and a
        dict of floats: ``loss``, ``pg_loss``, ``clip_frac``, ``dual_clip_frac``,
        ``ratio_mean``, ``approx_kl`` (token-level k3 of old vs new), and ``entropy`` /
        ``kl`` when those inputs are given.
    """
    logp = require_tensor("logp", logp)
    require_floating("logp", logp)
    require_ndim("logp", logp, 2, "[N, T]")
    old_logp = _check_token_tensor("old_logp", old_logp, logp)
    mask = require_tensor("mask", mask)
    require_real("mask", mask)
    require_same_shape("mask", mask, "logp", logp)
    require_same_device("mask", mask, "logp", logp)
    advantages = _check_response_or_token("advantages", advantages, logp)
    require_choice("ratio_level", ratio_level, RATIO_LEVELS)
    require_choice("agg", agg, AGG_MODES)
    eps_low = require_number("eps_low", eps_low, low=0.0)
    eps_high = require_number("eps_high", eps_high, low=0.0)
    if dual_clip is not None:
        dual_clip = require_number("dual_clip", dual_clip, low=1.0, low_open=True)
    beta_kl = require_number("beta_kl", beta_kl, low=0.0)
    entropy_coef = require_number("entropy_coef", entropy_coef)
    if ref_logp is not None:
        ref_logp = _check_token_tensor("ref_logp", ref_logp, logp)
    elif beta_kl > 0:
        raise ValueError("ref_logp: beta_kl > 0 needs the reference log-probs")
    if entropy is not None:
        entropy = _check_token_tensor("entropy", entropy, logp)
    elif entropy_coef != 0:
        raise ValueError("entropy: entropy_coef != 0 needs the per-token entropy")
    if max_len is not None:
        require_int("max_len", max_len, low=1)
    if num_items is not None:
        num_items = require_number("num_items", num_items, low=0.0, low_open=True)
    if token_weights is not None:
        token_weights = _check_response_or_token("token_weights", token_weights, logp)

    mask = mask != 0
    dtype = _compute_dtype(logp, old_logp, ref_logp, entropy)
    logp = logp.to(dtype)
    old_logp = old_logp.detach().to(dtype)
    token_advantages = _on_tokens("advantages", advantages, mask, dtype)

    log_ratio = log_ratios(logp, old_logp, mask, ratio_level)
    ratio = torch.exp(log_ratio)
    pg, was_clipped, dual = clipped_surrogate(ratio, token_advantages, eps_low, eps_high, dual_clip)
    if token_weights is not None:
        pg = pg * _on_tokens("token_weights", token_weights, mask, dtype)
    token_loss = pg
    kl = None
    if ref_logp is not None:
        kl = k3_kl(logp, ref_logp.detach().to(dtype))
        kl = torch.where(mask, kl, torch.zeros_like(kl))
        if beta_kl > 0:
            token_loss = token_loss + beta_kl * kl
    if entropy is not None:
        entropy = torch.where(mask, entropy.to(dtype), torch.zeros_like(logp))
        if entropy_coef != 0:
            token_loss = token_loss - entropy_coef * entropy

    agg_kwargs = {"max_len": max_len, "num_items": num_items}
    loss = aggregate(token_loss, mask, agg, **agg_kwargs)

    with torch.no_grad():
        tokens = mask.sum().clamp_min(1).to(dtype)

        def token_mean(x: torch.Tensor) -> torch.Tensor:
            return torch.where(mask, x, torch.zeros_like(x)).sum() / tokens

        token_log_ratio = torch.clamp(
            torch.where(mask, logp - old_logp, torch.zeros_like(logp)),
            -LOG_RATIO_CLAMP,
            LOG_RATIO_CLAMP,
        )
        named = {
            "loss": loss.detach(),
            "pg_loss": aggregate(pg.detach(), mask, agg, **agg_kwargs),
            "clip_frac": token_mean(was_clipped.to(dtype)),
            "dual_clip_frac": token_mean(dual.to(dtype)),
            "ratio_mean": token_mean(ratio.detach()),
            "approx_kl": token_mean(torch.expm1(token_log_ratio) - token_log_ratio),
        }
        if entropy is not None:
            named["entropy"] = token_mean(entropy.detach())
        if kl is not None:
            named["kl"] = token_mean(kl.detach())
        values = torch.stack([v.to(dtype) for v in named.values()]).tolist()
    return loss, dict(zip(named, values))
