"""One prepared GPU check for riskfast's Triton kernels (issue 4): build, test, time.

Run on a lent GPU machine from the repository root (``scripts/gpu_session.sh`` wraps it
with the wheels the machine lacks)::

    python benchmarks/gpu_check.py --out "$OUT"     # build + tests + timings, < 5 min
    python benchmarks/gpu_check.py --no-build --no-tests --no-compile   # timings only
    python benchmarks/gpu_check.py --dry-run        # this script's logic on a CPU

Steps:

1. build: ``pip install --no-build-isolation --no-deps -e .`` (scikit-build-core, the
   CUDA parts of ``riskfast._C`` where nvcc and a CUDA torch exist), then
   ``riskfast._C.build_info()``; on failure the source tree (``PYTHONPATH=python``)
   is used and the status is non-zero;
2. ``pytest`` of the kernel tests on CUDA with ``TRITON_INTERPRET=0`` (compiled
   kernels; the tests pick the GPU when one is present);
3. a copy-bandwidth measurement (the spec asks to re-measure the ceiling);
4. times (CUDA events, median) at the GPU shapes of ``spec/kernels.md``, bf16:
   the Triton kernels, the PyTorch reference and ``torch.compile`` of it, forward,
   backward and forward+backward; for the fused linear op also both engines of the
   backward's gradient matmuls (``tl.dot`` / cuBLAS) and, when ``liger_kernel`` is
   importable, Liger's fused linear cross-entropy with ``reduction="none"`` (whose
   per-token loss is ``-logp``; also checked against ours), the public fused
   implementation the spec's target names; the fused linear policy loss (issue 15,
   forward + backward of the token- and sequence-ratio clipped loss; the floor is
   ``6 N H V`` flops, its gradients being computed in the forward's one pass) beside
   the dense loss, riskfast's unfused ``fused_linear_logprobs`` + ``policy_loss`` and
   Liger's ``LigerFusedLinearGRPOLoss`` (eager and, without ``--no-compile``, its
   default compiled form; values checked against ours); then the bundle-advantages
   kernel; then
   (unless ``--no-sweep``) tile sweeps at the largest shapes: BLOCK_V of the selective
   kernels and the fused op's logit-tile configuration, for the next tuning step; last,
   RLR's compiled transition forward and step form, the bundle-advantages launch and
   the sync-free ``advantages(group_size=16,
   validate=False)`` call replayed from a CUDA graph (GPU time without Python's launch
   overhead, which the 20 us target is about; the capture itself fails on any host
   synchronisation);
5. one table: shape, ms, achieved TB/s or TFLOP/s, fraction of the floor of
   ``spec/kernels.md`` (copy 3.0 TB/s on an H100, 4.3 TB/s on an H200; 800 TFLOP/s
   bf16 dense), and the peak extra CUDA memory of each row. With ``--out DIR`` the
   table is also written to ``DIR/gpu_check.md`` and the rows to ``DIR/gpu_check.json``.

``--dry-run`` runs every step but the build and the tests on the CPU (Triton
interpreter, tiny fp32 shapes since the interpreter's bf16 is wrong, wall-clock timer,
no ``torch.compile``; Liger's kernels run on the interpreter too) so that
the script itself is tested in CI (``tests/test_gpu_check_script.py``): the one GPU
run a session gets must not be spent on a bug in this file. Without a CUDA device and
without ``--dry-run`` it prints a message and exits with status 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

GPU_SHAPES = {
    "selective": [(4096, 32000), (16384, 151936)],
    "fused": [(4096, 2048, 32000), (8192, 4096, 128256)],
    "advantages": [512, 4096],  # questions, 16 responses each, bundles of 5
    # fused linear policy loss (issue 15): the fused shapes as (responses, tokens, H, V)
    "policy_loss": [(8, 512, 2048, 32000), (16, 512, 4096, 128256)],
    # RLR (spec/kernels.md): latents (B, 4, 64, 64) and (B, 4, 128, 128) with B = 8, and
    # B = 64 to see the bandwidth-bound regime; parameters: flat 1M and 860M, and the
    # tensor lists of LoRA r=4 on SD 1.5's attention and of SD 1.5's UNet; element
    # counts are divided by rlr_param_divisor.
    "rlr_latents": [(8, 4, 64, 64), (8, 4, 128, 128), (64, 4, 128, 128)],
    "rlr_param_divisor": 1,
    "rlr_normal_numel": 2**28,
}
DRY_RUN_SHAPES = {
    "selective": [(48, 1000)],
    "fused": [(48, 64, 1000)],
    "advantages": [16],
    "policy_loss": [(3, 16, 64, 1000)],
    "rlr_latents": [(2, 4, 8, 8)],
    "rlr_param_divisor": 10_000,
    "rlr_normal_numel": 4096,
}
# Element counts of SD 1.5's UNet parameters and of LoRA r=4 on its attention projections
# (recorded from diffusers on the meta device; the GPU machine has no diffusers).
SD15_NUMELS = REPO / "benchmarks" / "sd15_param_numels.json"
RLR_SEEDS8 = list(range(100, 108))
# Tile sweeps at the largest shape, for the next tuning step (the defaults come first).
# Fused configurations: (BLOCK_N, BLOCK_V, BLOCK_H, num_warps, num_stages), each free of
# register spills on sm_90 at model sizes (checked ahead of time, bf16).
# (BLOCK_V, num_warps, BLOCK_N; None: the default); the H200 run of 2026-11-30 left the
# forward at 0.49-0.54 of copy bandwidth for every BLOCK_V at the default warps and one
# row per program, so the warps (registers per program, programs per SM) and rows per
# program (loads in flight) are swept too.
SWEEP_SELECTIVE = [
    (8192, None, None),
    (2048, None, None),
    (4096, None, None),
    (16384, None, None),
    (8192, 4, None),
    (4096, 4, None),
    (2048, 2, None),
    (16384, 16, None),
    (4096, 8, 2),
    (2048, 8, 4),
]
SWEEP_FUSED_TILES = [
    (128, 128, 64, 8, 3),
    (128, 128, 64, 8, 4),
    (64, 256, 64, 8, 3),
    (128, 128, 128, 8, 2),
]
TFLOPS_BF16 = 800e12
BUNDLE_TARGET_S = 20e-6  # spec/kernels.md: < 20 us at N = 65,536 on an H100
TEST_FILES = [
    "tests/test_ops_logprobs.py",
    "tests/test_ops_logprob_oracle.py",
    "tests/test_ops_fused_policy_loss.py",
    "tests/test_kernel_bundle_advantages.py",
    "tests/test_riskpo_host_sync.py",
    "tests/test_ops_noise_cuda.py",
    "tests/test_ops_transition_cuda.py",
]


def _ceiling_bandwidth(name: str) -> float:
    """Copy bandwidth of spec/kernels.md for the card (bytes read + written per s)."""
    return 4.3e12 if "H200" in name else 3.0e12


def _source_tree_env() -> dict[str, str]:
    env = dict(os.environ, TRITON_INTERPRET="0")
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO / "python")] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    return env


def _build() -> bool:
    """Editable build of riskfast (``riskfast._C`` included); True when it worked."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-build-isolation",
        "--no-deps",
        "-e",
        str(REPO),
    ]
    print("$", " ".join(cmd), flush=True)
    start = time.time()
    try:
        proc = subprocess.run(cmd, cwd=REPO, timeout=240, check=False)
    except subprocess.TimeoutExpired:
        print("build: timed out after 240 s; going on with the source tree", flush=True)
        return False
    print(f"build: exit {proc.returncode} in {time.time() - start:.0f} s", flush=True)
    if proc.returncode != 0:
        return False
    try:
        probe = subprocess.run(
            [
                sys.executable,
                "-c",
                "import riskfast._C as c, json; print(json.dumps(c.build_info()))",
            ],
            cwd="/",
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    except subprocess.TimeoutExpired:
        print("riskfast._C: import timed out", flush=True)
        return False
    print(f"riskfast._C.build_info(): {probe.stdout.strip() or probe.stderr.strip()[-800:]}")
    return probe.returncode == 0


def _run_tests(workers: int) -> int:
    cmd = [sys.executable, "-m", "pytest", *TEST_FILES, "-q", "-p", "no:cacheprovider"]
    if workers > 0 and importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", str(workers)]  # Triton's compiles are CPU-bound: spread them
    print("$", " ".join(cmd), flush=True)
    start = time.time()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=_source_tree_env(), timeout=240, check=False)
    except subprocess.TimeoutExpired:
        print("tests: timed out after 240 s; going on with the timings", flush=True)
        return 1
    print(f"tests: exit {proc.returncode} in {time.time() - start:.0f} s", flush=True)
    return proc.returncode


