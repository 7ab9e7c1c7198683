"""Advantages of RiskPO (spec sections 1-3) against hand arithmetic and the oracle."""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles.riskpo_oracle import (
    OracleAdvantages,
    bundling_problems,
    linear_quantile,
    member_scores,
    oracle_advantages,
    oracle_advantages_detailed,
    oracle_tracker_update,
    per_question_bundling,
    questions_in_order,
    responses_by_question,
    sequential_bundling,
)

from riskfast.riskpo import QuantileTracker, advantages

RISK_VARIANTS: list[dict[str, Any]] = [
    {"estimator": "mvar", "form": "paper"},
    {"estimator": "mvar", "form": "reference_code", "natural_baseline": True},
    {"estimator": "mvar", "form": "reference_code", "natural_baseline": False},
    {"estimator": "rvar"},
    {"estimator": "rvar", "natural_baseline": False},
    {"estimator": "cvar"},
    {"estimator": "upper"},
]
MEAN_VARIANTS: list[dict[str, Any]] = [
    {"estimator": "grpo"},
    {"estimator": "dr_grpo"},
    {"estimator": "rloo"},
]
ALL_VARIANTS = RISK_VARIANTS + MEAN_VARIANTS
# "triton" runs the kernel (under TRITON_INTERPRET=1 on a CPU, set in conftest.py)
BACKENDS = ("torch", "triton")
ORACLE_DEFAULTS: dict[str, Any] = {
    "estimator": "mvar",
    "alpha": 0.2,
    "beta": 0.8,
    "omega": 0.5,
    "form": "paper",
    "w_mix": 1.5,
    "natural_baseline": True,
    "w_upper": 1.5,
    "normalize": True,
    "center": False,
    "credit": "uniform",
    "score": "sum",
}
ORACLE_KEYS = tuple(ORACLE_DEFAULTS)


def variant_id(variant: dict[str, Any]) -> str:
    """Readable pytest id of an estimator variant."""
    return "-".join(str(v) for v in variant.values())


def as_floats(t: torch.Tensor) -> list[float]:
    """Tensor -> list of Python floats (float64)."""
    return t.detach().to(torch.float64).tolist()


def run(rewards: Sequence[float] | torch.Tensor, qids: Sequence[int], **options: Any) -> Any:
    """Call ``advantages`` with float32 rewards and int64 question ids."""
    if not isinstance(rewards, torch.Tensor):
        rewards = torch.tensor(rewards, dtype=torch.float32)
    return advantages(rewards, torch.tensor(qids, dtype=torch.int64), **options)


def assert_values(got: torch.Tensor, expected: Sequence[float], tol: float = 2e-6) -> None:
    """Elementwise comparison with a float32-sized tolerance."""
    got_list = as_floats(got)
    assert len(got_list) == len(expected)
    for index, (g, e) in enumerate(zip(got_list, expected, strict=True)):
        assert abs(g - e) <= tol * max(1.0, abs(e)), f"index {index}: got {g}, expected {e}"


def assert_matches_oracle(
    got: torch.Tensor, ref: OracleAdvantages, *, check_norm: bool, context: str = ""
) -> None:
    """Compare with the oracle: exact zeros where forced, else float32 tolerances.

    Elementwise: ``|got - ref| <= 1e-5 * scale`` where scale is the natural size
    of that advantage (formula coefficient x score magnitude / normaliser).
    Globally (when ``check_norm``): ``||got - ref|| / ||ref|| < 1e-5``.
    """
    values = as_floats(got)
    assert len(values) == len(ref.advantages)
    diff2 = ref2 = 0.0
    for n, (g, r) in enumerate(zip(values, ref.advantages, strict=True)):
        assert math.isfinite(g), f"{context} response {n}: non-finite {g}"
        if ref.forced_zero[n]:
            assert g == 0.0, f"{context} response {n}: expected exactly 0, got {g}"
            continue
        bound = 1e-5 * ref.scale[n]
        assert abs(g - r) <= bound, f"{context} response {n}: got {g}, oracle {r}, bound {bound}"
        diff2 += (g - r) ** 2
        ref2 += r * r
    if check_norm and ref2 > 0.0:
        rel = math.sqrt(diff2 / ref2)
        assert rel < 1e-5, f"{context} relative error {rel}"


def oracle_kwargs(options: dict[str, Any]) -> dict[str, Any]:
    """The oracle's options for a call made with ``options``."""
    kwargs = dict(ORACLE_DEFAULTS)
    kwargs.update({k: v for k, v in options.items() if k in ORACLE_KEYS})
    return kwargs


# ----------------------------------------------------------------------------
# hand-computed examples (shuffle=False, so the bundling is fixed)
# ----------------------------------------------------------------------------
def test_mvar_paper_single_question_matches_hand_arithmetic() -> None:
    # r = [0,1,2,3,4], B = 1, scores = rewards. alpha-quantile: position 0.2*4 = 0.8
    # -> a = 0 + 0.8*(1-0) = 0.8; beta: position 3.2 -> b = 3 + 0.2*(4-3) = 3.2; a-b = -2.4.
    # A = -(1.5)(a-z)+ + (z-a)+ - (z-b)+ + a - b
    # z=0: -1.5*0.8 + (0 - 0 - 2.4) = -3.6 ; z=1: 0.2 - 2.4 = -2.2 ; z=2: 1.2 - 2.4 = -1.2
    # z=3: 2.2 - 2.4 = -0.2 ; z=4: 3.2 - 0.8 - 2.4 = 0
    result = run([0, 1, 2, 3, 4], [0] * 5, bundle_size=1, shuffle=False, normalize=False)
    assert_values(result.advantages, [-3.6, -2.2, -1.2, -0.2, 0.0])
    assert_values(result.quantiles[0], [0.8, 3.2])
    # normalised: unbiased std of [0..4] = sqrt(10/4) = 1.5811388300841898, + 1e-6
    normalised = run([0, 1, 2, 3, 4], [0] * 5, bundle_size=1, shuffle=False)
    d = math.sqrt(2.5) + 1e-6
    assert_values(normalised.advantages, [-3.6 / d, -2.2 / d, -1.2 / d, -0.2 / d, 0.0])


# Two questions in one bundle (B = 2): q0 rewards [1,0,0], q1 rewards [1,1,0].
# member j = j-th response of each question: S = [1+1, 0+1, 0+0] = [2, 1, 0].
# sorted [0,1,2]: a = quantile(0.2) at position 0.4 -> 0.4 ; b at 1.6 -> 1.6 ; a-b = -1.2.
TWO_Q_REWARDS = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0]
OFFICIAL_W = 0.6 + 1e-6  # beta - alpha + 1e-6, form="reference_code"'s range width
OFFICIAL_L = 0.2 + 1e-6  # alpha + 1e-6, its lower-tail width
TWO_Q_IDS = [0, 0, 0, 1, 1, 1]

