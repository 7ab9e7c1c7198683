"""Spec section 5 for every public RiskPO entry point (issue 11, "RiskPO hardening").

One section per class of hole the issue found; each test names the behaviour it proves:

1. finite input never gives NaN or inf (length-0 responses, tiny normalisers, overflow,
   the +-20 log-ratio clamp);
2. non-finite input is refused with an error naming the argument (and padding outside
   the response mask reaches neither the loss nor a gradient);
3. options are validated when a class is constructed, with the functions' errors;
4. a rejected call changes no state (generators, trackers, caller tensors) and a
   retried step equals an uninterrupted run;
5. checkpoints carry the options that shape their state;
6. integers beyond int64 and numbers beyond the float range are named errors.

The quantile tracker's own cases are in ``tests/test_quantile_tracker.py``; random
inputs in ``tests/test_fuzz_riskpo.py``.
"""

from __future__ import annotations

import copy
import io
import math
from typing import Any

import pytest
import torch
from oracles.riskpo_oracle import oracle_policy_loss_detailed

import riskfast
from riskfast.ops import selective_logprobs
from riskfast.riskpo import QuantileTracker, advantages, policy_loss

AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
RATIO_LEVELS = ["sequence", "token"]
E20 = math.exp(20.0)


def tokens(n: int = 3, t: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """A small valid policy-loss problem (every token a response token)."""
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(n, t, generator=gen) * 2
    return {
        "logp": old + 0.3 * (torch.rand(n, t, generator=gen) - 0.5),
        "old_logp": old,
        "advantages": torch.randn(n, generator=gen),
        "mask": torch.ones(n, t),
    }


# ================================================================ 1. finite in, finite out
@pytest.mark.parametrize("ratio_level", RATIO_LEVELS)
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("num_items", [None, 3.0])
def test_length_zero_responses_give_loss_zero_and_zero_gradients(
    ratio_level: str, agg: str, num_items: float | None
) -> None:
    # T = 0: seq-mean-token-sum-norm used to divide 0 by T = 0 (NaN).
    logp = torch.zeros(3, 0, requires_grad=True)
    loss, metrics = policy_loss(
        logp,
        torch.zeros(3, 0),
        torch.tensor([1.0, -2.0, 0.5]),
        torch.zeros(3, 0, dtype=torch.bool),
        ratio_level=ratio_level,
        agg=agg,
        num_items=num_items,
        entropy=torch.zeros(3, 0),
        ref_logp=torch.zeros(3, 0),
        beta_kl=0.1,
    )
    assert loss.item() == 0.0
    assert all(value == 0.0 for value in metrics.values()), metrics
    loss.backward()
    assert logp.grad is not None and logp.grad.shape == (3, 0)


def test_length_zero_responses_through_riskpo_loss() -> None:
    module = riskfast.RiskPOLoss(agg="seq-mean-token-sum-norm", bundle_size=2, seed=0)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    loss, metrics = module(
        torch.zeros(4, 0), torch.zeros(4, 0), torch.zeros(4, 0), rewards, group_size=2
    )
    assert loss.item() == 0.0
    assert all(math.isfinite(v) for v in metrics.values()), metrics


def test_tiny_num_items_is_refused_by_name_instead_of_returning_inf() -> None:
    problem = tokens()
    args = (problem["logp"], problem["old_logp"], problem["advantages"], problem["mask"])
    with pytest.raises(ValueError, match="^num_items: dividing"):
        policy_loss(*args, num_items=1e-40)
    # A small but usable normaliser is fine and equals the oracle.
    loss, _ = policy_loss(*args, num_items=1e-3)
    expected = oracle_policy_loss_detailed(*(x.double().tolist() for x in args), num_items=1e-3)[
        "loss"
    ]
    assert loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    ("overrides", "name"),
    [
        ({"advantages": torch.tensor([3e38, 1.0, 1.0])}, "advantages"),
        ({"token_weights": torch.tensor([3e38, 1.0, 1.0])}, "token_weights"),
        ({"entropy": torch.full((3, 4), 3e38), "entropy_coef": 10.0}, "entropy_coef"),
        ({"ref_logp": torch.full((3, 4), 30.0), "beta_kl": 1e32}, "beta_kl"),
    ],
    ids=["advantages", "token_weights", "entropy_coef", "beta_kl"],
)
def test_a_loss_that_overflows_names_the_input_to_rescale(
    overrides: dict[str, Any], name: str
) -> None:
    problem = tokens()
    problem["logp"] = problem["old_logp"] + 1.0  # every ratio e > 1
    problem.update(overrides)
    args = [problem.pop(k) for k in ("logp", "old_logp", "advantages", "mask")]
    with pytest.raises(ValueError, match=f"^{name}: .*overflows"):
        policy_loss(*args, ratio_level="token", eps_high=10.0, **problem)


