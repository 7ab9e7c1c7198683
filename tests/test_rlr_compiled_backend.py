"""RLR's estimators on the compiled ops of ``riskfast._C`` and on the PyTorch references.

``tests/test_rlr_unbiased.py`` runs with ``RLRConfig(backend="auto")``, which picks the
compiled ops wherever the extension provides them (the CPU here): its unbiasedness
tests are the compiled backend's. This file shows that (1) ``"auto"`` is indeed the
compiled backend on this machine, (2) both backends give the same estimates call by
call (same generator seeds: the noise stream is bitwise the reference's, the float64
transition log-density agrees to about 1e-15), so the unbiasedness results hold for
either, and (3) the paired unbiasedness test of ``test_rlr_unbiased.py`` passes with
``backend="compiled"`` and ``backend="reference"`` forced, in its cheapest setting
(DDPO's likelihood ratio over all steps).
"""

from __future__ import annotations

import pytest
import rlr_toy
import torch

from riskfast.ops.noise import _compiled_noise_ops
from riskfast.ops.transition import _compiled_transition_op
from riskfast.rlr import RLRConfig, estimate_grad

COMPILED = (
    _compiled_noise_ops(torch.device("cpu")) is not None
    and _compiled_transition_op(torch.device("cpu")) is not None
)
pytestmark = pytest.mark.skipif(
    not COMPILED, reason="riskfast._C has no CPU ops (extension missing; see riskfast info)"
)
CONFIGS = {
    "rlr-lr-h2": {"rest": "lr", "window": 2},
    "rlr-zo-h6": {"rest": "zo", "window": 6},
    "rlr-zo-reverse": {"rest": "zo", "window": 2, "zo_restore": "reverse"},
    "ddpo": {"estimator": "ddpo"},
    "zo": {"estimator": "zo"},
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # as test_rlr_unbiased.py: its cached setting (pilot gradient, full-backprop
    # projections) is computed here first and must be computed the same way
    with rlr_toy.one_thread():
        yield


def test_auto_backend_is_the_compiled_one_on_this_machine():
    assert RLRConfig().backend == "auto"
    assert COMPILED


def _estimate(model, scheduler, config, seed):
    generator = torch.Generator().manual_seed(seed)
    x_T = torch.randn(32, 2, generator=generator, dtype=torch.float64)
    model.zero_grad(set_to_none=True)
    estimate_grad(model, scheduler, rlr_toy.reward, x_T, config=config, generator=generator)
    return rlr_toy.flat_grad(model)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_compiled_and_reference_backends_give_the_same_estimates(name):
    model, scheduler = rlr_toy.pretrained_denoiser(), rlr_toy.scheduler()
    for seed in (0, 1):
        reference = _estimate(
            model, scheduler, RLRConfig(**CONFIGS[name], backend="reference"), seed
        )
        compiled = _estimate(model, scheduler, RLRConfig(**CONFIGS[name], backend="compiled"), seed)
        assert torch.isfinite(compiled).all()
        scale = float(reference.abs().max())
        assert float((compiled - reference).abs().max()) <= 1e-9 * scale, name


@pytest.mark.parametrize("backend", ["compiled", "reference"])
def test_paired_unbiasedness_test_passes_with_either_backend_forced(backend):
    import test_rlr_unbiased  # the same module pytest collected: its pilot is shared

    config = RLRConfig(estimator="ddpo", backend=backend)
    test_rlr_unbiased._assert_unbiased(config, calls=64, chains=512)
