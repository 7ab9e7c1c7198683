"""Bad inputs are refused with errors that name the argument; extreme finite inputs stay finite.

Spec section 5 and the API contract's error lists.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from riskfast.riskpo import QuantileTracker, advantages, policy_loss

REWARDS = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
QIDS = torch.tensor([0, 0, 0, 1, 1, 1])


def make_tokens(n: int = 3, t: int = 4) -> dict[str, torch.Tensor]:
    """A small valid policy-loss problem."""
    gen = torch.Generator().manual_seed(0)
    return {
        "logp": -torch.rand(n, t, generator=gen),
        "old_logp": -torch.rand(n, t, generator=gen),
        "advantages": torch.randn(n, generator=gen),
        "mask": torch.ones(n, t),
    }


# ----------------------------------------------------------------------------
# advantages: ValueError naming the argument
# ----------------------------------------------------------------------------
ADVANTAGE_VALUE_ERRORS: list[tuple[str, dict[str, Any], str]] = [
    ("nan_reward", {"rewards": torch.tensor([1.0, float("nan"), 0, 1, 0, 0])}, "rewards"),
    ("inf_reward", {"rewards": torch.tensor([1.0, float("inf"), 0, 1, 0, 0])}, "rewards"),
    ("neg_inf_reward", {"rewards": torch.tensor([1.0, -float("inf"), 0, 1, 0, 0])}, "rewards"),
    ("alpha_below_zero", {"alpha": -0.1}, "alpha"),
    ("alpha_above_one", {"alpha": 1.5, "beta": 1.0}, "alpha"),
    ("beta_above_one", {"beta": 1.2}, "beta"),
    ("beta_below_zero", {"alpha": 0.0, "beta": -0.5}, "beta"),
    ("alpha_equals_beta", {"alpha": 0.5, "beta": 0.5}, "alpha|beta"),
    ("alpha_above_beta", {"alpha": 0.8, "beta": 0.2}, "alpha|beta"),
    ("cvar_alpha_zero", {"estimator": "cvar", "alpha": 0.0}, "alpha"),
    ("reference_code_alpha_zero", {"form": "reference_code", "alpha": 0.0}, "alpha"),
    ("upper_beta_one", {"estimator": "upper", "beta": 1.0}, "beta"),
    ("question_ids_shape", {"question_ids": torch.tensor([0, 0, 0, 1, 1])}, "question_ids"),
    (
        "rewards_two_dim",
        {"rewards": REWARDS.view(2, 3), "question_ids": QIDS.view(2, 3)},
        "rewards|question_ids",
    ),
    ("bundle_size_zero", {"bundle_size": 0}, "bundle_size"),
    ("bundle_size_negative", {"bundle_size": -2}, "bundle_size"),
    ("unknown_estimator", {"estimator": "ppo"}, "estimator"),
    ("unknown_form", {"form": "papers"}, "form"),
    ("unknown_credit", {"credit": "token"}, "credit"),
    ("unknown_score", {"score": "max"}, "score"),
    ("unknown_quantile", {"quantile": "kde"}, "quantile"),
    ("tracker_missing", {"quantile": "tracker"}, "tracker"),
    (
        "tracker_levels_differ",
        {"quantile": "tracker", "tracker": QuantileTracker(alpha=0.1, beta=0.8)},
        "tracker",
    ),
    (
        "member_ids_not_permutation",
        {
            "bundle_ids": torch.zeros(6, dtype=torch.int64),
            "member_ids": torch.tensor([0, 0, 1, 0, 1, 2]),
        },
        "member_ids",
    ),
    (
        "member_ids_out_of_range",
        {
            "bundle_ids": torch.zeros(6, dtype=torch.int64),
            "member_ids": torch.tensor([0, 1, 3, 0, 1, 2]),
        },
        "member_ids",
    ),
    (
        "question_split_over_bundles",
        {
            "bundle_ids": torch.tensor([0, 0, 1, 1, 1, 1]),
            "member_ids": torch.tensor([0, 1, 2, 0, 1, 2]),
        },
        "bundle_ids",
    ),
    (
        "bundle_ids_shape",
        {
            "bundle_ids": torch.zeros(5, dtype=torch.int64),
            "member_ids": torch.tensor([0, 1, 2, 0, 1, 2]),
        },
        "bundle_ids",
    ),
    (
        "empty_input",
        {"rewards": torch.zeros(0), "question_ids": torch.zeros(0, dtype=torch.int64)},
        "rewards",
    ),
]


@pytest.mark.parametrize(
    ("overrides", "name"),
    [(c[1], c[2]) for c in ADVANTAGE_VALUE_ERRORS],
    ids=[c[0] for c in ADVANTAGE_VALUE_ERRORS],
)
def test_advantages_rejects_bad_input_naming_the_argument(
    overrides: dict[str, Any], name: str
) -> None:
    kwargs: dict[str, Any] = {"rewards": REWARDS, "question_ids": QIDS, "bundle_size": 2}
    kwargs.update(overrides)
    rewards = kwargs.pop("rewards")
    qids = kwargs.pop("question_ids")
    with pytest.raises(ValueError, match=name):
        advantages(rewards, qids, **kwargs)


def test_rejected_call_leaves_tracker_and_generator_untouched() -> None:
    tracker = QuantileTracker(alpha=0.2, beta=0.8)
    gen = torch.Generator().manual_seed(5)
    state = gen.get_state()
    bad = torch.tensor([1.0, float("nan"), 0, 1, 0, 0])
    with pytest.raises(ValueError, match="rewards"):
        advantages(bad, QIDS, quantile="tracker", tracker=tracker, generator=gen)
    assert not tracker.initialized and tracker.values is None
    assert torch.equal(gen.get_state(), state)


def test_unequal_group_sizes_name_the_offending_question() -> None:
    rewards = torch.tensor([1.0, 0, 1, 0, 1, 0, 1, 0])
    qids = torch.tensor([5, 5, 5, 8, 8, 8, 11, 11])  # question 11 has 2 responses, others 3
    with pytest.raises(ValueError, match="11"):
        advantages(rewards, qids)


def test_mismatched_devices_are_rejected() -> None:
    qids = QIDS.to("meta")
    with pytest.raises(ValueError, match="device|question_ids"):
        advantages(REWARDS, qids)


ADVANTAGE_TYPE_ERRORS: list[tuple[str, Any, Any, str]] = [
    ("string_rewards", "101100", QIDS, "rewards"),
    ("nested_list_of_strings_rewards", ["a", "b", "c", "d", "e", "f"], QIDS, "rewards"),
    ("float_question_ids", REWARDS, QIDS.to(torch.float32), "question_ids"),
    ("complex_rewards", REWARDS.to(torch.complex64), QIDS, "rewards"),
    ("string_question_ids", REWARDS, "abc", "question_ids"),
]


@pytest.mark.parametrize(
    ("rewards", "qids", "name"),
    [c[1:] for c in ADVANTAGE_TYPE_ERRORS],
    ids=[c[0] for c in ADVANTAGE_TYPE_ERRORS],
)
def test_advantages_rejects_wrong_types_naming_the_argument(
    rewards: Any, qids: Any, name: str
) -> None:
    with pytest.raises(TypeError, match=name):
        advantages(rewards, qids)


def test_float_bundle_ids_are_a_type_error() -> None:
    with pytest.raises((TypeError, ValueError), match="bundle_ids"):
        advantages(
            REWARDS, QIDS, bundle_ids=torch.zeros(6), member_ids=torch.tensor([0, 1, 2, 0, 1, 2])
        )


# ----------------------------------------------------------------------------
# policy_loss errors
# ----------------------------------------------------------------------------
POLICY_VALUE_ERRORS: list[tuple[str, dict[str, Any], str]] = [
    ("old_logp_shape", {"old_logp": torch.zeros(3, 5)}, "old_logp"),
    ("mask_shape", {"mask": torch.ones(3, 5)}, "mask"),
    ("advantages_shape", {"advantages": torch.zeros(4)}, "advantages"),
    ("advantages_token_shape", {"advantages": torch.zeros(3, 5)}, "advantages"),
    ("ref_logp_shape", {"ref_logp": torch.zeros(2, 4), "beta_kl": 0.1}, "ref_logp"),
    ("entropy_shape", {"entropy": torch.zeros(3, 3), "entropy_coef": 0.1}, "entropy"),
    ("logp_one_dim", {"logp": torch.zeros(12)}, "logp"),
    ("unknown_ratio_level", {"ratio_level": "batch"}, "ratio_level"),
    ("unknown_agg", {"agg": "sum"}, "agg"),
    ("eps_low_negative", {"eps_low": -0.1}, "eps_low"),
    ("eps_high_negative", {"eps_high": -0.1}, "eps_high"),
    ("dual_clip_one", {"dual_clip": 1.0}, "dual_clip"),
    ("dual_clip_below_one", {"dual_clip": 0.5}, "dual_clip"),
    ("beta_kl_without_ref", {"beta_kl": 0.1}, "ref_logp|beta_kl"),
    ("num_items_zero", {"num_items": 0}, "num_items"),
    ("num_items_negative", {"num_items": -3}, "num_items"),
    ("max_len_zero", {"agg": "seq-mean-token-sum-norm", "max_len": 0}, "max_len"),
    ("old_logp_device", {"old_logp": torch.zeros(3, 4, device="meta")}, "old_logp|device"),
]


@pytest.mark.parametrize(
    ("overrides", "name"),
    [(c[1], c[2]) for c in POLICY_VALUE_ERRORS],
    ids=[c[0] for c in POLICY_VALUE_ERRORS],
)
def test_policy_loss_rejects_bad_input_naming_the_argument(
    overrides: dict[str, Any], name: str
) -> None:
    kwargs: dict[str, Any] = make_tokens()
    kwargs.update(overrides)
    tensors = [kwargs.pop(k) for k in ("logp", "old_logp", "advantages", "mask")]
    with pytest.raises(ValueError, match=name):
        policy_loss(*tensors, **kwargs)


@pytest.mark.parametrize("position", ["logp", "old_logp", "advantages", "mask"])
def test_policy_loss_rejects_non_tensors_naming_the_argument(position: str) -> None:
    kwargs: dict[str, Any] = make_tokens()
    kwargs[position] = kwargs[position].tolist()
    tensors = [kwargs.pop(k) for k in ("logp", "old_logp", "advantages", "mask")]
    with pytest.raises(TypeError, match=position):
        policy_loss(*tensors, **kwargs)


def test_policy_loss_rejects_non_tensor_ref_logp() -> None:
    kwargs: dict[str, Any] = make_tokens()
    with pytest.raises(TypeError, match="ref_logp"):
        policy_loss(
            kwargs["logp"],
            kwargs["old_logp"],
            kwargs["advantages"],
            kwargs["mask"],
            ref_logp=[[0.0] * 4] * 3,
            beta_kl=0.1,
        )


# ----------------------------------------------------------------------------
# finite extremes never give NaN or inf
# ----------------------------------------------------------------------------
EXTREME_REWARDS: list[tuple[str, list[float], list[int]]] = [
    ("all_equal", [0.3] * 8, [0, 0, 0, 0, 1, 1, 1, 1]),
    ("group_size_one", [0.0, 1.0, 5.0], [0, 1, 2]),
    ("single_response", [1.0], [0]),
    ("huge_scale_1e18", [1e18, -1e18, 3e17, 0.0, 1e18, 1e18], [0, 0, 0, 1, 1, 1]),
    ("huge_scale_1e30", [1e30, -1e30, 3e29, 0.0, 1e30, 1e30], [0, 0, 0, 1, 1, 1]),
    ("tiny_differences", [1.0, 1.0 + 2**-23, 1.0, 1.0, 1.0, 1.0 - 2**-24], [0, 0, 0, 1, 1, 1]),
    ("subnormal", [1e-40, 0.0, 2e-40, 0.0, 0.0, 1e-40], [0, 0, 0, 1, 1, 1]),
]
ESTIMATOR_OPTIONS: list[dict[str, Any]] = [
    {"estimator": "mvar"},
    {"estimator": "mvar", "form": "reference_code"},
    {"estimator": "rvar"},
    {"estimator": "cvar"},
    {"estimator": "upper"},
    {"estimator": "grpo"},
    {"estimator": "dr_grpo"},
    {"estimator": "rloo"},
    {"estimator": "mvar", "credit": "std", "center": True},
    {"estimator": "mvar", "alpha": 0.0, "beta": 1.0, "score": "mean"},
]


@pytest.mark.parametrize(
    ("rewards", "qids"), [c[1:] for c in EXTREME_REWARDS], ids=[c[0] for c in EXTREME_REWARDS]
)
@pytest.mark.parametrize("options", ESTIMATOR_OPTIONS, ids=lambda o: "-".join(map(str, o.values())))
def test_extreme_finite_rewards_give_finite_advantages(
    rewards: list[float], qids: list[int], options: dict[str, Any]
) -> None:
    result = advantages(
        torch.tensor(rewards, dtype=torch.float32),
        torch.tensor(qids),
        bundle_size=2,
        generator=torch.Generator().manual_seed(0),
        **options,
    )
    assert torch.isfinite(result.advantages).all(), result.advantages
    assert torch.isfinite(result.scores).all(), result.scores
    for key, value in result.metrics.items():
        assert math.isfinite(value), (key, value)


def test_all_equal_and_single_response_inputs_give_zero_advantages() -> None:
    for rewards, qids in ((EXTREME_REWARDS[0][1], EXTREME_REWARDS[0][2]), ([1.0], [0])):
        result = advantages(torch.tensor(rewards), torch.tensor(qids))
        assert torch.equal(result.advantages, torch.zeros(len(rewards)))


def test_float64_rewards_beyond_float32_range_are_refused_or_stay_finite() -> None:
    rewards = torch.tensor([1e300, 0.0, 1.0, 0.0], dtype=torch.float64)
    try:
        result = advantages(rewards, torch.tensor([0, 0, 1, 1]))
    except ValueError as error:
        assert "rewards" in str(error)
    else:
        assert torch.isfinite(result.advantages).all(), result.advantages


@pytest.mark.parametrize("ratio_level", ["sequence", "token"])
@pytest.mark.parametrize(
    "agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
)
def test_extreme_policy_inputs_give_finite_loss_and_gradients(ratio_level: str, agg: str) -> None:
    n, t = 4, 5
    logp = torch.zeros(n, t)
    logp[0] = 1e4  # log-ratio +1e4
    logp[1] = -1e4  # log-ratio -1e4
    logp.requires_grad_(True)
    old_logp = torch.zeros(n, t)
    ref_logp = torch.zeros(n, t)
    ref_logp[2] = 1e4
    mask = torch.ones(n, t)
    mask[3] = 0  # a length-0 response
    adv = torch.tensor([1e3, -1e3, -1.0, 2.0])
    entropy = torch.full((n, t), 1e4, requires_grad=True)
    loss, metrics = policy_loss(
        logp,
        old_logp,
        adv,
        mask,
        ratio_level=ratio_level,
        agg=agg,
        dual_clip=3.0,
        ref_logp=ref_logp,
        beta_kl=0.1,
        entropy=entropy,
        entropy_coef=0.01,
    )
    assert torch.isfinite(loss), loss
    loss.backward()
    assert torch.isfinite(logp.grad).all() and torch.isfinite(entropy.grad).all()
    for key, value in metrics.items():
        assert math.isfinite(value), (key, value)


@pytest.mark.parametrize("ratio_level", ["sequence", "token"])
@pytest.mark.parametrize(
    "agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
)
def test_no_response_tokens_give_zero_loss_and_zero_gradient(ratio_level: str, agg: str) -> None:
    logp = torch.randn(3, 4, requires_grad=True)
    loss, metrics = policy_loss(
        logp, torch.randn(3, 4), torch.randn(3), torch.zeros(3, 4), ratio_level=ratio_level, agg=agg
    )
    assert loss.item() == 0.0
    loss.backward()
    assert logp.grad is not None and torch.equal(logp.grad, torch.zeros(3, 4))
    for key, value in metrics.items():
        assert math.isfinite(value), (key, value)


def test_single_token_single_response_is_finite() -> None:
    logp = torch.tensor([[-0.5]], requires_grad=True)
    loss, _ = policy_loss(logp, torch.tensor([[-0.7]]), torch.tensor([1.0]), torch.ones(1, 1))
    loss.backward()
    # ratio exp(0.2) = 1.2214 > 1.2 with A = 1 > 0: clipped, loss -1.2, no gradient
    assert loss.item() == pytest.approx(-1.2, rel=1e-6)
    assert logp.grad is not None and logp.grad.item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_give_finite_float32_loss(dtype: torch.dtype) -> None:
    tokens = make_tokens(4, 6)
    logp = tokens["logp"].to(dtype).requires_grad_(True)
    loss, _ = policy_loss(
        logp, tokens["old_logp"].to(dtype), tokens["advantages"].to(dtype), tokens["mask"]
    )
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert logp.grad is not None and logp.grad.dtype == dtype
    assert torch.isfinite(logp.grad.float()).all()


def test_advantages_accept_plain_lists_like_tensors() -> None:
    """Lists of numbers are a convenience for both rewards and question_ids."""
    from_lists = advantages([1.0, 0.0, 1.0, 1.0, 0.0, 0.0], [0, 0, 0, 1, 1, 1], shuffle=False)
    from_tensors = advantages(
        torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0]), torch.tensor([0, 0, 0, 1, 1, 1]), shuffle=False
    )
    assert torch.equal(from_lists.advantages, from_tensors.advantages)


def test_entropy_bonus_without_entropy_names_entropy() -> None:
    logp = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="entropy"):
        policy_loss(logp, logp, torch.ones(2), torch.ones(2, 3), entropy_coef=0.1)


@pytest.mark.parametrize("given", ["bundle_ids", "member_ids"])
def test_half_an_explicit_bundling_names_the_missing_half(given: str) -> None:
    missing = "member_ids" if given == "bundle_ids" else "bundle_ids"
    with pytest.raises(ValueError, match=missing):
        advantages(REWARDS, QIDS, **{given: torch.zeros_like(QIDS)})
