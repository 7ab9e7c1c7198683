"""The RiskPO policy loss: a clipped likelihood-ratio surrogate at token level.

Spec: ``riskpo.md`` section 4. Drop-in for GRPO-family trainers: it takes per-token
log-probs under the current and the behaviour policy, per-response (or per-token)
advantages and the response mask, and returns a scalar loss plus metrics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch

from .._checks import (
    INT64_MAX,
    require_all_finite,
    require_choice,
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


@dataclass(frozen=True)
class PolicyLossOptions:
    """The options of :func:`policy_loss` that do not depend on the batch, validated once.

    :class:`riskfast.RiskPOLoss` builds one at construction, so a bad option is refused
    there instead of at the first training step. Numbers are stored as Python floats.
    """

    ratio_level: str = "sequence"
    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip: float | None = None
    beta_kl: float = 0.0
    entropy_coef: float = 0.0
    agg: str = "token-mean"
    max_len: int | None = None

    def __post_init__(self) -> None:
        require_choice("ratio_level", self.ratio_level, RATIO_LEVELS)
        require_choice("agg", self.agg, AGG_MODES)
        numbers = {
            "eps_low": require_number("eps_low", self.eps_low, low=0.0),
            "eps_high": require_number("eps_high", self.eps_high, low=0.0),
            "beta_kl": require_number("beta_kl", self.beta_kl, low=0.0),
            "entropy_coef": require_number("entropy_coef", self.entropy_coef),
        }
        if self.dual_clip is not None:
            numbers["dual_clip"] = require_number(
                "dual_clip", self.dual_clip, low=1.0, low_open=True
            )
        for name, value in numbers.items():
            object.__setattr__(self, name, value)
        if self.max_len is not None:
            require_int("max_len", self.max_len, low=1, high=INT64_MAX)
            if self.agg != "seq-mean-token-sum-norm":
                raise ValueError(
                    f"max_len: only agg='seq-mean-token-sum-norm' divides by it, got "
                    f"agg={self.agg!r}"
                )

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


@dataclass(frozen=True)
class TokenInputs:
    """Checked token-level inputs of :func:`policy_loss` (see :func:`check_token_inputs`).

    Every tensor is ``[N, T]`` in the compute dtype; ``logp``, ``ref_logp`` and
    ``entropy`` hold 0 outside the response (so whatever the caller's padding held can
    reach neither the loss nor a gradient), ``old_logp`` is used only through masked
    differences. ``logp`` and ``entropy`` stay differentiable.
    """

    logp: torch.Tensor
    old_logp: torch.Tensor
    mask: torch.Tensor
    ref_logp: torch.Tensor | None
    entropy: torch.Tensor | None
    num_items: float | None

    @property
    def dtype(self) -> torch.dtype:
        return self.logp.dtype


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


def _response_mask(value: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Where ``value`` (``[N]`` or ``[N, T]``) is used: responses with a token, or tokens."""
    return mask.any(dim=1) if value.dim() == 1 else mask


