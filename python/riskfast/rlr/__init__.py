"""RLR: the Recursive Likelihood Ratio optimizer for diffusion models (spec ``rlr.md``).

Public API:

* :func:`estimate_grad` with :class:`RLRConfig` - one gradient estimate (``rlr`` and
  the baselines ``ddpo``, ``draft``, ``alignprop``, ``full``) added to ``.grad``;
* :func:`step_with_logprob` - one DDIM/DDPM step with its log-density;
* :func:`sample_chain` - chains on any diffusers-style denoiser, with guidance and a
  :class:`PromptSchedule` (DCoT);
* :func:`register_estimator` - add an estimator; :func:`step_roles` - which step gets
  which term; :class:`RLRState` - state of ``window_start="grad_norm"``.

``import riskfast.rlr`` does not import diffusers; the scheduler checks do, on first use.
"""

from .config import BASELINES, RESTS, WINDOW_STARTS, ZO_RESTORES, RLRConfig
from .estimators import (
    EstimationRun,
    RLRState,
    estimate_grad,
    estimator_names,
    register_estimator,
    step_roles,
    window_starts,
)
from .sampler import (
    Chain,
    GuidedDenoiser,
    PromptSchedule,
    StepOutput,
    call_denoiser,
    sample_chain,
    step_with_logprob,
    transition_coefficients,
)

__all__ = [
    "BASELINES",
    "RESTS",
    "WINDOW_STARTS",
    "ZO_RESTORES",
    "Chain",
    "EstimationRun",
    "GuidedDenoiser",
    "PromptSchedule",
    "RLRConfig",
    "RLRState",
    "StepOutput",
    "call_denoiser",
    "estimate_grad",
    "estimator_names",
    "register_estimator",
    "sample_chain",
    "step_roles",
    "step_with_logprob",
    "transition_coefficients",
    "window_starts",
]
