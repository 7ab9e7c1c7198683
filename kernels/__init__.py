"""Triton kernels of riskfast, shipped as riskfast.kernels; imports nothing of riskfast.

* :mod:`.selective_logprobs` - token log-probs and entropy from ``[N, V]`` logits
  (``spec/kernels.md``, "selective log-probs from logits");
* :mod:`.fused_linear_logprobs` - the same from hidden states and an output layer,
  never materialising ``[N, V]`` (``spec/kernels.md``, "fused linear log-probs").

Importing this package imports Triton and defines ``@triton.jit`` kernels: on a machine
without a GPU set ``TRITON_INTERPRET=1`` first. The public, validated entry points are
in ``riskfast.ops``.
"""

from . import fused_linear_logprobs, selective_logprobs

__all__ = ["fused_linear_logprobs", "selective_logprobs"]