HAND_BUNDLE_CASES: list[tuple[dict[str, Any], list[float]]] = [
    # paper, omega 0.5: z=2: g = 1.6 - 0.4 - 1.2 = 0 ; z=1: g = 0.6 - 1.2 = -0.6
    # z=0: -1.5*0.4 + (0 - 0 - 1.2) = -0.6 - 1.2 = -1.8
    ({"estimator": "mvar", "form": "paper"}, [0.0, -0.6, -1.8]),
    # omega 0: z=0: -0.4 - 1.2 = -1.6
    ({"estimator": "mvar", "form": "paper", "omega": 0.0}, [0.0, -0.6, -1.6]),
    # reference_code divides by the official widths W = 0.6 + 1e-6 and L = 0.2 + 1e-6:
    # A_rv = g / W = [0, -0.6/W, -1.2/W] (about [0, -1, -2]) ; A_cv = -(a-z)+/L = [0, 0, -0.4/L]
    # A = (1.5*A_cv + A_rv) / 2.5 (about [0, -0.4, (-3 - 2)/2.5 = -2])
    (
        {"estimator": "mvar", "form": "reference_code"},
        [0.0, -0.6 / OFFICIAL_W / 2.5, (-1.5 * 0.4 / OFFICIAL_L - 1.2 / OFFICIAL_W) / 2.5],
    ),
    # c = 0: A_rv = ((z-a)+ - (z-b)+)/W = [1.2/W, 0.6/W, 0] (about [2, 1, 0])
    # A = (1.5*[0,0,-0.4/L] + A_rv) / 2.5 (about [0.8, 0.4, -1.2])
    (
        {"estimator": "mvar", "form": "reference_code", "natural_baseline": False},
        [1.2 / OFFICIAL_W / 2.5, 0.6 / OFFICIAL_W / 2.5, -1.5 * 0.4 / OFFICIAL_L / 2.5],
    ),
    # w_mix = 1: (A_cv + A_rv)/2 (about [0, -0.5, -2])
    (
        {"estimator": "mvar", "form": "reference_code", "w_mix": 1.0},
        [0.0, -0.6 / OFFICIAL_W / 2, (-0.4 / OFFICIAL_L - 1.2 / OFFICIAL_W) / 2],
    ),
    # rvar = A_rv
    ({"estimator": "rvar"}, [0.0, -1.0, -2.0]),
    ({"estimator": "rvar", "natural_baseline": False}, [2.0, 1.0, 0.0]),
    # cvar = A_cv
    ({"estimator": "cvar"}, [0.0, 0.0, -2.0]),
    # upper: (1.5*(z-b)+/0.2 + A_rv)/2.5: z=2: (1.5*0.4/0.2 + 0)/2.5 = 3/2.5 = 1.2
    # z=1: (0 - 1)/2.5 = -0.4 ; z=0: (0 - 2)/2.5 = -0.8
    ({"estimator": "upper"}, [1.2, -0.4, -0.8]),
    # alpha 0.5, beta 1 (rvar): a = median = 1, b = max = 2, A_rv = ((z-1)+ - (z-2)+ - 1)/0.5
    # z=2: (1 - 0 - 1)/0.5 = 0 ; z=1: -2 ; z=0: -2
    ({"estimator": "rvar", "alpha": 0.5, "beta": 1.0}, [0.0, -2.0, -2.0]),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("options", "per_member"), HAND_BUNDLE_CASES, ids=[variant_id(c[0]) for c in HAND_BUNDLE_CASES]
)
def test_two_question_bundle_matches_hand_arithmetic(
    options: dict[str, Any], per_member: list[float], backend: str
) -> None:
    result = run(
        TWO_Q_REWARDS,
        TWO_Q_IDS,
        bundle_size=2,
        shuffle=False,
        normalize=False,
        backend=backend,
        **options,
    )
    assert_values(result.advantages, per_member * 2)
    assert result.bundle_ids.tolist() == [0] * 6
    assert result.member_ids.tolist() == [0, 1, 2, 0, 1, 2]
    assert_values(result.scores.flatten(), [2.0, 1.0, 0.0])
    assert result.metrics["zero_advantage_bundle_frac"] == 0.0
    assert tuple(result.scores.shape) == (1, 3)


def test_two_question_bundle_normalised_divides_by_member_score_std() -> None:
    # unbiased std of S = [2,1,0] is 1 -> divide by 1 + 1e-6
    result = run(TWO_Q_REWARDS, TWO_Q_IDS, bundle_size=2, shuffle=False)
    d = 1.0 + 1e-6
    assert_values(result.advantages, [0.0, -0.6 / d, -1.8 / d] * 2)


def test_questions_are_ordered_by_first_appearance_and_outputs_stay_aligned() -> None:
    # Same data as TWO_Q_* but interleaved, with labels 9 (first seen) and 4.
    # q9 responses in input order: [1, 0, 0] ; q4: [1, 1, 0] -> S = [2, 1, 0] as above.
    rewards = [1.0, 1.0, 0.0, 1.0, 0.0, 0.0]
    qids = [9, 4, 9, 4, 9, 4]
    result = run(rewards, qids, bundle_size=1, shuffle=False, normalize=False)
    # B = 1: q9 is bundle 0 (S = [1,0,0]), q4 is bundle 1 (S = [1,1,0]).
    # q9: sorted [0,0,1], a = 0 (position 0.4 between 0 and 0), b = 0 + 0.6*1 = 0.6
    #   z=1: g = 1 - 0.4 + 0 - 0.6 = 0 ; z=0: (a-z)+ = 0, g = -0.6
    # q4: sorted [0,1,1], a = 0 + 0.4*1 = 0.4, b = 1
    #   z=1: g = 0.6 - 0 - 0.6 = 0 ; z=0: -1.5*0.4 - 0.6 = -1.2
    assert result.bundle_ids.tolist() == [0, 1, 0, 1, 0, 1]
    assert result.member_ids.tolist() == [0, 0, 1, 1, 2, 2]
    assert_values(result.advantages, [0.0, 0.0, -0.6, 0.0, -0.6, -1.2])


