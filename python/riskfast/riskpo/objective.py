"""RiskPO advantages: bundles, member scores, quantiles, Mixed-VaR weights.

Spec: ``riskpo.md`` sections 1-3 and 5. :func:`advantages` is the single public entry
point; the formulas it applies live in :mod:`riskfast.riskpo.estimators`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from .._checks import (
    INT64_MAX,
    as_tensor,
    require_bool,
    require_choice,
    require_finite,
    require_int,
    require_integer,
    require_ndim,
    require_real,
    require_same_device,
    set_number,
)
from ..ops._kernels import require_triton, triton_available
from ..ops.bundle_advantages import (
    BUILTIN_ESTIMATORS,
    MAX_KERNEL_MEMBERS,
    bundle_advantages,
)
from .bundling import (
    Bundling,
    GroupLayout,
    consecutive_layout,
    draw_bundling,
    explicit_bundling,
    gather_member_rewards,
    group_layout,
    member_response_table,
    question_bundling,
)
from .estimators import (
    GROUP_EPS,
    MEAN_ESTIMATORS,
    RISK_ESTIMATORS,
    RiskParams,
    estimator_names,
)
from .quantiles import QuantileTracker, empirical_quantiles, unbiased_std

FORMS = ("paper", "reference_code")
CREDITS = ("uniform", "std", "score", "sum_mean")
SCORES = ("sum", "mean")
QUANTILE_MODES = ("empirical", "tracker")
BACKENDS = ("auto", "torch", "triton")
CREDIT_STD_FLOOR = 1e-3
"""credit="std": a question whose reward std is at most this uses 1 instead of its std."""
CREDIT_SCORE_WEIGHTS = (0.5, 1.5)
"""credit="score": the share of ``A_j`` a response gets when its reward is > 0, and else."""
CREDIT_SUM_FLOOR = 1e-6
"""credit="sum_mean": a member whose ``|Sigma_j|`` is at most this shares ``A_j`` equally."""


@dataclass(frozen=True)
class AdvantageOptions:
    """Every option of :func:`advantages`, validated once (see its docstring)."""

    estimator: str = "mvar"
    bundle_size: int = 5
    alpha: float = 0.2
    beta: float = 0.8
    omega: float = 0.5
    form: str = "paper"
    w_mix: float = 1.5
    natural_baseline: bool = True
    w_upper: float = 1.5
    normalize: bool = True
    center: bool = False
    credit: str = "uniform"
    score: str = "sum"
    quantile: str = "empirical"
    shuffle: bool = True
    drop_last: bool = False

    def __post_init__(self) -> None:
        require_choice("estimator", self.estimator, estimator_names())
        require_int("bundle_size", self.bundle_size, low=1, high=INT64_MAX)
        set_number(self, "alpha", low=0.0, high=1.0)
        set_number(self, "beta", low=0.0, high=1.0)
        alpha, beta = self.alpha, self.beta
        if alpha >= beta:
            raise ValueError(f"alpha: must be smaller than beta ({beta}), got {alpha}")
        set_number(self, "omega", low=-1.0, low_open=True)
        require_choice("form", self.form, FORMS)
        set_number(self, "w_mix", low=0.0)
        require_bool("natural_baseline", self.natural_baseline)
        set_number(self, "w_upper", low=0.0)
        for name in ("normalize", "center", "shuffle", "drop_last"):
            require_bool(name, getattr(self, name))
        require_choice("credit", self.credit, CREDITS)
        require_choice("score", self.score, SCORES)
        require_choice("quantile", self.quantile, QUANTILE_MODES)
        entry = RISK_ESTIMATORS.get(self.estimator)
        if entry is not None and entry.check is not None:
            entry.check(self.risk_params)

    @property
    def risk_params(self) -> RiskParams:
        return RiskParams(
            alpha=float(self.alpha),
            beta=float(self.beta),
            omega=float(self.omega),
            form=self.form,
            w_mix=float(self.w_mix),
            natural_baseline=self.natural_baseline,
            w_upper=float(self.w_upper),
        )

    def levels_tuple(self) -> tuple[float, float]:
        return (float(self.alpha), float(self.beta))

    @property
    def is_risk(self) -> bool:
        return self.estimator in RISK_ESTIMATORS

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


@dataclass(frozen=True)
class AdvantageResult:
    """What :func:`advantages` returns.

    Attributes:
        advantages: ``[N]`` float32, aligned with the input responses.
        bundle_ids: ``[N]`` int64 in ``0..nb-1``.
        member_ids: ``[N]`` int64 in ``0..G-1``.
        scores: ``[nb, G]`` float32; ``scores[bundle_ids[n], member_ids[n]]`` is the
            score of response n's member.
        quantiles: ``[nb, 2]`` float32, the ``(q_alpha, q_beta)`` used for each bundle.
        metric_tensors: the metrics as 0-dim tensors (no host synchronisation).
    """

    advantages: torch.Tensor
    bundle_ids: torch.Tensor
    member_ids: torch.Tensor
    scores: torch.Tensor
    quantiles: torch.Tensor
    metric_tensors: dict[str, torch.Tensor] = field(repr=False)

    @property
    def metrics(self) -> dict[str, float]:
        """Metrics as Python floats (one host synchronisation)."""
        names = list(self.metric_tensors)
        values = torch.stack([self.metric_tensors[n].double() for n in names]).tolist()
        return dict(zip(names, values))


def _checked_inputs(
    rewards: Any, question_ids: Any, group_size: Any
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validated float32 rewards and int64 question ids (None with ``group_size``).

    Checks types, shapes and devices; the reward *values* are checked together with what
    the call computed from them, by :func:`_check_values`.
    """
    rewards = as_tensor("rewards", rewards)
    require_real("rewards", rewards)
    require_ndim("rewards", rewards, 1, "[N]")
    n = rewards.numel()
    if n == 0:
        raise ValueError("rewards: is empty; advantages need at least one response")
    if question_ids is None and group_size is None:
        raise ValueError(
            "question_ids: required, unless group_size gives G for responses stored "
            "question by question"
        )
    if question_ids is not None and group_size is not None:
        raise ValueError("group_size: give question_ids or group_size, not both")
    if group_size is not None:
        require_int("group_size", group_size, low=1, high=INT64_MAX)
        if n % group_size:
            raise ValueError(
                f"group_size: {n} responses do not split into questions of {group_size}"
            )
    else:
        question_ids = as_tensor("question_ids", question_ids)
        require_integer("question_ids", question_ids)
        require_ndim("question_ids", question_ids, 1, "[N]")
        if question_ids.numel() != n:
            raise ValueError(f"question_ids: has {question_ids.numel()} entries, rewards has {n}")
        require_same_device("question_ids", question_ids, "rewards", rewards)
        question_ids = question_ids.long()
    return rewards.detach().float(), question_ids


