"""Every backend of the log-prob ops against a loop-based float64 oracle and by-hand values.

``tests/oracles/logprob_oracle.py`` is written with Python loops from the definitions,
independently of the kernels, the chunked PyTorch path and the vectorised reference
(``riskfast.ops.reference``); the hand-computed cases check the oracle itself. The cases
include masked vocabulary entries (``-inf`` logits, or a ``-inf`` bias entry), which get
probability 0, add nothing to the entropy and receive no gradient.
"""

from __future__ import annotations

import math

import pytest
import torch
from kernel_device import DEVICE
from oracles.logprob_oracle import (
    linear_gradients,
    linear_logits,
    token_logit_gradient,
    token_logprob_entropy,
)

from riskfast.ops import fused_linear_logprobs, selective_logprobs

BACKENDS = ["triton", "torch", "reference"]
LOGP_REL, GRAD_REL = 1e-5, 1e-4  # spec/kernels.md, fp32 inputs
INF = float("inf")

# The CPU interpreter evaluates both sides of every tl.where, also on masked lanes.
pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]

# Two live entries with p = (1/4, 3/4), written three ways (the masked one adds a -inf).
LOG3 = math.log(3.0)
QUARTER_LOGP = math.log(0.75)  # log p of the 3/4 entry
QUARTER_ENTROPY = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))  # 0.5623351446...
# d entropy / d z_j = -p_j (log p_j + entropy): +0.2059898... for the 1/4 entry, its negative
QUARTER_DH = -0.25 * (math.log(0.25) + QUARTER_ENTROPY)
HAND_CASES = {
    "two entries": ([0.0, LOG3], 1, 1.0, [QUARTER_DH, -QUARTER_DH]),
    "temperature 2": ([0.0, 2 * LOG3], 1, 2.0, [QUARTER_DH / 2, -QUARTER_DH / 2]),
    "one masked entry": ([-INF, 0.0, LOG3], 2, 1.0, [0.0, QUARTER_DH, -QUARTER_DH]),
}


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def _close(out: torch.Tensor, ref: list, tolerance: float, what: str) -> None:
    ref_t = torch.tensor(ref, dtype=torch.float64)
    assert torch.isfinite(out).all(), f"{what}: not finite: {out}"
    error = _rel(out, ref_t)
    assert error < tolerance, f"{what}: relative error {error:.3g} >= {tolerance:g}"


# --------------------------------------------------------------------------------------
# The oracle against values worked out by hand
# --------------------------------------------------------------------------------------


def test_oracle_uniform_logits_by_hand() -> None:
    logp, entropy = token_logprob_entropy([0.5] * 4, 2)
    assert logp == pytest.approx(-math.log(4.0), abs=1e-15)
    assert entropy == pytest.approx(math.log(4.0), abs=1e-15)
    # g = 1, g_H = 0: 1[j = t] - 1/4; g = 0, g_H = 1: zero (entropy is at its maximum)
    assert token_logit_gradient([0.5] * 4, 2, 1.0, 1.0, 0.0) == pytest.approx(
        [-0.25, -0.25, 0.75, -0.25], abs=1e-15
    )
    assert token_logit_gradient([0.5] * 4, 2, 1.0, 0.0, 1.0) == pytest.approx([0.0] * 4, abs=1e-15)


@pytest.mark.parametrize("case", HAND_CASES, ids=str)
def test_oracle_quarter_three_quarters_by_hand(case) -> None:
    logits, target, temperature, entropy_grad = HAND_CASES[case]
    logp, entropy = token_logprob_entropy(logits, target, temperature)
    assert logp == pytest.approx(QUARTER_LOGP, abs=1e-15)
    assert entropy == pytest.approx(QUARTER_ENTROPY, abs=1e-15)
    assert QUARTER_ENTROPY == pytest.approx(0.5623351446188083, abs=1e-15)
    grad = token_logit_gradient(logits, target, temperature, 0.0, 1.0)
    assert grad == pytest.approx(entropy_grad, abs=1e-15)


# --------------------------------------------------------------------------------------
# Every backend against the by-hand values
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", HAND_CASES, ids=str)
def test_selective_by_hand(backend, case) -> None:
    logits, target, temperature, entropy_grad = HAND_CASES[case]
    leaf = torch.tensor([logits], device=DEVICE).requires_grad_(True)
    targets = torch.tensor([target], device=DEVICE)
    logp, entropy = selective_logprobs(
        leaf, targets, temperature=temperature, return_entropy=True, backend=backend
    )
    assert logp.detach().item() == pytest.approx(QUARTER_LOGP, abs=1e-6)
    assert entropy.detach().item() == pytest.approx(QUARTER_ENTROPY, abs=1e-6)
    entropy.sum().backward()
    assert leaf.grad[0].tolist() == pytest.approx(entropy_grad, abs=1e-6)


# --------------------------------------------------------------------------------------
# Every backend against the loop oracle, masked entries included
# --------------------------------------------------------------------------------------