def test_log_ratios_are_clamped_at_twenty_by_hand() -> None:
    # Token level: log-ratios 25 and -25, A = -1 then +1, eps 0.2.
    # r = exp(20): -A r = e^20 beats -A clip(r) = 1.2   -> pg = e^20
    # r = exp(-20): A = 1: -r = -e^-20 beats -0.8        -> pg = -e^-20
    logp = torch.tensor([[25.0], [-25.0]], dtype=torch.float64)
    old = torch.zeros(2, 1, dtype=torch.float64)
    adv = torch.tensor([-1.0, 1.0], dtype=torch.float64)
    mask = torch.ones(2, 1)
    ref = torch.tensor([[0.0], [0.0]], dtype=torch.float64)
    loss, metrics = policy_loss(
        logp, old, adv, mask, ratio_level="token", agg="seq-mean-token-sum", ref_logp=ref
    )
    assert loss.item() == pytest.approx((E20 - math.exp(-20.0)) / 2, rel=1e-12)
    assert metrics["ratio_mean"] == pytest.approx((E20 + math.exp(-20.0)) / 2, rel=1e-12)
    # approx_kl = mean((r - 1) - log r) with log r clamped: (e^20 - 21 + e^-20 + 19) / 2
    assert metrics["approx_kl"] == pytest.approx((E20 - 21 + math.exp(-20.0) + 19) / 2, rel=1e-12)
    # k3 with d = ref - logp = -25 and 25, clamped: (e^-20 + 19) and (e^20 - 21)
    assert metrics["kl"] == pytest.approx((math.exp(-20.0) + 19 + E20 - 21) / 2, rel=1e-12)
    # Sequence level: the mean log-ratio (30 + 24) / 2 = 27 is clamped to 20, and the clamp
    # stops the gradient.
    logp_seq = torch.tensor([[30.0, 24.0]], dtype=torch.float64, requires_grad=True)
    loss, metrics = policy_loss(
        logp_seq, torch.zeros(1, 2, dtype=torch.float64), torch.tensor([-1.0]), torch.ones(1, 2)
    )
    assert loss.item() == pytest.approx(E20, rel=1e-12)
    assert metrics["ratio_mean"] == pytest.approx(E20, rel=1e-12)
    loss.backward()
    assert torch.equal(logp_seq.grad, torch.zeros(1, 2, dtype=torch.float64))


def test_sequence_ratio_of_log_probs_near_the_float32_limit_stays_finite() -> None:
    # The four differences sum to 0, but a pairwise float32 sum of them overflows both
    # ways (inf + -inf = NaN) unless each is first bounded by max / (2T).
    logp = torch.tensor([[3e38, 3e38, -3e38, -3e38]], requires_grad=True)
    loss, metrics = policy_loss(logp, torch.zeros(1, 4), torch.tensor([-1.0]), torch.ones(1, 4))
    assert loss.item() == pytest.approx(1.0)  # mean log-ratio 0: ratio 1, -A * 1
    loss.backward()
    assert torch.isfinite(logp.grad).all()
    assert all(math.isfinite(v) for v in metrics.values()), metrics


