"""policy_loss (spec section 4) against the loop oracle, finite differences and gradcheck."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles.riskpo_oracle import oracle_policy_loss, oracle_policy_loss_detailed

from riskfast.riskpo import policy_loss

RATIO_LEVELS = ("sequence", "token")
AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
# rows: full, shorter, empty, with holes (packed), a single token
MASK_ROWS = [
    [1, 1, 1, 1, 1, 1],
    [1, 1, 1, 1, 0, 0],
    [0, 0, 0, 0, 0, 0],
    [1, 0, 1, 1, 0, 1],
    [0, 0, 1, 0, 0, 0],
]


def make_problem(
    seed: int, *, token_advantages: bool, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Five responses of six tokens with log-ratios in [-0.6, 0.6] (row 3: [0, 1.2]); some clip."""
    gen = torch.Generator().manual_seed(seed)
    n, t = len(MASK_ROWS), len(MASK_ROWS[0])
    old = -torch.rand(n, t, generator=gen, dtype=torch.float64) * 3.0
    logp = old + (torch.rand(n, t, generator=gen, dtype=torch.float64) - 0.5) * 1.2
    logp[3] += 0.6  # row 3 (A = -2) gets ratios above the dual-clip level 1.5
    ref = old + (torch.rand(n, t, generator=gen, dtype=torch.float64) - 0.5) * 2.0
    if token_advantages:
        adv = torch.randn(n, t, generator=gen, dtype=torch.float64)
    else:
        adv = torch.tensor([1.5, -0.7, 0.3, -2.0, 0.9], dtype=torch.float64)
    entropy = torch.rand(n, t, generator=gen, dtype=torch.float64) * 2.0
    return {
        "logp": logp.to(dtype),
        "old_logp": old.to(dtype),
        "advantages": adv.to(dtype),
        "mask": torch.tensor(MASK_ROWS, dtype=torch.bool),
        "ref_logp": ref.to(dtype),
        "entropy": entropy.to(dtype),
    }


