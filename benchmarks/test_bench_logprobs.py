"""pytest-benchmark suite: token log-probs, chunked CPU path vs the plain reference.

Run: ``.venv/bin/python -m pytest benchmarks/test_bench_logprobs.py --benchmark-only -s``.

Shapes are the CPU shapes of ``spec/kernels.md`` ("Benchmark shapes": N scaled down by
16, V kept), fp32 inputs, forward + backward (loss ``sum(g * logp)``). Beside each
time, ``extra_info["peak_extra_MiB"]`` holds the measured peak extra memory of one
forward + backward, taken in a fresh subprocess (``VmHWM`` reset through
``/proc/self/clear_refs``, minus ``VmRSS`` just before the call, inputs already built;
``ru_maxrss`` would inherit the parent's peak), and is printed with ``-s``.
The GPU timings come from ``benchmarks/gpu_check.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from riskfast.ops import fused_linear_logprobs, selective_logprobs

REPO = Path(__file__).resolve().parents[1]
SELECTIVE_SHAPES = {"N=256 V=32000": (256, 32000), "N=1024 V=151936": (1024, 151936)}
FUSED_SHAPES = {
    "N=256 H=2048 V=32000": (256, 2048, 32000),
    "N=512 H=4096 V=128256": (512, 4096, 128256),
}
BACKENDS = ["torch", "reference"]

_CHILD = r"""
import json, sys
import torch
from riskfast.ops import fused_linear_logprobs, selective_logprobs

kind, backend, shape = sys.argv[1], sys.argv[2], [int(x) for x in sys.argv[3].split(",")]
gen = torch.Generator().manual_seed(0)
if kind == "selective":
    n, v = shape
    leaves = [torch.randn(n, v, generator=gen).requires_grad_(True)]
else:
    n, h, v = shape
    leaves = [torch.randn(n, h, generator=gen).requires_grad_(True),
              torch.randn(v, h, generator=gen).mul_(0.02).requires_grad_(True)]
targets = torch.randint(0, v, (n,), generator=gen)
g = torch.randn(n, generator=gen)
def _status_bytes(key):
    # /proc/self/status: VmRSS (now) and VmHWM (peak since exec or since clear_refs).
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(key)


try:  # reset the peak to the current RSS (Linux >= 4.0); a fresh exec starts fresh anyway
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:
    pass
before = _status_bytes("VmRSS")

if kind == "selective":
    logp = selective_logprobs(leaves[0], targets, backend=backend)
else:
    logp = fused_linear_logprobs(leaves[0], leaves[1], targets, backend=backend)
(logp * g).sum().backward()
peak = _status_bytes("VmHWM")
print(json.dumps({"peak_extra": peak - before}))
"""


def _peak_extra_mib(kind: str, backend: str, shape: tuple[int, ...]) -> float:
    """Peak extra memory (MiB) of one forward + backward, measured in a subprocess."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO / "python")] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, kind, backend, ",".join(map(str, shape))],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_extra"] / 2**20


def _report(benchmark, kind: str, backend: str, shape: tuple[int, ...], label: str) -> None:
    peak = _peak_extra_mib(kind, backend, shape)
    benchmark.extra_info["peak_extra_MiB"] = round(peak, 1)
    median = benchmark.stats.stats.median if benchmark.stats else float("nan")
    print(f"\n[{kind} {label}] {backend}: median {median * 1e3:.1f} ms, peak extra {peak:.0f} MiB")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("label", list(SELECTIVE_SHAPES))
def test_bench_selective_logprobs_forward_backward(benchmark, label: str, backend: str) -> None:
    n, v = SELECTIVE_SHAPES[label]
    benchmark.group = f"selective_logprobs fwd+bwd {label} fp32 (CPU)"
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(n, v, generator=gen).requires_grad_(True)
    targets = torch.randint(0, v, (n,), generator=gen)
    g = torch.randn(n, generator=gen)

    def step() -> None:
        logits.grad = None
        (selective_logprobs(logits, targets, backend=backend) * g).sum().backward()

    benchmark.pedantic(step, rounds=5 if n * v < 2e7 else 2, iterations=1, warmup_rounds=1)
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    _report(benchmark, "selective", backend, (n, v), label)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("label", list(FUSED_SHAPES))
def test_bench_fused_linear_logprobs_forward_backward(benchmark, label: str, backend: str) -> None:
    n, h, v = FUSED_SHAPES[label]
    benchmark.group = f"fused_linear_logprobs fwd+bwd {label} fp32 (CPU)"
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=gen).requires_grad_(True)
    weight = torch.randn(v, h, generator=gen).mul_(0.02).requires_grad_(True)
    targets = torch.randint(0, v, (n,), generator=gen)
    g = torch.randn(n, generator=gen)

    def step() -> None:
        hidden.grad = weight.grad = None
        (fused_linear_logprobs(hidden, weight, targets, backend=backend) * g).sum().backward()

    large = n * h * v > 1e11
    benchmark.pedantic(
        step, rounds=1 if large else 3, iterations=1, warmup_rounds=0 if large else 1
    )
    assert weight.grad is not None and torch.isfinite(weight.grad).all()
    _report(benchmark, "fused", backend, (n, h, v), label)
