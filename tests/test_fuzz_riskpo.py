"""Fuzz: random finite inputs through every RiskPO entry point, against the oracles.

``advantages``, ``policy_loss``, ``RiskPOLoss`` and the log-prob ops
(``selective_logprobs``, ``fused_linear_logprobs``) get random finite inputs (sizes,
reward scales from 1e-20 to 1e20, log-ratios past the +-20 clamp, empty responses,
``T = 0``, every option over its documented range), forward and backward. Each case
must give finite outputs and gradients that agree with the independent float64 loop
oracles of ``tests/oracles`` (advantages, losses, log-probs, entropies, log-prob
gradients).

CI runs a fixed set of cases (``derandomize``: the same ones every run, a few hundred in
all). Opt in to a fresh random run with ``RISKFAST_FUZZ_EXAMPLES``, the number of cases
per test (at least 10,000 for the record in ``benchmarks/RESULTS.md``)::

    RISKFAST_FUZZ_EXAMPLES=10000 .venv/bin/python -m pytest -q tests/test_fuzz_riskpo.py \\
        -p no:cacheprovider --hypothesis-show-statistics
"""

from __future__ import annotations

import math
import os
import random
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracles.logprob_oracle import (
    linear_gradients,
    linear_logits,
    token_logit_gradient,
    token_logprob_entropy,
)
from oracles.riskpo_oracle import (
    linear_quantile,
    member_scores,
    oracle_advantages_detailed,
    oracle_policy_loss_detailed,
)
from test_riskpo_advantages import assert_matches_oracle, check_against_oracle, oracle_kwargs

import riskfast
from riskfast.ops import fused_linear_logprobs, selective_logprobs
from riskfast.riskpo import policy_loss

FUZZ_EXAMPLES = int(os.environ.get("RISKFAST_FUZZ_EXAMPLES") or 0)
"""Cases per test of an opt-in fresh run (0: the fixed CI cases)."""

# The Triton interpreter computes with numpy, which warns about masked (-inf) lanes.
pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]


