"""Triton kernels of riskfast, shipped as riskfast.kernels; imports nothing of riskfast.

* :mod:`.bundle_advantages` - RiskPO bundle scores, quantiles and advantages in one
  launch (``spec/kernels.md``, "bundle advantages");
* :mod:`.selective_logprobs` - token log-probs and entropy from ``[N, V]`` logits
  (``spec/kernels.md``, "selective log-probs from logits");
* :mod:`.fused_linear_logprobs` - the same from hidden states and an output layer,
  never materialising ``[N, V]`` (``spec/kernels.md``, "fused linear log-probs");
* :mod:`.fused_linear_policy_loss` - one chunk's logits kept for its statistics and
  gradients, for the fused policy loss (``riskfast.ops.fused_linear_policy_loss``).

Importing this package imports Triton and defines ``@triton.jit`` kernels: on a machine
without a GPU set ``TRITON_INTERPRET=1`` first. The public, validated entry points are
in ``riskfast.ops``.
"""

from . import (
    bundle_advantages,
    fused_linear_logprobs,
    fused_linear_policy_loss,
    selective_logprobs,
)
from .selective_logprobs import is_interpreting

__all__ = [
    "bundle_advantages",
    "fused_linear_logprobs",
    "fused_linear_policy_loss",
    "is_interpreting",
    "selective_logprobs",
]