class Timer:
    """Median milliseconds (CUDA events on a GPU, wall clock on a CPU) and peak memory."""

    def __init__(self, torch, device, reps: int) -> None:
        self.torch, self.device, self.reps = torch, device, reps
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def ms(self, fn: Callable[[], object]) -> float:
        for _ in range(2):  # warm-up (compilation, autotuning, allocator)
            fn()
        self.sync()
        times = []
        for _ in range(self.reps):
            if self.cuda:
                a = self.torch.cuda.Event(enable_timing=True)
                b = self.torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                self.sync()
                times.append(a.elapsed_time(b))
            else:
                start = time.perf_counter()
                fn()
                times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    def peak_extra_mib(self, fn: Callable[[], object]) -> float:
        """Peak CUDA memory above what was allocated before ``fn`` (NaN on a CPU)."""
        if not self.cuda:
            fn()
            return float("nan")
        self.sync()
        base = self.torch.cuda.memory_allocated()
        self.torch.cuda.reset_peak_memory_stats()
        fn()
        self.sync()
        return (self.torch.cuda.max_memory_allocated() - base) / 2**20

    def empty_cache(self) -> None:
        if self.cuda:
            self.torch.cuda.empty_cache()


class Table:
    """Rows of the one table the script prints (and writes with ``--out``)."""

    header = ("kernel", "shape", "variant", "ms", "achieved", "floor frac", "peak MiB")

    def __init__(self) -> None:
        self.rows: list[dict[str, object]] = []
        self.on_add: Callable[[], None] | None = None  # e.g. write the files so far

    def add(
        self,
        kernel: str,
        shape: str,
        variant: str,
        ms: float,
        achieved: str,
        floor_frac: float,
        mem: float,
    ) -> None:
        row = {
            "kernel": kernel,
            "shape": shape,
            "variant": variant,
            "ms": ms,
            "achieved": achieved,
            "floor_frac": floor_frac,
            "peak_mib": mem,
        }
        self.rows.append(row)
        print(" | ".join(self._cells(row)), flush=True)
        if self.on_add is not None:
            self.on_add()

    @staticmethod
    def _cells(row: dict[str, object]) -> tuple[str, ...]:
        mem = row["peak_mib"]
        return (
            str(row["kernel"]),
            str(row["shape"]),
            str(row["variant"]),
            f"{row['ms']:.3f}",
            str(row["achieved"]),
            f"{row['floor_frac']:.2f}",
            "-" if math.isnan(mem) else f"{mem:.0f}",
        )  # NaN: not measured

    def markdown(self) -> str:
        cells = [self.header, *(self._cells(r) for r in self.rows)]
        widths = [max(len(c[i]) for c in cells) for i in range(len(self.header))]
        lines = [
            "| " + " | ".join(h.ljust(w) for h, w in zip(self.header, widths)) + " |",
            "| " + " | ".join("-" * w for w in widths) + " |",
        ]
        lines += [
            "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells[1:]
        ]
        return "\n".join(lines)


def _compiled_ops_summary() -> dict[str, object]:
    """Which riskfast._C operators exist for which devices (riskfast.build_info())."""
    try:
        from riskfast import build_info

        info = build_info()
        return {key: info.get(key) for key in ("compiled_ops", "noise_math", "compiled_cuda")}
    except Exception as err:  # noqa: BLE001 - a report, not a check
        return {"error": f"{type(err).__name__}: {err}"}


