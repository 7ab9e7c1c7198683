"""Unbiasedness of the RLR estimators against the exact gradient (spec ``rlr.md``).

Setting (spec, "Testing the estimator"): float64, the pretrained 2-D toy denoiser of
``rlr_toy``, DDIM with T = 10, eta = 1, "trailing" spacing, reward ``-||x_0 - c||^2``,
K = 1. Statistic: each call of an estimator is paired with a call of ``full`` (exact
pathwise backprop, itself checked against plain autograd in
``test_rlr_estimators.py``) on the same noises (same generator seed); the differences
are projected on four fixed unit directions (the direction of a pilot full-backprop
gradient, which carries the power, and three random ones) and
``z = mean / standard error`` over calls. A direction fails when ``|z|`` exceeds
``THRESHOLD`` = 4.3 (two-sided 1.7e-5 per direction, 7e-5 for the four: Bonferroni at
about 1e-4 per test); ZO gets ``ZO_THRESHOLD`` = 4.8 because its per-call
distribution is skewed (a product of Gaussians). The detectable bias, reported in
every message, is ``(threshold + 1) * standard error`` along the pilot direction, as a
share of ``|g|``: a bias that large fails with about 84% probability.

The seeds are fixed, so every outcome is deterministic; the thresholds were checked
once with these seeds. The power checks run the truncated estimators (DRaFT-1,
AlignProp, ``rest="none"``) and a ZO term scaled by 2 through the same test, which
they must fail.
"""

from __future__ import annotations

import functools
import math

import pytest
import rlr_toy
import torch

from riskfast.rlr import RLRConfig, estimate_grad, estimators

THRESHOLD = 4.3
ZO_THRESHOLD = 4.8


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with rlr_toy.one_thread():
        yield


@functools.cache
def _setting():
    model = rlr_toy.pretrained_denoiser()
    scheduler = rlr_toy.scheduler()
    pilot = _gradients(model, scheduler, RLRConfig(estimator="full"), 16, 1024, 999).mean(0)
    gen = torch.Generator().manual_seed(7)
    directions = [pilot / pilot.norm()]
    for _ in range(3):
        v = torch.randn(pilot.numel(), generator=gen, dtype=torch.float64)
        directions.append(v / v.norm())
    return model, scheduler, float(pilot.norm()), torch.stack(directions)


def _gradients(model, scheduler, config, calls, chains, seed):
    """``[calls, P]``: one estimate per call; call ``c`` uses generator seed ``seed * 100003 + c``."""
    out = []
    for c in range(calls):
        generator = torch.Generator().manual_seed(seed * 100003 + c)
        x_T = torch.randn(chains, 2, generator=generator, dtype=torch.float64)
        model.zero_grad(set_to_none=True)
        estimate_grad(model, scheduler, rlr_toy.reward, x_T, config=config, generator=generator)
        out.append(rlr_toy.flat_grad(model))
    model.zero_grad(set_to_none=True)
    return torch.stack(out)


@functools.cache
def _full_projections(calls, chains, seed):
    model, scheduler, _, directions = _setting()
    return _gradients(model, scheduler, RLRConfig(estimator="full"), calls, chains, seed) @ (
        directions.T
    )


def _label(config):
    if config.estimator == "rlr":
        return f"rlr rest={config.rest} window={config.window}"
    if config.estimator == "draft":
        return f"draft fo_steps={config.fo_steps}"
    return config.estimator


def _paired_z(config, calls, chains, seed, threshold):
    """``(z per direction, message)`` of the paired test of ``config`` against ``full``."""
    model, scheduler, g_norm, directions = _setting()
    estimates = _gradients(model, scheduler, config, calls, chains, seed) @ directions.T
    diff = estimates - _full_projections(calls, chains, seed)
    mean, se = diff.mean(0), diff.std(0) / math.sqrt(calls)
    z = mean / se
    detectable = (threshold + 1.0) * float(se[0]) / g_norm
    message = (
        f"{_label(config)}, {calls} calls x "
        f"{chains} starts: difference from full backprop along the true gradient "
        f"{float(mean[0]):.4g} +- {float(se[0]):.3g} (|g| = {g_norm:.4g}, "
        f"{100 * float(mean[0]) / g_norm:+.1f}%); z on the 4 directions "
        f"{[round(v, 2) for v in z.tolist()]}, threshold {threshold}; this test detects "
        f"biases above about {100 * detectable:.0f}% of |g|"
    )
    return z, message


def _assert_unbiased(config, calls, chains, seed=1, threshold=THRESHOLD):
    z, message = _paired_z(config, calls, chains, seed, threshold)
    assert float(z.abs().max()) < threshold, "biased: " + message
    print(message)


def _assert_biased(config, calls, chains, seed=2, threshold=THRESHOLD):
    z, message = _paired_z(config, calls, chains, seed, threshold)
    assert float(z.abs().max()) > threshold, "the test failed to see a known bias: " + message
    print(message)


@pytest.mark.parametrize("window", [1, 2, 4])
def test_rlr_with_likelihood_ratio_rest_is_unbiased(window):
    _assert_unbiased(RLRConfig(rest="lr", window=window), calls=64, chains=512)


def test_ddpo_likelihood_ratio_over_all_steps_is_unbiased():
    _assert_unbiased(RLRConfig(estimator="ddpo"), calls=64, chains=512)


def test_rlr_with_zeroth_order_rest_is_unbiased():
    """Antithetic ZO on 3 rest steps (window 6), leave-pair-out baseline (spec's setting)."""
    _assert_unbiased(RLRConfig(rest="zo", window=6), calls=512, chains=16, threshold=ZO_THRESHOLD)


def test_rlr_with_zeroth_order_rest_and_default_window_is_unbiased():
    """The default configuration: h = 2, 7 ZO steps (more variance, less power)."""
    _assert_unbiased(RLRConfig(rest="zo"), calls=512, chains=16, threshold=ZO_THRESHOLD)


@pytest.mark.parametrize(
    "config",
    [
        RLRConfig(estimator="draft", fo_steps=1),
        RLRConfig(estimator="alignprop"),
        RLRConfig(rest="none"),
    ],
    ids=["draft-1", "alignprop", "rest-none"],
)
def test_truncated_estimators_fail_the_same_test(config):
    _assert_biased(config, calls=32, chains=128)


def test_a_zo_term_scaled_by_two_fails_the_same_test(monkeypatch):
    """Power of the ZO test: a factor-2 error in the ZO term (a plausible bug) is caught."""
    original = estimators.EstimationRun.add_noise_term

    def doubled(self, name, seeds, scale):
        return original(self, name, seeds, 2.0 * scale)

    monkeypatch.setattr(estimators.EstimationRun, "add_noise_term", doubled)
    _assert_biased(
        RLRConfig(rest="zo", window=6), calls=512, chains=16, seed=1, threshold=ZO_THRESHOLD
    )


def test_zeroth_order_only_is_unbiased():
    """Antithetic ZO at all 10 steps (the spec's ZO-only comparison; the least power)."""
    _assert_unbiased(RLRConfig(estimator="zo"), calls=512, chains=16, threshold=ZO_THRESHOLD)