def as_lists(problem: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Tensors -> nested Python floats for the oracle."""
    return {k: v.detach().to(torch.float64).tolist() for k, v in problem.items()}


def loss_options(
    *, ratio_level: str, agg: str, dual: bool, kl: bool, ent: bool, num_items: bool
) -> dict[str, Any]:
    """Keyword options of one combination (tensors added by the caller)."""
    options: dict[str, Any] = {"ratio_level": ratio_level, "agg": agg, "eps_high": 0.28}
    if dual:
        options["dual_clip"] = 1.5
    if kl:
        options["beta_kl"] = 0.3
    if ent:
        options["entropy_coef"] = 0.05
    if num_items:
        options["num_items"] = 13.0
        if agg == "seq-mean-token-sum-norm":
            options["max_len"] = 10
    return options


def call_both(
    problem: dict[str, torch.Tensor], options: dict[str, Any], *, kl: bool, ent: bool
) -> tuple[torch.Tensor, dict[str, float], dict[str, float]]:
    """Run policy_loss and the oracle on the same problem and options."""
    extra: dict[str, Any] = {}
    if kl:
        extra["ref_logp"] = problem["ref_logp"]
    if ent:
        extra["entropy"] = problem["entropy"]
    loss, metrics = policy_loss(
        problem["logp"],
        problem["old_logp"],
        problem["advantages"],
        problem["mask"],
        **options,
        **extra,
    )
    plain = as_lists(problem)
    extra_plain = {k: plain[k] for k in extra}
    ref = oracle_policy_loss_detailed(
        plain["logp"],
        plain["old_logp"],
        plain["advantages"],
        plain["mask"],
        **options,
        **extra_plain,
    )
    return loss, metrics, ref


COMBINATIONS = list(
    itertools.product(
        RATIO_LEVELS,
        AGGS,
        (False, True),
        (False, True),
        (False, True),
        (False, True),
        (False, True),
    )
)


@pytest.mark.parametrize(
    ("ratio_level", "agg", "dual", "kl", "ent", "token_adv", "num_items"),
    COMBINATIONS,
    ids=[
        f"{r}-{a}-dual{int(d)}-kl{int(k)}-ent{int(e)}-tokadv{int(ta)}-items{int(ni)}"
        for r, a, d, k, e, ta, ni in COMBINATIONS
    ],
)
def test_policy_loss_matches_oracle_for_every_option(
    ratio_level: str,
    agg: str,
    dual: bool,
    kl: bool,
    ent: bool,
    token_adv: bool,
    num_items: bool,
) -> None:
    problem = make_problem(17, token_advantages=token_adv)
    options = loss_options(
        ratio_level=ratio_level, agg=agg, dual=dual, kl=kl, ent=ent, num_items=num_items
    )
    loss, metrics, ref = call_both(problem, options, kl=kl, ent=ent)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref["loss"], rel=1e-5, abs=1e-6)
    assert metrics["loss"] == pytest.approx(ref["loss"], rel=1e-5, abs=1e-6)
    assert metrics["approx_kl"] == pytest.approx(ref["approx_kl"], rel=1e-5, abs=1e-6)
    if ent:
        assert metrics["entropy"] == pytest.approx(ref["entropy"], rel=1e-5, abs=1e-6)
    if kl:
        assert metrics["kl"] == pytest.approx(ref["kl"], rel=1e-5, abs=1e-6)
    if not kl and not ent:
        assert metrics["pg_loss"] == pytest.approx(ref["loss"], rel=1e-5, abs=1e-6)
    for key in ("clip_frac", "dual_clip_frac", "ratio_mean"):
        assert metrics[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-6), key


@settings(max_examples=150)
@given(
    n=st.integers(1, 5),
    t=st.integers(1, 7),
    seed=st.integers(0, 2**31 - 1),
    ratio_level=st.sampled_from(RATIO_LEVELS),
    agg=st.sampled_from(AGGS),
    eps_low=st.sampled_from([0.0, 0.1, 0.2, 0.3]),
    eps_high=st.sampled_from([0.1, 0.28, 1.0]),
    dual=st.sampled_from([None, 1.2, 3.0]),
    beta_kl=st.sampled_from([0.0, 0.04]),
    entropy_coef=st.sampled_from([0.0, 0.01]),
    token_adv=st.booleans(),
    num_items=st.sampled_from([None, 1.0, 7.0, 40.0]),
    max_len=st.sampled_from([None, 3, 12]),
    spread=st.sampled_from([0.05, 0.5, 3.0]),
)
def test_policy_loss_matches_oracle_on_random_problems(
    n: int,
    t: int,
    seed: int,
    ratio_level: str,
    agg: str,
    eps_low: float,
    eps_high: float,
    dual: float | None,
    beta_kl: float,
    entropy_coef: float,
    token_adv: bool,
    num_items: float | None,
    max_len: int | None,
    spread: float,
) -> None:
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(n, t, generator=gen) * 4
    logp = old + (torch.rand(n, t, generator=gen) - 0.5) * spread
    ref_logp = old + (torch.rand(n, t, generator=gen) - 0.5) * spread
    mask = torch.rand(n, t, generator=gen) < 0.7
    adv = torch.randn((n, t) if token_adv else (n,), generator=gen) * 2
    entropy = torch.rand(n, t, generator=gen)
    options: dict[str, Any] = {
        "ratio_level": ratio_level,
        "agg": agg,
        "eps_low": eps_low,
        "eps_high": eps_high,
        "dual_clip": dual,
        "beta_kl": beta_kl,
        "entropy_coef": entropy_coef,
        "num_items": num_items,
        # max_len only means something to (and is only accepted by) the norm mode
        "max_len": max_len if agg == "seq-mean-token-sum-norm" else None,
    }
    loss, _ = policy_loss(logp, old, adv, mask, ref_logp=ref_logp, entropy=entropy, **options)
    expected = oracle_policy_loss(
        logp.double().tolist(),
        old.double().tolist(),
        adv.double().tolist(),
        mask.double().tolist(),
        ref_logp=ref_logp.double().tolist(),
        entropy=entropy.double().tolist(),
        **options,
    )
    assert math.isfinite(loss.item())
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_sequence_and_token_ratios_match_hand_arithmetic() -> None:
    # one response, log-ratios [0.1, 0.3], A = -1, eps 0.2.
    logp = torch.tensor([[0.1, 0.3]], dtype=torch.float64)
    old = torch.zeros(1, 2, dtype=torch.float64)
    adv = torch.tensor([-1.0], dtype=torch.float64)
    mask = torch.ones(1, 2)
    # sequence: s = exp(0.2) = 1.2214028; -A*s = 1.2214, -A*clip(s) = 1.2 -> max 1.2214028
    seq, _ = policy_loss(logp, old, adv, mask)
    assert seq.item() == pytest.approx(math.exp(0.2), rel=1e-6)
    # token: r = [exp(.1), exp(.3)] = [1.1051709, 1.3498588]; max(-A r, -A clip r) = r
    # token-mean = (1.1051709 + 1.3498588)/2 = 1.2275149
    tok, _ = policy_loss(logp, old, adv, mask, ratio_level="token")
    assert tok.item() == pytest.approx((math.exp(0.1) + math.exp(0.3)) / 2, rel=1e-6)
    # dual clip 1.3 caps the second token at -A*1.3 = 1.3 -> (1.1051709 + 1.3)/2
    dual, metrics = policy_loss(logp, old, adv, mask, ratio_level="token", dual_clip=1.3)
    assert dual.item() == pytest.approx((math.exp(0.1) + 1.3) / 2, rel=1e-6)
    # approx_kl = mean((r-1) - log r) = ((e^.1 - 1.1) + (e^.3 - 1.3))/2
    assert metrics["approx_kl"] == pytest.approx(
        ((math.exp(0.1) - 1.1) + (math.exp(0.3) - 1.3)) / 2, rel=1e-6
    )


def test_aggregations_match_hand_arithmetic() -> None:
    # ratio 1 everywhere (logp == old): pg_t = -A_t. Two responses, T = 3,
    # row 0 tokens A = [1, 2, 3] (3 tokens), row 1 A = [4, -, -] (1 token).
    logp = torch.zeros(2, 3)
    adv = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    cases = {
        # -(1+2+3+4)/4 = -2.5
        ("token-mean", None): -2.5,
        # per-seq means: -2, -4 -> mean -3
        ("seq-mean-token-mean", None): -3.0,
        # per-seq sums: -6, -4 -> mean -5
        ("seq-mean-token-sum", None): -5.0,
        # per-seq sums / T=3: -2, -4/3 -> mean -5/3
        ("seq-mean-token-sum-norm", None): -5.0 / 3.0,
        # token sum -10 over num_items 5 -> -2
        ("token-mean", 5.0): -2.0,
        # per-seq sum / T summed: -10/3, over num_items 4 -> -5/6
        ("seq-mean-token-sum-norm", 4.0): -10.0 / 3.0 / 4.0,
    }
    for (agg, num_items), expected in cases.items():
        loss, _ = policy_loss(
            logp, logp.clone(), adv, mask, agg=agg, num_items=num_items, ratio_level="token"
        )
        assert loss.item() == pytest.approx(expected, rel=1e-6), (agg, num_items)
    loss, _ = policy_loss(logp, logp.clone(), adv, mask, agg="seq-mean-token-sum-norm", max_len=6)
    assert loss.item() == pytest.approx((-1.0 - 4.0 / 6.0) / 2.0, rel=1e-6)


def test_clip_fraction_is_zero_without_clipping_and_one_when_every_token_clips() -> None:
    logp = torch.zeros(2, 3)
    mask = torch.ones(2, 3)
    _, none = policy_loss(logp, logp.clone(), torch.tensor([1.0, -1.0]), mask)
    assert none["clip_frac"] == 0.0
    # log-ratio 1 (ratio 2.72 > 1.2) with A > 0: the clipped branch binds on every token
    _, every = policy_loss(logp + 1.0, logp, torch.tensor([1.0, 2.0]), mask, ratio_level="token")
    assert every["clip_frac"] == pytest.approx(1.0)


def oracle_loss_of(problem: dict[str, Any], options: dict[str, Any]) -> float:
    """The oracle loss for plain (list) inputs, with ref_logp and entropy when present."""
    extra = {k: problem[k] for k in ("ref_logp", "entropy") if k in problem}
    return oracle_policy_loss(
        problem["logp"],
        problem["old_logp"],
        problem["advantages"],
        problem["mask"],
        **options,
        **extra,
    )


def finite_difference(
    problem: dict[str, Any], options: dict[str, Any], key: str, h: float = 1e-6
) -> list[list[float]]:
    """Central differences of the oracle loss with respect to ``problem[key]``."""
    grad = []
    for n, row in enumerate(problem[key]):
        grad_row = []
        for t in range(len(row)):
            plus = {k: [list(r) for r in v] if k == key else v for k, v in problem.items()}
            minus = {k: [list(r) for r in v] if k == key else v for k, v in problem.items()}
            plus[key][n][t] += h
            minus[key][n][t] -= h
            grad_row.append(
                (oracle_loss_of(plus, options) - oracle_loss_of(minus, options)) / (2 * h)
            )
        grad.append(grad_row)
    return grad


@pytest.mark.parametrize("ratio_level", RATIO_LEVELS)
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("token_adv", [False, True])
def test_gradients_match_finite_differences_of_oracle(
    ratio_level: str, agg: str, token_adv: bool
) -> None:
    problem = make_problem(5, token_advantages=token_adv, dtype=torch.float64)
    options = {
        "ratio_level": ratio_level,
        "agg": agg,
        "dual_clip": 1.5,
        "beta_kl": 0.3,
        "entropy_coef": 0.05,
    }
    logp = problem["logp"].clone().requires_grad_(True)
    entropy = problem["entropy"].clone().requires_grad_(True)
    loss, _ = policy_loss(
        logp,
        problem["old_logp"],
        problem["advantages"],
        problem["mask"],
        ref_logp=problem["ref_logp"],
        entropy=entropy,
        **options,
    )
    loss.backward()
    plain = as_lists(problem)
    fd_logp = torch.tensor(finite_difference(plain, options, "logp"), dtype=torch.float64)
    fd_entropy = torch.tensor(finite_difference(plain, options, "entropy"), dtype=torch.float64)
    assert logp.grad is not None and entropy.grad is not None
    torch.testing.assert_close(logp.grad.double(), fd_logp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(entropy.grad.double(), fd_entropy, rtol=1e-5, atol=1e-6)


def test_sequence_ratio_gradient_reaches_every_token_with_weight_one_over_length() -> None:
    # A = 1, log-ratios small so s stays inside the clip range: loss = -s (token-mean,
    # every token of the row carries s), d loss / d logp_t = -s / len for each response token.
    logp = torch.tensor([[0.01, -0.02, 0.04, 5.0]], dtype=torch.float64, requires_grad=True)
    old = torch.zeros(1, 4, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, _ = policy_loss(logp, old, torch.tensor([1.0], dtype=torch.float64), mask)
    loss.backward()
    s = math.exp(0.01)  # mean(0.01, -0.02, 0.04) = 0.01
    assert loss.item() == pytest.approx(-s, rel=1e-9)
    assert logp.grad is not None
    expected = [-s / 3, -s / 3, -s / 3, 0.0]
    for got, want in zip(logp.grad[0].tolist(), expected, strict=True):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("ratio_level", RATIO_LEVELS)
@pytest.mark.parametrize("agg", AGGS)
def test_gradcheck_float64_with_respect_to_logp_and_entropy(ratio_level: str, agg: str) -> None:
    problem = make_problem(23, token_advantages=False, dtype=torch.float64)
    logp = problem["logp"].clone().requires_grad_(True)
    entropy = problem["entropy"].clone().requires_grad_(True)

    def loss_of(lp: torch.Tensor, ent: torch.Tensor) -> torch.Tensor:
        loss, _ = policy_loss(
            lp,
            problem["old_logp"],
            problem["advantages"],
            problem["mask"],
            ratio_level=ratio_level,
            agg=agg,
            dual_clip=2.0,
            ref_logp=problem["ref_logp"],
            beta_kl=0.2,
            entropy=ent,
            entropy_coef=0.1,
        )
        return loss

    out = loss_of(logp, entropy)
    assert out.dtype == torch.float64, (
        f"float64 inputs give a {out.dtype} loss: the implementation downcasts float64"
    )
    assert torch.autograd.gradcheck(loss_of, (logp, entropy), eps=1e-6, atol=1e-8, rtol=1e-6)


GARBAGE = 1e9


@pytest.mark.parametrize("ratio_level", RATIO_LEVELS)
@pytest.mark.parametrize("agg", AGGS)
def test_masked_garbage_changes_neither_loss_nor_gradient(ratio_level: str, agg: str) -> None:
    clean = make_problem(31, token_advantages=True)
    dirty = {k: v.clone() for k, v in clean.items()}
    outside = ~clean["mask"]
    dirty["logp"][outside] = GARBAGE
    dirty["old_logp"][outside] = -GARBAGE
    dirty["ref_logp"][outside] = -GARBAGE
    dirty["advantages"][outside] = GARBAGE
    dirty["entropy"][outside] = -GARBAGE
    results = []
    for problem in (clean, dirty):
        logp = problem["logp"].clone().requires_grad_(True)
        entropy = problem["entropy"].clone().requires_grad_(True)
        loss, metrics = policy_loss(
            logp,
            problem["old_logp"],
            problem["advantages"],
            problem["mask"],
            ratio_level=ratio_level,
            agg=agg,
            dual_clip=3.0,
            ref_logp=problem["ref_logp"],
            beta_kl=0.1,
            entropy=entropy,
            entropy_coef=0.01,
        )
        loss.backward()
        results.append((loss.detach(), logp.grad, entropy.grad, metrics))
    (loss_a, grad_a, ent_a, met_a), (loss_b, grad_b, ent_b, met_b) = results
    assert torch.equal(loss_a, loss_b), (loss_a, loss_b)
    assert torch.equal(grad_a, grad_b)
    assert torch.equal(ent_a, ent_b)
    assert torch.equal(grad_b[outside], torch.zeros_like(grad_b[outside]))
    for key in met_a:
        assert met_a[key] == met_b[key], key


def test_mask_may_be_bool_or_numeric() -> None:
    problem = make_problem(3, token_advantages=False)
    as_bool, _ = policy_loss(
        problem["logp"], problem["old_logp"], problem["advantages"], problem["mask"]
    )
    as_float, _ = policy_loss(
        problem["logp"],
        problem["old_logp"],
        problem["advantages"],
        problem["mask"].to(torch.float32) * 3.0,
    )
    as_int, _ = policy_loss(
        problem["logp"], problem["old_logp"], problem["advantages"], problem["mask"].to(torch.int64)
    )
    assert torch.equal(as_bool, as_float) and torch.equal(as_bool, as_int)


def test_token_weights_multiply_each_token_surrogate_before_aggregation() -> None:
    """token_weights (e.g. truncated importance weights): a float64 loop by hand."""
    gen = torch.Generator().manual_seed(11)
    logp = -torch.rand(3, 4, generator=gen, dtype=torch.float64)
    old = logp + 0.4 * torch.randn(3, 4, generator=gen, dtype=torch.float64)
    adv = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    weights = torch.rand(3, 4, generator=gen, dtype=torch.float64) * 2
    weights[0, 3] = 1e9  # masked: must not matter
    total, count = 0.0, 0
    for n in range(3):
        for t in range(4):
            if not mask[n, t]:
                continue
            r = math.exp(float(logp[n, t] - old[n, t]))
            a = float(adv[n])
            pg = max(-a * r, -a * min(max(r, 0.8), 1.2))
            total += float(weights[n, t]) * pg
            count += 1
    loss, _ = policy_loss(logp, old, adv, mask, ratio_level="token", token_weights=weights)
    assert float(loss) == pytest.approx(total / count, rel=1e-12)
    ones, _ = policy_loss(logp, old, adv, mask, ratio_level="token", token_weights=torch.ones(3))
    plain, _ = policy_loss(logp, old, adv, mask, ratio_level="token")
    assert float(ones) == float(plain)
    with pytest.raises(ValueError, match="token_weights"):
        policy_loss(logp, old, adv, mask, token_weights=torch.ones(2, 4, dtype=torch.float64))