def on_tokens(value: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[N]`` or ``[N, T]`` values as ``[N, T]`` (detached, 0 outside the response)."""
    value = value.detach().to(dtype)
    if value.dim() == 1:
        value = value[:, None].expand(mask.shape)
    return torch.where(mask, value, torch.zeros_like(value))


def check_token_inputs(
    logp: Any,
    old_logp: Any,
    mask: Any,
    *,
    ref_logp: Any = None,
    entropy: Any = None,
    num_items: Any = None,
    options: PolicyLossOptions,
    per_response: dict[str, Any] | None = None,
    num_responses: int | None = None,
) -> tuple[TokenInputs, dict[str, torch.Tensor]]:
    """Validate the token-level inputs of :func:`policy_loss` before anything is computed.

    Types, shapes, devices, the inputs the options need (``ref_logp`` for ``beta_kl > 0``,
    ``entropy`` for ``entropy_coef != 0``), ``num_items``, and finiteness of every value
    on a response token (one host read for all tensors together).

    Args:
        per_response: named ``[N]`` or ``[N, T]`` tensors checked alongside (the
            advantages, token weights); returned as ``[N, T]`` (0 outside the response).
        num_responses: when given, the ``N`` the token tensors must have (``RiskPOLoss``
            passes the reward count, so that a mismatch is refused before the step).

    Returns:
        The checked :class:`TokenInputs` and the checked ``per_response`` tensors.
    """
    logp = require_tensor("logp", logp)
    require_floating("logp", logp)
    require_ndim("logp", logp, 2, "[N, T]")
    if num_responses is not None and logp.shape[0] != num_responses:
        raise ValueError(
            f"logp: has {logp.shape[0]} responses (shape {tuple(logp.shape)}), rewards has "
            f"{num_responses}"
        )
    old_logp = _check_token_tensor("old_logp", old_logp, logp)
    mask = require_tensor("mask", mask)
    require_real("mask", mask)
    require_same_shape("mask", mask, "logp", logp)
    require_same_device("mask", mask, "logp", logp)
    if ref_logp is not None:
        ref_logp = _check_token_tensor("ref_logp", ref_logp, logp)
    elif options.beta_kl > 0:
        raise ValueError("ref_logp: beta_kl > 0 needs the reference log-probs")
    if entropy is not None:
        entropy = _check_token_tensor("entropy", entropy, logp)
    elif options.entropy_coef != 0:
        raise ValueError("entropy: entropy_coef != 0 needs the per-token entropy")
    if num_items is not None:
        num_items = require_number("num_items", num_items, low=0.0, low_open=True)
    extra = {
        name: _check_response_or_token(name, value, logp)
        for name, value in (per_response or {}).items()
    }

    raw_mask, mask = mask, mask != 0
    require_all_finite(
        [
            ("mask", raw_mask, None),
            ("logp", logp, mask),
            ("old_logp", old_logp, mask),
            *((name, value, _response_mask(value, mask)) for name, value in extra.items()),
            ("ref_logp", ref_logp, mask),
            ("entropy", entropy, mask),
        ]
    )
    dtype = _compute_dtype(logp, old_logp, ref_logp, entropy)
    zeros = torch.zeros((), dtype=dtype, device=logp.device)

    def response_only(value: torch.Tensor | None, detach: bool) -> torch.Tensor | None:
        # 0 outside the response before any arithmetic: padding (NaN, inf, anything)
        # reaches neither the loss nor, through the backward of a later op (the KL's
        # exp), a gradient. old_logp needs no pass of its own: it meets the response
        # only through logp - old_logp, which every use masks, and has no gradient.
        if value is None:
            return None
        value = value.detach() if detach else value
        return torch.where(mask, value.to(dtype), zeros)

    inputs = TokenInputs(
        logp=response_only(logp, detach=False),
        old_logp=old_logp.detach().to(dtype),
        mask=mask,
        ref_logp=response_only(ref_logp, detach=True),
        entropy=response_only(entropy, detach=False),
        num_items=num_items,
    )
    return inputs, {name: on_tokens(value, mask, dtype) for name, value in extra.items()}


def log_ratios(
    logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, ratio_level: str
) -> torch.Tensor:
    """``[N, T]`` log importance ratio at every token (0 outside the response).

    ``"token"``: ``logp_t - old_logp_t``. ``"sequence"``: the response's length-normalised
    ``mean_t(logp - old_logp)`` (GSPO), repeated at each of its tokens; differentiable, so
    its gradient reaches every token with weight ``1 / len``. Clamped to
    ``+-LOG_RATIO_CLAMP`` (20). Before the sequence sum, each token's difference is
    clamped to ``+-max / (2 T)`` of the dtype, so that no sum of finite inputs overflows
    (only differences beyond ``1e34`` in float32 are touched; their mean is far beyond
    20 anyway, or the input is meaningless).
    """
    diff = torch.where(mask, logp - old_logp, torch.zeros_like(logp))
    if ratio_level == "token":
        return torch.clamp(diff, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    limit = torch.finfo(diff.dtype).max / (2 * max(diff.shape[1], 1))
    lengths = mask.sum(dim=1, keepdim=True).clamp_min(1).to(diff.dtype)
    total = torch.clamp(diff, -limit, limit).sum(dim=1, keepdim=True)
    per_sequence = torch.clamp(total / lengths, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
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
    sum, or sum / ``max_len`` (default ``T``; 1 when ``T = 0``, where every sum is 0),
    summed over sequences with at least one response token and divided by ``num_items``
    or that count. No response token: 0.
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
            per_sequence = per_sequence / float(max_len or max(mask.shape[1], 1))
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

    Every value on a response token (``logp``, ``old_logp``, ``advantages``,
    ``ref_logp``, ``entropy``, ``token_weights``; and every ``mask`` value) must be finite:
    a NaN or inf there raises ``ValueError`` naming the argument (one host read for all
    of them), before anything is computed. The per-vocabulary inputs these log-probs
    come from (logits, hidden states) are not scanned by :mod:`riskfast.ops`, for speed:
    a NaN or ``+inf`` logit gives a NaN log-prob in its row, which this check then
    refuses, naming ``logp``.

    Args:
        logp: ``[N, T]`` log-probs of the taken tokens under the current policy
            (differentiable).
        old_logp: ``[N, T]`` log-probs under the behaviour policy (no gradient).
        advantages: ``[N]`` per response or ``[N, T]`` per token (no gradient).
        mask: ``[N, T]``, nonzero (or True) on response tokens. Values elsewhere in the
            other tensors are ignored, whatever they hold (NaN included): they reach
            neither the loss nor a gradient. ``T = 0`` and responses without tokens are
            fine (a batch without response tokens has loss 0).
        ratio_level: ``"sequence"`` or ``"token"``.
        eps_low, eps_high: clip range, ``>= 0``.
        dual_clip: ``c > 1`` bounding the loss of negative advantages, or None.
        ref_logp: ``[N, T]`` reference log-probs, needed when ``beta_kl > 0``.
        beta_kl: coefficient of the k3 KL penalty.
        entropy: ``[N, T]`` per-token policy entropy (differentiable), optional.
        entropy_coef: coefficient of the entropy bonus (needs ``entropy``).
        agg: ``"token-mean"``, ``"seq-mean-token-mean"``, ``"seq-mean-token-sum"`` or
            ``"seq-mean-token-sum-norm"`` (verl's meanings).
        max_len: divisor of ``seq-mean-token-sum-norm`` (default ``T``, or 1 when
            ``T = 0``); an error with any other ``agg``, which would ignore it.
        num_items: global normaliser replacing the local token (or sequence) count, for
            data-parallel runs; ``> 0``. A loss that overflows (finite inputs too large
            together, or a tiny ``num_items``) raises ``ValueError`` naming the input to
            rescale, never returns inf.
        token_weights: ``[N, T]`` (or ``[N]``) weights multiplying the clipped surrogate
            of each token before aggregation (no gradient), e.g. the truncated importance
            weights of a rollout engine whose log-probs differ from the trainer's.

    The math is float32 (float64 for float64 inputs) whatever the input dtype, but a
    gradient comes back in its input's dtype: with fp16 ``logp``, a gradient beyond fp16's
    65504 (``|A| * ratio / normaliser``, the ratio reaching ``exp(20)``) becomes inf in
    that cast, which no loss can prevent. Use bf16 or fp32 log-probs there.

    Returns:
        ``(loss, metrics)``: a 0-dim tensor (float32, float64 for float64 inputs) and a
        dict of floats: ``loss``, ``pg_loss``, ``clip_frac``, ``dual_clip_frac``,
        ``ratio_mean``, ``approx_kl`` (token-level k3 of old vs new), and ``entropy`` /
        ``kl`` when those inputs are given.
    """
    options = PolicyLossOptions(
        ratio_level=ratio_level,
        eps_low=eps_low,
        eps_high=eps_high,
        dual_clip=dual_clip,
        beta_kl=beta_kl,
        entropy_coef=entropy_coef,
        agg=agg,
        max_len=max_len,
    )
    per_response = {"advantages": advantages}
    if token_weights is not None:
        per_response["token_weights"] = token_weights
    inputs, checked = check_token_inputs(
        logp,
        old_logp,
        mask,
        ref_logp=ref_logp,
        entropy=entropy,
        num_items=num_items,
        options=options,
        per_response=per_response,
    )
    return token_policy_loss(
        inputs, checked["advantages"], options, token_weights=checked.get("token_weights")
    )


def token_policy_loss(
    inputs: TokenInputs,
    advantages: torch.Tensor,
    options: PolicyLossOptions,
    *,
    token_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """:func:`policy_loss` of inputs already checked by :func:`check_token_inputs`.

    ``advantages`` and ``token_weights`` are ``[N, T]`` in ``inputs.dtype``, 0 outside
    the response (as :func:`check_token_inputs` returns them). Reads the metrics back
    once; if the loss or a metric is not finite (finite inputs that overflow together,
    such as advantages near the float32 limit or a tiny ``num_items``), raises
    ``ValueError`` naming the input to rescale instead of returning it.
    """
    mask, dtype = inputs.mask, inputs.dtype
    logp, old_logp = inputs.logp, inputs.old_logp
    log_ratio = log_ratios(logp, old_logp, mask, options.ratio_level)
    ratio = torch.exp(log_ratio)
    pg, was_clipped, dual = clipped_surrogate(
        ratio, advantages, options.eps_low, options.eps_high, options.dual_clip
    )
    unweighted = pg
    if token_weights is not None:
        pg = pg * token_weights
    token_loss = pg
    kl = None
    if inputs.ref_logp is not None:
        kl = torch.where(mask, k3_kl(logp, inputs.ref_logp), torch.zeros_like(logp))
        if options.beta_kl > 0:
            token_loss = token_loss + options.beta_kl * kl
    entropy = inputs.entropy
    if entropy is not None and options.entropy_coef != 0:
        token_loss = token_loss - options.entropy_coef * entropy

    agg_kwargs = {"max_len": options.max_len, "num_items": inputs.num_items}
    loss = aggregate(token_loss, mask, options.agg, **agg_kwargs)

    with torch.no_grad():
        tokens = mask.sum().clamp_min(1).to(dtype)

        def token_mean(x: torch.Tensor) -> torch.Tensor:
            return torch.where(mask, x, torch.zeros_like(x)).sum() / tokens

        token_log_ratio = torch.clamp(logp - old_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        named = {
            "loss": loss.detach(),
            "pg_loss": aggregate(pg.detach(), mask, options.agg, **agg_kwargs),
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
        if not all(math.isfinite(v) for v in values):
            raise _overflow_error(inputs, options, unweighted, pg, kl, token_loss)
    return loss, dict(zip(named, values))


def _overflow_error(
    inputs: TokenInputs,
    options: PolicyLossOptions,
    unweighted: torch.Tensor,
    weighted: torch.Tensor,
    kl: torch.Tensor | None,
    token_loss: torch.Tensor,
) -> ValueError:
    """The error for finite inputs whose loss overflowed, naming the input to rescale.

    Only reached on failure, so the extra host reads here cost nothing in training.
    """
    mask, dtype = inputs.mask, inputs.dtype

    def overflows(values: torch.Tensor) -> bool:
        return bool((~torch.isfinite(values) & mask).any())

    terms = [
        ("advantages", unweighted, "the clipped surrogate -A * ratio (ratio <= exp(20))"),
        ("token_weights", weighted, "the weighted surrogate"),
    ]
    if kl is not None and options.beta_kl > 0:
        terms.append(("beta_kl", options.beta_kl * kl.detach(), "beta_kl * k3 (k3 <= exp(20))"))
    if inputs.entropy is not None and options.entropy_coef != 0:
        terms.append(
            ("entropy_coef", options.entropy_coef * inputs.entropy.detach(), "the entropy bonus")
        )
    for name, values, what in terms:
        if overflows(values.detach()):
            return ValueError(f"{name}: {what} overflows {dtype} on a response token; rescale it")
    if inputs.num_items is not None and bool(torch.isfinite(token_loss.detach().sum())):
        return ValueError(
            f"num_items: dividing the summed loss by num_items = {inputs.num_items:g} "
            f"overflows {dtype}; pass the real token (or sequence) count"
        )
    return ValueError(
        f"advantages: the per-token losses are finite but their sum overflows {dtype}; "
        "rescale the advantages"
    )
