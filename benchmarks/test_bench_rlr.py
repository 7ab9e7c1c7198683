"""Time and peak memory of one ``estimate_grad`` call per estimator as the chain grows.

Spec ``rlr.md`` (why RLR exists: its backpropagated steps are a fixed K + h whatever
T, while full backprop goes through all T). A tiny ``UNet2DModel`` (1 x 32 x 32
images, 0.70M parameters, attention in the lower block), 8 starts, float32, DDIM with
eta = 1 and trailing spacing, T in {10, 20, 50}, the differentiable reward
``-mean((x_0 - pattern)^2)``.

* pytest-benchmark: ``.venv/bin/python -m pytest benchmarks/test_bench_rlr.py
  --benchmark-only -s`` times one call in process and, with ``-s``, prints the peak
  extra memory of one call measured in a fresh subprocess (``VmHWM`` reset through
  ``/proc/self/clear_refs`` after a warm-up call, minus ``VmRSS`` just before; glibc's
  mmap threshold is pinned at 64 KiB with ``MALLOC_MMAP_THRESHOLD_`` so that freed
  activations go back to the system and the warm-up does not pre-grow the heap).
* Table: ``.venv/bin/python benchmarks/test_bench_rlr.py`` runs every (estimator, T)
  in its own subprocess (the mean of 2 calls after a warm-up, the second also measured for its peak) and prints
  the markdown table recorded in ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rlr_unet_setup import build

REPO = Path(__file__).resolve().parents[1]
STEPS = (10, 20, 50)
ESTIMATORS = {
    "rlr rest=zo": {"rest": "zo"},
    "rlr rest=lr": {"rest": "lr"},
    "ddpo": {"estimator": "ddpo"},
    "draft K=1": {"estimator": "draft"},
    "alignprop": {"estimator": "alignprop"},
    "full (checkpointed)": {"estimator": "full"},
    "full (no checkpointing)": {"estimator": "full", "checkpoint": False},
}

_CHILD = r"""
import json, statistics, sys, time
import torch
from rlr_unet_setup import build


def _status_bytes(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(key)

num_steps, options = int(sys.argv[1]), json.loads(sys.argv[2])
torch.set_num_threads(int(sys.argv[3]))
unet, call = build(num_steps, options)
call()  # warm-up: first-touch allocations and lazy initialisation
start = time.perf_counter()
call(1)
times = [time.perf_counter() - start]
unet.zero_grad(set_to_none=True)
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:
    pass
before = _status_bytes("VmRSS")
start = time.perf_counter()
metrics = call(2)
times.append(time.perf_counter() - start)
peak = _status_bytes("VmHWM")
print(json.dumps({"seconds": statistics.median(times), "peak_extra": peak - before,
                  "evaluations": metrics["model_evaluations"],
                  "parameters": sum(p.numel() for p in unet.parameters())}))
"""


def measure(num_steps: int, options: dict, threads: int = 1) -> dict:
    """Median seconds of a call and its peak extra memory, in a fresh subprocess."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO / "python"), str(REPO / "benchmarks"), *filter(None, [env.get("PYTHONPATH")])]
    )
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(num_steps), json.dumps(options), str(threads)],
        check=True,
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("num_steps", STEPS)
@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_estimate_grad_call(benchmark, name, num_steps):
    _, call = build(num_steps, ESTIMATORS[name])  # the same call as the subprocess measures
    call()
    benchmark.pedantic(call, rounds=3, iterations=1)
    result = measure(num_steps, ESTIMATORS[name], threads=torch.get_num_threads())
    benchmark.extra_info.update(
        peak_extra_MiB=result["peak_extra"] / 2**20, evaluations=result["evaluations"]
    )
    print(
        f"\n{name}, T = {num_steps}: peak extra {result['peak_extra'] / 2**20:.1f} MiB, "
        f"{result['evaluations']} evaluations"
    )


def main() -> int:
    rows = [
        "| estimator | " + " | ".join(f"T = {t}: time, peak extra, evals" for t in STEPS) + " |",
        "| --- |" + " --- |" * len(STEPS),
    ]
    parameters = None
    for name, options in ESTIMATORS.items():
        cells = []
        for num_steps in STEPS:
            r = measure(num_steps, options)
            parameters = r["parameters"]
            cells.append(
                f"{r['seconds']:.2f} s, {r['peak_extra'] / 2**20:.0f} MiB, {r['evaluations']}"
            )
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    print(f"\nUNet2DModel with {parameters:,} parameters, 8 starts of 1 x 32 x 32, one thread")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