def fuzz(ci_examples: int) -> Any:
    """Hypothesis settings: ``ci_examples`` fixed cases, or an opt-in fresh run."""
    return settings(
        max_examples=FUZZ_EXAMPLES or ci_examples,
        derandomize=not FUZZ_EXAMPLES,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def triton_share() -> float:
    """Share of cases also run on the Triton backend (the CPU interpreter is slow)."""
    return 0.1 if FUZZ_EXAMPLES else 0.25


# =============================================================== advantages
RISK_ESTIMATORS = [
    {"estimator": "mvar", "form": "paper"},
    {"estimator": "mvar", "form": "reference_code"},
    {"estimator": "rvar"},
    {"estimator": "cvar"},
    {"estimator": "upper"},
]
MEAN_ESTIMATORS = [{"estimator": "grpo"}, {"estimator": "dr_grpo"}, {"estimator": "rloo"}]


def draw_rewards(kind: str, count: int, scale: float, rng: random.Random) -> list[float]:
    """Rewards of one kind. All but "scaled" sum exactly in float32 (no float32-only
    ties); "scaled" rewards are non-negative, so a float32 member score has a relative
    error of a few ulps (sign-mixed large rewards cancel, and the error of their sum is
    relative to the sum of |r|, which the oracle's tolerances do not see)."""
    if kind == "binary":
        p = rng.random()
        return [float(rng.random() < p) for _ in range(count)]
    if kind == "small_int":
        return [float(rng.randint(-3, 3)) for _ in range(count)]
    if kind == "grid":
        return [rng.randint(-64, 64) / 64.0 for _ in range(count)]
    if kind == "constant":
        value = rng.uniform(-1.0, 1.0) * scale
        return [value] * count
    return [rng.uniform(0.0, 1.0) * scale for _ in range(count)]


LEVEL = st.floats(1e-6, 0.9)
"""A positive quantile level. Not below 1e-6: float32 cannot hold a level like 1e-308
(it rounds to 0), and a tracker quantile 1e-308 above a score then equals it in float32,
flipping the indicator 1[S < q] of the update against the float64 oracle (the first
10,000-case run found alpha = 2.2e-308)."""


@st.composite
def advantage_cases(draw: st.DrawFn) -> dict[str, Any]:
    """Sizes, rewards over 40 decades, and every option over its documented range."""
    q_count = draw(st.integers(1, 8))
    g = draw(st.integers(1, 7))
    seed = draw(st.integers(0, 2**31 - 1))
    kind = draw(st.sampled_from(["binary", "small_int", "grid", "constant", "scaled"]))
    scale = 10.0 ** draw(st.integers(-20, 20))
    variant = dict(draw(st.sampled_from(RISK_ESTIMATORS + MEAN_ESTIMATORS)))
    needs_alpha = variant["estimator"] == "cvar" or variant.get("form") == "reference_code"
    alpha = draw(LEVEL) if needs_alpha else draw(st.just(0.0) | LEVEL)
    beta_high = 0.999 if variant["estimator"] == "upper" else 1.0
    beta = draw(st.floats(min(alpha + 1e-3, beta_high), beta_high))
    options: dict[str, Any] = {
        **variant,
        "bundle_size": draw(st.integers(1, 7)),
        "alpha": alpha,
        "beta": beta,
        "omega": draw(st.floats(-0.9, 10.0)),
        "w_mix": draw(st.floats(0.0, 10.0)),
        "w_upper": draw(st.floats(0.0, 10.0)),
        "normalize": draw(st.booleans()),
        "center": draw(st.booleans()),
        "credit": draw(st.sampled_from(["uniform", "std"])),
        "score": draw(st.sampled_from(["sum", "mean"])),
        "shuffle": draw(st.booleans()),
        "drop_last": draw(st.booleans()),
    }
    rng = random.Random(seed)
    labels = rng.sample(range(-50, 500), q_count)
    qids = [labels[n // g] for n in range(q_count * g)]
    rng.shuffle(qids)
    return {
        "qids": qids,
        "rewards": draw_rewards(kind, len(qids), scale, rng),
        "kind": kind,
        "seed": seed,
        "options": options,
        "tracker_mode": draw(st.sampled_from(["empirical", "empirical", "fresh", "warm"])),
        "triton": draw(st.floats(0.0, 1.0)) < triton_share(),
    }


@fuzz(ci_examples=100)
@given(case=advantage_cases())
def test_fuzz_advantages_are_finite_and_match_the_oracle(case: dict[str, Any]) -> None:
    # check_against_oracle: advantages, scores, quantiles, metrics and the tracker step
    # against the loop oracle, exact zeros where the spec forces them, finite everywhere.
    # Elementwise bounds sized by each advantage's natural scale; no global relative-error
    # check: with levels like beta = 0.001 every advantage is a small difference of two
    # float32 numbers, so the relative error of the whole vector is legitimately ~1e-4.
    rewards = torch.tensor(case["rewards"], dtype=torch.float32)
    check_against_oracle(case, rewards, "torch", check_norm=False)
    if case["triton"]:
        check_against_oracle(case, rewards, "triton", check_norm=False)


# =============================================================== policy loss
LOSS_KEYS = ("ratio_level", "eps_low", "eps_high", "dual_clip", "beta_kl", "entropy_coef", "agg")


@st.composite
def loss_cases(draw: st.DrawFn) -> dict[str, Any]:
    """Token tensors (T = 0 and empty responses included) and every loss option."""
    agg = draw(
        st.sampled_from(
            ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
        )
    )
    options: dict[str, Any] = {
        "ratio_level": draw(st.sampled_from(["sequence", "token"])),
        "eps_low": draw(st.floats(0.0, 0.95)),
        "eps_high": draw(st.floats(0.0, 5.0)),
        "dual_clip": draw(st.none() | st.floats(1.01, 10.0)),
        "beta_kl": draw(st.sampled_from([0.0, 0.0, 0.04]) | st.floats(0.0, 1.0)),
        "entropy_coef": draw(st.sampled_from([0.0, 0.01]) | st.floats(-0.1, 0.1)),
        "agg": agg,
    }
    if agg == "seq-mean-token-sum-norm" and draw(st.booleans()):
        options["max_len"] = draw(st.integers(1, 20))
    return {
        "n": draw(st.integers(1, 6)),
        "t": draw(st.integers(0, 7)),
        "seed": draw(st.integers(0, 2**31 - 1)),
        "old_scale": draw(st.sampled_from([0.1, 5.0, 100.0])),
        "spread": draw(st.sampled_from([0.0, 0.01, 1.0, 30.0])),
        "adv_scale": 10.0 ** draw(st.integers(-3, 6)),
        "token_advantages": draw(st.booleans()),
        "keep": draw(st.floats(0.0, 1.0)),
        "with_ref": draw(st.booleans()) or options["beta_kl"] > 0,
        "with_entropy": draw(st.booleans()) or options["entropy_coef"] != 0,
        "num_items": draw(st.none() | st.floats(1e-2, 1e4)),
        "dtype": draw(
            st.sampled_from(
                [torch.float32, torch.float32, torch.float64, torch.bfloat16, torch.float16]
            )
        ),
        "options": options,
    }


def token_problem(case: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of a loss case, in its dtype (values the oracle sees exactly)."""
    gen = torch.Generator().manual_seed(case["seed"])
    n, t, dtype = case["n"], case["t"], case["dtype"]
    spread, adv_scale = case["spread"], case["adv_scale"]
    if dtype == torch.float16:
        # fp16 inputs get fp16 gradients (the loss cannot choose its inputs' gradient
        # dtype): keep |A| * ratio / normaliser, and the KL's e^|d|, far below 65504
        spread, adv_scale = min(spread, 0.3), min(adv_scale, 10.0)
    old = -torch.rand(n, t, generator=gen) * case["old_scale"]
    logp = old + torch.randn(n, t, generator=gen) * spread
    shape = (n, t) if case["token_advantages"] else (n,)
    problem = {
        "logp": logp.to(dtype),
        "old_logp": old.to(dtype),
        "advantages": (torch.randn(shape, generator=gen) * adv_scale).to(dtype),
        "mask": torch.rand(n, t, generator=gen) < case["keep"],
    }
    if case["with_ref"]:
        problem["ref_logp"] = (old + torch.randn(n, t, generator=gen) * spread).to(dtype)
    if case["with_entropy"]:
        problem["entropy"] = (torch.rand(n, t, generator=gen) * 3).to(dtype)
    return problem


def oracle_loss(
    problem: dict[str, torch.Tensor], options: dict[str, Any], num_items: float | None
) -> tuple[dict[str, float], float]:
    """The oracle's loss and metrics, and the loss's natural magnitude for tolerances.

    The magnitude is the oracle's aggregate of every term made non-negative: the
    surrogate with advantages -|A| and no dual clip, the entropy bonus +|c| H, and the KL
    term as beta (e^|d| + |d| + 1) (k3 = e^d - d - 1 cancels near d = 0, so its rounding
    error is relative to those three parts, not to k3). It bounds the size float32
    rounding errors are relative to.
    """
    as_lists = {k: v.double().tolist() for k, v in problem.items()}
    args = [as_lists[k] for k in ("logp", "old_logp", "advantages", "mask")]
    extra = {k: as_lists[k] for k in ("ref_logp", "entropy") if k in as_lists}
    ref = oracle_policy_loss_detailed(*args, **extra, **options, num_items=num_items)
    absolute = {
        **options,
        "dual_clip": None,
        "entropy_coef": -abs(options["entropy_coef"]),
        "beta_kl": 0.0,
    }
    args[2] = (-problem["advantages"].double().abs()).tolist()
    magnitude = oracle_policy_loss_detailed(*args, **extra, **absolute, num_items=num_items)["loss"]
    if "ref_logp" in problem and options["beta_kl"] > 0:
        d = (problem["ref_logp"].double() - problem["logp"].double()).abs().clamp_max(20.0)
        parts = {**absolute, "entropy_coef": -1.0}  # aggregates +1 * "entropy" = the parts
        args[2] = [0.0] * len(args[0])
        magnitude += (
            options["beta_kl"]
            * oracle_policy_loss_detailed(
                *args, entropy=(d.exp() + d + 1).tolist(), **parts, num_items=num_items
            )["loss"]
        )
    return ref, abs(magnitude)


def rounding(dtype: torch.dtype) -> float:
    """Relative tolerance of a loss computed from inputs of ``dtype``."""
    return 1e-10 if dtype == torch.float64 else 2e-5


@fuzz(ci_examples=100)
@given(case=loss_cases())
def test_fuzz_policy_loss_is_finite_and_matches_the_oracle(case: dict[str, Any]) -> None:
    problem = token_problem(case)
    options = case["options"]
    leaves = {
        k: problem[k].clone().requires_grad_(True) for k in ("logp", "entropy") if k in problem
    }
    inputs = {**problem, **leaves}
    loss, metrics = policy_loss(
        inputs.pop("logp"),
        inputs.pop("old_logp"),
        inputs.pop("advantages"),
        inputs.pop("mask"),
        **inputs,
        **options,
        num_items=case["num_items"],
    )
    assert loss.dtype == (torch.float64 if case["dtype"] == torch.float64 else torch.float32)
    assert math.isfinite(loss.item()), loss
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    loss.backward()
    for name, leaf in leaves.items():
        if name == "entropy" and options["entropy_coef"] == 0:
            continue  # only a metric then: no gradient
        assert leaf.grad is not None and torch.isfinite(leaf.grad.float()).all(), name

    ref, magnitude = oracle_loss(problem, options, case["num_items"])
    tolerance = rounding(case["dtype"]) * magnitude + 1e-12
    assert abs(loss.item() - ref["loss"]) <= tolerance, (loss.item(), ref["loss"], tolerance)
    for key in ("kl", "entropy"):
        # k3 = exp(d) - d - 1 cancels near d = 0: its error is absolute, about one ulp of 1
        if key in ref:
            precision = rounding(case["dtype"])
            assert metrics[key] == pytest.approx(ref[key], rel=precision, abs=precision / 10)


# =============================================================== RiskPOLoss
@st.composite
def module_cases(draw: st.DrawFn) -> dict[str, Any]:
    """A RiskPOLoss over two steps: advantage and loss options, sizes, tracker or not."""
    variant = dict(draw(st.sampled_from(RISK_ESTIMATORS + MEAN_ESTIMATORS[:1])))
    needs_alpha = variant["estimator"] == "cvar" or variant.get("form") == "reference_code"
    alpha = draw(LEVEL) if needs_alpha else draw(st.just(0.0) | LEVEL)
    beta_high = 0.999 if variant["estimator"] == "upper" else 1.0
    beta = draw(st.floats(min(alpha + 1e-3, beta_high), beta_high))
    tracked = variant["estimator"] != "grpo" and draw(st.booleans())
    advantage_options: dict[str, Any] = {
        **variant,
        "bundle_size": draw(st.integers(1, 5)),
        "alpha": alpha,
        "beta": beta,
        "omega": draw(st.floats(-0.9, 5.0)),
        "normalize": draw(st.booleans()),
        "center": draw(st.booleans()),
        "credit": draw(st.sampled_from(["uniform", "std"])),
        "score": draw(st.sampled_from(["sum", "mean"])),
        "shuffle": draw(st.booleans()),
        "drop_last": False if tracked else draw(st.booleans()),
        "quantile": "tracker" if tracked else "empirical",
    }
    loss_case = draw(loss_cases())
    return {
        "advantage_options": advantage_options,
        "gamma": draw(st.floats(1e-3, 1.0)) if tracked else None,
        "loss_options": loss_case["options"],
        "q_count": draw(st.integers(1, 6)),
        "g": draw(st.integers(1, 5)),
        "loss_case": {**loss_case, "dtype": torch.float32, "token_advantages": False},
        "seed": draw(st.integers(0, 2**32 - 1)),
        "reward_kind": draw(st.sampled_from(["binary", "small_int", "grid"])),
    }


@fuzz(ci_examples=60)
@given(case=module_cases())
def test_fuzz_riskpo_loss_is_finite_and_matches_the_oracles(case: dict[str, Any]) -> None:
    options = {**case["advantage_options"], **case["loss_options"]}
    gamma = {} if case["gamma"] is None else {"gamma": case["gamma"]}
    module = riskfast.RiskPOLoss(seed=case["seed"], **gamma, **options)
    rng = random.Random(case["seed"])
    n = case["q_count"] * case["g"]
    for step in range(2):
        qids = [q for q in range(case["q_count"]) for _ in range(case["g"])]
        rng.shuffle(qids)
        rewards = draw_rewards(case["reward_kind"], n, 1.0, rng)
        problem = token_problem({**case["loss_case"], "n": n, "seed": case["seed"] + step})
        tracker = module.tracker
        before = None if tracker is None or tracker.values is None else tracker.values.tolist()
        logp = problem["logp"].clone().requires_grad_(True)
        extra = {k: problem[k] for k in ("ref_logp", "entropy") if k in problem}
        loss, metrics = module(
            logp,
            problem["old_logp"],
            problem["mask"],
            torch.tensor(rewards),
            torch.tensor(qids),
            num_items=case["loss_case"]["num_items"],
            **extra,
        )
        assert math.isfinite(loss.item()) and all(math.isfinite(v) for v in metrics.values())
        loss.backward()
        assert torch.isfinite(logp.grad).all()

        result = module.last_result
        bundle_ids, member_ids = result.bundle_ids.tolist(), result.member_ids.tolist()
        advantage_options = case["advantage_options"]
        quantiles = None
        if tracker is not None:
            scores, _ = member_scores(rewards, qids, bundle_ids, member_ids, options["score"])
            pooled = [s for label in sorted(scores) for s in scores[label]]
            quantiles = (
                tuple(before)
                if before is not None
                else (
                    linear_quantile(pooled, options["alpha"]),
                    linear_quantile(pooled, options["beta"]),
                )
            )
        dropped = []
        if advantage_options["drop_last"] and case["q_count"] % options["bundle_size"]:
            dropped = [max(bundle_ids)]
        ref = oracle_advantages_detailed(
            rewards, qids, bundle_ids, member_ids, **oracle_kwargs(advantage_options),
            quantiles=quantiles, dropped_bundles=dropped,
        )  # fmt: skip
        assert_matches_oracle(result.advantages, ref, check_norm=False, context=str(case))
        # the loss on the module's advantages, against the loss oracle
        problem["advantages"] = result.advantages
        expected, magnitude = oracle_loss(
            problem, case["loss_options"], case["loss_case"]["num_items"]
        )
        assert abs(loss.item() - expected["loss"]) <= 2e-5 * magnitude + 1e-12


# =============================================================== log-prob ops
@st.composite
def logprob_cases(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "n": draw(st.integers(1, 6)),
        "v": draw(st.integers(1, 24)),
        "h": draw(st.integers(1, 8)),
        "scale": draw(st.sampled_from([0.01, 1.0, 5.0, 20.0])),
        "temperature": draw(st.floats(0.25, 4.0)),
        "masked": draw(st.floats(0.0, 0.6)),
        "with_bias": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**31 - 1)),
        "triton": draw(st.floats(0.0, 1.0)) < triton_share(),
    }


EPS32 = 1.2e-7
"""Twice float32's unit roundoff."""


def close(got: torch.Tensor, want: Any, rel: float, atol: float, what: str) -> None:
    """``||got - want|| <= rel * ||want|| + atol``, and ``got`` finite."""
    want_t = torch.tensor(want, dtype=torch.float64)
    got = got.detach().double()
    assert torch.isfinite(got).all(), f"{what}: not finite: {got}"
    error = float((got - want_t).norm())
    bound = rel * float(want_t.norm()) + atol
    assert error <= bound, f"{what}: error {error:.3g} > {bound:.3g}"


def rounding_bounds(
    z: torch.Tensor, temperature: float, g: torch.Tensor, g_h: torch.Tensor
) -> tuple[float, float]:
    """Absolute float32 rounding of ``(logp, dlogits)`` over all rows, from the logits.

    A float32 log-softmax of scaled logits ``z`` errs by about ``eps |z|`` in every log p
    (and p by ``p eps |z|``), whatever the size of the result: a peaked row has a tiny
    gradient with the same absolute error. The gradient per row is bounded by
    ``(|g| + |g_H| (1 + |z|)) / T``, so its error by ``eps |z|`` times that.
    """
    rows = z.shape[0]
    size = max(1.0, float(z.nan_to_num(neginf=0.0).abs().max()))
    weights = float(g.abs().max()) + float(g_h.abs().max()) * (1.0 + size)
    scale = math.sqrt(rows) * EPS32 * size
    return 10 * scale, 2 * scale * weights / temperature


@fuzz(ci_examples=60)
@given(case=logprob_cases())
def test_fuzz_logprob_ops_are_finite_and_match_the_oracle(case: dict[str, Any]) -> None:
    gen = torch.Generator().manual_seed(case["seed"])
    n, v, h, temperature = case["n"], case["v"], case["h"], case["temperature"]
    targets = torch.randint(0, v, (n,), generator=gen)
    masked = torch.rand(n, v, generator=gen) < case["masked"]
    masked[torch.arange(n), targets] = False  # a masked target has log-prob -inf
    logits = (torch.randn(n, v, generator=gen) * case["scale"]).masked_fill(masked, -math.inf)
    hidden = torch.randn(n, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) * case["scale"] / math.sqrt(h)
    bias = torch.randn(v, generator=gen).masked_fill(masked.all(dim=0) & (v > 1), -math.inf)
    bias[targets] = bias[targets].nan_to_num(neginf=0.0)
    g, g_h = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    logp_atol, grad_atol = rounding_bounds(logits / temperature, temperature, g, g_h)

    rows, t_list = logits.tolist(), targets.tolist()
    want = [token_logprob_entropy(r, t, temperature) for r, t in zip(rows, t_list, strict=True)]
    want_grad = [
        token_logit_gradient(r, t, temperature, gn, ghn)
        for r, t, gn, ghn in zip(rows, t_list, g.tolist(), g_h.tolist(), strict=True)
    ]
    backends = ["torch", "reference"] + (["triton"] if case["triton"] else [])
    for backend in backends:
        leaf = logits.clone().requires_grad_(True)
        logp, entropy = selective_logprobs(
            leaf, targets, temperature=temperature, return_entropy=True, backend=backend
        )
        close(logp, [w[0] for w in want], 1e-5, logp_atol, f"{backend} logp")
        close(entropy, [w[1] for w in want], 1e-5, logp_atol, f"{backend} entropy")
        ((logp * g).sum() + (entropy * g_h).sum()).backward()
        close(leaf.grad, want_grad, 1e-4, grad_atol, f"{backend} dlogits")
        assert (leaf.grad[masked] == 0).all(), f"{backend}: masked entries got a gradient"

    b = bias if case["with_bias"] else None
    h_list, w_list = hidden.tolist(), weight.tolist()
    b_list = None if b is None else b.tolist()
    linear = linear_logits(h_list, w_list, b_list)
    want = [token_logprob_entropy(r, t, temperature) for r, t in zip(linear, t_list, strict=True)]
    d_hidden, d_weight, d_bias = linear_gradients(
        h_list, w_list, b_list, t_list, temperature, g.tolist(), g_h.tolist()
    )
    z = torch.tensor(linear, dtype=torch.float64) / temperature
    logp_atol, grad_atol = rounding_bounds(z, temperature, g, g_h)
    weight_norm = float(weight.norm(dim=1).max())  # dhidden = dlogits @ weight
    hidden_norm = float(hidden.norm(dim=1).max())  # dweight = dlogits.T @ hidden
    for backend in backends:
        leaves = [x.clone().requires_grad_(True) for x in (hidden, weight)]
        bias_leaf = None if b is None else b.clone().requires_grad_(True)
        logp, entropy = fused_linear_logprobs(
            leaves[0], leaves[1], targets, bias=bias_leaf, temperature=temperature,
            return_entropy=True, backend=backend,
        )  # fmt: skip
        close(logp, [w[0] for w in want], 1e-5, logp_atol, f"{backend} fused logp")
        close(entropy, [w[1] for w in want], 1e-5, logp_atol, f"{backend} fused H")
        ((logp * g).sum() + (entropy * g_h).sum()).backward()
        close(leaves[0].grad, d_hidden, 1e-4, grad_atol * weight_norm, f"{backend} dhidden")
        close(leaves[1].grad, d_weight, 1e-4, grad_atol * hidden_norm, f"{backend} dweight")
        if bias_leaf is not None:
            close(bias_leaf.grad, d_bias, 1e-4, grad_atol, f"{backend} dbias")
