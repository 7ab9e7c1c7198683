"""Triton kernel: member scores, quantiles and advantages of every bundle, one launch.

Spec: ``spec/riskpo.md`` sections 1-3 (the formulas) and ``spec/kernels.md`` ("bundle
advantages": one launch, no host synchronisation, bundles up to 64 members). The plain
PyTorch reference is ``riskfast.riskpo`` (``estimators.py`` owns each formula; this file
restates them in Triton and the tests compare the two).

One program handles one bundle. Its input is the bundle's slice of
``member_response[nb, K, G]``: the flat index of the response that member ``j`` holds
for the bundle's ``k``-th question (-1 for the empty slots of a smaller bundle). The
program gathers the rewards ``[K, G]``, sums them into member scores ``S[G]``, sorts the
scores for the linear-interpolation quantiles (``torch.quantile``'s definition), applies
the estimator, the std normalisation, the all-equal rule, centring and the drop mask,
and scatters each member's advantage to its responses, shared by the credit mode
(distinct addresses: no atomics, deterministic). Mean-based estimators use the same kernel with ``K = 1``: a "bundle" is
one question and the estimator reads the row of its rewards.

This module imports nothing of riskfast.
"""

from __future__ import annotations

import triton
import triton.language as tl

MAX_MEMBERS = 64
"""Largest G handled in one program; riskfast falls back to PyTorch above it."""

# Credit codes (constexpr): how a member's advantage is shared among its responses.
CREDIT_UNIFORM, CREDIT_STD, CREDIT_SCORE, CREDIT_SUM_MEAN = range(4)
CREDIT_CODES = {
    "uniform": CREDIT_UNIFORM,
    "std": CREDIT_STD,
    "score": CREDIT_SCORE,
    "sum_mean": CREDIT_SUM_MEAN,
}

# Estimator codes (constexpr): risk family, then mean family.
MVAR_PAPER, MVAR_REFERENCE, RVAR, CVAR, UPPER, GRPO, DR_GRPO, RLOO = range(8)
ESTIMATOR_CODES = {
    ("mvar", "paper"): MVAR_PAPER,
    ("mvar", "reference_code"): MVAR_REFERENCE,
    ("rvar", None): RVAR,
    ("cvar", None): CVAR,
    ("upper", None): UPPER,
    ("grpo", None): GRPO,
    ("dr_grpo", None): DR_GRPO,
    ("rloo", None): RLOO,
}


@triton.jit
def _pick(sorted_values, offsets, index):
    """``sorted_values[index]`` for a scalar index (``where``, so padding never leaks)."""
    return tl.sum(tl.where(offsets == index, sorted_values, 0.0), axis=0)


@triton.jit
def _quantile(sorted_values, offsets, level, G):
    """Linear-interpolation quantile of sorted ``values[:G]`` (as ``torch.quantile``)."""
    position = level * (G - 1)
    below_index = tl.floor(position).to(tl.int32)
    above_index = tl.minimum(below_index + 1, G - 1)
    weight = position - below_index
    below = _pick(sorted_values, offsets, below_index)
    above = _pick(sorted_values, offsets, above_index)
    # torch.lerp's two-sided form.
    return tl.where(
        weight < 0.5, below + weight * (above - below), above - (above - below) * (1.0 - weight)
    )


@triton.jit
def _std_of_deviations(deviation, g_denominator, axis: tl.constexpr):
    """Unbiased std from deviations (0 where padded), scaled by their largest magnitude so
    that squares cannot overflow float32 (rewards of 1e25 must normalise like rewards of 1)."""
    largest = tl.max(tl.abs(deviation), axis=axis)
    safe = tl.where(largest > 0, largest, 1.0)
    if axis == 0:
        scaled = deviation / safe
    else:
        scaled = deviation / safe[:, None]
    return largest * tl.sqrt(tl.sum(scaled * scaled, axis=axis) / g_denominator)


