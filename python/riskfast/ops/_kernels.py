"""Locating the Triton kernels package, installed or from a source tree."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType


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
