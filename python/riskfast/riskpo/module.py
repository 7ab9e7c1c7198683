"""``RiskPOLoss``: advantages and policy loss in one module, for trainers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .._checks import (
    UINT64_MAX,
    as_tensor,
    checked_generator_state,
    require_choice,
    require_int,
    require_number,
)
from .loss import PolicyLossOptions, check_token_inputs, on_tokens, token_policy_loss
from .objective import AdvantageOptions, AdvantageResult, pending_advantages
from .quantiles import QuantileTracker, checked_tracker_state

STATE_VERSION = 2
"""Version of :meth:`RiskPOLoss.get_extra_state` (2: carries the options that shape it)."""

DEFAULT_GAMMA = 0.1
"""Step size of the quantile tracker when ``gamma`` is not given."""


class RiskPOLoss(nn.Module):
    """RiskPO objective as a module: rewards and log-probs in, scalar loss out.

    Holds the state a run needs between steps: a ``torch.Generator`` for the random
    bundling and, with ``quantile="tracker"``, a :class:`QuantileTracker`. Both are part
    of :meth:`state_dict` (as extra state), so saving and loading the module resumes the
    run exactly. The state dict also carries the options that shape that state (the
    bundling: ``bundle_size``, ``shuffle``; with a tracker also ``alpha``, ``beta``,
    ``gamma``, ``score``, ``drop_last``), and loading it into a module whose options
    differ raises ``ValueError`` naming the option, as does loading a tracker state into
    a module without a tracker or the reverse.

    Every option is validated here, with the errors of :func:`riskfast.riskpo.advantages`
    and :func:`riskfast.riskpo.policy_loss`. Every call either completes or changes
    nothing: :meth:`forward` checks all its inputs and computes the loss before it
    advances the generator and updates the tracker, and :meth:`load_state_dict` checks
    the whole state before taking any of it.

    Args:
        seed: seed of the bundling generator, ``0 <= seed < 2**64`` (None: drawn from the
            global RNG once).
        gamma: step size of the quantile tracker (default 0.1); only with
            ``quantile="tracker"``.
        **options: any option of :func:`riskfast.riskpo.advantages` (``estimator``,
            ``bundle_size``, ``alpha``, ``beta``, ``omega``, ``form``, ...) and of
            :func:`riskfast.riskpo.policy_loss` (``ratio_level``, ``eps_low``,
            ``eps_high``, ``dual_clip``, ``beta_kl``, ``entropy_coef``, ``agg``,
            ``max_len``).

    Example::

        criterion = RiskPOLoss(bundle_size=5, alpha=0.2, beta=0.8, seed=0)
        loss, metrics = criterion(logp, old_logp, mask, rewards, question_ids)
        loss.backward()
    """

    def __init__(
        self, *, seed: int | None = None, gamma: float | None = None, **options: Any
    ) -> None:
        super().__init__()
        advantage_names = set(AdvantageOptions.names())
        loss_names = set(PolicyLossOptions.names())
        unknown = sorted(set(options) - advantage_names - loss_names)
        if unknown:
            known = sorted(advantage_names | loss_names)
            raise TypeError(f"options: unknown option(s) {unknown}; known: {known}")
        self.advantage_options = AdvantageOptions(
            **{k: v for k, v in options.items() if k in advantage_names}
        )
        self.loss_options = PolicyLossOptions(
            **{k: v for k, v in options.items() if k in loss_names}
        )
        tracked = self.advantage_options.is_risk and self.advantage_options.quantile == "tracker"
        if gamma is not None:
            gamma = require_number("gamma", gamma, low=0.0, low_open=True)
            if not tracked:
                raise ValueError(
                    "gamma: only the quantile tracker uses it (quantile='tracker' with a "
                    f"risk estimator), got quantile={self.advantage_options.quantile!r} and "
                    f"estimator={self.advantage_options.estimator!r}"
                )
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        self.seed = require_int("seed", seed, low=0, high=UINT64_MAX)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.tracker: QuantileTracker | None = None
        if tracked:
            self.tracker = QuantileTracker(
                self.advantage_options.alpha,
                self.advantage_options.beta,
                DEFAULT_GAMMA if gamma is None else gamma,
            )
        self.last_result: AdvantageResult | None = None

    def compute_advantages(
        self,
        rewards: torch.Tensor,
        question_ids: torch.Tensor | None = None,
        *,
        group_size: int | None = None,
        bundle_ids: torch.Tensor | None = None,
        member_ids: torch.Tensor | None = None,
    ) -> AdvantageResult:
        """Advantages with this module's options, generator and tracker (advances both).

        ``question_ids`` or ``group_size``: as :func:`riskfast.riskpo.advantages`.
        """
        result, commit = self._pending_advantages(
            rewards, question_ids, group_size, bundle_ids, member_ids
        )
        commit()
        self.last_result = result
        return result

    def _pending_advantages(
        self,
        rewards: Any,
        question_ids: Any,
        group_size: int | None,
        bundle_ids: Any,
        member_ids: Any,
    ) -> tuple[AdvantageResult, Callable[[], None]]:
        return pending_advantages(
            rewards,
            question_ids,
            self.advantage_options,
            group_size=group_size,
            tracker=self.tracker,
            generator=self.generator,
            bundle_ids=bundle_ids,
            member_ids=member_ids,
        )

    def forward(
        self,
        logp: torch.Tensor,
        old_logp: torch.Tensor,
        mask: torch.Tensor,
        rewards: torch.Tensor,
        question_ids: torch.Tensor | None = None,
        *,
        group_size: int | None = None,
        ref_logp: torch.Tensor | None = None,
        entropy: torch.Tensor | None = None,
        num_items: float | None = None,
        bundle_ids: torch.Tensor | None = None,
        member_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of one step.

        Checks every input, computes the advantages and the loss, and only then advances
        the bundling generator and updates the tracker: a call that raises leaves the
        module exactly as it was, so a retried step equals an uninterrupted run.

        Args:
            logp, old_logp, mask: ``[N, T]`` per-token log-probs (current, behaviour) and
                response mask; see :func:`riskfast.riskpo.policy_loss`.
            rewards, question_ids: ``[N]``; see :func:`riskfast.riskpo.advantages`
                (``group_size`` instead of ``question_ids`` for responses stored
                question by question).
            ref_logp, entropy, num_items: passed to the policy loss.
            bundle_ids, member_ids: an explicit bundling, passed to the advantages.

        Returns:
            ``(loss, metrics)``: the advantage metrics merged with the loss metrics.
        """
        rewards = as_tensor("rewards", rewards)
        inputs, _ = check_token_inputs(
            logp,
            old_logp,
            mask,
            ref_logp=ref_logp,
            entropy=entropy,
            num_items=num_items,
            options=self.loss_options,
            num_responses=rewards.shape[0] if rewards.dim() == 1 else None,
        )
        result, commit = self._pending_advantages(
            rewards, question_ids, group_size, bundle_ids, member_ids
        )
        advantages = on_tokens(result.advantages.to(inputs.mask.device), inputs.mask, inputs.dtype)
        loss, loss_metrics = token_policy_loss(inputs, advantages, self.loss_options)
        commit()
        self.last_result = result
        return loss, {**result.metrics, **loss_metrics}

    def _state_options(self) -> dict[str, Any]:
        return state_options(
            self.advantage_options, None if self.tracker is None else self.tracker.gamma
        )

    def get_extra_state(self) -> dict[str, Any]:
        return run_state(self._state_options(), self.seed, self.generator, self.tracker)

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`get_extra_state`; the whole state is checked before any is taken."""
        _, seed, generator_state = checked_run_state(
            state, self.generator, expected=self._state_options(), what="module"
        )
        self.seed = seed
        self.generator.set_state(generator_state)
        if self.tracker is not None:
            self.tracker.load_state_dict(state["tracker"])  # checked above: cannot fail

    def extra_repr(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in vars(self.advantage_options).items())
        losses = ", ".join(f"{k}={v!r}" for k, v in vars(self.loss_options).items())
        gamma = "" if self.tracker is None else f", gamma={self.tracker.gamma}"
        return ", ".join(x for x in (options, losses, f"seed={self.seed}{gamma}") if x)


def state_options(options: AdvantageOptions, gamma: float | None) -> dict[str, Any]:
    """The options that shape a run's RiskPO state, as saved beside it in a checkpoint.

    The state is the bundling generator and, with ``quantile="tracker"`` and a risk
    estimator, the quantile tracker (step size ``gamma``). What the generator's state
    means depends on the bundling (``bundle_size``, ``shuffle``); the tracker's also on
    what it tracks (``alpha``, ``beta``, ``gamma``, and the scores it is fed: ``score``,
    ``drop_last``). Options that only shape the advantages (``omega``, ``center``, ...)
    may change on resume. Shared by :class:`RiskPOLoss` and the TRL and verl integrations.
    """
    tracked = options.is_risk and options.quantile == "tracker"
    shaping: dict[str, Any] = {
        "quantile": "tracker" if tracked else "empirical",
        "bundle_size": options.bundle_size,
        "shuffle": options.shuffle,
    }
    if tracked:
        shaping.update(
            alpha=float(options.alpha),
            beta=float(options.beta),
            gamma=None if gamma is None else float(gamma),
            score=options.score,
            drop_last=options.drop_last,
        )
    return shaping


def run_state(
    options: dict[str, Any], seed: int, generator: torch.Generator, tracker: QuantileTracker | None
) -> dict[str, Any]:
    """A run's RiskPO state for a checkpoint: the options that shape it (see
    :func:`state_options`), the seed, the bundling generator's state and the tracker's."""
    return {
        "version": STATE_VERSION,
        "options": dict(options),
        "seed": seed,
        "generator": generator.get_state(),
        "tracker": None if tracker is None else tracker.state_dict(),
    }


def checked_run_state(
    state: Any,
    generator: torch.Generator,
    *,
    expected: dict[str, Any] | None = None,
    what: str = "module",
) -> tuple[dict[str, Any], int, torch.Tensor]:
    """Validate a :func:`run_state` without loading it anywhere.

    Args:
        state: the saved state.
        generator: the generator that will take the saved generator state.
        expected: the options the loader runs with; a difference raises ``ValueError``
            naming the option. None: the saved options are only checked to be what
            :func:`state_options` makes (``ValueError`` naming ``state`` otherwise).
        what: what is loading ("module", "trainer", ...), for the messages.

    Returns:
        ``(options, seed, generator_state)`` as saved (the options as plain Python values
        when ``expected`` is None). The tracker state, if any, has been
        checked against the saved levels and step size.
    """
    if not isinstance(state, dict):
        raise TypeError(f"state: expected a dict, got {type(state).__name__}")
    if state.get("version") != STATE_VERSION or not isinstance(state.get("options"), dict):
        raise ValueError(
            f"state: not a RiskPO state of version {STATE_VERSION} (version "
            f"{state.get('version')!r}); states saved before version 2 do not carry their "
            f"options and cannot be checked against this {what}"
        )
    saved = state["options"]
    if expected is None:
        expected = saved = _rebuilt_state_options(saved)
    else:
        check_state_options(saved, expected, what)
    seed = require_int("state['seed']", state.get("seed"), low=0, high=UINT64_MAX)
    generator_state = checked_generator_state(state.get("generator"), generator)
    if saved.get("quantile") == "tracker":
        levels = (saved.get("alpha"), saved.get("beta"))
        checked_tracker_state(state.get("tracker"), levels, saved.get("gamma"))
    elif state.get("tracker") is not None:
        raise ValueError("state: holds a tracker state, but its options say quantile='empirical'")
    return saved, seed, generator_state


_STATE_OPTION_KEYS = ("quantile", "bundle_size", "shuffle")
_TRACKER_OPTION_KEYS = ("alpha", "beta", "gamma", "score", "drop_last")


def _rebuilt_state_options(saved: dict[str, Any]) -> dict[str, Any]:
    """The saved options of a :func:`run_state`, checked to be what :func:`state_options`
    makes (every key present, every value valid); ``ValueError`` naming ``state``."""
    tracked = saved.get("quantile") == "tracker"
    keys = set(_STATE_OPTION_KEYS) | (set(_TRACKER_OPTION_KEYS) if tracked else set())
    missing, unknown = sorted(keys - set(saved)), sorted(set(saved) - keys)
    if missing or unknown:
        raise ValueError(
            f"state: its options are not a RiskPO state's (missing keys {missing}, unknown "
            f"keys {unknown})"
        )
    try:
        require_choice("quantile", saved["quantile"], ("empirical", "tracker"))
        fields = {k: saved[k] for k in keys if k != "gamma"}
        gamma = require_number("gamma", saved["gamma"], low=0.0, low_open=True) if tracked else None
        rebuilt = state_options(AdvantageOptions(**fields), gamma)
    except (TypeError, ValueError) as err:
        raise ValueError(f"state: its options are not valid ({err})") from None
    return rebuilt


def check_state_options(saved: Any, expected: dict[str, Any], what: str) -> None:
    """Raise ``ValueError`` naming the first option whose saved value differs.

    ``saved`` and ``expected`` map option names to values; ``what`` names the object
    being loaded into ("module", "trainer", ...) for the message.
    """
    if not isinstance(saved, dict):
        raise TypeError(f"state: options must be a dict, got {type(saved).__name__}")
    for name in [*expected, *sorted(set(saved) - set(expected))]:
        mine = expected.get(name, "<not set>")
        theirs = saved.get(name, "<not set>")
        try:
            differs = bool(theirs != mine)
        except (RuntimeError, TypeError, ValueError):  # e.g. a saved tensor of 2 values
            differs = True
        if differs:
            raise ValueError(
                f"{name}: the checkpoint was saved with {name} = {theirs!r}, this {what} has "
                f"{mine!r}"
            )
