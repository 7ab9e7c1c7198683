"""Locating the Triton kernels package, installed or from a source tree, and whether
its kernels can run on a given tensor."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch


@functools.cache
def triton_available() -> bool:
    """True when the triton package can be imported (the kernels need it)."""
    return importlib.util.find_spec("triton") is not None


def load_kernels() -> ModuleType:
    """Return the ``riskfast.kernels`` package.

    Installed (wheel or editable), it is the repository's top-level ``kernels/`` folder
    shipped as ``riskfast/kernels`` (pyproject ``wheel.packages``). From a source tree
    on ``PYTHONPATH=python`` it is not under ``python/riskfast``, so it is loaded from
    ``<repo>/kernels`` under the same name.
    """
    try:
        return importlib.import_module("riskfast.kernels")
    except ModuleNotFoundError as err:
        if err.name != "riskfast.kernels":
            raise
    root = Path(__file__).resolve().parents[3] / "kernels"
    init = root / "__init__.py"
    if not init.is_file():
        raise ModuleNotFoundError("riskfast.kernels: not installed and no kernels/ folder found")
    spec = importlib.util.spec_from_file_location(
        "riskfast.kernels", init, submodule_search_locations=[str(root)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["riskfast.kernels"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop("riskfast.kernels", None)
        raise
    return module


def require_triton(tensor: torch.Tensor) -> None:
    """Raise ``RuntimeError`` (naming ``backend``) unless the kernels can run on ``tensor``.

    The one check behind every forced ``backend="triton"``. CUDA tensors run compiled
    kernels. Other tensors run only when the kernels were defined for Triton's CPU
    interpreter, that is with ``TRITON_INTERPRET=1`` set before ``riskfast.kernels`` was
    first imported (Triton reads the variable then, not at launch), and only on the CPU.
    """
    if not triton_available():
        raise RuntimeError("backend: 'triton' needs the triton package, which is not installed")
    if tensor.is_cuda:
        return
    if tensor.device.type == "cpu" and load_kernels().is_interpreting():
        return
    raise RuntimeError(
        f"backend: 'triton' on a {tensor.device.type} tensor needs CUDA, or TRITON_INTERPRET=1 "
        "set before riskfast.kernels is first imported (Triton's CPU interpreter); "
        "backend='torch' runs anywhere"
    )