def test_advantages_overflowing_float32_are_refused_or_zeroed() -> None:
    # Each reward is finite and every member score (B = 1) too, but z - a overflows.
    rewards = torch.tensor([3e38, -3e38, 0.0, 1e38])
    with pytest.raises(ValueError, match="^rewards: .*overflow"):
        advantages(rewards, group_size=4, bundle_size=1)
    result = advantages(rewards, group_size=4, bundle_size=1, validate=False)
    assert torch.equal(result.advantages, torch.zeros(4))
    # a weight so large that moderate rewards overflow: named through the rewards' scale
    with pytest.raises(ValueError, match="^rewards: .*overflow"):
        advantages(torch.tensor([0.0, 1.0, 2.0, 3.0]), group_size=4, omega=1e300)


def test_advantage_metrics_of_large_finite_advantages_are_finite() -> None:
    # Advantages near 1e20 are finite, but a float32 std of them squares past float32.
    rewards = torch.tensor([1e20, 0.0, 3e20, 2e20])
    result = advantages(rewards, group_size=4, bundle_size=1, normalize=False)
    assert torch.isfinite(result.advantages).all() and result.advantages.abs().max() > 1e19
    for key, value in result.metrics.items():
        assert math.isfinite(value), (key, value)
    assert result.metrics["advantage_std"] == pytest.approx(
        result.advantages.double().std(correction=0).item(), rel=1e-6
    )