def _check_values(
    rewards: torch.Tensor,
    original: Any,
    scores: torch.Tensor,
    quantiles: torch.Tensor,
    flat: torch.Tensor,
) -> None:
    """Spec section 5 with one host read: refuse non-finite rewards (or rewards beyond
    float32), and finite rewards whose scores, quantiles or advantages overflowed float32
    on the way (huge rewards, or huge weights such as ``omega``). Runs after the
    computation and before any state is changed, so a refused call changes nothing.

    The float64 sum of ``|r|`` is non-finite exactly when a reward is (or lies beyond
    float32).
    """
    abs_sum, computed_finite = torch.stack(
        [
            rewards.abs().double().sum(),
            torch.stack([torch.isfinite(t).all() for t in (scores, quantiles, flat)])
            .all()
            .double(),
        ]
    ).tolist()
    if not math.isfinite(abs_sum):
        require_finite("rewards", as_tensor("rewards", original))
        raise ValueError("rewards: values beyond the float32 range (about 3.4e38); rescale them")
    if not computed_finite:
        raise ValueError(
            "rewards: the member scores or advantages overflow float32 at this reward scale "
            f"(sum of |rewards| {abs_sum:.3g}) with these weights; rescale the rewards"
        )


def advantages(
    rewards: torch.Tensor,
    question_ids: torch.Tensor | None = None,
    *,
    group_size: int | None = None,
    estimator: str = "mvar",
    bundle_size: int = 5,
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
    quantile: str = "empirical",
    tracker: QuantileTracker | None = None,
    update_tracker: bool = True,
    generator: torch.Generator | None = None,
    shuffle: bool = True,
    drop_last: bool = False,
    bundle_ids: torch.Tensor | None = None,
    member_ids: torch.Tensor | None = None,
    backend: str = "auto",
    validate: bool = True,
) -> AdvantageResult:
    """Advantage of every response under RiskPO (or a mean-based baseline).

    Spec ``riskpo.md`` sections 1-3. Steps: group the responses by question; split the
    questions into bundles of ``bundle_size`` and each bundle into G members; score
    each member (sum of its rewards, or mean with ``score="mean"``); take the bundle's
    quantiles ``q_alpha``, ``q_beta``; map each member score to an advantage with
    ``estimator``; normalise by the bundle's score std; zero bundles whose scores are
    all equal; optionally centre; hand each member's advantage to its responses.

    Args:
        rewards: ``[N]`` finite rewards, any real dtype (math in float32).
        question_ids: ``[N]`` integers; every question must have the same count G.
            Finding the questions reads ``question_ids`` on the host.
        group_size: instead of ``question_ids``, G for responses stored question by
            question (response n answers question ``n // G``, the TRL and verl layout):
            no host read.
        estimator: ``"mvar"`` (Mixed-VaR, default), ``"rvar"``, ``"cvar"``, ``"upper"``
            (risk family) or ``"grpo"``, ``"dr_grpo"``, ``"rloo"`` (mean family, which
            ignores bundles, normalisation, centring, credit and quantile options and
            treats each question as its own bundle).
        bundle_size: B, questions per bundle (``B = 1``: per-question RiskPO).
        alpha, beta: quantile levels, ``0 <= alpha < beta <= 1``.
        omega: lower-tail weight of the paper's Mixed-VaR, ``> -1``.
        form: ``"paper"`` (default) or ``"reference_code"`` (uses ``w_mix`` and
            ``natural_baseline``; needs ``alpha > 0``).
        w_upper: upper-tail weight of ``estimator="upper"`` (needs ``beta < 1``).
        normalize: divide by ``std(S_1..S_G) + 1e-6`` (unbiased) per bundle.
        center: subtract each bundle's mean advantage afterwards.
        credit: how a member's advantage ``A_j`` is shared among its responses (spec
            section 3, the official code's ``credit_assign_mode``): ``"uniform"`` (each
            gets ``A_j``), ``"std"`` (``A_j / (s_q + 1e-6)`` with ``s_q`` the question's
            unbiased reward std, 1 when ``s_q <= 1e-3``), ``"score"`` (``0.5 A_j`` for a
            response with reward > 0, ``1.5 A_j`` otherwise) or ``"sum_mean"``
            (``A_j rho_i / Sigma_j`` with ``rho_i = r_i - mean_q(r)`` and ``Sigma_j`` the
            member's sum of ``rho``; ``A_j / B_b`` each when ``|Sigma_j| <= 1e-6``).
            Ignored by the mean-based estimators.
        score: ``"sum"`` or ``"mean"`` of a member's rewards.
        quantile: ``"empirical"`` per bundle, or ``"tracker"`` (needs ``tracker``).
        tracker: a :class:`QuantileTracker` with the same levels; its current values
            are used, then it is updated with this step's scores (``update_tracker``).
        generator: source of the random bundling (``shuffle=True``).
        shuffle: random bundles and members (default), or consecutive questions and
            member j = j-th response (the reference code's rule).
        drop_last: give the responses of a last, smaller bundle advantage 0 (its scores
            do not feed the tracker either; explicit bundlings are never dropped).
        bundle_ids, member_ids: an explicit bundling (``[N]`` each), overriding both.
        backend: ``"auto"`` (the Triton kernel on CUDA for built-in estimators and
            G <= 64, PyTorch otherwise), ``"torch"``, or ``"triton"`` (forced; on a CPU
            it needs ``TRITON_INTERPRET=1``).
        validate: check the reward values (spec section 5: non-finite rewards, or
            finite ones whose member scores or advantages overflow float32, raise
            ``ValueError`` naming ``rewards``) at the cost of one host read, taken after
            the computation and before any state changes. ``False`` skips that read: a
            bundle whose scores, quantiles or advantages are then not finite gets
            advantage 0 instead of an error, and a tracker starts from the finite scores
            only. With ``group_size`` and ``validate=False`` the call
            reads nothing back from the device (``spec/kernels.md``: one launch, no host
            synchronisation), whether ``generator`` lives on the device or on the CPU
            (its draws then reach the device through pinned memory, asynchronously).

    Returns:
        An :class:`AdvantageResult`. Deterministic for a given generator state.

    Every call either completes or changes nothing: a refused call leaves ``generator``
    (torch's default generator when None), ``tracker`` and the inputs as they were.
    ``tracker`` given with ``quantile="empirical"`` or a mean-based estimator, which
    would ignore it, is an error.
    """
    options = AdvantageOptions(
        estimator=estimator,
        bundle_size=bundle_size,
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
        quantile=quantile,
        shuffle=shuffle,
        drop_last=drop_last,
    )
    return compute_advantages(
        rewards,
        question_ids,
        options,
        group_size=group_size,
        tracker=tracker,
        update_tracker=update_tracker,
        generator=generator,
        bundle_ids=bundle_ids,
        member_ids=member_ids,
        backend=backend,
        validate=validate,
    )


