"""One prepared GPU check for the token log-prob kernels (issue 4, kernels 2 and 3).

Run on a lent GPU machine from the repository root, after the package is importable
(``pip install --no-build-isolation -e .`` or ``PYTHONPATH=python``)::

    python benchmarks/gpu_check.py            # tests + timings, < 5 min on an H100
    python benchmarks/gpu_check.py --no-tests --no-compile   # timings only, quicker

It builds nothing. Steps:

1. ``pytest tests/test_ops_logprobs.py`` on CUDA with ``TRITON_INTERPRET=0`` (compiled
   kernels; the tests pick the GPU when one is present);
2. a copy-bandwidth measurement (the spec asks to re-measure the ceiling);
3. forward and backward times of the Triton kernels, the PyTorch reference and
   ``torch.compile`` of the reference at the GPU shapes of ``spec/kernels.md`` (bf16),
   and of the fused backward with both gradient-matmul engines (``tl.dot`` / cuBLAS);
4. one table: shape, ms, achieved TB/s or TFLOP/s, fraction of the floor of
   ``spec/kernels.md`` (copy 3.0 TB/s on an H100, 4.3 TB/s on an H200; 800 TFLOP/s
   bf16 dense), plus the peak extra CUDA memory of each variant.

Without a CUDA device it prints a message and exits with status 0.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ["TRITON_INTERPRET"] = "0"  # before anything imports triton

SELECTIVE_SHAPES = [(4096, 32000), (16384, 151936)]
FUSED_SHAPES = [(4096, 2048, 32000), (8192, 4096, 128256)]
TFLOPS_BF16 = 800e12


def _ceiling_bandwidth(name: str) -> float:
    return 4.3e12 if "H200" in name else 3.0e12


def _run_tests() -> int:
    env = dict(os.environ, TRITON_INTERPRET="0")
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO / "python")] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "tests/test_ops_logprobs.py",
        "tests/test_kernel_bundle_advantages.py",
        "-q",
        "-x",
        "-p",
        "no:cacheprovider",
    ]
    print("$", " ".join(cmd), flush=True)
    start = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, timeout=240, check=False)
    print(f"tests: exit {proc.returncode} in {time.time() - start:.0f} s", flush=True)
    return proc.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-tests", action="store_true", help="skip the pytest run")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile rows")
    parser.add_argument("--reps", type=int, default=10, help="timed repetitions per row")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to do (run it on a lent GPU machine).")
        return 0
    import numpy
    import triton

    sys.path.insert(0, str(REPO / "python"))
    from riskfast.ops import (
        fused_linear_logprobs,
        fused_linear_logprobs_reference,
        selective_logprobs,
        selective_logprobs_reference,
    )
    from riskfast.ops.logprobs import _load_kernels

    fused_kernels = _load_kernels().fused_linear_logprobs
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    print(
        f"device: {name}; torch {torch.__version__}; triton {triton.__version__}; "
        f"numpy {numpy.__version__}",
        flush=True,
    )
    if triton.__version__.startswith("3.6") and tuple(
        int(x) for x in numpy.__version__.split(".")[:2]
    ) >= (2, 4):
        print(
            "WARNING: Triton 3.6 with numpy >= 2.4 breaks loops with run-time bounds "
            "(see ENVIRONMENT.md); install numpy<2.4",
            flush=True,
        )
    started = time.time()
    status = 0
    if not args.no_tests:
        status = _run_tests()

    def bench(fn: Callable[[], object]) -> float:
        """Median ms of ``fn`` over ``args.reps`` runs (CUDA events), after 2 warm-ups."""
        for _ in range(2):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(args.reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        return statistics.median(times)

    def peak_extra_mib(fn: Callable[[], object]) -> float:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20

    # Copy bandwidth (read + write of 2 GiB).
    def measure_copy() -> float:
        src = torch.empty(2**30, dtype=torch.float16, device=dev)
        dst = torch.empty_like(src)
        return 2 * src.numel() * 2 / (bench(lambda: dst.copy_(src)) * 1e-3)

    copy_bw = measure_copy()
    torch.cuda.empty_cache()
    ceiling = _ceiling_bandwidth(name)
    print(
        f"copy bandwidth: {copy_bw / 1e12:.2f} TB/s measured "
        f"(spec ceiling {ceiling / 1e12:.1f} TB/s)",
        flush=True,
    )

    rows: list[tuple[str, ...]] = []

    def add(
        kernel: str, shape: str, variant: str, ms: float, rate: str, frac: float, mem: float
    ) -> None:
        rows.append((kernel, shape, variant, f"{ms:.3f}", rate, f"{frac:.2f}", f"{mem:.0f}"))
        print(" | ".join(rows[-1]), flush=True)

    def variants(op, ref):
        out = [("triton", op), ("reference", ref)]
        if not args.no_compile:
            out.append(("torch.compile(reference)", torch.compile(ref, dynamic=False)))
        return out

    gen = torch.Generator(device=dev).manual_seed(0)
    failures = []

    def run_selective(n: int, v: int) -> None:
        """Selective log-probs from logits (memory bound): reads N*V*2 bytes forward,
        twice that backward (read logits, write dlogits)."""
        logits = torch.randn(n, v, device=dev, generator=gen, dtype=torch.bfloat16)
        logits.requires_grad_(True)
        targets = torch.randint(0, v, (n,), device=dev, generator=gen)
        g = torch.randn(n, device=dev, generator=gen)
        fwd_bytes, bwd_bytes = n * v * 2, 2 * n * v * 2
        shape = f"N={n} V={v} bf16"
        for variant, fn in variants(
            lambda x: selective_logprobs(x, targets, backend="triton"),
            lambda x: selective_logprobs_reference(x, targets),
        ):
            try:
                ms = bench(lambda fn=fn: fn(logits))
                mem = peak_extra_mib(lambda fn=fn: fn(logits))
                add(
                    "selective fwd",
                    shape,
                    variant,
                    ms,
                    f"{fwd_bytes / (ms * 1e-3) / 1e12:.2f} TB/s",
                    fwd_bytes / ceiling / (ms * 1e-3),
                    mem,
                )
                out = fn(logits)

                def grad(out=out):
                    return torch.autograd.grad(out, logits, g, retain_graph=True)

                ms = bench(grad)
                mem = peak_extra_mib(grad)
                add(
                    "selective bwd",
                    shape,
                    variant,
                    ms,
                    f"{bwd_bytes / (ms * 1e-3) / 1e12:.2f} TB/s",
                    bwd_bytes / ceiling / (ms * 1e-3),
                    mem,
                )
                del out, grad
            except Exception as err:  # noqa: BLE001 - report and go on: one table
                print(f"selective {shape} {variant}: FAILED {type(err).__name__}: {err}")
                failures.append(f"selective {shape} {variant}")
            torch.cuda.empty_cache()

    def run_fused(n: int, h: int, v: int) -> None:
        """Fused linear log-probs (matrix bound): 2NHV forward, 6NHV backward."""
        hidden = torch.randn(n, h, device=dev, generator=gen, dtype=torch.bfloat16)
        weight = (torch.randn(v, h, device=dev, generator=gen) * h**-0.5).to(torch.bfloat16)
        hidden.requires_grad_(True)
        weight.requires_grad_(True)
        targets = torch.randint(0, v, (n,), device=dev, generator=gen)
        g = torch.randn(n, device=dev, generator=gen)
        flop = 2 * n * h * v
        shape = f"N={n} H={h} V={v} bf16"

        def fused_op(x, w):
            return fused_linear_logprobs(x, w, targets, backend="triton")

        variant_list = [
            (name_, fn_, "triton", True)
            for name_, fn_ in variants(
                fused_op, lambda x, w: fused_linear_logprobs_reference(x, w, targets)
            )
        ]
        # the same kernels with cuBLAS for the two gradient matmuls (backward only)
        variant_list.insert(1, ("triton, cuBLAS grad matmuls", fused_op, "torch", False))
        for variant, fn, engine, time_forward in variant_list:
            fused_kernels.MATMUL_BACKEND = engine
            try:
                if time_forward:
                    ms = bench(lambda fn=fn: fn(hidden, weight))
                    mem = peak_extra_mib(lambda fn=fn: fn(hidden, weight))
                    add(
                        "fused fwd",
                        shape,
                        variant,
                        ms,
                        f"{flop / (ms * 1e-3) / 1e12:.0f} TFLOP/s",
                        flop / TFLOPS_BF16 / (ms * 1e-3),
                        mem,
                    )
                out = fn(hidden, weight)

                def grad(out=out):
                    return torch.autograd.grad(out, (hidden, weight), g, retain_graph=True)

                ms = bench(grad)
                mem = peak_extra_mib(grad)
                # Floor: 6NHV with recomputation (8NHV in all, spec/kernels.md).
                add(
                    "fused bwd",
                    shape,
                    variant,
                    ms,
                    f"{3 * flop / (ms * 1e-3) / 1e12:.0f} TFLOP/s",
                    3 * flop / TFLOPS_BF16 / (ms * 1e-3),
                    mem,
                )
                del out, grad
            except Exception as err:  # noqa: BLE001 - report and go on: one table
                print(f"fused {shape} {variant}: FAILED {type(err).__name__}: {err}")
                failures.append(f"fused {shape} {variant}")
            finally:
                fused_kernels.MATMUL_BACKEND = "triton"
            torch.cuda.empty_cache()

    for n, v in SELECTIVE_SHAPES:
        run_selective(n, v)
        torch.cuda.empty_cache()
    for n, h, v in FUSED_SHAPES:
        run_fused(n, h, v)
        torch.cuda.empty_cache()
    if failures:
        status = status or 1

    # Bundle advantages (kernel 1): one launch; the floor is launch latency (< 20 us
    # target at N = 65,536). Timed through riskfast.riskpo.advantages (validation, the
    # bundling draw and the metrics included) and the kernel launch alone.
    from riskfast.ops.bundle_advantages import bundle_advantages as launch_bundle
    from riskfast.riskpo import advantages as riskpo_advantages
    from riskfast.riskpo.bundling import draw_bundling, group_layout, member_response_table

    options = {
        "estimator": "mvar",
        "form": "paper",
        "alpha": 0.2,
        "beta": 0.8,
        "omega": 0.5,
        "w_mix": 1.5,
        "natural_baseline": True,
        "w_upper": 1.5,
        "score_mean": False,
        "normalize": True,
        "center": False,
        "credit_std": False,
    }

    def time_advantages(rewards: torch.Tensor, question_ids: torch.Tensor, backend: str) -> float:
        return bench(
            lambda: riskpo_advantages(
                rewards,
                question_ids,
                backend=backend,
                generator=torch.Generator(dev).manual_seed(0),
            )
        )

    for questions in (512, 4096):
        rewards = (torch.rand(questions * 16, device=dev, generator=gen) < 0.4).float()
        question_ids = torch.arange(questions, device=dev).repeat_interleave(16)
        shape = f"N={questions}x16 B=5"
        for backend in ("triton", "torch"):
            ms = time_advantages(rewards, question_ids, backend)
            add("bundle advantages", shape, f"{backend} (advantages())", ms, "-", 0.020 / ms, 0.0)
        layout = group_layout(question_ids)
        bundling = draw_bundling(layout, 5, shuffle=False, generator=None)
        table = member_response_table(layout, bundling)
        kept = torch.ones(table.shape[0], dtype=torch.bool, device=dev)
        ms = bench(partial(launch_bundle, rewards, table, kept, None, **options))
        add("bundle advantages", shape, "triton launch only", ms, "-", 0.020 / ms, 0.0)

    header = ("kernel", "shape", "variant", "ms", "achieved", "floor frac", "peak MiB")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print(
        f"\n{name}, {time.strftime('%Y-%m-%d')}; floor fraction = floor time / measured "
        f"(copy {ceiling / 1e12:.1f} TB/s, {TFLOPS_BF16 / 1e12:.0f} TFLOP/s bf16; "
        f"fused bwd counts 6NHV); measured copy {copy_bw / 1e12:.2f} TB/s"
    )
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("| " + " | ".join("-" * w for w in widths) + " |")
    for r in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
    print(f"\ngpu_check: done in {time.time() - started:.0f} s, status {status}")
    return status


if __name__ == "__main__":
    sys.exit(main())
