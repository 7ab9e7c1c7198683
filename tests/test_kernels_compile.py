"""Every Triton kernel launch riskfast makes compiles for Hopper (sm_90), without a GPU.

The CPU interpreter runs the kernels' arithmetic but not the compiler: this test runs
``tests/compile_kernels_for_gpu.py`` in a fresh process (``TRITON_INTERPRET=0``), which
records each launch of the public ops in their GPU configuration (tile sizes, 16-bit
tensor-core dots, the alignment specialisation a launch gets) and compiles it to a
cubin, checking shared memory against the card's limit and, with ``--no-spills``, that
no variant spills registers to local memory. Running the kernels on a GPU is still
``benchmarks/gpu_check.py``'s job.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="Triton is not installed: nothing to compile")

SCRIPT = Path(__file__).with_name("compile_kernels_for_gpu.py")
KERNELS = (
    "_selective_logprobs_fwd_kernel",
    "_selective_logprobs_bwd_kernel",
    "_fused_fwd_partial_kernel",
    "_fused_fwd_merge_kernel",
    "_fused_bwd_dlogits_kernel",
    "_matmul_kernel",
    "bundle_advantages_kernel",
)


def test_every_kernel_launch_compiles_for_sm90() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--arch", "90", "--no-spills"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=False,
    )
    report = done.stdout + done.stderr
    assert done.returncode == 0, report[-4000:]
    assert " 0 failed" in done.stdout, report[-4000:]
    for name in KERNELS:
        assert f"ok   sm_90 {name}(" in done.stdout, f"{name} was never launched:\n{report[-3000:]}"
    # the 16-bit tensor-core path of the fused kernels was compiled, not only fp32
    assert "DOT_DTYPE=bf16" in done.stdout and "DOT_DTYPE=fp16" in done.stdout
    # both the aligned specialisation (real model sizes) and the odd sizes were compiled
    assert "[aligned]" in done.stdout and " aligned args]" in done.stdout
    # the register report was read from the cubins (cuobjdump ships inside Triton)
    assert "B spilled" in done.stdout, report[-3000:]