# ========================================================== 2. non-finite input refused
@pytest.mark.parametrize("name", ["logp", "old_logp", "ref_logp", "entropy", "mask"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_token_inputs_are_refused_by_name(name: str, bad: float) -> None:
    problem = tokens()
    problem["ref_logp"] = problem["old_logp"].clone()
    problem["entropy"] = torch.rand(3, 4)
    problem[name] = problem[name].clone()
    problem[name][1, 2] = bad
    args = [problem.pop(k) for k in ("logp", "old_logp", "advantages", "mask")]
    with pytest.raises(ValueError, match=f"^{name}: holds non-finite values"):
        policy_loss(*args, beta_kl=0.1, entropy_coef=0.01, **problem)


def test_non_finite_padding_reaches_neither_the_loss_nor_a_gradient() -> None:
    # NaN and inf where mask = 0 (in every token input, KL and entropy terms on) give
    # the loss and gradients of zero padding; the KL's exp() used to turn a NaN there
    # into a NaN gradient through where().
    problem = tokens()
    mask = torch.ones(3, 4)
    mask[:, 3] = 0
    ref = problem["old_logp"] - 0.1
    entropy = torch.rand(3, 4)
    options = {"beta_kl": 0.1, "entropy_coef": 0.01, "agg": "seq-mean-token-mean"}
    results = []
    for fill in (0.0, float("nan"), float("inf")):
        pad = mask == 0
        logp = problem["logp"].masked_fill(pad, fill).requires_grad_(True)
        ent = entropy.masked_fill(pad, fill).requires_grad_(True)
        loss, _ = policy_loss(
            logp,
            problem["old_logp"].masked_fill(pad, -fill),
            problem["advantages"],
            mask,
            ref_logp=ref.masked_fill(pad, fill),
            entropy=ent,
            **options,
        )
        loss.backward()
        assert torch.isfinite(logp.grad).all() and torch.isfinite(ent.grad).all(), fill
        assert torch.equal(logp.grad[:, 3], torch.zeros(3)), fill
        results.append((loss.detach(), logp.grad.clone(), ent.grad.clone()))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_a_nan_logit_gives_a_nan_log_prob_that_policy_loss_refuses_by_name() -> None:
    # Logits are not scanned (a pass over [N, V] for every call); what they give is.
    logits = torch.randn(4, 7)
    logits[2, 5] = float("nan")
    logp = selective_logprobs(logits, torch.tensor([0, 1, 2, 3]), backend="torch")
    assert torch.isnan(logp[2]) and torch.isfinite(logp[[0, 1, 3]]).all()
    with pytest.raises(
        ValueError, match=r"^logp: holds non-finite values \(first positions \[\[2, 0\]\]"
    ):
        policy_loss(logp[:, None], logp.detach()[:, None], torch.ones(4), torch.ones(4, 1))


# ========================================================== 3. options at construction
LOSS_OPTION_ERRORS: list[tuple[str, Any, type[Exception]]] = [
    ("agg", "bogus", ValueError),
    ("ratio_level", "batch", ValueError),
    ("eps_low", -1, ValueError),
    ("eps_high", float("nan"), ValueError),
    ("eps_low", "0.2", TypeError),
    ("dual_clip", 1.0, ValueError),
    ("beta_kl", -0.1, ValueError),
    ("entropy_coef", float("inf"), ValueError),
    ("max_len", 0, ValueError),
    ("max_len", 2**63, ValueError),
    ("max_len", 4.0, TypeError),
]
ADVANTAGE_OPTION_ERRORS: list[tuple[str, Any, type[Exception]]] = [
    ("estimator", "ppo", ValueError),
    ("bundle_size", 0, ValueError),
    ("bundle_size", 2**63, ValueError),
    ("bundle_size", 2.0, TypeError),
    ("alpha", -0.1, ValueError),
    ("alpha", 10**400, ValueError),
    ("beta", 1.5, ValueError),
    ("omega", -1.0, ValueError),
    ("omega", 10**400, ValueError),
    ("form", "papers", ValueError),
    ("w_mix", -1.0, ValueError),
    ("natural_baseline", 1, TypeError),
    ("w_upper", float("nan"), ValueError),
    ("normalize", "yes", TypeError),
    ("center", None, TypeError),
    ("credit", "token", ValueError),
    ("score", "max", ValueError),
    ("quantile", "kde", ValueError),
    ("shuffle", 0, TypeError),
    ("drop_last", "no", TypeError),
]


def _error(call: Any) -> tuple[type[Exception], str]:
    with pytest.raises((TypeError, ValueError)) as info:
        call()
    return type(info.value), str(info.value)


@pytest.mark.parametrize(
    ("name", "value", "error"),
    LOSS_OPTION_ERRORS,
    ids=[f"{c[0]}={c[1]!r}"[:40] for c in LOSS_OPTION_ERRORS],
)
def test_riskpo_loss_refuses_a_bad_loss_option_at_construction_like_policy_loss(
    name: str, value: Any, error: type[Exception]
) -> None:
    extra = {"agg": "seq-mean-token-sum-norm"} if name == "max_len" else {}
    kind, message = _error(lambda: riskfast.RiskPOLoss(**{name: value}, **extra))
    assert kind is error and message.startswith(f"{name}:"), message
    problem = tokens()
    args = [problem[k] for k in ("logp", "old_logp", "advantages", "mask")]
    assert _error(lambda: policy_loss(*args, **{name: value}, **extra)) == (kind, message)


def test_max_len_with_an_aggregation_that_ignores_it_is_refused() -> None:
    with pytest.raises(ValueError, match="^max_len: only agg='seq-mean-token-sum-norm'"):
        riskfast.RiskPOLoss(max_len=8)
    problem = tokens()
    args = [problem[k] for k in ("logp", "old_logp", "advantages", "mask")]
    with pytest.raises(ValueError, match="^max_len:"):
        policy_loss(*args, max_len=8, agg="token-mean")


@pytest.mark.parametrize(
    ("name", "value", "error"),
    ADVANTAGE_OPTION_ERRORS,
    ids=[f"{c[0]}={c[1]!r}"[:40] for c in ADVANTAGE_OPTION_ERRORS],
)
def test_riskpo_loss_refuses_a_bad_advantage_option_at_construction_like_advantages(
    name: str, value: Any, error: type[Exception]
) -> None:
    kind, message = _error(lambda: riskfast.RiskPOLoss(**{name: value}))
    assert kind is error and message.startswith(f"{name}:"), message
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    assert _error(lambda: advantages(rewards, group_size=2, **{name: value})) == (kind, message)


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"seed": -1}, ValueError, "seed"),
        ({"seed": 2**64}, ValueError, "seed"),
        ({"seed": 1.5}, TypeError, "seed"),
        ({"quantile": "tracker", "gamma": 0.0}, ValueError, "gamma"),
        ({"quantile": "tracker", "gamma": float("nan")}, ValueError, "gamma"),
        ({"gamma": 0.1}, ValueError, "gamma"),  # no tracker would use it
        ({"estimator": "grpo", "quantile": "tracker", "gamma": 0.1}, ValueError, "gamma"),
        ({"bundel_size": 3}, TypeError, "options"),
        ({"form": "reference_code", "alpha": 0.0}, ValueError, "alpha"),
        ({"estimator": "upper", "beta": 1.0}, ValueError, "beta"),
    ],
)
def test_riskpo_loss_refuses_its_own_bad_options_by_name(
    kwargs: dict[str, Any], error: type[Exception], name: str
) -> None:
    with pytest.raises(error, match=f"^{name}:"):
        riskfast.RiskPOLoss(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"alpha": 1.2}, ValueError, "alpha"),
        ({"alpha": 0.5, "beta": 0.5}, ValueError, "beta"),
        ({"gamma": -0.1}, ValueError, "gamma"),
        ({"gamma": 10**400}, ValueError, "gamma"),
        ({"gathered": "yes"}, TypeError, "gathered"),
    ],
)
def test_quantile_tracker_refuses_bad_options_by_name(
    kwargs: dict[str, Any], error: type[Exception], name: str
) -> None:
    with pytest.raises(error, match=f"^{name}:"):
        QuantileTracker(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"group_size": 2**63}, "group_size"), ({"group_size": 2**64 + 4}, "group_size")],
)
def test_integers_beyond_int64_are_named_errors(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=f"^{name}: must be <="):
        advantages(torch.ones(4), **kwargs)


