"""The CUDA parts of ``riskfast._C`` compile for Hopper (sm_90) without a GPU or a CUDA torch.

The CPU build here never compiles them (they need a CUDA torch), so a typo would first
show on a lent GPU machine, whose 15 minutes must not go to it. So:

* every ``csrc/*.cu`` (torch-free: raw pointers and ``cuda_runtime.h``) is compiled by
  ``nvcc -arch=sm_90 -Xptxas -v`` with the flags CMake's Release build uses; the test
  fails on a compile error or on any register spill (``spill stores``/``spill loads``
  in ptxas's report), and prints registers and stack per kernel (the 32-byte stack
  frames of the noise kernels are CUDA's ``sinf``/``cosf`` slow path for huge
  arguments, not spills);
* ``csrc/cuda_ops.cpp``, the binding, is parsed (``-fsyntax-only``) with
  ``RISKFAST_WITH_CUDA`` against torch's headers and CUDA's, with a stub for the one
  header that only a CUDA build of torch generates (``c10/cuda/impl/cuda_cmake_macros.h``).

Skipped, with the reason printed, where nvcc or a host C++ compiler is missing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch.utils.cpp_extension

REPO = Path(__file__).resolve().parents[1]
CSRC = REPO / "csrc"
CUDA_SOURCES = sorted(CSRC.glob("*.cu"))
KERNELS = {
    "noise_cuda.cu": ("fill_kernel", "accumulate_kernel"),
    "transition_cuda.cu": ("forward_kernel", "finish_kernel", "backward_kernel"),
}


def _nvcc() -> str | None:
    for candidate in (
        shutil.which("nvcc"),
        os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"),
    ):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


NVCC = _nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found: no CUDA compile check")


def _cuda_include() -> Path | None:
    """Where ``cuda_runtime.h`` lives for this nvcc."""
    roots = [Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))]
    if NVCC is not None:
        roots.append(Path(NVCC).resolve().parent.parent)
    for root in roots:
        if (root / "include" / "cuda_runtime.h").exists():
            return root / "include"
    return None


def _ptxas_report(text: str) -> dict[str, tuple[int, int, int, int]]:
    """``{kernel: (registers, stack bytes, spill stores, spill loads)}`` from -Xptxas -v."""
    report = {}
    kernel = None
    stack = stores = loads = 0
    for line in text.splitlines():
        entry = re.search(r"Compiling entry function '([^']+)' for 'sm_90'", line)
        if entry:
            kernel = entry.group(1)
            continue
        frame = re.search(
            r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line
        )
        if frame and kernel is not None:
            stack, stores, loads = (int(x) for x in frame.groups())
            continue
        used = re.search(r"Used (\d+) registers", line)
        if used and kernel is not None:
            report[kernel] = (int(used.group(1)), stack, stores, loads)
            kernel = None
    return report


@needs_nvcc
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
def test_cuda_source_compiles_for_sm90_without_register_spills(source, tmp_path):
    cmd = [
        NVCC,
        "-c",
        "-std=c++17",
        "-O3",
        "-DNDEBUG",
        "-arch=sm_90",
        "-Xptxas",
        "-v",
        "-I",
        str(CSRC),
        str(source),
        "-o",
        str(tmp_path / "kernel.o"),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(cmd)}\n{output[-4000:]}"
    report = _ptxas_report(output)
    for name, (registers, stack, stores, loads) in sorted(report.items()):
        print(
            f"{source.name}: {name[:90]}: {registers} registers, {stack} B stack, "
            f"{stores} B spill stores, {loads} B spill loads"
        )
    expected = KERNELS.get(source.name, ())
    for kernel in expected:
        assert any(kernel in name for name in report), f"{kernel} not compiled:\n{output[-3000:]}"
    assert report, f"no kernel in ptxas's report:\n{output[-3000:]}"
    spilling = {name: r for name, r in report.items() if r[2] or r[3]}
    assert not spilling, f"register spills on sm_90: {spilling}"


@needs_nvcc
def test_cuda_binding_parses_against_torch_and_cuda_headers(tmp_path):
    compiler = shutil.which("c++") or shutil.which("g++")
    cuda_include = _cuda_include()
    if compiler is None or cuda_include is None:
        pytest.skip(f"no host compiler ({compiler}) or no cuda_runtime.h ({cuda_include})")
    includes = torch.utils.cpp_extension.include_paths()
    generated = Path(includes[0]) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    stub = tmp_path / "stub"
    if not generated.exists():  # a CPU torch: the CUDA build of torch writes this header
        (stub / "c10" / "cuda" / "impl").mkdir(parents=True)
        (stub / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").write_text(
            "#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n"
        )
    abi = int(torch.compiled_with_cxx11_abi())
    cmd = [
        compiler,
        "-std=c++20",
        "-fsyntax-only",
        "-DRISKFAST_WITH_CUDA",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        f"-I{stub}",
        f"-I{CSRC}",
        f"-I{cuda_include}",
        *(f"-I{path}" for path in includes),
        str(CSRC / "cuda_ops.cpp"),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]


def test_the_spill_check_reads_ptxas_numbers():
    # the check above can fail: a kernel that spills is reported with its bytes
    text = (
        "ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'\n"
        "ptxas info    : Function properties for _Z3fooPf\n"
        "    24 bytes stack frame, 16 bytes spill stores, 8 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 0 barriers, 24 bytes cumulative stack size\n"
    )
    assert _ptxas_report(text) == {"_Z3fooPf": (255, 24, 16, 8)}
