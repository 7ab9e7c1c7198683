"""The installed build: riskfast._C matches the running torch and the wheel layout holds."""

import importlib
import shutil
from pathlib import Path

import torch

import riskfast
from riskfast._extension import build_info, extension_error, load_extension

REPO = Path(__file__).resolve().parents[1]


def test_compiled_extension_imports():
    # A plain import, not load_extension(): a broken build must fail here loudly.
    module = importlib.import_module("riskfast._C")
    assert Path(module.__file__).name.startswith("_C.")
    assert load_extension() is module
    assert extension_error() is None


def test_extension_was_compiled_against_the_running_torch():
    compiled = importlib.import_module("riskfast._C").build_info()
    # torch.__version__ including its local tag (+cpu, +cu130): any other torch has
    # another C++ ABI, and the extension must be rebuilt (bash scripts/setup.sh).
    assert compiled["torch_version"] == torch.__version__
    major, minor, patch = (int(part) for part in compiled["torch_header_version"].split("."))
    assert torch.__version__.startswith(f"{major}.{minor}.{patch}")
    assert compiled["torch_cuda_version"] == torch.version.cuda
    assert isinstance(compiled["cuda"], bool)
    assert isinstance(compiled["compiler"], str) and compiled["compiler"]
    assert compiled["cxx11_abi"] == torch.compiled_with_cxx11_abi()


def test_cuda_sources_are_compiled_exactly_when_torch_and_nvcc_allow():
    compiled = importlib.import_module("riskfast._C").build_info()
    has_cuda_sources = any((REPO / "csrc").glob("*.cu"))
    has_nvcc = shutil.which("nvcc") is not None or Path("/usr/local/cuda/bin/nvcc").exists()
    # RISKFAST_CUDA=AUTO: CUDA sources only for a CUDA torch with nvcc present.
    expected = torch.version.cuda is not None and has_nvcc and has_cuda_sources
    assert compiled["cuda"] is expected


def test_build_info_reports_compiled_and_runtime_torch():
    info = build_info()
    assert info["extension_loaded"] is True
    assert info["extension_error"] is None
    assert info["compiled_torch_version"] == torch.__version__
    assert info["torch_version"] == torch.__version__
    assert info["torch_version_matches"] is True
    assert info["cuda_available"] == torch.cuda.is_available()
    assert isinstance(info["triton_available"], bool)
    assert isinstance(info["triton_interpret"], bool)
    assert riskfast.build_info is build_info


def test_kernels_ship_as_a_subpackage_of_riskfast():
    kernels = importlib.import_module("riskfast.kernels")
    assert kernels.__name__ == "riskfast.kernels"
    assert kernels.__spec__.submodule_search_locations  # a package, not a module
    assert riskfast.kernels is kernels
    # Served from the top-level kernels/ folder (editable) or riskfast/kernels (wheel).
    assert Path(kernels.__file__).parent.name == "kernels"
    assert "Triton kernels of riskfast" in kernels.__doc__


def test_a_missing_extension_is_reported_not_raised(monkeypatch):
    real_import_module = importlib.import_module

    def import_module(name, package=None):
        if name == "riskfast._C":
            raise ImportError("simulated: no compiled extension")
        return real_import_module(name, package)

    monkeypatch.setattr(importlib, "import_module", import_module)
    load_extension.cache_clear()
    try:
        assert load_extension() is None
        assert "simulated: no compiled extension" in extension_error()
        info = build_info()
        assert info["extension_loaded"] is False
        assert info["compiled_torch_version"] is None
        assert info["torch_version_matches"] is None
        assert info["torch_version"] == torch.__version__
    finally:
        monkeypatch.undo()
        load_extension.cache_clear()
    assert load_extension() is not None


RLR_OPS = {
    "philox_normal_fill_",
    "accumulate_noise_",
    "transition_log_prob",
    "transition_log_prob_backward",
    "transition_log_prob_into_",
}


def test_build_info_lists_the_compiled_ops_and_their_devices():
    from riskfast.ops._compiled import compiled_devices

    info = build_info()
    ops = info["compiled_ops"]
    assert set(ops) == RLR_OPS
    for name, devices in ops.items():
        assert "cpu" in devices
        assert ("cuda" in devices) is info["compiled_cuda"]
        # what the build says is what torch's dispatcher has
        assert sorted(compiled_devices(name)) == sorted(devices)
    assert info["noise_math"] in ("mkl", "aten")


def test_riskfast_info_prints_the_compiled_ops(capsys):
    import json

    from riskfast.cli import main

    assert main(["info"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed["compiled_ops"]) == RLR_OPS
    assert printed["compiled_ops"]["transition_log_prob"][0] == "cpu"


def test_without_compiled_kernels_auto_runs_the_reference_and_compiled_raises(monkeypatch):
    import pytest

    from riskfast.ops import _compiled, perturb_, transition_log_prob
    from riskfast.ops.philox import philox_normal_reference
    from riskfast.ops.transition import TransitionCoefficients

    monkeypatch.setattr(_compiled, "_KERNEL_DEVICES", {op: frozenset() for op in _compiled.OPS})
    x = torch.zeros(10)
    perturb_(x, 3, 1.0)  # auto
    assert torch.equal(x, philox_normal_reference(10, 3))
    with pytest.raises(RuntimeError, match="^backend: 'compiled'"):
        perturb_(x, 3, 1.0, backend="compiled")
    step = TransitionCoefficients(0.5, 0.7, 0.3, 0.0, 0.2)
    with pytest.raises(RuntimeError, match="^backend: the 'compiled'"):
        transition_log_prob(x[None], x[None], x[None], step, backend="compiled")
    assert transition_log_prob(x[None], x[None], x[None], step).shape == (1,)