def compute_advantages(
    rewards: Any,
    question_ids: Any,
    options: AdvantageOptions,
    *,
    group_size: int | None = None,
    tracker: QuantileTracker | None = None,
    update_tracker: bool = True,
    generator: torch.Generator | None = None,
    bundle_ids: Any = None,
    member_ids: Any = None,
    backend: str = "auto",
    validate: bool = True,
) -> AdvantageResult:
    """:func:`advantages` with its options already gathered in an :class:`AdvantageOptions`."""
    result, commit = pending_advantages(
        rewards,
        question_ids,
        options,
        group_size=group_size,
        tracker=tracker,
        update_tracker=update_tracker,
        generator=generator,
        bundle_ids=bundle_ids,
        member_ids=member_ids,
        backend=backend,
        validate=validate,
    )
    commit()
    return result


def pending_advantages(
    rewards: Any,
    question_ids: Any,
    options: AdvantageOptions,
    *,
    group_size: int | None = None,
    tracker: QuantileTracker | None = None,
    update_tracker: bool = True,
    generator: torch.Generator | None = None,
    bundle_ids: Any = None,
    member_ids: Any = None,
    backend: str = "auto",
    validate: bool = True,
) -> tuple[AdvantageResult, Callable[[], None]]:
    """:func:`compute_advantages` without changing any state: the result, and ``commit``.

    The tracker's new values are computed but not assigned, and with ``validate`` (whose
    check of the values comes after the bundling) the bundling is drawn from a copy of
    ``generator`` (of torch's default generator when None); ``commit()`` advances the
    generator and updates the tracker exactly as the call would have, and changes
    nothing else. A caller with more work that may fail (``RiskPOLoss.forward`` computing
    its loss) commits once that work has succeeded, so that a failed step leaves every
    state as it was. ``commit`` runs no collective and reads nothing.

    With ``validate=False`` every check that can refuse the call comes before the
    bundling, which then draws from ``generator`` itself: a copy would not be a generator
    that CUDA-graph capture has registered (the sync-free path is the one captured).
    """
    if not isinstance(options, AdvantageOptions):
        raise TypeError(f"options: expected AdvantageOptions, got {type(options).__name__}")
    original_rewards = rewards
    rewards, question_ids = _checked_inputs(rewards, question_ids, group_size)
    require_bool("validate", validate)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
    require_bool("update_tracker", update_tracker)
    if (bundle_ids is None) != (member_ids is None):
        missing = "member_ids" if member_ids is None else "bundle_ids"
        raise ValueError(f"{missing}: bundle_ids and member_ids must be given together")
    use_tracker = options.is_risk and options.quantile == "tracker"
    if use_tracker:
        if not isinstance(tracker, QuantileTracker):
            raise ValueError(
                "tracker: quantile='tracker' needs a QuantileTracker kept across steps"
            )
        if tracker.levels != (float(options.alpha), float(options.beta)):
            raise ValueError(
                f"tracker: its levels {tracker.levels} differ from (alpha, beta) = "
                f"({options.alpha}, {options.beta})"
            )
    elif tracker is not None:
        used_by = "a mean-based estimator" if not options.is_risk else "quantile='empirical'"
        raise ValueError(
            f"tracker: given, but {used_by} does not use it (estimator={options.estimator!r}, "
            f"quantile={options.quantile!r}); pass quantile='tracker' or no tracker"
        )

    require_choice("backend", backend, BACKENDS)

    if question_ids is None:
        layout = consecutive_layout(rewards.numel(), group_size, rewards.device)
    else:
        layout = group_layout(question_ids)
    use_triton = _use_triton(backend, rewards, layout, options)
    draws = None
    if not options.is_risk:
        bundling = question_bundling(layout)
    elif bundle_ids is not None:
        bundling = explicit_bundling(layout, bundle_ids, member_ids, rewards)
    else:
        draw_from = generator
        if options.shuffle and validate:
            draws = _GeneratorCopy(generator, rewards.device)
            draw_from = draws.copy
        bundling = draw_bundling(
            layout, options.bundle_size, shuffle=options.shuffle, generator=draw_from
        )
    num_kept = bundling.num_bundles
    smaller_last = options.is_risk and layout.num_questions % options.bundle_size != 0
    if smaller_last and bundle_ids is None and options.drop_last:
        # draw_bundling numbers bundles by slot, so the smaller one is always the last;
        # the kept bundles are then scores[:num_kept] (a slice: no host read).
        num_kept -= 1
    kept = torch.arange(bundling.num_bundles, device=rewards.device) < num_kept
    member_response = member_response_table(layout, bundling)

    tracked, tracked_unchecked = None, False
    if use_tracker:
        assert tracker is not None
        if tracker.settled:
            tracked = tracker.values
        else:
            # A first step starts from the scores of the path that will use them, so that a
            # score equal to the initial quantile compares equal (no one-ulp disagreement).
            # Values that may still be NaN (validate=False; read nothing to find out) are
            # repaired on the device from the PyTorch scores: no second kernel launch.
            first_scores = (
                _kernel_path(rewards, member_response, kept, None, options)[0]
                if use_triton and tracker.values is None
                else _member_scores(rewards, member_response, bundling, options)
            )
            first_scores = first_scores[:num_kept]
            tracked, tracked_unchecked = tracker.values_for_step(first_scores, finite=validate)
        # None: no value yet and no kept score on any rank (drop_last with fewer questions
        # than bundle_size); every bundle is dropped, the empirical quantiles are reported.
        tracked = None if tracked is None else tracked.to(rewards.device)

    if use_triton:
        scores, quantiles, member_advantages, flat = _kernel_path(
            rewards, member_response, kept, tracked, options
        )
    else:
        scores = _member_scores(rewards, member_response, bundling, options)
        if not options.is_risk:
            quantiles = empirical_quantiles(scores, options.levels_tuple())
            member_advantages = mean_member_advantages(scores, options)
        else:
            if tracked is not None:
                quantiles = tracked[None, :].expand(bundling.num_bundles, 2).clone()
            else:
                quantiles = empirical_quantiles(scores, options.levels_tuple())
            member_advantages = risk_member_advantages(scores, quantiles, options)
            member_advantages = member_advantages * kept[:, None]
        flat = _to_responses(rewards, member_response, member_advantages, options)

    response_bundles = bundling.response_bundle_ids(layout)
    if validate:
        _check_values(rewards, original_rewards, scores, quantiles, flat)
    else:
        flat, member_advantages = _zero_non_finite_bundles(
            flat, member_advantages, response_bundles, member_response
        )
    new_values = None
    if use_tracker and update_tracker and tracked is not None:
        assert tracker is not None
        new_values = tracker.stepped(tracked, scores[:num_kept])
    result = _result(
        rewards,
        layout,
        bundling,
        response_bundles,
        flat,
        scores,
        quantiles,
        member_advantages,
        num_kept,
    )

    def commit() -> None:
        if draws is not None:
            draws.commit()
        if use_tracker and update_tracker:
            assert tracker is not None
            tracker.commit(new_values, unchecked=tracked_unchecked)

    return result, commit