def _masked_logits(n: int, v: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[n, v]`` logits with about a third of the entries at ``-inf`` (never a target);
    the last row keeps only its target and one other entry."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, v, generator=gen) * 2.5
    targets = torch.randint(0, v, (n,), generator=gen)
    masked = torch.rand(n, v, generator=gen) < 0.35
    masked[-1] = True
    masked[-1, (targets[-1] + 1) % v] = False
    masked[torch.arange(n), targets] = False
    return logits.masked_fill(masked, -INF), targets


@pytest.mark.parametrize("backend", BACKENDS)
def test_selective_matches_loop_oracle_with_masked_entries(backend) -> None:
    n, v, temperature = 6, 37, 0.7
    logits, targets = _masked_logits(n, v, seed=40)
    gen = torch.Generator().manual_seed(41)
    g, g_h = torch.randn(n, generator=gen), torch.randn(n, generator=gen)

    rows, t_list = logits.tolist(), targets.tolist()
    want = [token_logprob_entropy(r, t, temperature) for r, t in zip(rows, t_list, strict=True)]
    want_grad = [
        token_logit_gradient(r, t, temperature, gn, ghn)
        for r, t, gn, ghn in zip(rows, t_list, g.tolist(), g_h.tolist(), strict=True)
    ]

    leaf = logits.to(DEVICE).requires_grad_(True)
    logp, entropy = selective_logprobs(
        leaf, targets.to(DEVICE), temperature=temperature, return_entropy=True, backend=backend
    )
    _close(logp, [w[0] for w in want], LOGP_REL, "logp")
    _close(entropy, [w[1] for w in want], LOGP_REL, "entropy")
    ((logp * g.to(DEVICE)).sum() + (entropy * g_h.to(DEVICE)).sum()).backward()
    _close(leaf.grad, want_grad, GRAD_REL, "dlogits")
    assert (leaf.grad.cpu()[torch.isinf(logits)] == 0).all(), "masked entries got a gradient"


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_matches_loop_oracle_with_a_masked_bias_entry(backend) -> None:
    n, h, v, temperature = 5, 8, 23, 1.3
    gen = torch.Generator().manual_seed(50)
    hidden = torch.randn(n, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) * 0.4
    bias = torch.randn(v, generator=gen)
    targets = torch.randint(0, v, (n,), generator=gen)
    masked = [j for j in range(0, v, 5) if j not in targets.tolist()]
    bias[masked] = -INF  # vocabulary entries the output layer masks
    g, g_h = torch.randn(n, generator=gen), torch.randn(n, generator=gen)

    h_list, w_list, b_list = hidden.tolist(), weight.tolist(), bias.tolist()
    rows = linear_logits(h_list, w_list, b_list)
    want = [token_logprob_entropy(r, t, temperature) for r, t in zip(rows, targets.tolist(), strict=True)]
    d_hidden, d_weight, d_bias = linear_gradients(
        h_list, w_list, b_list, targets.tolist(), temperature, g.tolist(), g_h.tolist()
    )

    leaves = [x.to(DEVICE).requires_grad_(True) for x in (hidden, weight, bias)]
    logp, entropy = fused_linear_logprobs(
        leaves[0], leaves[1], targets.to(DEVICE), bias=leaves[2], temperature=temperature,
        return_entropy=True, backend=backend,
    )
    _close(logp, [w[0] for w in want], LOGP_REL, "logp")
    _close(entropy, [w[1] for w in want], LOGP_REL, "entropy")
    ((logp * g.to(DEVICE)).sum() + (entropy * g_h.to(DEVICE)).sum()).backward()
    _close(leaves[0].grad, d_hidden, GRAD_REL, "grad hidden")
    _close(leaves[1].grad, d_weight, GRAD_REL, "grad weight")
    _close(leaves[2].grad, d_bias, GRAD_REL, "grad bias")
    assert (leaves[2].grad.cpu()[masked] == 0).all(), "masked bias entries got a gradient"
    assert (leaves[1].grad.cpu()[masked] == 0).all(), "masked weight rows got a gradient"


@pytest.mark.parametrize("backend", BACKENDS)
def test_finite_logits_across_the_float32_range_keep_gradients_finite(backend) -> None:
    # Finite input, but z = x / T leaves float32's range (or p underflows to 0) for the
    # low entries, and |g_H| / T > 1: the entropy term's p (log p + H) must be formed
    # before it is scaled by g_H, or 0 * inf turns the gradient to NaN.
    rows = [[0.0, 1.0, -3.0e38, -1.0e38, 2.0], [-2.0e38, 0.5, -1.0e30, 0.0, -7.0]]
    targets, temperature = [4, 1], 0.5
    g, g_h = [0.7, -1.1], [3.0, -2.5]
    want = [token_logprob_entropy(r, t, temperature) for r, t in zip(rows, targets, strict=True)]
    want_grad = [
        token_logit_gradient(r, t, temperature, gn, ghn)
        for r, t, gn, ghn in zip(rows, targets, g, g_h, strict=True)
    ]
    leaf = torch.tensor(rows, device=DEVICE).requires_grad_(True)
    logp, entropy = selective_logprobs(
        leaf, torch.tensor(targets, device=DEVICE), temperature=temperature,
        return_entropy=True, backend=backend,
    )
    _close(logp, [w[0] for w in want], LOGP_REL, "logp")
    _close(entropy, [w[1] for w in want], LOGP_REL, "entropy")
    weights = [torch.tensor(x, device=DEVICE) for x in (g, g_h)]
    ((logp * weights[0]).sum() + (entropy * weights[1]).sum()).backward()
    _close(leaf.grad, want_grad, GRAD_REL, "dlogits")