def _rate(amount: float, ms: float, unit: str) -> str:
    """``amount`` (bytes or flops) per ``ms`` milliseconds, in tera-units per second."""
    return f"{amount / (ms * 1e-3) / 1e12:.2f} {unit}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-build", action="store_true", help="skip the editable build")
    parser.add_argument("--no-tests", action="store_true", help="skip the pytest run")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile rows")
    parser.add_argument("--no-liger", action="store_true", help="skip Liger's rows")
    parser.add_argument("--no-sweep", action="store_true", help="skip the tile sweeps")
    parser.add_argument("--reps", type=int, default=10, help="timed repetitions per row")
    parser.add_argument(
        "--deadline-s",
        type=float,
        default=0.0,
        help="after this many seconds skip the remaining torch.compile rows and sweeps "
        "(0: never), so that a run with a hard time limit still times every kernel",
    )
    parser.add_argument(
        "--test-workers",
        type=int,
        default=6,
        help="pytest-xdist workers for the GPU tests when xdist is installed (0: none)",
    )
    parser.add_argument("--out", type=Path, default=None, help="write gpu_check.md/.json here")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="CPU, Triton interpreter, tiny shapes: test this script",
    )
    args = parser.parse_args(argv)
    # Before anything imports triton: compiled kernels on a GPU, the interpreter on a CPU.
    os.environ["TRITON_INTERPRET"] = "1" if args.dry_run else "0"

    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to do (run it on a lent GPU machine).")
        return 0
    started = time.time()
    status = 0

    def past_deadline(what: str) -> bool:
        """True (and says so, naming ``what``) once ``--deadline-s`` has passed."""
        if args.deadline_s <= 0 or time.time() - started < args.deadline_s:
            return False
        print(f"deadline ({args.deadline_s:.0f} s) passed: {what} skipped", flush=True)
        return True

    def compile_rows() -> bool:
        return not args.no_compile and not past_deadline("torch.compile rows")

    if args.dry_run:
        args.no_build = args.no_tests = args.no_compile = True
        args.reps = 1
    if not args.no_build:
        if _build():
            # The editable install's import hook is a .pth file, read when Python starts:
            # this process, started before the build, would not see riskfast._C. Go on
            # in a fresh interpreter (same options, the build done, the deadline kept).
            rest = [*(sys.argv[1:] if argv is None else argv), "--no-build"]
            if args.deadline_s > 0:  # the last --deadline-s given wins
                left = args.deadline_s - (time.time() - started)
                rest += ["--deadline-s", f"{max(left, 1.0):.1f}"]
            print("build done: going on in a fresh interpreter", flush=True)
            os.execv(sys.executable, [sys.executable, str(Path(__file__).resolve()), *rest])
        status = 1
    sys.path.insert(0, str(REPO / "python"))  # the source tree when the build is skipped

    import numpy
    import triton

    from riskfast._extension import extension_error, load_extension
    from riskfast.ops import (
        TransitionCoefficients,
        accumulate_noise_,
        fused_linear_logprobs,
        fused_linear_logprobs_reference,
        fused_linear_policy_loss,
        philox_normal,
        selective_logprobs,
        selective_logprobs_reference,
        transition_log_prob,
        transition_log_prob_into,
    )
    from riskfast.ops.bundle_advantages import bundle_advantages as launch_bundle
    from riskfast.ops.logprobs import _load_kernels
    from riskfast.ops.transition import transition_log_prob_reference
    from riskfast.riskpo import advantages as riskpo_advantages
    from riskfast.riskpo import policy_loss
    from riskfast.riskpo.bundling import consecutive_layout, draw_bundling, member_response_table

    if load_extension() is None:
        print(f"riskfast._C not importable here ({extension_error()}): no compiled rows")
    fused_kernels = _load_kernels().fused_linear_logprobs
    dev = torch.device("cpu" if args.dry_run else "cuda")
    name = "CPU (dry run)" if args.dry_run else torch.cuda.get_device_name(dev)
    shapes = DRY_RUN_SHAPES if args.dry_run else GPU_SHAPES
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    dtype_name = (
        str(dtype).removeprefix("torch.").replace("bfloat16", "bf16").replace("float32", "fp32")
    )
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
    if not args.no_tests:
        status = _run_tests(args.test_workers) or status

    timer = Timer(torch, dev, args.reps)
    table = Table()
    failures: list[str] = []

    def copy_bandwidth() -> float:
        """Device-to-device copy, bytes read + written per second (2 GiB on a GPU)."""
        src = torch.empty(2**30 if timer.cuda else 2**22, dtype=torch.float16, device=dev)
        dst = torch.empty_like(src)
        return 2 * src.numel() * 2 / (timer.ms(lambda: dst.copy_(src)) * 1e-3)

    copy_bw = copy_bandwidth()
    timer.empty_cache()
    ceiling = _ceiling_bandwidth(name)
    print(
        f"copy bandwidth: {copy_bw / 1e12:.2f} TB/s measured "
        f"(spec ceiling {ceiling / 1e12:.1f} TB/s)",
        flush=True,
    )

    rlr_stream: dict[str, object] = {}
    compiled_ops = _compiled_ops_summary()

    def caption() -> str:
        return (
            f"{name}, {time.strftime('%Y-%m-%d')}; floor fraction = floor time / measured "
            f"(copy {ceiling / 1e12:.1f} TB/s, {TFLOPS_BF16 / 1e12:.0f} TFLOP/s bf16; fused "
            f"bwd counts 6NHV, policy loss fwd+bwd 6NHV; bundle advantages: 20 us target / "
            f"measured); measured copy {copy_bw / 1e12:.2f} TB/s"
        )

    def save(done: bool) -> None:
        """Write gpu_check.md/.json under ``--out`` (after every row, so that a run cut
        off by its time limit still leaves what it measured; ``done`` says whether the
        script reached its end)."""
        if args.out is None:
            return
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_check.md").write_text(f"{caption()}\n\n{table.markdown()}\n")
        summary = {
            "device": name,
            "torch": torch.__version__,
            "triton": triton.__version__,
            "copy_bandwidth_tb_s": copy_bw / 1e12,
            "status": status if done else None,
            "finished": done,
            "failures": failures,
            "rlr_stream": rlr_stream,
            "rlr_compiled_ops": compiled_ops,
            "rows": table.rows,
        }
        (args.out / "gpu_check.json").write_text(json.dumps(summary, indent=1, default=str))

    table.on_add = lambda: save(done=False)

    def memory_floor_ms(nbytes: float) -> float:
        """Milliseconds to move ``nbytes`` at the spec's copy bandwidth for this card."""
        return nbytes / ceiling * 1e3

    def add_memory_row(kernel: str, shape: str, variant: str, ms: float, nbytes: float) -> None:
        """A memory-bound row: achieved TB/s and the fraction of the copy floor."""
        table.add(
            kernel,
            shape,
            variant,
            ms,
            _rate(nbytes, ms, "TB/s"),
            memory_floor_ms(nbytes) / ms,
            float("nan"),
        )

    def matrix_floor_ms(flop: float) -> float:
        """Milliseconds for ``flop`` at the spec's bf16 matrix ceiling."""
        return flop / TFLOPS_BF16 * 1e3

    liger = None
    if not args.no_liger:
        try:
            from liger_kernel.ops.fused_linear_cross_entropy import (
                LigerFusedLinearCrossEntropyFunction as liger,
            )
        except ImportError as err:
            print(f"liger_kernel not importable ({err}): no Liger rows", flush=True)

    gen = torch.Generator(device=dev).manual_seed(0)

    def timed_rows(
        kernel: str,
        shape: str,
        variant: str,
        forward: Callable[[], torch.Tensor],
        inputs: tuple[torch.Tensor, ...],
        g: torch.Tensor,
        amounts: tuple[float, float],
        unit: str,
        floor: Callable[[float], float],
        time_forward: bool = True,
    ) -> None:
        """Forward, backward and forward+backward rows of one variant."""
        try:
            if time_forward:
                ms = timer.ms(forward)
                table.add(
                    f"{kernel} fwd",
                    shape,
                    variant,
                    ms,
                    _rate(amounts[0], ms, unit),
                    floor(amounts[0]) / ms,
                    timer.peak_extra_mib(forward),
                )
            out = forward()

            def backward(out=out):
                return torch.autograd.grad(out, inputs, g, retain_graph=True)

            ms = timer.ms(backward)
            table.add(
                f"{kernel} bwd",
                shape,
                variant,
                ms,
                _rate(amounts[1], ms, unit),
                floor(amounts[1]) / ms,
                timer.peak_extra_mib(backward),
            )
            del out, backward

            def both():
                return torch.autograd.grad(forward(), inputs, g)

            total = amounts[0] + amounts[1]
            ms = timer.ms(both)
            table.add(
                f"{kernel} fwd+bwd",
                shape,
                variant,
                ms,
                _rate(total, ms, unit),
                floor(total) / ms,
                timer.peak_extra_mib(both),
            )
        except Exception as err:  # noqa: BLE001 - report and go on: one table
            print(f"{kernel} {shape} {variant}: FAILED {type(err).__name__}: {err}", flush=True)
            failures.append(f"{kernel} {shape} {variant}")
        timer.empty_cache()

    def run_selective(n: int, v: int) -> None:
        """Memory bound: forward reads the N*V logits once (2 bytes each in bf16),
        backward reads them again and writes dlogits."""
        logits = torch.randn(n, v, device=dev, generator=gen).to(dtype)
        logits.requires_grad_(True)
        targets = torch.randint(0, v, (n,), device=dev, generator=gen)
        g = torch.randn(n, device=dev, generator=gen)
        shape = f"N={n} V={v} {dtype_name}"
        variants = [
            ("triton", lambda: selective_logprobs(logits, targets, backend="triton")),
            ("reference", lambda: selective_logprobs_reference(logits, targets)),
        ]
        if compile_rows():
            compiled = torch.compile(selective_logprobs_reference, dynamic=False)
            variants.append(("torch.compile(reference)", lambda: compiled(logits, targets)))
        for variant, forward in variants:
            timed_rows(
                "selective",
                shape,
                variant,
                forward,
                (logits,),
                g,
                (n * v * logits.element_size(), 2 * n * v * logits.element_size()),
                "TB/s",
                memory_floor_ms,
            )

    def run_fused(n: int, h: int, v: int) -> None:
        """Matrix bound: 2NHV forward, 6NHV backward with recomputation (8NHV in all)."""
        hidden = torch.randn(n, h, device=dev, generator=gen).to(dtype)
        weight = (torch.randn(v, h, device=dev, generator=gen) * h**-0.5).to(dtype)
        hidden.requires_grad_(True)
        weight.requires_grad_(True)
        targets = torch.randint(0, v, (n,), device=dev, generator=gen)
        g = torch.randn(n, device=dev, generator=gen)
        flop = 2 * n * h * v
        shape = f"N={n} H={h} V={v} {dtype_name}"

        def ours():
            return fused_linear_logprobs(hidden, weight, targets, backend="triton")

        default_engine = fused_kernels.MATMUL_BACKEND

        variants: list[tuple[str, Callable[[], torch.Tensor], str, bool]] = [
            ("triton", ours, default_engine, True),  # the default engine (cuBLAS)
            ("triton, tl.dot grad matmuls", ours, "triton", False),
            (
                "reference",
                lambda: fused_linear_logprobs_reference(hidden, weight, targets),
                default_engine,
                True,
            ),
        ]
        if compile_rows():
            compiled = torch.compile(fused_linear_logprobs_reference, dynamic=False)
            variants.append(
                (
                    "torch.compile(reference)",
                    lambda: compiled(hidden, weight, targets),
                    default_engine,
                    True,
                )
            )
        if liger is not None:

            def liger_logp():
                loss = liger.apply(hidden, weight, targets, None, None, -100, 0.0, 0.0, "none")[0]
                return -loss

            with torch.no_grad():
                gap = float((liger_logp() - ours()).abs().max())
            print(f"liger vs riskfast log-probs at {shape}: max abs difference {gap:.2e}")
            if not gap < 1e-2:
                failures.append(f"liger disagrees with riskfast at {shape}: {gap:.2e}")
            variants.append(("liger FLCE (reduction=none)", liger_logp, default_engine, True))
        for variant, forward, engine, time_forward in variants:
            fused_kernels.MATMUL_BACKEND = engine
            try:
                timed_rows(
                    "fused",
                    shape,
                    variant,
                    forward,
                    (hidden, weight),
                    g,
                    (flop, 3 * flop),
                    "TFLOP/s",
                    matrix_floor_ms,
                    time_forward=time_forward,
                )
            finally:
                fused_kernels.MATMUL_BACKEND = default_engine

    liger_grpo = None
    if not args.no_liger:
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss as liger_grpo
        except ImportError as err:
            print(f"liger_kernel GRPO loss not importable ({err}): no Liger rows", flush=True)

    def run_policy_loss(b: int, t: int, h: int, v: int, level: str) -> None:
        """Forward + backward of the clipped loss from hidden states; floor 6NHV flops.

        ``fused_linear_policy_loss`` computes its gradients in the forward's pass (the
        backward only scales them), so only the forward + backward row is comparable.
        """
        hidden = torch.randn(b, t, h, device=dev, generator=gen).to(dtype)
        weight = (torch.randn(v, h, device=dev, generator=gen) * h**-0.5 * 2).to(dtype)
        hidden.requires_grad_(True)
        weight.requires_grad_(True)
        targets = torch.randint(0, v, (b, t), device=dev, generator=gen)
        mask = torch.ones(b, t, dtype=torch.bool, device=dev)
        advantages = torch.randn(b, device=dev, generator=gen)
        with torch.no_grad():
            logp0 = fused_linear_logprobs(hidden.view(b * t, h), weight, targets.view(-1))
        old_logp = logp0.view(b, t).float() + 0.1 * torch.randn(b, t, device=dev, generator=gen)
        options = {"ratio_level": level, "eps_low": 0.2, "eps_high": 0.2, "agg": "token-mean"}
        shape = f"B={b} T={t} H={h} V={v} {dtype_name} {level}"
        flop = 6 * b * t * h * v

        def fused():
            return fused_linear_policy_loss(
                hidden, weight, targets, old_logp, advantages, mask, backend="triton", **options
            )[0]

        def unfused():
            logp = fused_linear_logprobs(hidden.view(b * t, h), weight, targets.view(-1))
            return policy_loss(logp.view(b, t), old_logp, advantages, mask, **options)[0]

        def dense():
            logits = (hidden.view(b * t, h) @ weight.T).float()
            logp = torch.log_softmax(logits, -1).gather(1, targets.view(-1, 1))
            return policy_loss(logp.view(b, t), old_logp, advantages, mask, **options)[0]

        variants: list[tuple[str, Callable[[], torch.Tensor]]] = [
            ("triton fused", fused),
            ("riskfast unfused (logprobs + policy_loss)", unfused),
            ("reference (dense logits + policy_loss)", dense),
        ]
        if liger_grpo is not None:
            for compiled in (False, True) if compile_rows() else (False,):
                module = liger_grpo(
                    beta=0.0, compiled=compiled, use_ref_model=False, epsilon_low=0.2,
                    epsilon_high=0.2, loss_type="dapo", importance_sampling_level=level,
                )  # fmt: skip

                def liger_loss(module=module):
                    return module(
                        hidden, weight, targets, mask.long(), advantages,
                        old_per_token_logps=old_logp,
                    )[0]  # fmt: skip

                label = "liger GRPO loss" + (" (compiled)" if compiled else " (eager)")
                variants.append((label, liger_loss))
        with torch.no_grad():
            want = float(fused())
        for variant, forward in variants:
            try:
                with torch.no_grad():
                    got = float(forward())
                if not abs(got - want) <= 2e-2 * max(1.0, abs(want)):
                    failures.append(f"policy loss {shape} {variant}: {got} vs fused {want}")

                def both(forward=forward):
                    return torch.autograd.grad(forward(), (hidden, weight))

                ms = timer.ms(both)
                table.add(
                    "policy loss fwd+bwd",
                    shape,
                    variant,
                    ms,
                    _rate(flop, ms, "TFLOP/s"),
                    matrix_floor_ms(flop) / ms,
                    timer.peak_extra_mib(both),
                )
            except Exception as err:  # noqa: BLE001 - report and go on: one table
                print(f"policy loss {shape} {variant}: FAILED {type(err).__name__}: {err}")
                failures.append(f"policy loss {shape} {variant}")
            timer.empty_cache()

    def bundle_case(questions: int) -> tuple[torch.Tensor, Callable[[], object]]:
        """Rewards of ``questions`` x 16 responses and the bare kernel launch on them
        (consecutive bundles of 5, Mixed-VaR paper form)."""
        n = questions * 16
        rewards = (torch.rand(n, device=dev, generator=gen) < 0.4).float()
        layout = consecutive_layout(n, 16, dev)
        bundling = draw_bundling(layout, 5, shuffle=False, generator=None)
        members = member_response_table(layout, bundling)
        kept = torch.ones(members.shape[0], dtype=torch.bool, device=dev)
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
        return rewards, lambda: launch_bundle(rewards, members, kept, None, **options)

    def run_advantages(questions: int) -> None:
        """One launch; the floor is launch latency (< 20 us target at N = 65,536).

        ``advantages()`` rows: with ``question_ids`` (finding the questions reads them on
        the host), with ``group_size`` (one host read: the value checks), and with
        ``group_size, validate=False`` (no host read); then the launch alone.
        """
        shape = f"N={questions}x16 B=5"
        target_ms = BUNDLE_TARGET_S * 1e3
        try:
            rewards, launch_only = bundle_case(questions)
            question_ids = torch.arange(questions, device=dev).repeat_interleave(16)
            calls = {
                "question_ids": {"question_ids": question_ids},
                "group_size": {"group_size": 16},
                "group_size, validate=False": {"group_size": 16, "validate": False},
            }
            for backend in ("triton", "torch"):
                for label, call in calls.items():
                    if backend == "torch" and label != "question_ids":
                        continue
                    ms = timer.ms(
                        lambda backend=backend, call=call: riskpo_advantages(
                            rewards,
                            backend=backend,
                            generator=torch.Generator(dev).manual_seed(0),
                            **call,
                        )
                    )
                    table.add(
                        "bundle advantages",
                        shape,
                        f"{backend} advantages({label})",
                        ms,
                        "-",
                        target_ms / ms,
                        float("nan"),
                    )
            ms = timer.ms(launch_only)
            table.add(
                "bundle advantages",
                shape,
                "triton launch only",
                ms,
                "-",
                target_ms / ms,
                float("nan"),
            )
        except Exception as err:  # noqa: BLE001 - report and go on: one table
            print(f"bundle advantages {shape}: FAILED {type(err).__name__}: {err}", flush=True)
            failures.append(f"bundle advantages {shape}")

    def graph_ms_per_call(fn: Callable[[], object], copies: int) -> float:
        """GPU time of one ``fn()`` without the host: ``copies`` calls captured in one CUDA
        graph, replayed and timed, divided by ``copies``. Capture refuses any host
        synchronisation, so a successful capture also proves the call is sync-free."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up off the capture: compilation, allocator
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(copies):
                fn()
        return timer.ms(graph.replay) / copies

    # (op, shape, bytes moved, call) timed from CUDA-graph replays at the end of the run
    # (a dry run times them eagerly: the rows' own code is tested on a CPU too)
    graph_rows: list[tuple[str, str, int, Callable[[], object]]] = []

    def run_graph_rows() -> None:
        variant = "compiled, CUDA graph" if timer.cuda else "compiled, eager (dry run)"
        for op, name_shape, nbytes, call in graph_rows:
            try:
                ms = graph_ms_per_call(call, copies=10) if timer.cuda else timer.ms(call)
                add_memory_row(op, name_shape, variant, ms, nbytes)
            except Exception as err:  # noqa: BLE001 - report and go on: one table
                print(f"{op} {name_shape} CUDA graph: FAILED {type(err).__name__}: {err}")
                failures.append(f"{op} {name_shape} CUDA graph")

    def graph_advantages(questions: int) -> None:
        """Bundle advantages with the host out of the timing (the 20 us target is GPU
        time; eager rows above include Python's launch overhead). Run last: a failed
        capture can leave the device unusable for what follows."""
        shape = f"N={questions}x16 B=5"
        try:
            rewards, launch_only = bundle_case(questions)
        except Exception as err:  # noqa: BLE001 - report and go on: the table still comes
            print(f"bundle advantages {shape} CUDA graph: FAILED {type(err).__name__}: {err}")
            failures.append(f"bundle advantages {shape} CUDA graph")
            return
        target_ms = BUNDLE_TARGET_S * 1e3
        calls = {
            "triton launch only, CUDA graph": launch_only,
            # The default generator: CUDA-graph capture registers its state itself.
            "triton advantages(group_size, validate=False), CUDA graph": lambda: riskpo_advantages(
                rewards, group_size=16, validate=False, backend="triton"
            ),
        }
        for variant, call in calls.items():
            try:
                ms = graph_ms_per_call(call, copies=20)
                table.add(
                    "bundle advantages", shape, variant, ms, "-", target_ms / ms, float("nan")
                )
            except Exception as err:  # noqa: BLE001 - report and go on: one table
                print(
                    f"bundle advantages {shape} {variant}: FAILED {type(err).__name__}: {err}",
                    flush=True,
                )
                failures.append(f"bundle advantages {shape} {variant}")

    def rlr_params(kind: str, dtype: torch.dtype) -> list[torch.Tensor]:
        """Parameter lists of the RLR noise rows (element counts / rlr_param_divisor)."""
        divisor = shapes["rlr_param_divisor"]
        numels = json.loads(SD15_NUMELS.read_text())
        counts = {
            "flat 1M": [1_000_000],
            "flat 860M": [860_000_000],
            "LoRA list": numels["lora_r4_attention"],
            "UNet list": numels["unet"],
        }[kind]
        return [torch.zeros(max(1, n // divisor), dtype=dtype, device=dev) for n in counts]

    def run_rlr_noise(kind: str, dtype: torch.dtype) -> None:
        """perturb_ (one seed) and accumulate_noise_ (8 seeds): one read and one write of
        the parameters whatever the seed count; target >= 70% of copy bandwidth."""
        try:
            params = rlr_params(kind, dtype)
        except Exception as err:  # noqa: BLE001 - report and go on: one table
            print(f"rlr noise {kind}: FAILED {type(err).__name__}: {err}", flush=True)
            failures.append(f"rlr noise {kind}")
            return
        numel = sum(p.numel() for p in params)
        nbytes = 2 * numel * params[0].element_size()
        label = (
            str(dtype).removeprefix("torch.").replace("bfloat16", "bf16").replace("float32", "fp32")
        )
        shape = f"{kind} ({len(params)} tensors, {numel / 1e6:.2f}M {label})"
        hand = torch.Generator(device=dev)

        def by_hand(seeds, scales):
            for seed, scale in zip(seeds, scales):
                hand.manual_seed(seed)
                for p in params:
                    p.add_(
                        torch.randn(p.shape, generator=hand, device=dev, dtype=p.dtype),
                        alpha=scale,
                    )

        variants = {
            "compiled": lambda seeds, scales: accumulate_noise_(
                params, seeds, scales, backend="compiled"
            ),
            "by hand (randn + add_)": by_hand,
        }
        if kind in ("flat 1M", "LoRA list"):  # the reference takes seconds at 860M
            variants["reference"] = lambda seeds, scales: accumulate_noise_(
                params, seeds, scales, backend="reference"
            )
        for op, seeds in (("rlr perturb_", [7]), ("rlr accumulate_noise_ x8", RLR_SEEDS8)):
            scales = [1e-3 * (-1) ** i for i in range(len(seeds))]
            for variant, call in variants.items():
                try:
                    ms = timer.ms(lambda call=call, seeds=seeds, scales=scales: call(seeds, scales))
                    add_memory_row(op, shape, variant, ms, nbytes)
                except Exception as err:  # noqa: BLE001 - report and go on: one table
                    print(f"{op} {shape} {variant}: FAILED {type(err).__name__}: {err}")
                    failures.append(f"{op} {shape} {variant}")
        if kind == "LoRA list":  # the host out of the timing: many small
            # tensors, few launches (timed at the end with the other graph replays)
            graph_rows.append(
                (
                    "rlr perturb_",
                    shape,
                    nbytes,
                    lambda: accumulate_noise_(params, [7], [1e-3], backend="compiled"),
                )
            )
        timer.empty_cache()

    def run_rlr_normal(numel: int) -> None:
        """philox_normal: one write of numel float32 numbers."""
        hand = torch.Generator(device=dev).manual_seed(5)
        variants = {
            "compiled": lambda: philox_normal(numel, 5, device=dev, backend="compiled"),
            "reference": lambda: philox_normal(numel, 5, device=dev, backend="reference"),
            "by hand (torch.randn)": lambda: torch.randn(numel, device=dev, generator=hand),
        }
        for variant, call in variants.items():
            try:
                ms = timer.ms(call)
                table.add(
                    "rlr philox_normal",
                    f"{numel} fp32",
                    variant,
                    ms,
                    _rate(4 * numel, ms, "TB/s"),
                    memory_floor_ms(4 * numel) / ms,
                    timer.peak_extra_mib(call),
                )
            except Exception as err:  # noqa: BLE001 - report and go on: one table
                print(f"rlr philox_normal {variant}: FAILED {type(err).__name__}: {err}")
                failures.append(f"rlr philox_normal {variant}")
        timer.empty_cache()

    def check_rlr_stream(numel: int) -> None:
        """How the compiled CUDA stream compares with the CUDA reference (the same device
        math: expected bitwise) and with the CPU stream (MKL's float32 math: a few ulps).
        Measured and recorded in gpu_check.json ("rlr_stream"); a gap above 8 ulps from
        the CPU stream is a bug and fails the run."""
        try:
            for seed, offset in ((0, 0), (2**40 + 3, 4 * (2**32 - 7) + 1)):
                compiled = philox_normal(numel, seed, offset, device=dev, backend="compiled")
                reference = philox_normal(numel, seed, offset, device=dev, backend="reference")
                cpu = philox_normal(numel, seed, offset, backend="reference")

                def ulps(a, b):
                    bits = a.cpu().view(torch.int32).long() - b.cpu().view(torch.int32).long()
                    return bits.abs()

                vs_reference, vs_cpu = ulps(compiled, reference), ulps(compiled, cpu)
                record = {
                    "numbers": numel,
                    "differ_from_device_reference": int((vs_reference > 0).sum()),
                    "max_ulps_device_reference": int(vs_reference.max()),
                    "differ_from_cpu": int((vs_cpu > 0).sum()),
                    "max_ulps_cpu": int(vs_cpu.max()),
                    "ulp_histogram_cpu": torch.bincount(vs_cpu.clamp(max=8)).tolist(),
                }
                rlr_stream[f"seed={seed} offset={offset}"] = record
                print(f"rlr stream seed={seed} offset={offset}: {record}", flush=True)
                if record["max_ulps_cpu"] > 8:
                    failures.append(f"rlr stream seed={seed}: {record['max_ulps_cpu']} ulps")
        except Exception as err:  # noqa: BLE001 - report and go on: one table
            print(f"rlr stream check: FAILED {type(err).__name__}: {err}", flush=True)
            failures.append("rlr stream check")

    def run_rlr_transition(shape: tuple[int, ...], dtype: torch.dtype) -> None:
        """Fused transition log-density: forward reads x_prev, x_t and the model output
        once; backward reads them again and writes three gradients (target >= 80% of
        copy bandwidth); the [B, T] step form reads the three once."""
        label = (
            str(dtype).removeprefix("torch.").replace("bfloat16", "bf16").replace("float32", "fp32")
        )
        name_shape = f"{'x'.join(map(str, shape))} {label}"
        try:
            inputs = tuple(
                torch.randn(shape, device=dev, generator=gen).to(dtype).requires_grad_(True)
                for _ in range(3)
            )
            a_t, a_prev = 0.5, 0.6
            sigma = ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
            coefficients = TransitionCoefficients(
                a_t, a_prev**0.5, (1 - a_prev - sigma**2) ** 0.5, 0.0, sigma
            )
            g = torch.randn(shape[0], device=dev, generator=gen)
        except Exception as err:  # noqa: BLE001 - report and go on: one table
            print(f"rlr transition {name_shape}: FAILED {type(err).__name__}: {err}")
            failures.append(f"rlr transition {name_shape}")
            return
        size = inputs[0].numel() * inputs[0].element_size()
        variants = {
            "compiled": lambda: transition_log_prob(*inputs, coefficients, backend="compiled"),
            "reference": lambda: transition_log_prob(*inputs, coefficients, backend="reference"),
        }
        if compile_rows() and dtype == torch.float32:  # one compile per shape: fp32 only
            compiled_reference = torch.compile(transition_log_prob_reference, dynamic=False)
            variants["torch.compile(reference)"] = lambda: compiled_reference(
                *inputs, coefficients
            )[0]
        for variant, forward in variants.items():
            timed_rows(
                "rlr transition",
                name_shape,
                variant,
                forward,
                inputs,
                g,
                (3 * size, 6 * size),
                "TB/s",
                memory_floor_ms,
            )
        log_probs = torch.zeros(shape[0], 50, device=dev)
        for variant in ("compiled", "reference"):
            try:
                ms = timer.ms(
                    lambda variant=variant: transition_log_prob_into(
                        log_probs, 7, *inputs, coefficients, backend=variant
                    )
                )
                add_memory_row("rlr transition_log_prob_into", name_shape, variant, ms, 3 * size)
            except Exception as err:  # noqa: BLE001 - report and go on: one table
                print(f"rlr transition_log_prob_into {variant}: FAILED {err}")
                failures.append(f"rlr transition_log_prob_into {name_shape} {variant}")
        # The host out of the timing: the first H200 run (2026-11-30) took about the
        # same 0.15-0.3 ms per eager call at 8x and 64x the data (host-bound), so the
        # kernels' own fraction of the copy bandwidth is read from graph replays, run
        # at the end with the other captures (a failed capture can spoil what follows).
        detached = tuple(t.detach() for t in inputs)
        graph_rows.append(
            (
                "rlr transition fwd",
                name_shape,
                3 * size,
                lambda: transition_log_prob(*detached, coefficients, backend="compiled"),
            )
        )
        graph_rows.append(
            (
                "rlr transition_log_prob_into",
                name_shape,
                3 * size,
                lambda: transition_log_prob_into(
                    log_probs, 7, *detached, coefficients, backend="compiled"
                ),
            )
        )
        timer.empty_cache()

    kernels = _load_kernels()

    def _check_same(what: str, out: torch.Tensor, first: torch.Tensor) -> None:
        """A sweep configuration must give the default configuration's log-probs."""
        gap = float((out - first).abs().max())
        if not gap < 1e-3:
            print(f"{what}: log-probs differ from the default configuration's by {gap:.2e}")
            failures.append(f"{what}: differs by {gap:.2e}")

    def sweep_selective(n: int, v: int) -> None:
        """Forward (no entropy) and backward of the selective kernels per BLOCK_V and
        warps."""
        module = kernels.selective_logprobs
        logits = torch.randn(n, v, device=dev, generator=gen).to(dtype)
        targets = torch.randint(0, v, (n,), device=dev, generator=gen)
        g = torch.randn(n, device=dev, generator=gen)
        nbytes = n * v * logits.element_size()
        shape = f"N={n} V={v} {dtype_name}"
        first = None
        for block_v, warps, block_n in SWEEP_SELECTIVE:
            label = f"BLOCK_V={block_v}" + ("" if warps is None else f" w{warps}")
            label += "" if block_n is None else f" BLOCK_N={block_n}"
            tiles = {"block_v": block_v, "num_warps": warps, "block_n": block_n}
            try:

                def forward(tiles=tiles):
                    return module.selective_logprobs_forward(logits, targets, 1.0, False, **tiles)

                ms = timer.ms(forward)
                add_memory_row("sweep selective fwd", shape, label, ms, nbytes)
                logp, lse, _ = forward()
                first = logp if first is None else first
                _check_same(f"sweep selective {label}", logp, first)
                ms = timer.ms(
                    lambda tiles=tiles, lse=lse: module.selective_logprobs_backward(
                        logits, targets, lse, None, g, None, 1.0, **tiles
                    )
                )
                add_memory_row("sweep selective bwd", shape, label, ms, 2 * nbytes)
            except Exception as err:  # noqa: BLE001 - report and go on: one table
                print(f"sweep selective {label}: FAILED {type(err).__name__}: {err}")
                failures.append(f"sweep selective {label}")
        timer.empty_cache()

    def sweep_fused(n: int, h: int, v: int) -> None:
        """Forward and backward of the fused op per logit-tile configuration."""
        module = kernels.fused_linear_logprobs
        default_tiles = module._tile_blocks
        hidden = torch.randn(n, h, device=dev, generator=gen).to(dtype).requires_grad_(True)
        weight = (torch.randn(v, h, device=dev, generator=gen) * h**-0.5).to(dtype)
        weight.requires_grad_(True)
        targets = torch.randint(0, v, (n,), device=dev, generator=gen)
        g = torch.randn(n, device=dev, generator=gen)
        flop = 2 * n * h * v
        shape = f"N={n} H={h} V={v} {dtype_name}"
        first = None
        for tiles in SWEEP_FUSED_TILES:
            module._tile_blocks = lambda _dtype, tiles=tiles: tiles
            try:

                def forward():
                    return fused_linear_logprobs(hidden, weight, targets, backend="triton")

                ms = timer.ms(forward)
                label = "x".join(map(str, tiles[:3])) + f" w{tiles[3]} s{tiles[4]}"
                table.add(
                    "sweep fused fwd",
                    shape,
                    label,
                    ms,
                    _rate(flop, ms, "TFLOP/s"),
                    matrix_floor_ms(flop) / ms,
                    float("nan"),
                )
                out = forward()
                first = out.detach() if first is None else first
                _check_same(f"sweep fused {label}", out.detach(), first)
                ms = timer.ms(
                    lambda out=out: torch.autograd.grad(out, (hidden, weight), g, retain_graph=True)
                )
                table.add(
                    "sweep fused bwd",
                    shape,
                    label,
                    ms,
                    _rate(3 * flop, ms, "TFLOP/s"),
                    matrix_floor_ms(3 * flop) / ms,
                    float("nan"),
                )
                del out
            except Exception as err:  # noqa: BLE001 - report and go on: one table
                print(f"sweep fused {tiles}: FAILED {type(err).__name__}: {err}")
                failures.append(f"sweep fused {tiles}")
            finally:
                module._tile_blocks = default_tiles
        timer.empty_cache()

    for n, v in shapes["selective"]:
        run_selective(n, v)
    for n, h, v in shapes["fused"]:
        run_fused(n, h, v)
    for i, (b, t, h, v) in enumerate(shapes["policy_loss"]):
        for level in ("token", "sequence") if i == 0 else ("token",):
            run_policy_loss(b, t, h, v, level)
    for questions in shapes["advantages"]:
        run_advantages(questions)
    check_rlr_stream(shapes["rlr_normal_numel"] // 16)
    for latents in shapes["rlr_latents"]:
        for rlr_dtype in (torch.float32, torch.bfloat16):
            run_rlr_transition(latents, rlr_dtype)
    for kind in ("flat 1M", "LoRA list", "UNet list", "flat 860M"):
        run_rlr_noise(kind, torch.float32)
    run_rlr_noise("flat 860M", torch.bfloat16)
    run_rlr_normal(shapes["rlr_normal_numel"])
    if not args.no_sweep and not past_deadline("tile sweeps"):
        sweep_selective(*shapes["selective"][-1])
        sweep_fused(*shapes["fused"][-1])
    run_graph_rows()
    if timer.cuda:
        for questions in shapes["advantages"]:
            graph_advantages(questions)
    else:
        print("CUDA-graph rows of bundle advantages: skipped (no CUDA device)", flush=True)
    if failures:
        status = status or 1

    print(f"\n{caption()}\n{table.markdown()}")
    if failures:
        print("failed rows:", "; ".join(failures))
    print(f"\ngpu_check: done in {time.time() - started:.0f} s, status {status}")
    save(done=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
