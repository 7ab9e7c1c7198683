"""Public token log-prob ops, dispatched by device to Triton kernels or chunked PyTorch.

* :func:`selective_logprobs` - ``log_softmax(logits / T)[target]`` (and entropy) from
  ``[N, V]`` logits;
* :func:`fused_linear_logprobs` - the same from ``hidden[N, H]`` and ``weight[V, H]``
  without materialising ``[N, V]``;
* :mod:`riskfast.ops.reference` - the plain PyTorch references (test oracles);
* :mod:`riskfast.ops.bundle_advantages` - dispatch to the bundle-advantages kernel.

Spec: ``spec/kernels.md``, "Public signatures (riskfast.ops)".
"""

from . import bundle_advantages, reference
from .logprobs import BACKENDS, fused_linear_logprobs, selective_logprobs
from .reference import fused_linear_logprobs_reference, selective_logprobs_reference

__all__ = [
    "BACKENDS",
    "bundle_advantages",
    "fused_linear_logprobs",
    "fused_linear_logprobs_reference",
    "reference",
    "selective_logprobs",
    "selective_logprobs_reference",
]
