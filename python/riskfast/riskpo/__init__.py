"""RiskPO: risk-based policy optimisation (spec ``riskpo.md``).

Public API:

* :func:`advantages` - bundles, member scores, quantiles and Mixed-VaR advantages;
* :class:`QuantileTracker` - run-wide quantiles (``quantile="tracker"``);
* :func:`policy_loss` - the clipped token-level surrogate;
* :class:`RiskPOLoss` - both in one ``nn.Module``;
* :func:`register_risk_estimator`, :func:`register_mean_estimator` - add estimators.
"""

from .estimators import (
    RiskParams,
    estimator_names,
    lower_tail_advantages,
    mixed_var_advantages,
    range_var_advantages,
    register_mean_estimator,
    register_risk_estimator,
    upper_tail_advantages,
)
from .loss import AGG_MODES, RATIO_LEVELS, PolicyLossOptions, policy_loss
from .module import RiskPOLoss
from .objective import AdvantageOptions, AdvantageResult, advantages, compute_advantages
from .quantiles import QuantileTracker

__all__ = [
    "AGG_MODES",
    "RATIO_LEVELS",
    "AdvantageOptions",
    "AdvantageResult",
    "PolicyLossOptions",
    "QuantileTracker",
    "RiskPOLoss",
    "RiskParams",
    "advantages",
    "compute_advantages",
    "estimator_names",
    "lower_tail_advantages",
    "mixed_var_advantages",
    "policy_loss",
    "range_var_advantages",
    "register_mean_estimator",
    "register_risk_estimator",
    "upper_tail_advantages",
]