def test_a_tracker_that_would_be_ignored_is_refused() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    tracker = QuantileTracker()
    with pytest.raises(ValueError, match="^tracker: given, but quantile='empirical'"):
        advantages(rewards, group_size=2, tracker=tracker)
    with pytest.raises(ValueError, match="^tracker: given, but a mean-based estimator"):
        advantages(rewards, group_size=2, estimator="grpo", quantile="tracker", tracker=tracker)
    assert not tracker.initialized and tracker.num_updates == 0


# ============================================= 4. a rejected call leaves every state alone
def _step(index: int, n_questions: int = 5, group: int = 4, width: int = 6) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(500 + index)
    n = n_questions * group
    old = -torch.rand(n, width, generator=gen) * 2
    lengths = torch.randint(0, width + 1, (n,), generator=gen)
    return {
        "logp": old + (torch.rand(n, width, generator=gen) - 0.5) * 0.6,
        "old_logp": old,
        "mask": torch.arange(width)[None, :] < lengths[:, None],
        "rewards": torch.randint(0, 2, (n,), generator=gen).float(),
        "question_ids": torch.arange(n_questions).repeat_interleave(group),
    }


def _module_state(module: riskfast.RiskPOLoss) -> dict[str, Any]:
    tracker = module.tracker
    return {
        "generator": module.generator.get_state(),
        "values": None if tracker is None or tracker.values is None else tracker.values.clone(),
        "num_updates": None if tracker is None else tracker.num_updates,
        "last_result": module.last_result,
        "seed": module.seed,
    }


def _assert_same_state(before: dict[str, Any], after: dict[str, Any]) -> None:
    for key, value in before.items():
        other = after[key]
        if isinstance(value, torch.Tensor):
            assert isinstance(other, torch.Tensor) and torch.equal(value, other), key
        else:
            assert other is value or other == value, key


