"""The device the kernel tests run on.

CUDA when the kernels were compiled for it (a GPU machine, ``TRITON_INTERPRET=0``, as
``benchmarks/gpu_check.py`` runs them), else the CPU under Triton's interpreter (set by
``conftest.py``). The kernels themselves say which (``riskfast.kernels.is_interpreting``).
"""

from __future__ import annotations

import torch

from riskfast.ops._kernels import load_kernels

INTERPRETING = load_kernels().is_interpreting()
DEVICE = torch.device("cuda" if torch.cuda.is_available() and not INTERPRETING else "cpu")
