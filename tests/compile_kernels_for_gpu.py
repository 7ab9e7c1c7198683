"""Compile every Triton kernel launch riskfast makes for a GPU target, with no GPU.

Run as a script (``python tests/compile_kernels_for_gpu.py [--arch 90]``); the test
``tests/test_kernels_compile.py`` runs it in a subprocess. It imports the kernels as
real ``@triton.jit`` functions (``TRITON_INTERPRET=0``), replaces the launch with a
recorder, drives the public ops on small CPU tensors (forward and backward, every dtype
the kernels take, every estimator of the bundle kernel, G = 1, K = 1), and compiles each
recorded launch ahead of time for ``cuda:sm_<arch>`` through ptx to a cubin with the
launch's own constexprs, ``num_warps`` and ``num_stages``, and specialised as a launch
specialises it: integer arguments equal to 1 become the constant 1, and pointers
aligned to 16 bytes and integers divisible by 16 carry ``tt.divisibility = 16`` (without
that hint the compiler cannot use asynchronous copies for 16-bit operands, and the
matmul loops are neither pipelined nor representative). The ops are driven at sizes
that are multiples of 16 (as real hidden sizes and vocabularies are) and at odd ones,
and the selective kernels at a real vocabulary (151,936), whose launch configuration
differs from a small one's.

For each compiled variant it reports registers per thread and spilled bytes (read
from the cubin with the ``cuobjdump`` that ships inside Triton); ``--no-spills`` fails
the run when a variant compiled at model sizes (multiples of 16) spills (local-memory
stack), which on a GPU costs bandwidth in the inner loops; spills at odd sizes, where
no asynchronous copies are possible anyway, are reported and tolerated.

This catches what the CPU interpreter lets through (type errors in the Triton
language, constexpr misuse, unsupported operations, register or shared-memory
overflows at compile time). It does not run anything: numerics and speed still need a
GPU (``benchmarks/gpu_check.py``). Prints one line per distinct compiled kernel
variant and exits non-zero when any fails.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # before triton is imported: real JIT functions

import torch
import triton
import triton.runtime.jit as triton_jit
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))

POINTER_TYPES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float64: "fp64",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int16: "i16",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "i1",
}
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas")
# Largest shared memory one block may use (opt-in), by compute capability: a kernel
# over it compiles but fails at launch ("out of resource: shared memory").
MAX_SHARED_BYTES = {80: 166_912, 86: 101_376, 89: 101_376, 90: 232_448, 100: 232_448}

recorded: list[tuple[triton_jit.JITFunction, tuple, dict, str]] = []
# "model": sizes that are multiples of 16, as real hidden sizes and vocabularies are;
# "odd": sizes that are not (the alignment specialisation is lost).
phase = ["odd"]


def _record(self, *args, grid, warmup, **kwargs):  # replaces JITFunction.run
    recorded.append((self, args, kwargs, phase[0]))


def _drive_ops() -> None:
    """Call every public entry point that launches a kernel, forward and backward."""
    from riskfast.ops import fused_linear_logprobs, selective_logprobs
    from riskfast.ops._kernels import load_kernels
    from riskfast.riskpo import QuantileTracker, advantages

    kernels = load_kernels()  # defined now, as JIT functions
    # The ops' device guard (riskfast.ops._kernels.require_triton) asks the package: let
    # the CPU tensors through to the recorder.
    kernels.is_interpreting = lambda: True
    for module in (kernels.selective_logprobs, kernels.fused_linear_logprobs):
        # The launchers ask their own module: the GPU configuration (tile sizes, 16-bit
        # tensor-core dots).
        module.is_interpreting = lambda: False
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        logits = torch.randn(5, 37, generator=gen).to(dtype).requires_grad_(True)
        targets = torch.randint(0, 37, (5,), generator=gen)
        logp, entropy = selective_logprobs(logits, targets, return_entropy=True, backend="triton")
        (logp.sum() + entropy.sum()).backward()
        logp = selective_logprobs(logits, targets, backend="triton", temperature=0.7)
        logp.sum().backward()
        hidden = torch.randn(6, 40, generator=gen).to(dtype).requires_grad_(True)
        weight = torch.randn(37, 40, generator=gen).to(dtype).requires_grad_(True)
        bias = torch.randn(37, generator=gen).to(dtype).requires_grad_(True)
        targets = torch.randint(0, 37, (6,), generator=gen)
        logp, entropy = fused_linear_logprobs(
            hidden, weight, targets, bias=bias, return_entropy=True, backend="triton"
        )
        (logp.sum() + entropy.sum()).backward()
        fused_linear_logprobs(hidden, weight, targets, backend="triton").sum().backward()
        # Sizes that are multiples of 16, as real models' are (alignment specialisation).
        phase[0] = "model"
        hidden = torch.randn(32, 64, generator=gen).to(dtype).requires_grad_(True)
        weight = torch.randn(160, 64, generator=gen).to(dtype).requires_grad_(True)
        targets = torch.randint(0, 160, (32,), generator=gen)
        fused = kernels.fused_linear_logprobs
        default_engine = fused.MATMUL_BACKEND
        for engine in ("triton", "torch"):  # both engines of the gradient matmuls ship
            fused.MATMUL_BACKEND = engine
            try:
                logp, entropy = fused_linear_logprobs(
                    hidden, weight, targets, return_entropy=True, backend="triton"
                )
                (logp.sum() + entropy.sum()).backward()
                fused_linear_logprobs(hidden, weight, targets, backend="triton").sum().backward()
            finally:
                fused.MATMUL_BACKEND = default_engine
        # A real vocabulary: the selective kernels' block size depends on it.
        logits = torch.randn(2, 151936, generator=gen).to(dtype).requires_grad_(True)
        targets = torch.randint(0, 151936, (2,), generator=gen)
        logp, entropy = selective_logprobs(logits, targets, return_entropy=True, backend="triton")
        (logp.sum() + entropy.sum()).backward()
        selective_logprobs(logits, targets, backend="triton").sum().backward()
        phase[0] = "odd"

    rewards = torch.rand(24, generator=gen)
    question_ids = torch.arange(6).repeat_interleave(4)

    def launch_advantages(*args, **kwargs) -> None:
        # The recorded launch does not run, so the outputs hold whatever torch.empty
        # gave, non-finite bit patterns included: validate=False, or the check of the
        # computed scores and advantages refuses them (it did, once in two suite runs).
        # The kernel and its launch do not depend on validate.
        advantages(*args, backend="triton", validate=False, **kwargs)

    risk = [
        {"estimator": "mvar"},
        {"estimator": "mvar", "form": "reference_code"},
        {"estimator": "rvar"},
        {"estimator": "cvar"},
        {"estimator": "upper"},
    ]
    for options in risk:
        for extra in ({}, {"center": True, "credit": "std", "score": "mean"}, {"normalize": False}):
            launch_advantages(rewards, question_ids, bundle_size=4, **options, **extra)
    for estimator in ("grpo", "dr_grpo", "rloo"):
        launch_advantages(rewards, question_ids, estimator=estimator)
    launch_advantages(rewards, question_ids, quantile="tracker", tracker=QuantileTracker())
    launch_advantages(rewards[:6], torch.arange(6), bundle_size=3)  # G = 1
    # Real group sizes: 16 and 64 responses per question, bundles of 5 questions.
    phase[0] = "model"
    for g in (16, 64):
        question_ids = torch.arange(10).repeat_interleave(g)
        rewards = torch.rand(10 * g, generator=gen)
        launch_advantages(rewards, question_ids, bundle_size=5)
        launch_advantages(rewards, question_ids, bundle_size=5, center=True, credit="std")
    phase[0] = "odd"


DIVISIBILITY = [["tt.divisibility", 16]]


def _signature(fn: triton_jit.JITFunction, args: tuple, kwargs: dict):
    """Triton signature strings, constexpr values and alignment attributes of a launch."""
    bound = dict(zip(fn.arg_names, args))
    bound.update({k: v for k, v in kwargs.items() if k not in LAUNCH_OPTIONS})
    signature: dict[str, str] = {}
    constexprs: dict[tuple[int, ...], object] = {}
    attrs: dict[tuple[int, ...], list] = {}
    for index, param in enumerate(fn.params):
        value = bound[param.name]
        if param.is_constexpr or value is None or (type(value) is int and value == 1):
            signature[param.name] = "constexpr"
            constexprs[(index,)] = value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = "*" + POINTER_TYPES[value.dtype]
            if value.data_ptr() % 16 == 0:
                attrs[(index,)] = DIVISIBILITY
        elif isinstance(value, bool):
            signature[param.name] = "i1"
        elif isinstance(value, int):
            signature[param.name] = "i64" if abs(value) >= 2**31 else "i32"
            if value % 16 == 0:
                attrs[(index,)] = DIVISIBILITY
        elif isinstance(value, float):
            signature[param.name] = "fp32"
        else:
            raise TypeError(f"{fn.fn.__name__}: cannot type argument {param.name}={value!r}")
    return signature, constexprs, attrs


CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def _resources(cubin: bytes) -> tuple[int, int] | None:
    """``(registers per thread, spilled stack bytes)`` of a cubin, or None without cuobjdump."""
    if not CUOBJDUMP.exists():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        out = subprocess.run(
            [str(CUOBJDUMP), "--dump-resource-usage", str(path)],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return (int(found.group(1)), int(found.group(2))) if found else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability (90: Hopper)")
    parser.add_argument(
        "--no-spills",
        action="store_true",
        help="fail when a variant launched at model sizes spills registers",
    )
    args = parser.parse_args()
    triton_jit.JITFunction.run = _record
    _drive_ops()
    target = GPUTarget("cuda", args.arch, 32)
    seen: set[tuple] = set()
    failures = 0
    started = time.time()
    variants = []
    model_sized: set[tuple] = set()
    for fn, call_args, kwargs, launch_phase in recorded:
        signature, constexprs, attrs = _signature(fn, call_args, kwargs)
        options = {k: kwargs[k] for k in LAUNCH_OPTIONS if k in kwargs}
        key = (
            fn.fn.__name__,
            tuple(signature.items()),
            tuple(sorted((k, repr(v)) for k, v in constexprs.items())),
            tuple(sorted(attrs)),
            tuple(sorted(options.items())),
        )
        if launch_phase == "model":
            model_sized.add(key)
        if key not in seen:
            seen.add(key)
            variants.append((key, fn, signature, constexprs, attrs, options))
    for key, fn, signature, constexprs, attrs, options in variants:
        shown = ", ".join(
            f"{fn.arg_names[i[0]]}={v}"
            for i, v in constexprs.items()
            if fn.params[i[0]].is_constexpr
        )
        aligned = "aligned" if len(attrs) == len(
            [v for v in signature.values() if v != "constexpr"]
        ) else f"{len(attrs)} aligned args"
        try:
            compiled = triton.compile(
                ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                target=target,
                options=options,
            )
            shared = int(compiled.metadata.shared)
            limit = MAX_SHARED_BYTES.get(args.arch)
            if limit is not None and shared > limit:
                raise RuntimeError(
                    f"uses {shared} B of shared memory, sm_{args.arch} allows {limit}"
                )
            resources = _resources(compiled.asm["cubin"])
            if resources is None:
                usage = "registers n/a"
            else:
                registers, spilled = resources
                usage = f"{registers} registers, {spilled} B spilled"
                if spilled and key not in model_sized:
                    usage += " (odd sizes only: tolerated)"
                elif spilled and args.no_spills:
                    raise RuntimeError(f"spills {spilled} B of registers to local memory")
            print(
                f"ok   sm_{args.arch} {fn.fn.__name__}({shown}) {options} [{aligned}] "
                f"shared {shared} B, {usage}"
            )
        except Exception as err:  # noqa: BLE001 - report every kernel, then fail
            failures += 1
            print(
                f"FAIL sm_{args.arch} {fn.fn.__name__}({shown}) {options}: "
                f"{type(err).__name__}: {str(err)[:400]}"
            )
    print(
        f"compiled {len(seen)} kernel variants for sm_{args.arch} with Triton "
        f"{triton.__version__} in {time.time() - started:.0f} s; {failures} failed"
    )
    return 1 if failures or not seen else 0


if __name__ == "__main__":
    raise SystemExit(main())
