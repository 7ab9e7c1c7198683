"""Access to the compiled extension ``riskfast._C`` and a report of how it was built.

The extension is optional at run time: every operator has a PyTorch path, so a
missing or broken ``_C`` is recorded (see :func:`extension_error`) rather than raised.
This module imports nothing of riskfast besides the extension itself.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from types import ModuleType
from typing import Any

__all__ = ["build_info", "extension_error", "load_extension"]

_load_error: ImportError | None = None


@functools.cache
def load_extension() -> ModuleType | None:
    """Return the ``riskfast._C`` module, or ``None`` when it cannot be imported.

    The result is cached; the ``ImportError`` of a failed import is kept and returned
    by :func:`extension_error`.
    """
    global _load_error
    try:  # the extension imports torch itself before anything uses it
        module = importlib.import_module("riskfast._C")
    except ImportError as exc:
        _load_error = exc
        return None
    _load_error = None
    return module


def extension_error() -> str | None:
    """Why ``riskfast._C`` could not be imported, or ``None`` if it was (or was not tried)."""
    load_extension()
    return None if _load_error is None else f"{type(_load_error).__name__}: {_load_error}"


@functools.cache
def _triton_version() -> str | None:
    try:
        import triton
    except Exception:  # noqa: BLE001  (a broken Triton install fails in more ways)
        return None
    return str(getattr(triton, "__version__", "unknown"))


def _triton_interpret() -> bool:
    """Whether riskfast's Triton kernels run on Triton's CPU interpreter in this process.

    Once ``riskfast.kernels`` is imported, the kernels say (Triton fixed the mode when it
    defined them); before, Triton's own reading of ``TRITON_INTERPRET`` says what an
    import would give. ``False`` without Triton.
    """
    if _triton_version() is None:
        return False
    kernels = sys.modules.get("riskfast.kernels")
    if kernels is not None:
        return bool(kernels.is_interpreting())
    import triton

    knobs = getattr(triton, "knobs", None)
    if knobs is not None:  # Triton's own reading ("1", "true", "on", "yes", "y" in 3.9)
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"  # Triton without knobs read "1" only


def build_info() -> dict[str, Any]:
    """How riskfast's compiled parts were built, next to what this process runs.

    Returns a flat dict:

    * ``extension_loaded`` (bool) and ``extension_error`` (str or None);
    * from the build (None when the extension is missing): ``compiled_torch_version``
      (``torch.__version__`` at build time), ``compiled_torch_cuda_version``,
      ``compiled_cuda`` (whether CUDA sources were compiled), ``compiler``,
      ``cxx11_abi``, ``compiled_ops`` (each operator of ``torch.ops.riskfast`` and the
      devices it was compiled for, e.g. ``{"transition_log_prob": ["cpu", "cuda"]}``;
      ``{}`` without the extension), ``noise_math`` (the float32 math of the CPU noise
      stream: ``"mkl"``, torch's own MKL functions, or ``"aten"``);
    * from this process: ``torch_version``, ``torch_cuda_version``,
      ``torch_version_matches`` (compiled == runtime torch; a mismatch means the
      extension must be rebuilt, its ABI may not match), ``cuda_available``,
      ``triton_available``, ``triton_version``, ``triton_interpret`` (whether
      riskfast's Triton kernels run, or once imported would run, on Triton's CPU
      interpreter: ``TRITON_INTERPRET`` as Triton reads it when it defines them).
    """
    import torch

    module = load_extension()
    compiled: dict[str, Any] = dict(module.build_info()) if module is not None else {}
    compiled_torch = compiled.get("torch_version")
    matches = None if compiled_torch is None else compiled_torch == torch.__version__
    triton_version = _triton_version()
    return {
        "extension_loaded": module is not None,
        "extension_error": extension_error(),
        "compiled_torch_version": compiled_torch,
        "compiled_torch_cuda_version": compiled.get("torch_cuda_version"),
        "compiled_cuda": compiled.get("cuda"),
        "compiler": compiled.get("compiler"),
        "cxx11_abi": compiled.get("cxx11_abi"),
        "compiled_ops": {name: list(devices) for name, devices in compiled.get("ops", {}).items()},
        "noise_math": compiled.get("noise_math"),
        "torch_version": torch.__version__,
        "torch_cuda_version": torch.version.cuda,
        "torch_version_matches": matches,
        "cuda_available": torch.cuda.is_available(),
        "triton_available": triton_version is not None,
        "triton_version": triton_version,
        "triton_interpret": _triton_interpret(),
    }