def _bad_forward_calls(step: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Ways a forward call can be wrong, each failing at a different stage."""
    nan_logp = step["logp"].clone()
    nan_logp[0, 0] = float("nan")
    nan_rewards = step["rewards"].clone()
    nan_rewards[3] = float("nan")
    return {
        "nan logp": {**step, "logp": nan_logp, "mask": torch.ones_like(step["mask"])},
        "nan reward": {**step, "rewards": nan_rewards},
        "overflowing rewards": {**step, "rewards": step["rewards"] * 3e38},
        "responses mismatch": {
            **step,
            "logp": step["logp"][:-1],
            "old_logp": step["old_logp"][:-1],
            "mask": step["mask"][:-1],
        },
        "unequal groups": {**step, "question_ids": torch.arange(20) // 3},
        "tiny num_items": {**step, "num_items": 1e-44},
        "entropy missing": {**step, "ref_logp": torch.zeros(3)},
        "bad bundling": {
            **step,
            "bundle_ids": torch.zeros(20, dtype=torch.long),
            "member_ids": torch.zeros(20, dtype=torch.long),
        },
    }


@pytest.mark.parametrize("quantile", ["empirical", "tracker"])
def test_a_rejected_forward_changes_nothing_and_a_retry_equals_an_uninterrupted_run(
    quantile: str,
) -> None:
    options = {"bundle_size": 2, "quantile": quantile, "seed": 3, "agg": "seq-mean-token-mean"}
    straight = riskfast.RiskPOLoss(**options)
    expected = [straight(**_step(i))[0] for i in range(4)]
    module = riskfast.RiskPOLoss(**options)
    for i in range(4):
        step = _step(i)
        for what, call in _bad_forward_calls(step).items():
            before = _module_state(module)
            inputs = {k: v.clone() for k, v in call.items() if isinstance(v, torch.Tensor)}
            with pytest.raises((ValueError, TypeError)):
                module(**call)
            _assert_same_state(before, _module_state(module))
            for key, value in inputs.items():  # the caller's tensors are untouched
                assert torch.equal(value.nan_to_num(), call[key].nan_to_num()), (what, key)
        loss, _ = module(**step)
        assert torch.equal(loss, expected[i]), f"step {i}"


def test_a_rejected_compute_advantages_changes_nothing() -> None:
    module = riskfast.RiskPOLoss(bundle_size=2, quantile="tracker", seed=1)
    step = _step(0)
    module.compute_advantages(step["rewards"], step["question_ids"])
    before = _module_state(module)
    for rewards in (step["rewards"] * float("nan"), step["rewards"] * 3e38):
        with pytest.raises(ValueError, match="^rewards:"):
            module.compute_advantages(rewards, step["question_ids"])
        _assert_same_state(before, _module_state(module))


@pytest.mark.parametrize("generator", ["given", "global"])
def test_a_rejected_advantages_call_leaves_generator_tracker_and_global_rng_alone(
    generator: str,
) -> None:
    tracker = QuantileTracker(gamma=0.3)
    tracker.update(torch.tensor([0.0, 1.0, 2.0]))
    gen = torch.Generator().manual_seed(9) if generator == "given" else None
    rewards = _step(1)["rewards"]
    bad_calls = {
        "overflow after the draw": {"rewards": rewards * 3e38},
        "nan reward": {"rewards": rewards.masked_fill(rewards > 0, float("nan"))},
        "bad backend": {"rewards": rewards, "backend": "cuda"},
    }
    for what, call in bad_calls.items():
        state = None if gen is None else gen.get_state()
        global_state = torch.get_rng_state()
        values, count = tracker.values.clone(), tracker.num_updates
        with pytest.raises(ValueError):
            advantages(group_size=4, quantile="tracker", tracker=tracker, generator=gen, **call)
        assert gen is None or torch.equal(gen.get_state(), state), what
        assert torch.equal(torch.get_rng_state(), global_state), what
        assert torch.equal(tracker.values, values) and tracker.num_updates == count, what
    # and a good call does advance the generator in use and the tracker
    global_state = torch.get_rng_state()
    advantages(rewards, group_size=4, quantile="tracker", tracker=tracker, generator=gen)
    assert tracker.num_updates == count + 1
    if gen is None:
        assert not torch.equal(torch.get_rng_state(), global_state)


# ============================================ 5. checkpoints carry the options shaping them
def _saved(module: riskfast.RiskPOLoss) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize(
    ("saved_options", "loading_options", "name"),
    [
        ({"bundle_size": 2}, {"bundle_size": 5}, "bundle_size"),
        ({"shuffle": False}, {}, "shuffle"),
        ({"quantile": "tracker"}, {}, "quantile"),
        ({}, {"quantile": "tracker"}, "quantile"),
        ({"quantile": "tracker", "alpha": 0.1}, {"quantile": "tracker"}, "alpha"),
        ({"quantile": "tracker", "gamma": 0.2}, {"quantile": "tracker"}, "gamma"),
        ({"quantile": "tracker", "score": "mean"}, {"quantile": "tracker"}, "score"),
    ],
)
def test_loading_a_checkpoint_with_other_state_options_names_the_option(
    saved_options: dict[str, Any], loading_options: dict[str, Any], name: str
) -> None:
    saver = riskfast.RiskPOLoss(seed=1, **saved_options)
    saver(**_step(0))
    loader = riskfast.RiskPOLoss(seed=2, **loading_options)
    loader(**_step(1))
    before = _module_state(loader)
    with pytest.raises(ValueError, match=f"^{name}: the checkpoint was saved with"):
        loader.load_state_dict(_saved(saver))
    _assert_same_state(before, _module_state(loader))


def test_options_that_do_not_shape_the_state_may_change_on_resume() -> None:
    # alpha and omega shape the advantages, not the generator of an empirical run.
    saver = riskfast.RiskPOLoss(seed=1, bundle_size=2, omega=0.5)
    saver(**_step(0))
    loader = riskfast.RiskPOLoss(seed=2, bundle_size=2, omega=1.0, alpha=0.1, center=True)
    loader.load_state_dict(_saved(saver))
    assert torch.equal(loader.generator.get_state(), saver.generator.get_state())
    assert loader.seed == 1


@pytest.mark.parametrize(
    ("corrupt", "match"),
    [
        (lambda s: s.update(version=1), "^state: not a RiskPO state of version 2"),
        (lambda s: s.pop("options"), "^state: not a RiskPO state"),
        (lambda s: s.update(generator=torch.zeros(7, dtype=torch.uint8)), "^state: generator"),
        (lambda s: s.update(generator=[1, 2]), "^state: generator"),
        (lambda s: s.update(seed=-4), r"^state\['seed'\]:"),
        (lambda s: s["tracker"].update(values=torch.tensor([float("nan"), 1.0])), "^state: values"),
        (lambda s: s["tracker"].update(values=torch.zeros(3)), "^state: values"),
        (lambda s: s["tracker"].update(gamma=-1.0), r"^state\['gamma'\]:"),
    ],
)
def test_a_corrupt_checkpoint_is_refused_whole(corrupt: Any, match: str) -> None:
    saver = riskfast.RiskPOLoss(seed=1, quantile="tracker")
    saver(**_step(0))
    state = _saved(saver)
    extra = state["_extra_state"]
    corrupt(extra)
    loader = riskfast.RiskPOLoss(seed=2, quantile="tracker")
    loader(**_step(1))
    before = _module_state(loader)
    with pytest.raises((ValueError, TypeError), match=match):
        loader.load_state_dict(state)
    _assert_same_state(before, _module_state(loader))


def test_a_checkpoint_round_trip_through_deepcopy_keeps_working() -> None:
    module = riskfast.RiskPOLoss(seed=4, quantile="tracker", bundle_size=3)
    module(**_step(0))
    twin = copy.deepcopy(module)
    assert torch.equal(module(**_step(1))[0], twin(**_step(1))[0])


def test_unvalidated_calls_draw_from_the_callers_generator_and_refuse_before_drawing() -> None:
    # validate=False is the sync-free path CUDA graphs capture: it draws from the caller's
    # generator itself (a copy would be unregistered), so every refusal comes first.
    rewards = _step(2)["rewards"]
    states = []
    for validate in (True, False):
        gen = torch.Generator().manual_seed(4)
        advantages(rewards, group_size=4, validate=validate, generator=gen)
        states.append(gen.get_state())
    assert torch.equal(states[0], states[1])
    gen = torch.Generator().manual_seed(4)
    before = gen.get_state()
    for bad in ({"backend": "cuda"}, {"backend": "triton", "estimator": "grpo_like"}):
        with pytest.raises(ValueError):
            advantages(rewards, group_size=4, validate=False, generator=gen, **bad)
    wide = torch.zeros(2 * 65)  # G = 65 is beyond the kernel's 64 members
    with pytest.raises(ValueError, match="^backend: the kernel handles G <= 64"):
        advantages(wide, group_size=65, validate=False, generator=gen, backend="triton")
    assert torch.equal(gen.get_state(), before)