def test_ties_inside_member_scores_match_hand_arithmetic() -> None:
    # r = [1,0,1,0] (G=4, B=1): sorted [0,0,1,1], a at position 0.6 -> 0, b at 2.4 -> 1
    # z=1: g = 1 - 0 + 0 - 1 = 0 ; z=0: g = 0 - 0 - 1 = -1 ; unbiased std = sqrt(1/3)
    result = run([1, 0, 1, 0], [3] * 4, bundle_size=1, shuffle=False)
    d = math.sqrt(1.0 / 3.0) + 1e-6
    assert_values(result.advantages, [0.0, -1.0 / d, 0.0, -1.0 / d])
    # r = [0,2,2,2,5]: a at 0.8 -> 0 + 0.8*2 = 1.6, b at 3.2 -> 2 + 0.2*3 = 2.6, a-b = -1
    # z=0: -1.5*1.6 + (0 - 0 - 1) = -3.4 ; z=2: 0.4 - 1 = -0.6 ; z=5: 3.4 - 2.4 - 1 = 0
    tied = run([0, 2, 2, 2, 5], [1] * 5, bundle_size=1, shuffle=False, normalize=False)
    assert_values(tied.advantages, [-3.4, -0.6, -0.6, -0.6, 0.0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ALL_VARIANTS, ids=variant_id)
def test_all_equal_rewards_give_exactly_zero(variant: dict[str, Any], backend: str) -> None:
    # 0.1 and 1/3 are not exact in binary: a float32 mean of seven copies may miss the
    # value by an ulp; the spec demands exactly 0 anyway.
    rewards = [0.1] * 7 + [1.0 / 3.0] * 7 + [1e-3] * 7
    qids = [0] * 7 + [1] * 7 + [2] * 7
    for normalize in (True, False):
        result = run(
            rewards,
            qids,
            bundle_size=2,
            generator=torch.Generator().manual_seed(0),
            normalize=normalize,
            backend=backend,
            **variant,
        )
        assert torch.equal(result.advantages, torch.zeros(21)), result.advantages


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", RISK_VARIANTS, ids=variant_id)
def test_bundle_with_all_equal_member_scores_gives_exactly_zero(
    variant: dict[str, Any], backend: str
) -> None:
    # q0 = [1,1], q1 = [0,0], B = 2 -> every member scores 1 although the questions differ.
    result = run(
        [1, 1, 0, 0], [0, 0, 1, 1], bundle_size=2, shuffle=False, backend=backend, **variant
    )
    assert torch.equal(result.advantages, torch.zeros(4))
    assert result.metrics["zero_advantage_bundle_frac"] == pytest.approx(1.0)


def test_question_with_equal_rewards_gets_signal_from_its_bundle() -> None:
    # q0 = [1,1,1], q1 = [1,0,0], B = 2 -> S = [2,1,1]; sorted [1,1,2]: a = 1, b = 1.6
    # z=2: g = 1 - 0.4 - 0.6 = 0 ; z=1: g = 0 - 0 - 0.6 = -0.6, (a-z)+ = 0
    result = run(
        [1, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1], bundle_size=2, shuffle=False, normalize=False
    )
    assert_values(result.advantages, [0.0, -0.6, -0.6, 0.0, -0.6, -0.6])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ALL_VARIANTS, ids=variant_id)
def test_group_size_one_gives_exactly_zero(variant: dict[str, Any], backend: str) -> None:
    result = run(
        [0.0, 1.0, 0.5, 1.0],
        [0, 1, 2, 3],
        bundle_size=2,
        generator=torch.Generator().manual_seed(1),
        backend=backend,
        **variant,
    )
    assert torch.equal(result.advantages, torch.zeros(4))
    assert torch.isfinite(result.advantages).all()


# Q = 3, B = 2, G = 2, shuffle off: bundle 0 = {q0 [1,0], q1 [1,0]} -> S = [2, 0],
# a = 0.4, b = 1.6: z=2 -> 0 ; z=0 -> -1.5*0.4 - 1.2 = -1.8.
# bundle 1 = {q2 [0,1]} -> S = [0, 1], a = 0.2, b = 0.8: z=0 -> -0.3 - 0.6 = -0.9 ; z=1 -> 0.
SMALL_LAST_REWARDS = [1.0, 0.0, 1.0, 0.0, 0.0, 1.0]
SMALL_LAST_IDS = [0, 0, 1, 1, 2, 2]


def test_last_bundle_smaller_than_bundle_size_matches_hand_arithmetic() -> None:
    result = run(SMALL_LAST_REWARDS, SMALL_LAST_IDS, bundle_size=2, shuffle=False, normalize=False)
    assert result.bundle_ids.tolist() == [0, 0, 0, 0, 1, 1]
    assert_values(result.advantages, [0.0, -1.8, 0.0, -1.8, -0.9, 0.0])
    assert result.metrics["num_bundles"] == 2
    assert result.metrics["dropped_response_frac"] == 0.0


def test_drop_last_zeroes_the_smaller_bundle_and_reports_it() -> None:
    result = run(
        SMALL_LAST_REWARDS,
        SMALL_LAST_IDS,
        bundle_size=2,
        shuffle=False,
        normalize=False,
        drop_last=True,
    )
    assert_values(result.advantages, [0.0, -1.8, 0.0, -1.8, 0.0, 0.0])
    assert result.advantages[4].item() == 0.0
    assert result.metrics["dropped_response_frac"] == pytest.approx(2.0 / 6.0)