class _GeneratorCopy:
    """A copy of ``generator`` (torch's default one for ``device`` when None) to draw
    from; :meth:`commit` moves the original to where the copy has got."""

    def __init__(self, generator: torch.Generator | None, device: torch.device) -> None:
        if generator is None:
            generator = (
                torch.cuda.default_generators[
                    torch.cuda.current_device() if device.index is None else device.index
                ]
                if device.type == "cuda"
                else torch.default_generator
            )
        self.original = generator
        self.copy = torch.Generator(device=generator.device)
        self.copy.set_state(generator.get_state())

    def commit(self) -> None:
        self.original.set_state(self.copy.get_state())


def _kernel_path(
    rewards: torch.Tensor,
    member_response: torch.Tensor,
    kept: torch.Tensor,
    tracked: torch.Tensor | None,
    options: AdvantageOptions,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores, quantiles, member and response advantages from the Triton kernel."""
    scores, quantiles, member_advantages, flat = bundle_advantages(
        rewards,
        member_response,
        kept,
        tracked,
        estimator=options.estimator,
        form=options.form,
        alpha=float(options.alpha),
        beta=float(options.beta),
        omega=float(options.omega),
        w_mix=float(options.w_mix),
        natural_baseline=options.natural_baseline,
        w_upper=float(options.w_upper),
        score_mean=options.is_risk and options.score == "mean",
        normalize=options.normalize,
        center=options.center,
        credit=options.credit if options.is_risk else "uniform",
    )
    return scores, quantiles, member_advantages, flat


def _use_triton(
    backend: str, rewards: torch.Tensor, layout: GroupLayout, options: AdvantageOptions
) -> bool:
    """Kernel on CUDA for the built-in estimators and G <= 64; ``backend`` forces a path."""
    builtin = options.estimator in BUILTIN_ESTIMATORS
    fits = layout.group_size <= MAX_KERNEL_MEMBERS
    if backend == "triton":
        if not builtin:
            raise ValueError(
                f"backend: the kernel knows the built-in estimators only, not {options.estimator!r}"
            )
        if not fits:
            raise ValueError(
                f"backend: the kernel handles G <= {MAX_KERNEL_MEMBERS}, got G = {layout.group_size}"
            )
        require_triton(rewards)
        return True
    return backend == "auto" and rewards.is_cuda and builtin and fits and triton_available()


def _member_scores(
    rewards: torch.Tensor,
    member_response: torch.Tensor,
    bundling: Bundling,
    options: AdvantageOptions,
) -> torch.Tensor:
    """Member scores ``S_j`` ``[nb, G]``: sum (or mean) of each member's rewards (spec 1)."""
    scores = gather_member_rewards(rewards, member_response).sum(dim=1)
    if options.is_risk and options.score == "mean":
        scores = scores / bundling.bundle_num_questions[:, None].to(scores.dtype)
    return scores


def risk_member_advantages(
    scores: torch.Tensor, quantiles: torch.Tensor, options: AdvantageOptions
) -> torch.Tensor:
    """Member advantages ``[nb, G]`` from member scores ``[nb, G]`` and quantiles ``[nb, 2]``.

    Applies the estimator (spec section 3), the per-bundle normalisation, the rule that a
    bundle whose scores are all equal (G = 1 included) gets exactly 0, and centring.
    """
    entry = RISK_ESTIMATORS[options.estimator]
    a = quantiles[:, 0:1]
    b = quantiles[:, 1:2]
    values = entry.fn(scores, a, b, options.risk_params)
    if options.normalize:
        values = values / (unbiased_std(scores, dim=1)[:, None] + GROUP_EPS)
    values = _zero_degenerate_rows(scores, values, quantiles)
    if options.center:
        values = values - values.mean(dim=1, keepdim=True)
    return values


def mean_member_advantages(rewards: torch.Tensor, options: AdvantageOptions) -> torch.Tensor:
    """Mean-family advantages ``[Q, G]`` of each question's rewards ``[Q, G]``."""
    values = MEAN_ESTIMATORS[options.estimator](rewards)
    return _zero_degenerate_rows(rewards, values)


def _zero_degenerate_rows(
    scores: torch.Tensor, values: torch.Tensor, quantiles: torch.Tensor | None = None
) -> torch.Tensor:
    """Exactly 0 on rows whose scores are all equal (G = 1 included), whatever rounding
    did, and on rows with a non-finite score or quantile (reachable only with
    ``validate=False``: a bundle the checks would have refused carries no signal)."""
    degenerate = (scores.amax(dim=1) == scores.amin(dim=1)) | ~torch.isfinite(scores).all(dim=1)
    if quantiles is not None:
        degenerate = degenerate | ~torch.isfinite(quantiles).all(dim=1)
    return torch.where(degenerate[:, None], torch.zeros_like(values), values)


def _zero_non_finite_bundles(
    flat: torch.Tensor,
    member_advantages: torch.Tensor,
    response_bundles: torch.Tensor,
    member_response: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``validate=False``: a bundle with a non-finite member advantage or response share
    (its scores or quantiles were not finite, or finite rewards overflowed on the way) gets 0 on every
    response (``response_bundles``: the ``[N]`` bundle of each); decided on the device,
    no host read."""
    bad = ~torch.isfinite(member_advantages).all(dim=1)
    # A credit share can overflow where its member advantage did not (sum_mean's ratio).
    held = member_response >= 0
    shares_finite = torch.isfinite(flat)[member_response.clamp_min(0)] | ~held
    bad = bad | ~shares_finite.flatten(1).all(dim=1)
    flat = torch.where(bad[response_bundles], 0.0, flat)
    return flat, torch.where(bad[:, None], 0.0, member_advantages)


def _credit_std_divisor(question_rewards: torch.Tensor) -> torch.Tensor:
    """``[M, 1]`` divisor of credit="std": ``s_q + 1e-6`` with ``s_q`` each row's unbiased
    std, replaced by 1 when at most 1e-3 (or not finite, which only ``validate=False`` can
    produce), as the official code does."""
    std = unbiased_std(question_rewards, dim=1)[:, None]
    usable = (std > CREDIT_STD_FLOOR) & torch.isfinite(std)
    return torch.where(usable, std, torch.ones_like(std)) + GROUP_EPS


def credit_shares(
    rewards: torch.Tensor,
    member_response: torch.Tensor,
    member_advantages: torch.Tensor,
    credit: str,
) -> torch.Tensor:
    """Each response's share of its member's advantage: ``[nb, K, G]`` (spec section 3, Credit).

    Args:
        rewards: ``[N]`` float32.
        member_response: ``[nb, K, G]`` response index per bundle, question slot and member
            (-1 in the empty slots of a smaller bundle, whose values are then unused).
        member_advantages: ``[nb, G]`` member advantages ``A_j``.
        credit: one of :data:`CREDITS`.
    """
    values = member_advantages[:, None, :].expand(member_response.shape)
    if credit == "uniform":
        return values
    question_rewards = gather_member_rewards(rewards, member_response)  # [nb, K, G]
    nb, k, g = question_rewards.shape
    if credit == "std":
        return values / _credit_std_divisor(question_rewards.reshape(nb * k, g)).view(nb, k, 1)
    if credit == "score":
        rewarded, otherwise = CREDIT_SCORE_WEIGHTS
        return values * torch.where(question_rewards > 0, rewarded, otherwise)
    # sum_mean: rho_i = r_i - mean_q(r); Sigma_j = sum of the member's rho (= S_j - mean(S)).
    present = member_response >= 0
    rho = question_rewards - question_rewards.mean(dim=2, keepdim=True)
    rho = torch.where(present, rho, torch.zeros_like(rho))
    sigma = rho.sum(dim=1, keepdim=True)  # [nb, 1, G]
    spread = sigma.abs() > CREDIT_SUM_FLOOR
    questions = present[:, :, :1].sum(dim=1, keepdim=True).clamp_min(1).to(values.dtype)
    ratio = rho / torch.where(spread, sigma, torch.ones_like(sigma))
    return torch.where(spread, values * ratio, values / questions)


def _to_responses(
    rewards: torch.Tensor,
    member_response: torch.Tensor,
    member_advantages: torch.Tensor,
    options: AdvantageOptions,
) -> torch.Tensor:
    """Hand each member's advantage to its responses (``credit``): ``[N]`` in input order.

    Empty slots scatter into a spare last element, which is dropped.
    """
    n = rewards.numel()
    credit = options.credit if options.is_risk else "uniform"
    values = credit_shares(rewards, member_response, member_advantages, credit)
    target = torch.where(member_response >= 0, member_response, n)
    out = rewards.new_zeros(n + 1)
    out[target.flatten()] = values.flatten()
    return out[:n]


def _result(
    rewards: torch.Tensor,
    layout: GroupLayout,
    bundling: Bundling,
    response_bundles: torch.Tensor,
    flat: torch.Tensor,
    scores: torch.Tensor,
    quantiles: torch.Tensor,
    member_advantages: torch.Tensor,
    num_kept: int,
) -> AdvantageResult:
    """Assemble the result and its metrics (0-dim tensors: no host synchronisation)."""
    device = flat.device
    dropped_responses = bundling.bundle_num_questions[num_kept:].sum() * layout.group_size
    counts = {
        "num_bundles": bundling.num_bundles,
        "num_questions": layout.num_questions,
        "group_size": layout.group_size,
    }
    # float64 reductions: means and spreads of finite float32 values never overflow.
    wide_flat, wide_quantiles = flat.double(), quantiles.double()
    metrics = {
        "advantage_mean": wide_flat.mean(),
        "advantage_std": wide_flat.std(correction=0),
        "score_mean": scores.double().mean(),
        "quantile_alpha": wide_quantiles[:, 0].mean(),
        "quantile_beta": wide_quantiles[:, 1].mean(),
        "zero_advantage_bundle_frac": (member_advantages == 0).all(dim=1).float().mean(),
        # torch.full writes on the device; torch.tensor would copy from the host.
        **{k: torch.full((), float(v), device=device) for k, v in counts.items()},
        "dropped_response_frac": dropped_responses.float() / rewards.numel(),
    }
    return AdvantageResult(
        advantages=flat,
        bundle_ids=response_bundles,
        member_ids=bundling.response_member_ids(layout),
        scores=scores,
        quantiles=quantiles,
        metric_tensors={k: v.to(device) for k, v in metrics.items()},
    )
