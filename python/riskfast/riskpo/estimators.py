"""Advantage formulas of RiskPO and of the mean-based baselines, and their registry.

Spec: ``riskpo.md`` section 3. Each formula lives in exactly one function here; the
vectorised objective, the kernels' CPU path and the integrations all call these.

Two families:

* **risk** estimators map member scores ``z`` and the bundle's quantiles ``a = q_alpha``,
  ``b = q_beta`` to a member advantage, elementwise (``[nb, G]`` tensors, ``a`` and ``b``
  broadcast as ``[nb, 1]``);
* **mean** estimators map one question's rewards ``[Q, G]`` to advantages ``[Q, G]``.

New estimators are added with :func:`register_risk_estimator` or
:func:`register_mean_estimator`, without touching the dispatcher.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .quantiles import unbiased_std

GROUP_EPS = 1e-6
"""Added to a standard deviation before dividing by it (spec: ``std + 1e-6``)."""
LEVEL_EPS = 1e-6
"""Added to the level widths ``beta - alpha`` and ``alpha`` that ``form="reference_code"``
divides by, as the official code does (spec section 3)."""


@dataclass(frozen=True)
class RiskParams:
    """The levels and weights a risk estimator reads (spec section 3).

    Attributes:
        alpha, beta: quantile levels, ``0 <= alpha < beta <= 1``.
        omega: extra lower-tail weight of the paper's Mixed-VaR (``form="paper"``).
        form: ``"paper"`` or ``"reference_code"`` (Mixed-VaR only).
        w_mix: lower-tail weight of the reference code's Mixed-VaR.
        natural_baseline: ``c = 1`` (True) or ``c = 0`` in ``A_rv``.
        w_upper: weight of the upper tail in the risk-seeking ``upper`` estimator.
    """

    alpha: float = 0.2
    beta: float = 0.8
    omega: float = 0.5
    form: str = "paper"
    w_mix: float = 1.5
    natural_baseline: bool = True
    w_upper: float = 1.5


RiskEstimator = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, RiskParams], torch.Tensor]
MeanEstimator = Callable[[torch.Tensor], torch.Tensor]
ParamsCheck = Callable[[RiskParams], None]


@dataclass(frozen=True)
class _RiskEntry:
    fn: RiskEstimator
    check: ParamsCheck | None


RISK_ESTIMATORS: dict[str, _RiskEntry] = {}
MEAN_ESTIMATORS: dict[str, MeanEstimator] = {}


def register_risk_estimator(
    name: str, *, check: ParamsCheck | None = None
) -> Callable[[RiskEstimator], RiskEstimator]:
    """Register ``fn(z, a, b, params) -> A`` under ``name`` (``check`` validates params)."""

    def decorate(fn: RiskEstimator) -> RiskEstimator:
        if name in RISK_ESTIMATORS or name in MEAN_ESTIMATORS:
            raise ValueError(f"name: estimator {name!r} is already registered")
        RISK_ESTIMATORS[name] = _RiskEntry(fn, check)
        return fn

    return decorate


def register_mean_estimator(name: str) -> Callable[[MeanEstimator], MeanEstimator]:
    """Register ``fn(rewards[Q, G]) -> advantages[Q, G]`` under ``name``."""

    def decorate(fn: MeanEstimator) -> MeanEstimator:
        if name in RISK_ESTIMATORS or name in MEAN_ESTIMATORS:
            raise ValueError(f"name: estimator {name!r} is already registered")
        MEAN_ESTIMATORS[name] = fn
        return fn

    return decorate


def estimator_names() -> list[str]:
    return [*RISK_ESTIMATORS, *MEAN_ESTIMATORS]


# ---------------------------------------------------------------------------------
# Building blocks (x+ = max(x, 0))


def positive_part(x: torch.Tensor) -> torch.Tensor:
    return torch.clamp_min(x, 0.0)


def truncation_g(z: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``g(z, a, b) = (z - a)+ - (z - b)+ + a - b``: ``a - b`` below a, ``z - b`` between, 0 above b."""
    return positive_part(z - a) - positive_part(z - b) + (a - b)


def range_var_advantage(
    z: torch.Tensor, a: torch.Tensor, b: torch.Tensor, params: RiskParams, eps: float = 0.0
) -> torch.Tensor:
    """``A_rv = ((z - a)+ - (z - b)+ + c (a - b)) / (beta - alpha + eps)``, ``c = 1`` with the
    natural baseline (``eps = 1e-6`` in the reference code's form, 0 otherwise)."""
    c = 1.0 if params.natural_baseline else 0.0
    return (positive_part(z - a) - positive_part(z - b) + c * (a - b)) / (
        params.beta - params.alpha + eps
    )


