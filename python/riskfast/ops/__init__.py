"""Public ops, dispatched by device to Triton kernels, compiled operators or PyTorch.

Token log-probs (RiskPO):

* :func:`selective_logprobs` - ``log_softmax(logits / T)[target]`` (and entropy) from
  ``[N, V]`` logits;
* :func:`fused_linear_logprobs` - the same from ``hidden[N, H]`` and ``weight[V, H]``
  without materialising ``[N, V]``;
* :func:`fused_linear_policy_loss` - RiskPO's clipped policy loss (``riskpo.md`` section
  4) from ``hidden[N, T, H]`` and ``weight[V, H]``, gradients in the same chunked pass;
* :mod:`riskfast.ops.reference` - the plain PyTorch references (test oracles);
* :mod:`riskfast.ops.bundle_advantages` - dispatch to the bundle-advantages kernel.

RLR (diffusion):

* :func:`transition_log_prob` - the denoising step's mean and Gaussian log-density
  (:mod:`riskfast.ops.transition`, reference beside it); :func:`transition_log_prob_into`
  writes a step's log-densities into a ``[B, T]`` buffer during sampling;
* :func:`philox_normal`, :func:`perturb_`, :func:`accumulate_noise_` - counter-based
  noise regenerated from seeds (:mod:`riskfast.ops.noise`; the stream and its
  reference are in :mod:`riskfast.ops.philox`).

Spec: ``spec/kernels.md``, "Public signatures (riskfast.ops)"; ``spec/rlr.md``.
"""

from . import bundle_advantages, noise, philox, reference, transition
from .fused_policy_loss import fused_linear_policy_loss
from .logprobs import BACKENDS, fused_linear_logprobs, selective_logprobs
from .noise import accumulate_noise_, perturb_, philox_normal
from .reference import fused_linear_logprobs_reference, selective_logprobs_reference
from .transition import TransitionCoefficients, transition_log_prob, transition_log_prob_into

__all__ = [
    "BACKENDS",
    "TransitionCoefficients",
    "accumulate_noise_",
    "bundle_advantages",
    "fused_linear_logprobs",
    "fused_linear_logprobs_reference",
    "fused_linear_policy_loss",
    "noise",
    "perturb_",
    "philox",
    "philox_normal",
    "reference",
    "selective_logprobs",
    "selective_logprobs_reference",
    "transition",
    "transition_log_prob",
    "transition_log_prob_into",
]
