"""The bundle-advantages Triton kernel (run by the interpreter on CPU) against PyTorch.

The PyTorch path of ``riskfast.riskpo.advantages`` is itself checked against the float64
loop oracle in ``test_riskpo_advantages.py``; here the kernel must match it (spec
``kernels.md``: rel. error < 1e-5 for advantages) and the oracle directly, on the same
bundling.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from oracles.riskpo_oracle import oracle_advantages

from riskfast.riskpo import QuantileTracker, advantages

pytest.importorskip("triton", reason="Triton is not installed: the kernel cannot run")

# Compiled on a GPU (benchmarks/gpu_check.py runs this file there), interpreted on a CPU.
from kernel_device import DEVICE  # after the importorskip

RISK_CASES = [
    {"estimator": "mvar", "form": "paper"},
    {"estimator": "mvar", "form": "reference_code"},
    {"estimator": "mvar", "form": "reference_code", "natural_baseline": False},
    {"estimator": "rvar"},
    {"estimator": "cvar"},
    {"estimator": "upper", "w_upper": 2.0},
]
OPTION_CASES = [
    {},
    {"normalize": False},
    {"center": True},
    {"credit": "std"},
    {"credit": "score"},
    {"credit": "sum_mean"},
    {"credit": "sum_mean", "center": True, "bundle_size": 2},
    {"score": "mean", "drop_last": True},
]


def _rollout(questions: int, group: int, seed: int, continuous: bool = False):
    gen = torch.Generator().manual_seed(seed)
    if continuous:
        rewards = torch.rand(questions * group, generator=gen) * 3 - 1
    else:
        rewards = (torch.rand(questions * group, generator=gen) < 0.5).float()
    rewards[:group] = 1.0  # one question whose answers all agree
    perm = torch.randperm(questions * group, generator=gen)
    question_ids = (torch.arange(questions).repeat_interleave(group) * 7 + 3)[perm]
    return rewards[perm].to(DEVICE), question_ids.to(DEVICE)


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-12))


def _compare(rewards, question_ids, **options) -> None:
    kwargs = {"generator": torch.Generator().manual_seed(5), **options}
    ref = advantages(rewards, question_ids, backend="torch", **kwargs)
    kwargs["generator"] = torch.Generator().manual_seed(5)
    out = advantages(rewards, question_ids, backend="triton", **kwargs)
    assert torch.equal(out.bundle_ids, ref.bundle_ids)
    assert torch.equal(out.member_ids, ref.member_ids)
    torch.testing.assert_close(out.scores, ref.scores, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.quantiles, ref.quantiles, rtol=1e-6, atol=1e-6)
    err = _relative_error(out.advantages, ref.advantages)
    assert err < 1e-5, f"relative error {err:.2e} with {options}"
    torch.testing.assert_close(out.advantages, ref.advantages, rtol=1e-5, atol=1e-5)
    assert bool(torch.isfinite(out.advantages).all())
    # Exactly-zero rules survive in the kernel: all-equal bundles and dropped bundles are
    # zero as whole bundles in both paths. A lone member's zero is arithmetic, not a
    # rule: above q_beta, (z - a)+ - (z - b)+ + (a - b) cancels to 0 or to an ulp-sized
    # residue depending on the last bit of the score, and a GPU's summation order moves
    # that bit (the H200 run: one score 1 ulp apart, residue 1.1e-7 against 0). So the
    # per-response zero pattern is compared on the CPU, where both paths round alike.
    if not options.get("center"):
        for bundle in range(ref.scores.shape[0]):
            members = ref.bundle_ids == bundle
            ref_zero = bool((ref.advantages[members] == 0).all())
            out_zero = bool((out.advantages[members] == 0).all())
            assert ref_zero == out_zero, f"bundle {bundle}: zero {out_zero}, torch {ref_zero}"
        if rewards.device.type == "cpu":
            assert torch.equal(out.advantages == 0, ref.advantages == 0)
    assert out.metrics["zero_advantage_bundle_frac"] == ref.metrics["zero_advantage_bundle_frac"]


@pytest.mark.parametrize(
    ("risk", "extra"),
    list(itertools.product(RISK_CASES, OPTION_CASES)),
    ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "defaults",
)
def test_kernel_matches_torch_path_for_every_risk_estimator(risk, extra) -> None:
    rewards, question_ids = _rollout(questions=7, group=5, seed=1, continuous=True)
    _compare(rewards, question_ids, **{"bundle_size": 3, **risk, **extra})


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
def test_kernel_matches_torch_path_for_mean_estimators(estimator: str) -> None:
    rewards, question_ids = _rollout(questions=4, group=6, seed=2)
    _compare(rewards, question_ids, estimator=estimator)


@pytest.mark.parametrize(("group", "bundle"), [(1, 2), (64, 2), (3, 1), (33, 4)])
def test_kernel_handles_edge_sizes(group: int, bundle: int) -> None:
    """G = 1 (exactly zero), the 64-member limit, B = 1, and G not a power of two."""
    rewards, question_ids = _rollout(questions=3, group=group, seed=3)
    _compare(rewards, question_ids, bundle_size=bundle)
    if group == 1:
        out = advantages(rewards, question_ids, backend="triton", bundle_size=bundle)
        assert bool((out.advantages == 0).all())


def test_kernel_with_ties_matches_hand_computed_case() -> None:
    """One bundle of one question, scores [0, 1, 1, 1, 2]: q_0.2 = 0.8, q_0.8 = 1.2.

    Paper form, omega = 0.5, no normalisation: A(z) = -(1.5)(0.8 - z)+ + g(z, 0.8, 1.2)
    -> z = 0: -1.2 - 0.4 = -1.6; z = 1: 1 - 1.2 = -0.2; z = 2: 0.
    """
    rewards = torch.tensor([0.0, 1.0, 1.0, 1.0, 2.0], device=DEVICE)
    question_ids = torch.zeros(5, dtype=torch.long, device=DEVICE)
    out = advantages(rewards, question_ids, backend="triton", normalize=False)
    expected = torch.tensor([-1.6, -0.2, -0.2, -0.2, 0.0])
    torch.testing.assert_close(out.advantages.cpu(), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.quantiles.cpu(), torch.tensor([[0.8, 1.2]]), rtol=0, atol=1e-6)


def test_kernel_uses_and_updates_the_tracker_like_the_torch_path() -> None:
    rewards, question_ids = _rollout(questions=6, group=4, seed=4, continuous=True)
    trackers = {backend: QuantileTracker(0.2, 0.8, gamma=0.3) for backend in ("torch", "triton")}
    for step in range(3):
        results = {
            backend: advantages(
                rewards + step,
                question_ids,
                quantile="tracker",
                tracker=trackers[backend],
                bundle_size=2,
                generator=torch.Generator().manual_seed(step),
                backend=backend,
            )
            for backend in trackers
        }
        torch.testing.assert_close(
            results["triton"].advantages, results["torch"].advantages, rtol=1e-5, atol=1e-5
        )
        torch.testing.assert_close(trackers["triton"].values, trackers["torch"].values)


@pytest.mark.parametrize("credit", ["uniform", "std", "score", "sum_mean"])
def test_kernel_matches_the_float64_oracle_on_the_same_bundling(credit: str) -> None:
    rewards, question_ids = _rollout(questions=5, group=4, seed=6, continuous=credit != "score")
    out = advantages(
        rewards,
        question_ids,
        bundle_size=2,
        backend="triton",
        credit=credit,
        generator=torch.Generator().manual_seed(0),
    )
    ref = oracle_advantages(
        rewards.double().cpu().tolist(),
        question_ids.tolist(),
        out.bundle_ids.tolist(),
        out.member_ids.tolist(),
        estimator="mvar",
        alpha=0.2,
        beta=0.8,
        omega=0.5,
        form="paper",
        w_mix=1.5,
        natural_baseline=True,
        w_upper=1.5,
        normalize=True,
        center=False,
        credit=credit,
        score="sum",
    )
    ref = torch.tensor(ref, dtype=torch.float64)
    assert _relative_error(out.advantages.cpu(), ref) < 1e-5


def test_forcing_the_kernel_past_its_limits_names_the_backend() -> None:
    rewards, question_ids = _rollout(questions=2, group=65, seed=0)
    with pytest.raises(ValueError, match="backend"):
        advantages(rewards, question_ids, backend="triton")
    # auto falls back to PyTorch for G > 64 instead of failing
    assert advantages(rewards, question_ids, backend="auto").advantages.shape == rewards.shape
