"""Independent float64 reference for RiskPO (spec: /work/shared/spec/riskpo.md).

Everything here is written with plain Python loops over Python floats (float64),
on purpose slow and obvious, so that it can check the vectorised float32
implementation in ``riskfast.riskpo``. It never imports riskfast.

Vocabulary (spec section 1): a *bundle* is a set of questions, a *member* is one
of the G disjoint response sets of a bundle holding exactly one response of each
of the bundle's questions. The member score is the sum (or mean) of its rewards.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

RISK_ESTIMATORS = ("mvar", "rvar", "cvar", "upper")
MEAN_ESTIMATORS = ("grpo", "dr_grpo", "rloo")
STD_EPS = 1e-6
LEVEL_EPS = 1e-6
CREDIT_STD_FLOOR = 1e-3
CREDIT_SUM_FLOOR = 1e-6
CREDITS = ("uniform", "std", "score", "sum_mean")
LOG_RATIO_CLAMP = 20.0


# ----------------------------------------------------------------------------
# small statistics, written by hand
# ----------------------------------------------------------------------------
def linear_quantile(values: Sequence[float], level: float) -> float:
    """Quantile with linear interpolation between order statistics.

    Position ``level * (n - 1)`` in the sorted values; the value is interpolated
    between the two neighbouring order statistics (the definition that
    ``torch.quantile(..., interpolation="linear")`` documents).
    """
    if len(values) == 0:
        raise ValueError("linear_quantile of an empty sequence")
    ordered = sorted(float(v) for v in values)
    position = level * (len(ordered) - 1)
    below = math.floor(position)
    below = min(max(below, 0), len(ordered) - 1)
    above = min(below + 1, len(ordered) - 1)
    weight = position - below
    return ordered[below] + weight * (ordered[above] - ordered[below])


def mean(values: Sequence[float]) -> float:
    """Arithmetic mean by a loop."""
    total = 0.0
    for v in values:
        total += float(v)
    return total / len(values)


def unbiased_std(values: Sequence[float]) -> float:
    """Unbiased (n - 1) standard deviation; 0 for fewer than two values."""
    n = len(values)
    if n < 2:
        return 0.0
    m = mean(values)
    total = 0.0
    for v in values:
        total += (float(v) - m) ** 2
    return math.sqrt(total / (n - 1))


def all_equal(values: Sequence[float]) -> bool:
    """True when every value equals the first one (exact comparison)."""
    first = values[0]
    for v in values:
        if v != first:
            return False
    return True


def positive_part(x: float) -> float:
    """``x+ = max(x, 0)``."""
    return max(0.0, x)


# ----------------------------------------------------------------------------
# questions and bundlings
# ----------------------------------------------------------------------------
def questions_in_order(question_ids: Sequence[int]) -> list[int]:
    """Question ids in order of first appearance."""
    seen: dict[int, None] = {}
    for q in question_ids:
        if int(q) not in seen:
            seen[int(q)] = None
    return list(seen)


def responses_by_question(question_ids: Sequence[int]) -> dict[int, list[int]]:
    """Map question id -> indices of its responses, in input order."""
    groups: dict[int, list[int]] = {}
    for n, q in enumerate(question_ids):
        groups.setdefault(int(q), []).append(n)
    return groups


def sequential_bundling(
    question_ids: Sequence[int], bundle_size: int
) -> tuple[list[int], list[int]]:
    """The ``shuffle=False`` bundling, built by hand.

    Bundle k holds questions k*B .. k*B+B-1 in first-appearance order; member j
    holds the j-th response (input order) of each question of the bundle.
    Returns ``(bundle_ids, member_ids)`` aligned with the inputs.
    """
    order = questions_in_order(question_ids)
    groups = responses_by_question(question_ids)
    bundle_ids = [-1] * len(question_ids)
    member_ids = [-1] * len(question_ids)
    for index, q in enumerate(order):
        for position, n in enumerate(groups[q]):
            bundle_ids[n] = index // bundle_size
            member_ids[n] = position
    return bundle_ids, member_ids


def per_question_bundling(question_ids: Sequence[int]) -> tuple[list[int], list[int]]:
    """Bundles = questions (first-appearance index), member = position in question."""
    return sequential_bundling(question_ids, 1)


def bundling_problems(
    question_ids: Sequence[int],
    bundle_ids: Sequence[int],
    member_ids: Sequence[int],
    bundle_size: int | None = None,
) -> list[str]:
    """Every way in which a bundling breaks the rules of spec section 1.

    Checks: all responses of a question share one bundle; inside each question
    the member ids are a permutation of 0..G-1 (so each member of a bundle holds
    exactly one response of each of its questions and every response lies in
    exactly one member); when ``bundle_size`` is given, bundle sizes are
    ``[B] * (Q // B)`` plus one bundle of ``Q % B`` when that is nonzero.
    Returns an empty list for a valid bundling.
    """
    problems: list[str] = []
    groups = responses_by_question(question_ids)
    sizes = {len(v) for v in groups.values()}
    if len(sizes) != 1:
        problems.append(f"unequal group sizes {sorted(sizes)}")
        return problems
    group_size = sizes.pop()
    questions_of_bundle: dict[int, list[int]] = {}
    for q, indices in groups.items():
        labels = {int(bundle_ids[n]) for n in indices}
        if len(labels) != 1:
            problems.append(f"question {q} spread over bundles {sorted(labels)}")
            continue
        questions_of_bundle.setdefault(labels.pop(), []).append(q)
        members = sorted(int(member_ids[n]) for n in indices)
        if members != list(range(group_size)):
            problems.append(f"question {q} has member ids {members}")
    for label, questions in questions_of_bundle.items():
        for j in range(group_size):
            holders = [n for q in questions for n in groups[q] if int(member_ids[n]) == j]
            if len(holders) != len(questions):
                problems.append(f"bundle {label} member {j} holds {len(holders)} responses")
    if bundle_size is not None:
        q_count = len(groups)
        expected = [bundle_size] * (q_count // bundle_size)
        if q_count % bundle_size:
            expected.append(q_count % bundle_size)
        got = sorted((len(v) for v in questions_of_bundle.values()), reverse=True)
        if got != sorted(expected, reverse=True):
            problems.append(f"bundle sizes {got}, expected {expected}")
    return problems


# ----------------------------------------------------------------------------
# advantages
# ----------------------------------------------------------------------------
@dataclass
class OracleAdvantages:
    """Everything the oracle derives for one step (keys are bundle labels)."""

    advantages: list[float]
    scores: dict[int, list[float]] = field(default_factory=dict)
    quantiles: dict[int, tuple[float, float]] = field(default_factory=dict)
    forced_zero: list[bool] = field(default_factory=list)
    bundle_questions: dict[int, list[int]] = field(default_factory=dict)
    scale: list[float] = field(default_factory=list)


def member_scores(
    rewards: Sequence[float],
    question_ids: Sequence[int],
    bundle_ids: Sequence[int],
    member_ids: Sequence[int],
    score: str = "sum",
) -> tuple[dict[int, list[float]], dict[int, list[int]]]:
    """Member scores ``S_j`` per bundle, and the questions of each bundle.

    ``scores[label][j]`` is the sum of the rewards of member j (divided by the
    bundle's question count for ``score="mean"``).
    """
    groups = responses_by_question(question_ids)
    group_size = len(next(iter(groups.values())))
    bundle_questions: dict[int, list[int]] = {}
    for q in questions_in_order(question_ids):
        label = int(bundle_ids[groups[q][0]])
        bundle_questions.setdefault(label, []).append(q)
    scores: dict[int, list[float]] = {}
    for label, questions in bundle_questions.items():
        totals = [0.0] * group_size
        for q in questions:
            for n in groups[q]:
                totals[int(member_ids[n])] += float(rewards[n])
        if score == "mean":
            totals = [t / len(questions) for t in totals]
        elif score != "sum":
            raise ValueError(f"unknown score {score!r}")
        scores[label] = totals
    return scores, bundle_questions


def risk_weight(
    z: float,
    a: float,
    b: float,
    *,
    estimator: str,
    alpha: float,
    beta: float,
    omega: float,
    form: str,
    w_mix: float,
    natural_baseline: bool,
    w_upper: float,
) -> tuple[float, float]:
    """Advantage of one member with score z, quantiles a (alpha) and b (beta).

    Returns ``(A, K)`` where K bounds the formula's coefficients (used to size
    float32 tolerances). Formulas of spec section 3 / the API contract.
    """
    g = positive_part(z - a) - positive_part(z - b) + a - b
    c = 1.0 if natural_baseline else 0.0
    if estimator == "mvar" and form == "paper":
        return -(1.0 + omega) * positive_part(a - z) + g, 2.0 + omega
    official = estimator == "mvar" and form == "reference_code"
    # The reference code's form divides by the official, eps-padded level widths.
    width = beta - alpha + (LEVEL_EPS if official else 0.0)
    lower_width = alpha + (LEVEL_EPS if official else 0.0)
    if estimator == "cvar" or official:
        a_cv = -positive_part(a - z) / lower_width
    else:
        a_cv = 0.0
    if estimator in ("rvar", "upper") or official:
        a_rv = (positive_part(z - a) - positive_part(z - b) + c * (a - b)) / width
    else:
        a_rv = 0.0
    if estimator == "mvar":
        if form != "reference_code":
            raise ValueError(f"unknown form {form!r}")
        return (w_mix * a_cv + a_rv) / (w_mix + 1.0), 1.0 / alpha + 3.0 / width
    if estimator == "rvar":
        return a_rv, 3.0 / width
    if estimator == "cvar":
        return a_cv, 1.0 / alpha
    if estimator == "upper":
        up = positive_part(z - b) / (1.0 - beta)
        return (w_upper * up + a_rv) / (w_upper + 1.0), 1.0 / (1.0 - beta) + 3.0 / width
    raise ValueError(f"unknown estimator {estimator!r}")


def _mean_family(
    rewards: Sequence[float], question_ids: Sequence[int], estimator: str
) -> OracleAdvantages:
    """grpo / dr_grpo / rloo, per question, by loops."""
    out = [0.0] * len(rewards)
    forced = [False] * len(rewards)
    scale = [1.0] * len(rewards)
    groups = responses_by_question(question_ids)
    for indices in groups.values():
        values = [float(rewards[n]) for n in indices]
        size = len(values)
        magnitude = max(1.0, max(abs(v) for v in values))
        if size == 1 or all_equal(values):
            for n in indices:
                forced[n] = True
            continue
        m = mean(values)
        s = unbiased_std(values)
        for n, v in zip(indices, values, strict=True):
            if estimator == "grpo":
                out[n] = (v - m) / (s + STD_EPS)
                scale[n] = magnitude / (s + STD_EPS)
            elif estimator == "dr_grpo":
                out[n] = v - m
                scale[n] = magnitude
            elif estimator == "rloo":
                others = 0.0
                for w in values:
                    others += w
                others -= v
                out[n] = v - others / (size - 1)
                scale[n] = 2.0 * magnitude
            else:
                raise ValueError(f"unknown estimator {estimator!r}")
    return OracleAdvantages(advantages=out, forced_zero=forced, scale=scale)


def oracle_advantages_detailed(
    rewards: Sequence[float],
    question_ids: Sequence[int],
    bundle_ids: Sequence[int],
    member_ids: Sequence[int],
    *,
    estimator: str = "mvar",
    alpha: float = 0.2,
    beta: float = 0.8,
    omega: float = 0.5,
    form: str = "paper",
    w_mix: float = 1.5,
    natural_baseline: bool = True,
    w_upper: float = 1.5,
    normalize: bool = True,
    center: bool = False,
    credit: str = "uniform",
    score: str = "sum",
    quantiles: tuple[float, float] | Mapping[int, tuple[float, float]] | None = None,
    dropped_bundles: Sequence[int] = (),
) -> OracleAdvantages:
    """RiskPO advantages for an explicit bundling (spec section 3, contract order).

    Order: estimator -> normalize -> zero all-equal bundles -> center ->
    drop_last -> credit (``"uniform"``, ``"std"``, ``"score"`` or ``"sum_mean"``, spec
    section 3). ``quantiles`` overrides the empirical per-bundle
    quantiles (one ``(q_alpha, q_beta)`` pair for every bundle, or a mapping from
    bundle label to pair; tracker mode). ``dropped_bundles`` lists bundle labels
    whose responses get advantage 0 (drop_last). ``scale`` gives, per response,
    the natural magnitude of its advantage (for float32 tolerances).
    """
    rewards = [float(r) for r in rewards]
    question_ids = [int(q) for q in question_ids]
    if estimator in MEAN_ESTIMATORS:
        return _mean_family(rewards, question_ids, estimator)
    if estimator not in RISK_ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}")
    scores, bundle_questions = member_scores(rewards, question_ids, bundle_ids, member_ids, score)
    groups = responses_by_question(question_ids)
    n_total = len(rewards)
    out = [0.0] * n_total
    forced = [False] * n_total
    scale = [1.0] * n_total
    used_quantiles: dict[int, tuple[float, float]] = {}
    member_advantage: dict[int, list[float]] = {}
    bundle_scale: dict[int, float] = {}
    for label, s in scores.items():
        if quantiles is None:
            a = linear_quantile(s, alpha)
            b = linear_quantile(s, beta)
        elif isinstance(quantiles, Mapping):
            a, b = (float(x) for x in quantiles[label])
        else:
            a, b = (float(x) for x in quantiles)
        used_quantiles[label] = (a, b)
        weights = []
        coefficient = 1.0
        for z in s:
            value, coefficient = risk_weight(
                z,
                a,
                b,
                estimator=estimator,
                alpha=alpha,
                beta=beta,
                omega=omega,
                form=form,
                w_mix=w_mix,
                natural_baseline=natural_baseline,
                w_upper=w_upper,
            )
            weights.append(value)
        denominator = 1.0
        if normalize:
            denominator = unbiased_std(s) + STD_EPS
            weights = [w / denominator for w in weights]
        magnitude = max([1.0, abs(a), abs(b)] + [abs(z) for z in s])
        bundle_scale[label] = coefficient * magnitude / denominator
        if all_equal(s):
            weights = [0.0] * len(s)
        if center:
            m = mean(weights)
            weights = [w - m for w in weights]
        if label in set(dropped_bundles):
            weights = [0.0] * len(s)
        member_advantage[label] = weights
    dropped = {int(d) for d in dropped_bundles}
    if credit not in CREDITS:
        raise ValueError(f"unknown credit {credit!r}")
    for label, questions in bundle_questions.items():
        bundle_forced = all_equal(scores[label]) or label in dropped
        # rho_i = r_i - mean of its question's rewards; Sigma_j sums rho over member j.
        question_mean = {q: mean([rewards[n] for n in groups[q]]) for q in questions}
        sigma = [0.0] * len(scores[label])
        for q in questions:
            for n in groups[q]:
                sigma[int(member_ids[n])] += rewards[n] - question_mean[q]
        for q in questions:
            divisor = 1.0
            if credit == "std":
                values = [rewards[n] for n in groups[q]]
                s_q = unbiased_std(values)
                if len(values) < 2 or not s_q > CREDIT_STD_FLOOR:
                    s_q = 1.0
                divisor = s_q + STD_EPS
            for n in groups[q]:
                member = int(member_ids[n])
                member_value = member_advantage[label][member]
                factor = 1.0 / divisor
                reach = factor  # how much float32 rounding of the inputs the factor amplifies
                if credit == "score":
                    factor = reach = 0.5 if rewards[n] > 0.0 else 1.5
                elif credit == "sum_mean":
                    if abs(sigma[member]) > CREDIT_SUM_FLOOR:
                        factor = (rewards[n] - question_mean[q]) / sigma[member]
                        magnitude = max(abs(rewards[m]) for p in questions for m in groups[p])
                        reach = max(
                            1.0, abs(factor) + 2.0 * magnitude * len(questions) / abs(sigma[member])
                        )
                    else:
                        factor = reach = 1.0 / len(questions)
                out[n] = member_value * factor
                forced[n] = bundle_forced
                scale[n] = bundle_scale[label] * reach
    return OracleAdvantages(
        advantages=out,
        scores=scores,
        quantiles=used_quantiles,
        forced_zero=forced,
        bundle_questions=bundle_questions,
        scale=scale,
    )


def oracle_advantages(
    rewards: Sequence[float],
    question_ids: Sequence[int],
    bundle_ids: Sequence[int],
    member_ids: Sequence[int],
    *,
    estimator: str = "mvar",
    alpha: float = 0.2,
    beta: float = 0.8,
    omega: float = 0.5,
    form: str = "paper",
    w_mix: float = 1.5,
    natural_baseline: bool = True,
    w_upper: float = 1.5,
    normalize: bool = True,
    center: bool = False,
    credit: str = "uniform",
    score: str = "sum",
    quantiles: tuple[float, float] | Mapping[int, tuple[float, float]] | None = None,
    dropped_bundles: Sequence[int] = (),
) -> list[float]:
    """Per-response advantages (list of floats aligned with the inputs).

    See :func:`oracle_advantages_detailed` for the meaning of every option.
    """
    return oracle_advantages_detailed(
        rewards,
        question_ids,
        bundle_ids,
        member_ids,
        estimator=estimator,
        alpha=alpha,
        beta=beta,
        omega=omega,
        form=form,
        w_mix=w_mix,
        natural_baseline=natural_baseline,
        w_upper=w_upper,
        normalize=normalize,
        center=center,
        credit=credit,
        score=score,
        quantiles=quantiles,
        dropped_bundles=dropped_bundles,
    ).advantages


# ----------------------------------------------------------------------------
# quantile tracker
# ----------------------------------------------------------------------------
def oracle_tracker_update(
    values: tuple[float, float] | None,
    scores: Sequence[float],
    alpha: float,
    beta: float,
    gamma: float,
) -> tuple[float, float]:
    """One tracker step: initialise if needed, then stochastic approximation.

    ``q_s <- q_s + gamma * (s - mean(1[S < q_s]))`` for s in (alpha, beta),
    where the indicator mean is over every score of the step (spec section 2).
    """
    if values is None:
        values = (linear_quantile(scores, alpha), linear_quantile(scores, beta))
    updated = []
    for level, q in zip((alpha, beta), values, strict=True):
        below = 0
        for s in scores:
            if float(s) < q:
                below += 1
        updated.append(q + gamma * (level - below / len(scores)))
    return updated[0], updated[1]


# ----------------------------------------------------------------------------
# policy loss
# ----------------------------------------------------------------------------
def _clip(x: float, low: float, high: float) -> float:
    return min(max(x, low), high)


def oracle_policy_loss_detailed(
    logp: Sequence[Sequence[float]],
    old_logp: Sequence[Sequence[float]],
    advantages: Sequence[float] | Sequence[Sequence[float]],
    mask: Sequence[Sequence[float]],
    *,
    ratio_level: str = "sequence",
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: float | None = None,
    ref_logp: Sequence[Sequence[float]] | None = None,
    beta_kl: float = 0.0,
    entropy: Sequence[Sequence[float]] | None = None,
    entropy_coef: float = 0.0,
    agg: str = "token-mean",
    max_len: int | None = None,
    num_items: float | None = None,
) -> dict[str, float]:
    """Clipped-surrogate loss of spec section 4 with loops over n and t.

    Returns a dict with ``loss`` and the metrics that the contract defines
    exactly: ``approx_kl`` (token ratio), ``entropy`` and ``kl`` means over
    response tokens, ``pg_loss`` (the surrogate alone, same aggregation) and
    ``clip_frac`` (response tokens where the clipped branch is strictly larger, as
    verl's pg_clipfrac), ``dual_clip_frac`` (tokens with A < 0 where the dual clip
    binds, as verl's pg_clipfrac_lower) and ``ratio_mean`` (mean over response tokens
    of the ratio used: s_n at sequence level, r_t at token level).
    """
    if beta_kl > 0.0 and ref_logp is None:
        raise ValueError("beta_kl > 0 needs ref_logp")
    n_rows = len(logp)
    n_cols = len(logp[0]) if n_rows else 0
    valid = [[float(mask[n][t]) != 0.0 for t in range(n_cols)] for n in range(n_rows)]

    def adv(n: int, t: int) -> float:
        row = advantages[n]
        if isinstance(row, Sequence):
            return float(row[t])
        return float(row)

    seq_ratio = [1.0] * n_rows
    if ratio_level == "sequence":
        for n in range(n_rows):
            total, count = 0.0, 0
            for t in range(n_cols):
                if valid[n][t]:
                    total += float(logp[n][t]) - float(old_logp[n][t])
                    count += 1
            if count:
                seq_ratio[n] = math.exp(_clip(total / count, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    elif ratio_level != "token":
        raise ValueError(f"unknown ratio_level {ratio_level!r}")

    loss_tok = [[0.0] * n_cols for _ in range(n_rows)]
    pg_tok = [[0.0] * n_cols for _ in range(n_rows)]
    approx_kl_sum = entropy_sum = kl_sum = ratio_sum = 0.0
    clipped = dual_clipped = 0
    tokens = 0
    for n in range(n_rows):
        for t in range(n_cols):
            if not valid[n][t]:
                continue
            tokens += 1
            log_ratio_t = _clip(
                float(logp[n][t]) - float(old_logp[n][t]), -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP
            )
            ratio_t = math.exp(log_ratio_t)
            approx_kl_sum += (ratio_t - 1.0) - log_ratio_t
            r = seq_ratio[n] if ratio_level == "sequence" else ratio_t
            a = adv(n, t)
            unclipped = -a * r
            clipped_value = -a * _clip(r, 1.0 - eps_low, 1.0 + eps_high)
            if clipped_value > unclipped:
                clipped += 1
            ratio_sum += r
            pg = max(unclipped, clipped_value)
            if dual_clip is not None and a < 0.0:
                if pg > -a * dual_clip:
                    dual_clipped += 1
                pg = min(pg, -a * dual_clip)
            value = pg
            if ref_logp is not None:
                d = _clip(
                    float(ref_logp[n][t]) - float(logp[n][t]), -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP
                )
                kl = math.exp(d) - d - 1.0
                kl_sum += kl
                if beta_kl > 0.0:
                    value += beta_kl * kl
            if entropy is not None:
                entropy_sum += float(entropy[n][t])
                value -= entropy_coef * float(entropy[n][t])
            pg_tok[n][t] = pg
            loss_tok[n][t] = value

    def aggregate(matrix: list[list[float]]) -> float:
        lengths = [sum(1 for t in range(n_cols) if valid[n][t]) for n in range(n_rows)]
        nonempty = sum(1 for length in lengths if length > 0)
        if agg == "token-mean":
            total = 0.0
            for n in range(n_rows):
                for t in range(n_cols):
                    if valid[n][t]:
                        total += matrix[n][t]
            denominator = num_items if num_items is not None else tokens
            return total / denominator if denominator else 0.0
        per_sequence = []
        for n in range(n_rows):
            if lengths[n] == 0:
                continue
            seq_sum = 0.0
            for t in range(n_cols):
                if valid[n][t]:
                    seq_sum += matrix[n][t]
            if agg == "seq-mean-token-mean":
                per_sequence.append(seq_sum / lengths[n])
            elif agg == "seq-mean-token-sum":
                per_sequence.append(seq_sum)
            elif agg == "seq-mean-token-sum-norm":
                per_sequence.append(seq_sum / (max_len if max_len is not None else n_cols))
            else:
                raise ValueError(f"unknown agg {agg!r}")
        if agg not in ("seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
            raise ValueError(f"unknown agg {agg!r}")
        denominator = num_items if num_items is not None else nonempty
        total = 0.0
        for v in per_sequence:
            total += v
        return total / denominator if denominator else 0.0

    result = {
        "loss": aggregate(loss_tok),
        "pg_loss": aggregate(pg_tok),
        "approx_kl": approx_kl_sum / tokens if tokens else 0.0,
        "clip_frac": clipped / tokens if tokens else 0.0,
        "dual_clip_frac": dual_clipped / tokens if tokens else 0.0,
        "ratio_mean": ratio_sum / tokens if tokens else 0.0,
    }
    if entropy is not None:
        result["entropy"] = entropy_sum / tokens if tokens else 0.0
    if ref_logp is not None:
        result["kl"] = kl_sum / tokens if tokens else 0.0
    return result


def oracle_policy_loss(
    logp: Sequence[Sequence[float]],
    old_logp: Sequence[Sequence[float]],
    advantages: Sequence[float] | Sequence[Sequence[float]],
    mask: Sequence[Sequence[float]],
    **options: object,
) -> float:
    """The scalar loss of :func:`oracle_policy_loss_detailed` (same options)."""
    return oracle_policy_loss_detailed(logp, old_logp, advantages, mask, **options)["loss"]