def lower_tail_advantage(
    z: torch.Tensor, a: torch.Tensor, params: RiskParams, eps: float = 0.0
) -> torch.Tensor:
    """``A_cv = -(a - z)+ / (alpha + eps)``, the CVaR_alpha likelihood-ratio weight."""
    return -positive_part(a - z) / (params.alpha + eps)


def _needs_positive_alpha(what: str) -> ParamsCheck:
    def check(params: RiskParams) -> None:
        if params.alpha <= 0.0:
            raise ValueError(f"alpha: {what} divides by alpha, so alpha must be > 0")

    return check


def _check_mixed_var(params: RiskParams) -> None:
    if params.form == "reference_code":
        _needs_positive_alpha("form='reference_code'")(params)


def _check_upper(params: RiskParams) -> None:
    if params.beta >= 1.0:
        raise ValueError("beta: estimator='upper' divides by 1 - beta, so beta must be < 1")


# ---------------------------------------------------------------------------------
# Risk family


@register_risk_estimator("mvar", check=_check_mixed_var)
def mixed_var_advantages(
    z: torch.Tensor, a: torch.Tensor, b: torch.Tensor, params: RiskParams
) -> torch.Tensor:
    """Mixed Value-at-Risk member advantage (spec section 3).

    ``form="paper"``: ``A = -(1 + omega) (a - z)+ + g(z, a, b)``, the likelihood-ratio
    weight of ``J = (1 + omega) int_0^alpha F^-1 + int_alpha^beta F^-1``; never positive.
    ``form="reference_code"``: ``A = (w_mix A_cv + A_rv) / (w_mix + 1)``, with the official
    code's denominators ``alpha + 1e-6`` and ``beta - alpha + 1e-6``.
    """
    if params.form == "paper":
        return -(1.0 + params.omega) * positive_part(a - z) + truncation_g(z, a, b)
    lower = lower_tail_advantage(z, a, params, LEVEL_EPS)
    upper = range_var_advantage(z, a, b, params, LEVEL_EPS)
    return (params.w_mix * lower + upper) / (params.w_mix + 1.0)


@register_risk_estimator("rvar")
def range_var_advantages(
    z: torch.Tensor, a: torch.Tensor, b: torch.Tensor, params: RiskParams
) -> torch.Tensor:
    """Range Value-at-Risk alone: ``A_rv`` (``g / (beta - alpha)`` with the natural baseline)."""
    return range_var_advantage(z, a, b, params)


@register_risk_estimator("cvar", check=_needs_positive_alpha("estimator='cvar'"))
def lower_tail_advantages(
    z: torch.Tensor, a: torch.Tensor, b: torch.Tensor, params: RiskParams
) -> torch.Tensor:
    """Conditional Value-at-Risk of the lower tail alone: ``-(a - z)+ / alpha``."""
    return lower_tail_advantage(z, a, params)


@register_risk_estimator("upper", check=_check_upper)
def upper_tail_advantages(
    z: torch.Tensor, a: torch.Tensor, b: torch.Tensor, params: RiskParams
) -> torch.Tensor:
    """Risk-seeking variant: ``A = (u (z - b)+ / (1 - beta) + A_rv) / (u + 1)``, ``u = w_upper``."""
    upper = params.w_upper * positive_part(z - b) / (1.0 - params.beta)
    return (upper + range_var_advantage(z, a, b, params)) / (params.w_upper + 1.0)


# ---------------------------------------------------------------------------------
# Mean family (per question; the caller zeroes questions whose rewards are all equal)


@register_mean_estimator("grpo")
def group_normalized_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """GRPO: ``(r - mean_q) / (std_q + 1e-6)``, unbiased std as in verl."""
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    return centered / (unbiased_std(rewards, dim=1)[:, None] + GROUP_EPS)


@register_mean_estimator("dr_grpo")
def group_centered_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """Dr. GRPO: ``r - mean_q`` (no division by the std)."""
    return rewards - rewards.mean(dim=1, keepdim=True)


@register_mean_estimator("rloo")
def leave_one_out_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """RLOO: ``r`` minus the mean of the question's other responses (0 when G = 1)."""
    g = rewards.shape[1]
    if g < 2:
        return torch.zeros_like(rewards)
    others = (rewards.sum(dim=1, keepdim=True) - rewards) / (g - 1)
    return rewards - others