@triton.jit
def bundle_advantages_kernel(
    rewards_ptr,
    member_response_ptr,
    tracked_quantiles_ptr,
    kept_ptr,
    scores_ptr,
    quantiles_ptr,
    member_advantages_ptr,
    advantages_ptr,
    K,
    G,
    g_float,
    g_denominator,
    alpha,
    beta,
    omega,
    w_mix,
    natural_c,
    w_upper,
    ESTIMATOR: tl.constexpr,
    SCORE_MEAN: tl.constexpr,
    NORMALIZE: tl.constexpr,
    CENTER: tl.constexpr,
    CREDIT: tl.constexpr,
    USE_TRACKER: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """One bundle per program; see the module docstring for the layout.

    ``g_float = G`` and ``g_denominator = max(G - 1, 1)`` come as floats because Triton
    specialises an integer argument equal to 1 into a constant.
    """
    bundle = tl.program_id(0).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_g = tl.arange(0, BLOCK_G)
    in_k = offs_k < K
    in_g = offs_g < G
    tile_mask = in_k[:, None] & in_g[None, :]
    base = bundle * K * G
    index = tl.load(
        member_response_ptr + base + offs_k[:, None] * G + offs_g[None, :], mask=tile_mask, other=-1
    )
    valid = tile_mask & (index >= 0)
    rewards = tl.load(rewards_ptr + tl.where(valid, index, 0), mask=valid, other=0.0).to(tl.float32)

    # Member scores S_j (spec 1): sum, or mean over the bundle's questions.
    scores = tl.sum(rewards, axis=0)
    if SCORE_MEAN:
        questions = tl.sum((tl.max(valid.to(tl.int32), axis=1) > 0).to(tl.float32), axis=0)
        scores = scores / questions
    mean = tl.sum(tl.where(in_g, scores, 0.0), axis=0) / g_float
    deviation = tl.where(in_g, scores - mean, 0.0)
    std = _std_of_deviations(deviation, g_denominator, 0)
    high = tl.max(tl.where(in_g, scores, -float("inf")), axis=0)
    low = tl.min(tl.where(in_g, scores, float("inf")), axis=0)
    flat = high == low

    # Quantiles (spec 2).
    if USE_TRACKER:
        q_alpha = tl.load(tracked_quantiles_ptr)
        q_beta = tl.load(tracked_quantiles_ptr + 1)
    else:
        ordered = tl.sort(tl.where(in_g, scores, float("inf")), dim=0)
        q_alpha = _quantile(ordered, offs_g, alpha, G)
        q_beta = _quantile(ordered, offs_g, beta, G)

    # Advantages (spec 3); z = S_j, a = q_alpha, b = q_beta, x+ = max(x, 0).
    z = scores
    above_a = tl.maximum(z - q_alpha, 0.0)
    above_b = tl.maximum(z - q_beta, 0.0)
    below_a = tl.maximum(q_alpha - z, 0.0)
    range_var = (above_a - above_b + natural_c * (q_alpha - q_beta)) / (beta - alpha)
    if ESTIMATOR == 0:  # Mixed-VaR, paper form: -(1 + omega)(a - z)+ + g(z, a, b)
        values = -(1.0 + omega) * below_a + (above_a - above_b + (q_alpha - q_beta))
    elif ESTIMATOR == 1:  # Mixed-VaR, reference code: (w A_cv + A_rv) / (w + 1), levels + 1e-6
        official_rv = (above_a - above_b + natural_c * (q_alpha - q_beta)) / (beta - alpha + 1e-6)
        values = (w_mix * (-below_a / (alpha + 1e-6)) + official_rv) / (w_mix + 1.0)
    elif ESTIMATOR == 2:  # RVaR
        values = range_var
    elif ESTIMATOR == 3:  # CVaR of the lower tail
        values = -below_a / alpha
    elif ESTIMATOR == 4:  # risk-seeking upper tail
        values = (w_upper * above_b / (1.0 - beta) + range_var) / (w_upper + 1.0)
    elif ESTIMATOR == 5:  # GRPO
        values = (z - mean) / (std + 1e-6)
    elif ESTIMATOR == 6:  # Dr. GRPO
        values = z - mean
    else:  # RLOO: r - mean of the others
        others = (mean * g_float - z) / g_denominator
        values = z - others  # G = 1 is a single, all-equal member: zeroed below
    if ESTIMATOR < 5:  # noqa: SIM102 (constexpr branches read best one flag at a time)
        if NORMALIZE:
            values = values / (std + 1e-6)
    values = tl.where(in_g, values, 0.0)
    # All-equal scores carry no signal (exactly 0); non-finite scores or quantiles (only
    # reachable when the caller skipped validation) zero the bundle instead of NaN.
    finite = tl.where(in_g, tl.abs(scores) < float("inf"), 1)
    finite = (tl.min(finite.to(tl.int32), axis=0) > 0) & (tl.abs(q_alpha) < float("inf"))
    finite = finite & (tl.abs(q_beta) < float("inf"))
    values = tl.where(flat | (finite == 0), 0.0, values)
    if ESTIMATOR < 5:
        if CENTER:
            values = values - tl.sum(values, axis=0) / g_float
        kept = tl.load(kept_ptr + bundle)
        values = tl.where(kept != 0, values, 0.0)

    tl.store(scores_ptr + bundle * G + offs_g, scores, mask=in_g)
    tl.store(quantiles_ptr + bundle * 2, q_alpha)
    tl.store(quantiles_ptr + bundle * 2 + 1, q_beta)
    tl.store(member_advantages_ptr + bundle * G + offs_g, values, mask=in_g)

    # Credit (spec 3): each response's share of its member's advantage.
    per_response = tl.broadcast_to(values[None, :], (BLOCK_K, BLOCK_G))
    if CREDIT == 1:
        # std: divide by each question's own reward std + 1e-6 (the std is 1 when at most
        # 1e-3, or for G = 1).
        row_mean = tl.sum(rewards, axis=1) / g_float
        row_dev = tl.where(valid, rewards - row_mean[:, None], 0.0)
        row_std = _std_of_deviations(row_dev, g_denominator, 1)
        row_scale = tl.where((row_std > 1e-3) & (row_std < float("inf")), row_std, 1.0)
        per_response = per_response / (row_scale[:, None] + 1e-6)
    elif CREDIT == 2:
        # score: half the advantage to a rewarded response, 1.5 times it otherwise.
        per_response = per_response * tl.where(rewards > 0, 0.5, 1.5)
    elif CREDIT == 3:
        # sum_mean: A_j rho_i / Sigma_j, rho_i = r_i - mean_q(r), Sigma_j = sum of the
        # member's rho; A_j / B_b each when |Sigma_j| <= 1e-6.
        row_mean = tl.sum(rewards, axis=1) / g_float
        rho = tl.where(valid, rewards - row_mean[:, None], 0.0)
        sigma = tl.sum(rho, axis=0)
        spread = tl.abs(sigma) > 1e-6
        bundle_questions = tl.sum((tl.max(valid.to(tl.int32), axis=1) > 0).to(tl.float32), axis=0)
        ratio = rho / tl.where(spread, sigma, 1.0)[None, :]
        per_response = tl.where(
            spread[None, :], per_response * ratio, per_response / tl.maximum(bundle_questions, 1.0)
        )
    tl.store(advantages_ptr + tl.where(valid, index, 0), per_response, mask=valid)


def launch_bundle_advantages(
    rewards,
    member_response,
    tracked_quantiles,
    kept,
    scores,
    quantiles,
    member_advantages,
    advantages,
    *,
    estimator_code: int,
    alpha: float,
    beta: float,
    omega: float,
    w_mix: float,
    natural_c: float,
    w_upper: float,
    score_mean: bool,
    normalize: bool,
    center: bool,
    credit_code: int,
    use_tracker: bool,
) -> None:
    """Launch one program per bundle; all tensors are preallocated by the caller.

    Shapes: ``rewards[N]``, ``member_response[nb, K, G]`` (int64, -1 = empty),
    ``tracked_quantiles[2]`` float32, ``kept[nb]`` int8, ``scores[nb, G]``,
    ``quantiles[nb, 2]``, ``member_advantages[nb, G]``, ``advantages[N]`` float32.
    """
    num_bundles, k, g = member_response.shape
    if g > MAX_MEMBERS:
        raise ValueError(f"member_response: G = {g} exceeds {MAX_MEMBERS} members")
    bundle_advantages_kernel[(num_bundles,)](
        rewards,
        member_response,
        tracked_quantiles,
        kept,
        scores,
        quantiles,
        member_advantages,
        advantages,
        k,
        g,
        float(g),
        float(max(g - 1, 1)),
        alpha,
        beta,
        omega,
        w_mix,
        natural_c,
        w_upper,
        ESTIMATOR=estimator_code,
        SCORE_MEAN=score_mean,
        NORMALIZE=normalize,
        CENTER=center,
        CREDIT=credit_code,
        USE_TRACKER=use_tracker,
        BLOCK_K=max(triton.next_power_of_2(k), 2),
        BLOCK_G=max(triton.next_power_of_2(g), 2),
    )
