"""``benchmarks/gpu_check.py`` itself, run on the CPU with ``--dry-run``.

A session that is lent a GPU gets 15 minutes of it and runs this script once; a bug in
the script's own logic (a wrong keyword, a row that never gets timed, an output file
that is not written) would waste that run. The dry run takes every path the GPU run
takes except the build, the pytest subprocess, CUDA events and ``torch.compile``:
the Triton kernels run on the interpreter at tiny fp32 shapes, Liger's rows included
when ``liger_kernel`` is installed (it is in the ``[test]`` extra).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_gpu_check_dry_run_times_every_kernel_and_writes_its_table(tmp_path) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env=env, check=False,
    )
    report = (done.stdout + done.stderr)[-4000:]
    assert done.returncode == 0, report
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["status"] == 0 and summary["failures"] == [], report
    assert summary["finished"] is True, report
    rows = {(r["kernel"], r["variant"]) for r in summary["rows"]}
    expected = set()
    for kernel in ("selective", "fused"):
        for step in ("fwd", "bwd", "fwd+bwd"):
            expected |= {(f"{kernel} {step}", "triton"), (f"{kernel} {step}", "reference")}
    expected |= {("fused bwd", "triton, tl.dot grad matmuls"),
                 ("fused fwd+bwd", "triton, tl.dot grad matmuls")}
    expected |= {("bundle advantages", v) for v in
                 ("triton advantages(question_ids)", "triton advantages(group_size)",
                  "triton advantages(group_size, validate=False)",
                  "torch advantages(question_ids)", "triton launch only")}
    expected |= {(f"sweep selective {step}", f"BLOCK_V={b}")
                 for step in ("fwd", "bwd") for b in (2048, 4096, 8192, 16384)}
    # the CUDA-graph rows' code, timed eagerly in a dry run
    expected |= {(op, "compiled, eager (dry run)") for op in
                 ("rlr transition fwd", "rlr transition_log_prob_into", "rlr perturb_")}
    expected |= {(f"sweep selective {step}", label) for step in ("fwd", "bwd")
                 for label in ("BLOCK_V=8192 w4", "BLOCK_V=4096 w4", "BLOCK_V=2048 w2",
                               "BLOCK_V=4096 w8 BLOCK_N=2", "BLOCK_V=2048 w8 BLOCK_N=4")}
    expected |= {(f"sweep fused {step}", "64x256x64 w8 s3") for step in ("fwd", "bwd")}
    expected |= {("policy loss fwd+bwd", v) for v in
                 ("triton fused", "riskfast unfused (logprobs + policy_loss)",
                  "reference (dense logits + policy_loss)")}
    if importlib.util.find_spec("liger_kernel") is not None:
        expected.add(("policy loss fwd+bwd", "liger GRPO loss (eager)"))
        expected |= {(f"fused {step}", "liger FLCE (reduction=none)")
                     for step in ("fwd", "bwd", "fwd+bwd")}
        assert "liger vs riskfast log-probs" in done.stdout, report
    assert expected <= rows, f"missing rows {sorted(expected - rows)}\n{report}"
    for row in summary["rows"]:
        assert math.isfinite(row["ms"]) and row["ms"] > 0, row
    table = (tmp_path / "gpu_check.md").read_text()
    assert table.count("\n| ") == len(summary["rows"]) + 2  # header, separator, rows


def test_gpu_check_deadline_skips_the_sweeps_but_times_every_kernel(tmp_path) -> None:
    """``--deadline-s``: a run that must end inside a device call's limit drops the tile
    sweeps (and, on a GPU, the torch.compile rows) once the deadline has passed, and
    still times every kernel; the files under ``--out`` are written after every row."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--no-liger", "--deadline-s", "0.001",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env=env, check=False,
    )
    report = (done.stdout + done.stderr)[-4000:]
    assert done.returncode == 0, report
    assert "deadline (0 s) passed: tile sweeps skipped" in done.stdout, report
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["finished"] is True and summary["status"] == 0, report
    kernels = {r["kernel"] for r in summary["rows"]}
    assert not any(k.startswith("sweep") for k in kernels), sorted(kernels)
    for kernel in ("selective fwd", "fused fwd+bwd", "policy loss fwd+bwd", "bundle advantages",
                   "rlr transition fwd", "rlr perturb_", "rlr philox_normal"):
        assert kernel in kernels, (kernel, sorted(kernels))