def test_drop_last_with_shuffle_zeroes_exactly_the_short_bundle() -> None:
    gen = torch.Generator().manual_seed(7)
    rewards = torch.tensor([float((3 * n) % 5) for n in range(7 * 3)])
    qids = [n // 3 for n in range(7 * 3)]
    result = run(rewards, qids, bundle_size=3, generator=gen, drop_last=True, normalize=False)
    counts: dict[int, set[int]] = {}
    for n, b in enumerate(result.bundle_ids.tolist()):
        counts.setdefault(b, set()).add(qids[n])
    short = [b for b, qs in counts.items() if len(qs) < 3]
    assert len(short) == 1 and len(counts[short[0]]) == 1
    dropped = [n for n, b in enumerate(result.bundle_ids.tolist()) if b == short[0]]
    assert all(result.advantages[n].item() == 0.0 for n in dropped)
    assert result.metrics["dropped_response_frac"] == pytest.approx(3.0 / 21.0)
    ref = oracle_advantages(
        as_floats(rewards),
        qids,
        result.bundle_ids.tolist(),
        result.member_ids.tolist(),
        normalize=False,
        dropped_bundles=short,
    )
    assert_values(result.advantages, ref)


def test_score_mean_divides_member_scores_by_question_count() -> None:
    # S = [2,1,0]/2 = [1, 0.5, 0]; a = 0.2, b = 0.8, a-b = -0.6
    # z=1: 0.8 - 0.2 - 0.6 = 0 ; z=0.5: 0.3 - 0.6 = -0.3 ; z=0: -1.5*0.2 - 0.6 = -0.9
    result = run(
        TWO_Q_REWARDS, TWO_Q_IDS, bundle_size=2, shuffle=False, score="mean", normalize=False
    )
    assert_values(result.advantages, [0.0, -0.3, -0.9] * 2)
    assert_values(result.scores.flatten(), [1.0, 0.5, 0.0])
    # normalised: std([1, .5, 0]) = 0.5
    normalised = run(TWO_Q_REWARDS, TWO_Q_IDS, bundle_size=2, shuffle=False, score="mean")
    d = 0.5 + 1e-6
    assert_values(normalised.advantages, [0.0, -0.3 / d, -0.9 / d] * 2)


def test_center_subtracts_bundle_mean_after_normalisation() -> None:
    # unnormalised A = [0, -0.6, -1.8], mean -0.8 -> [0.8, 0.2, -1.0]
    result = run(
        TWO_Q_REWARDS, TWO_Q_IDS, bundle_size=2, shuffle=False, center=True, normalize=False
    )
    assert_values(result.advantages, [0.8, 0.2, -1.0] * 2)
    # normalised by std 1 + 1e-6 first, then centred: (A + 0.8) / (1 + 1e-6)
    normalised = run(TWO_Q_REWARDS, TWO_Q_IDS, bundle_size=2, shuffle=False, center=True)
    d = 1.0 + 1e-6
    assert_values(normalised.advantages, [0.8 / d, 0.2 / d, -1.0 / d] * 2)


def test_credit_std_divides_by_each_question_reward_std() -> None:
    # q0 [1,0,0], q1 [2,1,0] (B=2): S = [3, 1, 0]; sorted [0,1,3]: a = 0.4,
    # b at 1.6 -> 1 + 0.6*2 = 2.2, a-b = -1.8.
    # z=3: 2.6 - 0.8 - 1.8 = 0 ; z=1: 0.6 - 1.8 = -1.2 ; z=0: -1.5*0.4 - 1.8 = -2.4
    # std(q0) = sqrt(((2/3)^2 + 2*(1/3)^2)/2) = sqrt(1/3) ; std(q1) = 1
    result = run(
        [1, 0, 0, 2, 1, 0], TWO_Q_IDS, bundle_size=2, shuffle=False, normalize=False, credit="std"
    )
    d0 = math.sqrt(1.0 / 3.0) + 1e-6  # s_q + 1e-6, as the official code divides
    d1 = 1.0 + 1e-6
    assert_values(result.advantages, [0.0, -1.2 / d0, -2.4 / d0, 0.0, -1.2 / d1, -2.4 / d1])


def test_credit_std_uses_one_for_questions_with_equal_rewards() -> None:
    # q0 [1,1,1] (std 0 -> divide by 1), q1 [1,0,0] (std sqrt(1/3)); S = [2,1,1]
    # A = [0, -0.6, -0.6] (see test_question_with_equal_rewards_gets_signal_from_its_bundle)
    result = run(
        [1, 1, 1, 1, 0, 0],
        [0, 0, 0, 1, 1, 1],
        bundle_size=2,
        shuffle=False,
        normalize=False,
        credit="std",
    )
    d0 = 1.0 + 1e-6  # std 0 is replaced by 1, then + 1e-6
    d1 = math.sqrt(1.0 / 3.0) + 1e-6
    assert_values(result.advantages, [0.0, -0.6 / d0, -0.6 / d0, 0.0, -0.6 / d1, -0.6 / d1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_credit_std_replaces_stds_up_to_the_floor_by_one(backend: str) -> None:
    # One question per bundle (B = 1), G = 2: unbiased std = |r0 - r1| / sqrt(2).
    # q0 [0, 0.0014]: std 9.9e-4 <= 1e-3 -> divisor 1 + 1e-6 ;
    # q1 [0, 0.0015]: std 1.06e-3 > 1e-3 -> divisor std + 1e-6.
    # Each question's A (paper, unnormalised): a = 0.0014 * 0.2 (or 0.0015 * 0.2),
    # b = 0.8 * top; z = 0: -1.5 a + (a - b) ; z = top: 0.
    rewards = [0.0, 0.0014, 0.0, 0.0015]
    result = run(
        rewards,
        [0, 0, 1, 1],
        bundle_size=1,
        shuffle=False,
        normalize=False,
        credit="std",
        backend=backend,
    )
    expected = []
    for top in (0.0014, 0.0015):
        a, b = 0.2 * top, 0.8 * top
        std = top / math.sqrt(2.0)
        divisor = (std if std > 1e-3 else 1.0) + 1e-6
        expected += [(-1.5 * a + a - b) / divisor, 0.0]
    assert_values(result.advantages, expected, tol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_credit_score_gives_rewarded_responses_half_and_others_one_and_a_half(
    backend: str,
) -> None:
    # A = [0, -0.6, -1.8] per member (see HAND_BUNDLE_CASES); q0 [1,0,0], q1 [1,1,0]:
    # 0.5 A where r > 0, 1.5 A otherwise.
    result = run(
        TWO_Q_REWARDS,
        TWO_Q_IDS,
        bundle_size=2,
        shuffle=False,
        normalize=False,
        credit="score",
        backend=backend,
    )
    assert_values(result.advantages, [0.0, -0.9, -2.7, 0.0, -0.3, -2.7])


@pytest.mark.parametrize("backend", BACKENDS)
def test_credit_sum_mean_shares_by_deviation_and_equally_when_the_sum_vanishes(
    backend: str,
) -> None:
    # q0 [1,0,0] (mean 1/3), q1 [1,1,0] (mean 2/3): rho q0 = [2/3, -1/3, -1/3],
    # rho q1 = [1/3, 1/3, -2/3]; Sigma = [1, 0, -1] (member 1's is a float32 residue of
    # about 3e-8 <= 1e-6). A = [0, -0.6, -1.8]:
    # member 1: A / B_b = -0.3 each ; member 2: -1.8 * (-1/3) / (-1) = -0.6 and
    # -1.8 * (-2/3) / (-1) = -1.2.
    result = run(
        TWO_Q_REWARDS,
        TWO_Q_IDS,
        bundle_size=2,
        shuffle=False,
        normalize=False,
        credit="sum_mean",
        backend=backend,
    )
    assert_values(result.advantages, [0.0, -0.3, -0.6, 0.0, -0.3, -1.2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_credit_sum_mean_can_flip_a_response_sign_and_keeps_each_member_total(
    backend: str,
) -> None:
    # q0 [1,0,0,0] (mean .25), q1 [0,0,1,1] (mean .5), B = 2, member j = j-th response:
    # S = [1, 0, 1, 1]; a = 0.6, b = 1 ; paper A = [0, -1.3, 0, 0], centred (mean -0.325):
    # A = [0.325, -0.975, 0.325, 0.325]. rho q0 = [.75, -.25, -.25, -.25],
    # rho q1 = [-.5, -.5, .5, .5]; Sigma = [.25, -.75, .25, .25].
    # member 0: q0 .975 (share 3), q1 -.65 (share -2: the sign flips)
    # member 1: q0 -.325 (1/3), q1 -.65 (2/3) ; members 2, 3: q0 -.325 (-1), q1 .65 (2)
    rewards = [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    qids = [0, 0, 0, 0, 1, 1, 1, 1]
    result = run(
        rewards,
        qids,
        bundle_size=2,
        shuffle=False,
        normalize=False,
        center=True,
        credit="sum_mean",
        backend=backend,
    )
    expected = [0.975, -0.325, -0.325, -0.325, -0.65, -0.65, 0.65, 0.65]
    assert_values(result.advantages, expected)
    member_totals = torch.zeros(4).index_add_(0, result.member_ids, result.advantages.cpu())
    assert_values(member_totals, [0.325, -0.975, 0.325, 0.325])


@pytest.mark.parametrize("credit", ["uniform", "std", "score", "sum_mean"])
def test_credit_modes_keep_all_equal_bundles_exactly_zero(credit: str) -> None:
    rewards = [1.0, 1.0, 0.0, 0.0, 0.0, 1.0]  # q0 [1,1,0], q1 [0,0,1]: S = [1,1,1]
    result = run(rewards, TWO_Q_IDS, bundle_size=2, shuffle=False, credit=credit)
    assert result.advantages.tolist() == [0.0] * 6


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    group=st.integers(2, 6),
    questions=st.integers(1, 6),
    bundle=st.integers(1, 4),
    center=st.booleans(),
)
def test_credit_sum_mean_keeps_member_totals_and_equals_uniform_for_one_question_bundles(
    seed: int, group: int, questions: int, bundle: int, center: bool
) -> None:
    gen = torch.Generator().manual_seed(seed)
    rewards = (torch.rand(questions * group, generator=gen) < 0.5).float()
    qids = torch.arange(questions).repeat_interleave(group)
    common = {"bundle_size": bundle, "center": center}
    uniform = advantages(rewards, qids, generator=torch.Generator().manual_seed(seed), **common)
    shared = advantages(
        rewards, qids, generator=torch.Generator().manual_seed(seed), credit="sum_mean", **common
    )
    assert torch.equal(shared.bundle_ids, uniform.bundle_ids)
    if bundle == 1:
        assert torch.equal(shared.advantages, uniform.advantages)
    # Every member's shares add up to its advantage A_j (times B_b where Sigma_j
    # vanished and each response got A_j / B_b, whose sum is A_j too).
    nb = int(uniform.bundle_ids.max()) + 1
    key = uniform.bundle_ids * group + uniform.member_ids
    totals = torch.zeros(nb * group, dtype=torch.float64).index_add_(
        0, key, shared.advantages.double()
    )
    member_adv = torch.zeros(nb * group, dtype=torch.float64).index_add_(
        0, key, uniform.advantages.double()
    )
    sizes = torch.zeros(nb * group, dtype=torch.float64).index_add_(
        0, key, torch.ones_like(rewards, dtype=torch.float64)
    )
    torch.testing.assert_close(totals, member_adv / sizes, rtol=1e-5, atol=1e-5)


def test_mean_family_estimators_match_hand_arithmetic() -> None:
    # q0 = [1,0,0,1]: mean 0.5, unbiased std sqrt(1/3) ; q1 = [3,1,2,2]: mean 2, std sqrt(2/3)
    rewards = [1, 0, 0, 1, 3, 1, 2, 2]
    qids = [0, 0, 0, 0, 1, 1, 1, 1]
    d0 = math.sqrt(1.0 / 3.0) + 1e-6
    d1 = math.sqrt(2.0 / 3.0) + 1e-6
    grpo = run(rewards, qids, estimator="grpo")
    assert_values(
        grpo.advantages, [0.5 / d0, -0.5 / d0, -0.5 / d0, 0.5 / d0, 1 / d1, -1 / d1, 0.0, 0.0]
    )
    dr = run(rewards, qids, estimator="dr_grpo")
    assert_values(dr.advantages, [0.5, -0.5, -0.5, 0.5, 1.0, -1.0, 0.0, 0.0])
    # rloo: r - mean(others): q0: 1 - 1/3, 0 - 2/3 ; q1: 3 - 5/3, 1 - 7/3, 2 - 2
    rloo = run(rewards, qids, estimator="rloo")
    assert_values(rloo.advantages, [2 / 3, -2 / 3, -2 / 3, 2 / 3, 4 / 3, -4 / 3, 0.0, 0.0])
    # mean family: bundles = questions, members = positions, scores = rewards [Q, G]
    assert grpo.bundle_ids.tolist() == qids
    assert grpo.member_ids.tolist() == [0, 1, 2, 3] * 2
    assert_values(grpo.scores.flatten(), [float(r) for r in rewards])


@pytest.mark.parametrize("variant", MEAN_VARIANTS, ids=variant_id)
def test_mean_family_draws_nothing_from_the_generator(variant: dict[str, Any]) -> None:
    gen = torch.Generator().manual_seed(11)
    before = gen.get_state()
    run([1, 0, 1, 1], [0, 0, 1, 1], generator=gen, **variant)
    assert torch.equal(gen.get_state(), before)


# ----------------------------------------------------------------------------
# identities of the spec
# ----------------------------------------------------------------------------
def test_reduction_identity_gives_reward_minus_question_max() -> None:
    rng = random.Random(3)
    rewards = [rng.choice([0.0, 0.25, 1.0, 2.5, -1.0]) for _ in range(6 * 5)]
    qids = [n // 5 for n in range(30)]
    result = run(
        rewards,
        qids,
        bundle_size=1,
        alpha=0.0,
        beta=1.0,
        omega=0.0,
        normalize=False,
        generator=torch.Generator().manual_seed(2),
    )
    expected = [r - max(rewards[(n // 5) * 5 : (n // 5) * 5 + 5]) for n, r in enumerate(rewards)]
    assert_values(result.advantages, expected)


@pytest.mark.parametrize("variant", RISK_VARIANTS, ids=variant_id)
@pytest.mark.parametrize(
    "options",
    [{}, {"normalize": False}, {"center": True}, {"credit": "std"}, {"score": "mean"}],
    ids=["default", "raw", "center", "credit_std", "score_mean"],
)
def test_bundle_size_one_reproduces_each_question_alone(
    variant: dict[str, Any], options: dict[str, Any]
) -> None:
    rng = random.Random(5)
    q_count, g = 6, 5
    rewards = [rng.choice([0.0, 1.0, 0.5, 2.0]) for _ in range(q_count * g)]
    qids = [n % q_count for n in range(q_count * g)]  # interleaved questions
    together = run(
        rewards,
        qids,
        bundle_size=1,
        generator=torch.Generator().manual_seed(9),
        **variant,
        **options,
    )
    groups = responses_by_question(qids)
    for q, indices in groups.items():
        alone = run(
            [rewards[n] for n in indices],
            [q] * g,
            bundle_size=1,
            generator=torch.Generator().manual_seed(1),
            **variant,
            **options,
        )
        torch.testing.assert_close(
            together.advantages[indices], alone.advantages, rtol=1e-6, atol=1e-7
        )


def test_grpo_matches_group_normalised_formula() -> None:
    gen = torch.Generator().manual_seed(4)
    q_count, g = 9, 6
    rewards = torch.randint(0, 3, (q_count * g,), generator=gen).to(torch.float32) / 2
    rewards[:g] = 1.0  # one all-equal question
    qids = torch.arange(q_count).repeat_interleave(g)
    result = advantages(rewards, qids, estimator="grpo")
    grouped = rewards.to(torch.float64).view(q_count, g)
    std = grouped.std(dim=1, keepdim=True)
    expected = (grouped - grouped.mean(dim=1, keepdim=True)) / (std + 1e-6)
    expected = torch.where(std == 0, torch.zeros_like(expected), expected).flatten()
    torch.testing.assert_close(result.advantages.to(torch.float64), expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(result.advantages[:g], torch.zeros(g))


@given(
    q_count=st.integers(1, 12),
    g=st.integers(1, 7),
    bundle_size=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
)
def test_drawn_bundlings_put_each_response_in_exactly_one_member(
    q_count: int, g: int, bundle_size: int, seed: int
) -> None:
    rng = random.Random(seed)
    labels = rng.sample(range(1000), q_count)
    qids = [labels[n // g] for n in range(q_count * g)]
    rng.shuffle(qids)
    rewards = [float(rng.randint(0, 3)) for _ in qids]
    result = run(
        rewards, qids, bundle_size=bundle_size, generator=torch.Generator().manual_seed(seed)
    )
    bundle_ids = result.bundle_ids.tolist()
    member_ids = result.member_ids.tolist()
    assert bundling_problems(qids, bundle_ids, member_ids, bundle_size) == []
    nb = -(-q_count // bundle_size)
    assert sorted(set(bundle_ids)) == list(range(nb))
    assert tuple(result.scores.shape) == (nb, g)
    for n in range(len(qids)):
        assert result.scores[bundle_ids[n], member_ids[n]].item() == pytest.approx(
            sum(
                rewards[m]
                for m in range(len(qids))
                if bundle_ids[m] == bundle_ids[n] and member_ids[m] == member_ids[n]
            )
        )


def test_shuffle_false_bundling_is_consecutive_questions_and_positions() -> None:
    qids = [5, 2, 5, 8, 2, 8, 1, 1, 3, 3, 5, 2, 8, 1, 3]  # G = 3, first-appearance 5,2,8,1,3
    rewards = [float(n % 4) for n in range(len(qids))]
    result = run(rewards, qids, bundle_size=2, shuffle=False)
    expected_bundles, expected_members = sequential_bundling(qids, 2)
    assert result.bundle_ids.tolist() == expected_bundles
    assert result.member_ids.tolist() == expected_members


def test_same_seed_is_bitwise_deterministic_and_different_seeds_rebundle() -> None:
    gen_rewards = torch.Generator().manual_seed(0)
    rewards = torch.rand(20 * 8, generator=gen_rewards)
    qids = torch.arange(20).repeat_interleave(8)
    first = advantages(rewards, qids, generator=torch.Generator().manual_seed(42))
    second = advantages(rewards, qids, generator=torch.Generator().manual_seed(42))
    other = advantages(rewards, qids, generator=torch.Generator().manual_seed(43))
    for name in ("advantages", "bundle_ids", "member_ids", "scores", "quantiles"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name
    assert not (
        torch.equal(first.bundle_ids, other.bundle_ids)
        and torch.equal(first.member_ids, other.member_ids)
    )


def test_global_rng_is_used_when_no_generator_is_given() -> None:
    rewards = torch.rand(12 * 4, generator=torch.Generator().manual_seed(1))
    qids = torch.arange(12).repeat_interleave(4)
    torch.manual_seed(77)
    first = advantages(rewards, qids)
    torch.manual_seed(77)
    second = advantages(rewards, qids)
    assert torch.equal(first.advantages, second.advantages)
    assert torch.equal(first.member_ids, second.member_ids)


def test_inputs_are_not_mutated() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.5, 2.0, 1.0, 1.0, 0.0, 3.0])
    qids = torch.tensor([3, 3, 3, 3, 1, 1, 1, 1])
    bundle_ids = torch.tensor([7, 7, 7, 7, 7, 7, 7, 7])
    member_ids = torch.tensor([3, 1, 0, 2, 0, 1, 2, 3])
    copies = [t.clone() for t in (rewards, qids, bundle_ids, member_ids)]
    advantages(rewards, qids, generator=torch.Generator().manual_seed(0), center=True, credit="std")
    advantages(rewards, qids, bundle_ids=bundle_ids, member_ids=member_ids)
    advantages(rewards, qids, estimator="grpo")
    for original, copy in zip((rewards, qids, bundle_ids, member_ids), copies, strict=True):
        assert torch.equal(original, copy)


def test_explicit_bundling_labels_are_renumbered_in_first_appearance_order() -> None:
    # q0 = [1,0,0], q1 = [1,1,0], q2 = [0,0,1]; bundles {q0,q2} (label 40), {q1} (label 3)
    rewards = [1, 0, 0, 1, 1, 0, 0, 0, 1]
    qids = [0, 0, 0, 1, 1, 1, 2, 2, 2]
    bundle_ids = [40, 40, 40, 3, 3, 3, 40, 40, 40]
    member_ids = [2, 0, 1, 0, 1, 2, 0, 1, 2]
    result = run(
        rewards,
        qids,
        bundle_ids=torch.tensor(bundle_ids),
        member_ids=torch.tensor(member_ids),
        normalize=False,
    )
    assert result.bundle_ids.tolist() == [0, 0, 0, 1, 1, 1, 0, 0, 0]
    assert result.member_ids.tolist() == member_ids
    # bundle 0: member 0 = q0[1] + q2[0] = 0, member 1 = q0[2] + q2[1] = 0,
    # member 2 = q0[0] + q2[2] = 2 -> S = [0, 0, 2]
    assert_values(result.scores[0], [0.0, 0.0, 2.0])
    ref = oracle_advantages(rewards, qids, bundle_ids, member_ids, normalize=False)
    assert_values(result.advantages, ref)


def test_question_ids_may_be_a_list_of_ints() -> None:
    from_list = advantages(torch.tensor(TWO_Q_REWARDS), TWO_Q_IDS, bundle_size=2, shuffle=False)
    from_tensor = run(TWO_Q_REWARDS, TWO_Q_IDS, bundle_size=2, shuffle=False)
    assert torch.equal(from_list.advantages, from_tensor.advantages)


@pytest.mark.parametrize(
    "dtype",
    [
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
        torch.int32,
        torch.int64,
        torch.bool,
    ],
)
def test_result_dtypes_and_shapes_follow_the_contract(dtype: torch.dtype) -> None:
    rewards = torch.tensor([1, 0, 0, 1, 1, 0, 1, 1, 0]).to(dtype)
    result = advantages(
        rewards,
        torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2]),
        bundle_size=2,
        generator=torch.Generator().manual_seed(0),
    )
    assert result.advantages.dtype == torch.float32 and result.advantages.shape == (9,)
    assert result.bundle_ids.dtype == torch.int64 and result.member_ids.dtype == torch.int64
    assert result.scores.dtype == torch.float32 and tuple(result.scores.shape) == (2, 3)
    assert result.quantiles.dtype == torch.float32 and tuple(result.quantiles.shape) == (2, 2)
    assert result.metrics["num_questions"] == 3 and result.metrics["group_size"] == 3


# ----------------------------------------------------------------------------
# property tests against the oracle
# ----------------------------------------------------------------------------
REWARD_KINDS = ("binary", "small_int", "grid", "continuous")
ALPHAS = (0.0, 0.1, 0.2, 0.25, 0.5)
BETAS = (0.5, 0.75, 0.8, 0.9, 1.0)


def draw_rewards(kind: str, count: int, rng: random.Random) -> list[float]:
    """Rewards of one kind; every kind but "continuous" sums exactly in float32."""
    if kind == "binary":
        p = rng.random()
        return [1.0 if rng.random() < p else 0.0 for _ in range(count)]
    if kind == "small_int":
        return [float(rng.randint(-3, 3)) for _ in range(count)]
    if kind == "grid":
        return [rng.randint(-64, 64) / 64.0 for _ in range(count)]
    return [rng.uniform(-2.0, 2.0) for _ in range(count)]


@st.composite
def advantage_cases(draw: st.DrawFn) -> dict[str, Any]:
    """A random problem: sizes, rewards, labels and a full option set."""
    q_count = draw(st.integers(1, 7))
    g = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    kind = draw(st.sampled_from(REWARD_KINDS))
    variant = dict(draw(st.sampled_from(ALL_VARIANTS)))
    alpha = draw(st.sampled_from(ALPHAS))
    beta = draw(st.sampled_from([b for b in BETAS if b > alpha]))
    needs_alpha = variant["estimator"] == "cvar" or variant.get("form") == "reference_code"
    if needs_alpha and alpha == 0.0:
        alpha = 0.1
    if variant["estimator"] == "upper" and beta == 1.0:
        beta = 0.9
    options: dict[str, Any] = {
        **variant,
        "bundle_size": draw(st.integers(1, 6)),
        "alpha": alpha,
        "beta": beta,
        "omega": draw(st.sampled_from([0.0, 0.5, 1.0])),
        "w_mix": draw(st.sampled_from([1.5, 0.5])),
        "w_upper": draw(st.sampled_from([1.5, 3.0])),
        "normalize": draw(st.booleans()),
        "center": draw(st.booleans()),
        "credit": draw(st.sampled_from(["uniform", "std", "score", "sum_mean"])),
        "score": draw(st.sampled_from(["sum", "mean"])),
        "shuffle": draw(st.booleans()),
        "drop_last": draw(st.booleans()),
    }
    tracker_mode = draw(st.sampled_from(["empirical", "empirical", "fresh", "warm"]))
    rng = random.Random(seed)
    labels = rng.sample(range(-50, 500), q_count)
    qids = [labels[n // g] for n in range(q_count * g)]
    rng.shuffle(qids)
    rewards = draw_rewards(kind, len(qids), rng)
    return {
        "qids": qids,
        "rewards": rewards,
        "kind": kind,
        "seed": seed,
        "options": options,
        "tracker_mode": tracker_mode,
    }


def check_against_oracle(
    case: dict[str, Any], rewards: torch.Tensor, backend: str, *, check_norm: bool | None = None
) -> None:
    """Run ``advantages`` on a case and compare every output with the oracle.

    ``check_norm`` (default: for exact reward kinds and quantiles) adds the global relative-error check
    of :func:`assert_matches_oracle`; the elementwise scale-based bounds always apply.
    """
    options = dict(case["options"])
    qids = case["qids"]
    kind = case["kind"]
    risk = options["estimator"] not in ("grpo", "dr_grpo", "rloo")
    tracker = None
    tracker_before: tuple[float, float] | None = None
    if risk and case["tracker_mode"] != "empirical":
        options["drop_last"] = False  # whether dropped scores feed the tracker is open
        tracker = QuantileTracker(alpha=options["alpha"], beta=options["beta"], gamma=0.1)
        if case["tracker_mode"] == "warm":
            tracker.update(torch.tensor([0.0, 1.0, 2.0, 0.5, -1.0]))
            tracker_before = tuple(as_floats(tracker.values))
        options.update(quantile="tracker", tracker=tracker)
    result = advantages(
        rewards,
        torch.tensor(qids),
        **options,
        generator=torch.Generator().manual_seed(case["seed"]),
        backend=backend,
    )
    values = as_floats(rewards)
    bundle_ids = result.bundle_ids.tolist()
    member_ids = result.member_ids.tolist()
    g = len(qids) // len(set(qids))
    q_count = len(set(qids))
    if risk:
        assert bundling_problems(qids, bundle_ids, member_ids, options["bundle_size"]) == []
        if not options["shuffle"]:
            assert (bundle_ids, member_ids) == sequential_bundling(qids, options["bundle_size"])
    else:
        assert (bundle_ids, member_ids) == per_question_bundling(qids)
    dropped: list[int] = []
    if risk and options["drop_last"] and q_count % options["bundle_size"]:
        sizes: dict[int, set[int]] = {}
        for n, b in enumerate(bundle_ids):
            sizes.setdefault(b, set()).add(qids[n])
        dropped = [b for b, qs in sizes.items() if len(qs) < options["bundle_size"]]
    quantile_override = None
    pooled: list[float] = []
    if tracker is not None:
        scores, _ = member_scores(values, qids, bundle_ids, member_ids, options["score"])
        pooled = [s for label in sorted(scores) for s in scores[label]]
        quantile_override = tracker_before or (
            linear_quantile(pooled, options["alpha"]),
            linear_quantile(pooled, options["beta"]),
        )
    ref = oracle_advantages_detailed(
        values,
        qids,
        bundle_ids,
        member_ids,
        **oracle_kwargs(options),
        quantiles=quantile_override,
        dropped_bundles=dropped,
    )
    context = f"kind={kind} options={options}"
    if check_norm is None:
        # Exact rewards and quantiles only: a warm tracker's float32 quantiles (-0.61, say)
        # make (z - a) inexact, and centring can then cancel the advantages down to their
        # rounding (the elementwise bounds still apply).
        check_norm = kind in ("binary", "small_int") and case["tracker_mode"] != "warm"
    assert_matches_oracle(result.advantages, ref, check_norm=check_norm, context=context)
    if risk:
        for label, s in ref.scores.items():
            got = as_floats(result.scores[label])
            for j, value in enumerate(s):
                assert abs(got[j] - value) <= 1e-6 * max(1.0, abs(value)), context
            if label in dropped:
                continue
            a, b = ref.quantiles[label]
            qa, qb = as_floats(result.quantiles[label])
            magnitude = max([1.0] + [abs(x) for x in s] + [abs(a), abs(b)])
            assert abs(qa - a) <= 1e-5 * magnitude and abs(qb - b) <= 1e-5 * magnitude, context
    else:
        for n, r in enumerate(values):
            assert as_floats(result.scores[bundle_ids[n]])[member_ids[n]] == pytest.approx(r)
    assert result.metrics["num_questions"] == q_count
    assert result.metrics["group_size"] == g
    assert result.metrics["num_bundles"] == len(set(bundle_ids))
    dropped_count = sum(1 for b in bundle_ids if b in dropped)
    assert result.metrics["dropped_response_frac"] == pytest.approx(dropped_count / len(qids))
    got_values = as_floats(result.advantages)
    size = max([1.0] + [abs(x) for x in got_values])
    assert result.metrics["advantage_mean"] == pytest.approx(
        sum(got_values) / len(got_values), abs=1e-6 * size
    )
    score_values = as_floats(result.scores.flatten())
    assert result.metrics["score_mean"] == pytest.approx(
        sum(score_values) / len(score_values), rel=1e-5, abs=1e-6
    )
    if risk and not dropped:
        rows = result.quantiles.to(torch.float64)
        assert result.metrics["quantile_alpha"] == pytest.approx(rows[:, 0].mean().item(), abs=1e-5)
        assert result.metrics["quantile_beta"] == pytest.approx(rows[:, 1].mean().item(), abs=1e-5)
    if tracker is not None:
        expected = oracle_tracker_update(
            quantile_override, pooled, options["alpha"], options["beta"], 0.1
        )
        got = as_floats(tracker.values)
        for e, v in zip(expected, got, strict=True):
            assert abs(e - v) <= 1e-5 * max([1.0] + [abs(x) for x in pooled]), context


@settings(max_examples=300)
@given(case=advantage_cases())
def test_advantages_match_oracle_on_random_problems(case: dict[str, Any]) -> None:
    rewards = torch.tensor(case["rewards"], dtype=torch.float32)
    check_against_oracle(case, rewards, "torch")


@settings(max_examples=60)
@given(case=advantage_cases())
def test_triton_backend_matches_oracle_on_random_problems(case: dict[str, Any]) -> None:
    # fewer examples: each kernel launch runs in the Triton interpreter (~0.15 s a call)
    rewards = torch.tensor(case["rewards"], dtype=torch.float32)
    check_against_oracle(case, rewards, "triton")


DTYPES = (
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.int32,
    torch.int64,
    torch.bool,
)


def check_dtype_case(case: dict[str, Any], dtype: torch.dtype, backend: str) -> None:
    """Cast the case's rewards to ``dtype`` (the oracle sees the cast values) and compare."""
    if dtype == torch.bool:
        case["rewards"] = [float(r > 0) for r in case["rewards"]]
        case["kind"] = "binary"
    elif not dtype.is_floating_point:
        case["rewards"] = [float(round(r * 2)) for r in case["rewards"]]
        case["kind"] = "small_int"
    rewards = torch.tensor(case["rewards"], dtype=torch.float64).to(dtype)
    check_against_oracle(case, rewards, backend)


@settings(max_examples=200)
@given(case=advantage_cases(), dtype=st.sampled_from(DTYPES))
def test_advantages_match_oracle_for_every_reward_dtype(
    case: dict[str, Any], dtype: torch.dtype
) -> None:
    check_dtype_case(case, dtype, "torch")


@settings(max_examples=40)
@given(case=advantage_cases(), dtype=st.sampled_from(DTYPES))
def test_triton_backend_matches_oracle_for_every_reward_dtype(
    case: dict[str, Any], dtype: torch.dtype
) -> None:
    check_dtype_case(case, dtype, "triton")


def test_oracle_quantile_follows_torch_quantile_definition() -> None:
    # guards the oracle itself: its hand-written quantile is torch.quantile's linear rule
    rng = random.Random(0)
    for size in range(1, 12):
        values = [rng.choice([0.0, 1.0, 2.5, -3.0, rng.random()]) for _ in range(size)]
        for level in (0.0, 0.1, 0.2, 0.25, 0.5, 0.8, 0.9, 1.0):
            expected = torch.quantile(torch.tensor(values, dtype=torch.float64), level).item()
            assert linear_quantile(values, level) == pytest.approx(expected, abs=1e-12)
    assert questions_in_order([5, 2, 5, 1, 2]) == [5, 2, 1]


LARGE_CASES = [(v, "torch") for v in ALL_VARIANTS] + [
    (RISK_VARIANTS[0], "triton"),
    (RISK_VARIANTS[6], "triton"),
]


@pytest.mark.parametrize(
    ("variant", "backend"),
    LARGE_CASES,
    ids=[f"{variant_id(v)}-{b}" for v, b in LARGE_CASES],
)
def test_large_problem_matches_oracle(variant: dict[str, Any], backend: str) -> None:
    rng = random.Random(8)
    q_count, g = 48, 16
    qids = [n // g for n in range(q_count * g)]
    rng.shuffle(qids)
    rewards = [float(rng.random() < 0.3) for _ in qids]
    for q in (3, 11):  # two all-equal questions
        for n, label in enumerate(qids):
            if label == q:
                rewards[n] = 1.0
    result = run(
        rewards,
        qids,
        bundle_size=5,
        generator=torch.Generator().manual_seed(8),
        center=True,
        backend=backend,
        **variant,
    )
    ref = oracle_advantages_detailed(
        rewards,
        qids,
        result.bundle_ids.tolist(),
        result.member_ids.tolist(),
        **oracle_kwargs({**variant, "center": True}),
    )
    assert_matches_oracle(result.advantages, ref, check_norm=True)


SCALE_CASES = [
    (v, scale, "torch") for v in RISK_VARIANTS + MEAN_VARIANTS[:1] for scale in (1e6, 1e18, 1e25)
] + [(v, scale, "triton") for v in (RISK_VARIANTS[0], MEAN_VARIANTS[0]) for scale in (1e6, 1e25)]


@pytest.mark.parametrize(
    ("variant", "scale", "backend"),
    SCALE_CASES,
    ids=[f"{variant_id(v)}-{s:g}-{b}" for v, s, b in SCALE_CASES],
)
def test_normalised_advantages_do_not_depend_on_reward_scale(
    variant: dict[str, Any], scale: float, backend: str
) -> None:
    # Normalised risk advantages are homogeneous of degree 0 in the rewards (up to the
    # 1e-6 in the denominator): a variance that overflows float32 would zero them.
    rng = random.Random(2)
    qids = [n // 4 for n in range(6 * 4)]
    base = [float(rng.randint(0, 3)) for _ in qids]
    small = run(
        base,
        qids,
        bundle_size=2,
        generator=torch.Generator().manual_seed(0),
        backend=backend,
        **variant,
    )
    large = run(
        [r * scale for r in base],
        qids,
        bundle_size=2,
        backend=backend,
        generator=torch.Generator().manual_seed(0),
        **variant,
    )
    assert torch.isfinite(large.advantages).all()
    torch.testing.assert_close(large.advantages, small.advantages, rtol=1e-5, atol=1e-5)


def test_result_is_frozen() -> None:
    result = run(TWO_Q_REWARDS, TWO_Q_IDS, bundle_size=2, shuffle=False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.advantages = torch.zeros(6)  # type: ignore[misc]


def test_strided_inputs_and_int32_question_ids_give_the_same_result() -> None:
    rewards = torch.tensor([1.0, 9.0, 0.0, 9.0, 0.0, 9.0, 1.0, 9.0, 1.0, 9.0, 0.0, 9.0])[::2]
    qids = torch.tensor([4, 0, 4, 0, 4, 0, 8, 0, 8, 0, 8, 0])[::2]
    assert not rewards.is_contiguous()
    strided = advantages(rewards, qids, bundle_size=2, shuffle=False)
    plain = advantages(
        rewards.contiguous(), qids.contiguous().to(torch.int32), bundle_size=2, shuffle=False
    )
    assert torch.equal(strided.advantages, plain.advantages)
    expected = oracle_advantages_detailed(
        rewards.tolist(), qids.tolist(), *sequential_bundling(qids.tolist(), 2)
    )
    assert_matches_oracle(strided.advantages, expected, check_norm=True)


def test_explicit_bundling_draws_nothing_from_the_generator() -> None:
    gen = torch.Generator().manual_seed(3)
    state = gen.get_state()
    advantages(
        torch.tensor(TWO_Q_REWARDS),
        torch.tensor(TWO_Q_IDS),
        generator=gen,
        bundle_ids=torch.zeros(6, dtype=torch.int64),
        member_ids=torch.tensor([0, 1, 2, 2, 1, 0]),
    )
    assert torch.equal(gen.get_state(), state)


def test_drawn_bundlings_are_uniform_over_seeds() -> None:
    # Q = 6, B = 2, G = 3. Over 600 seeds: P(q0 and q1 share a bundle) = 1/5,
    # P(first response of q0 is member 0) = 1/3, P(first responses of q0 and q1 are the
    # same member) = 1/3. Tolerances are over 4 standard deviations (sd <= 0.02).
    qids = torch.arange(6).repeat_interleave(3)
    rewards = torch.arange(18, dtype=torch.float32) % 2
    same_bundle = member_zero = same_member = 0
    draws = 600
    for seed in range(draws):
        result = advantages(
            rewards, qids, bundle_size=2, generator=torch.Generator().manual_seed(seed)
        )
        bundles, members = result.bundle_ids.tolist(), result.member_ids.tolist()
        same_bundle += bundles[0] == bundles[3]
        member_zero += members[0] == 0
        same_member += members[0] == members[3]
    assert abs(same_bundle / draws - 0.2) < 0.07
    assert abs(member_zero / draws - 1 / 3) < 0.08
    assert abs(same_member / draws - 1 / 3) < 0.08
