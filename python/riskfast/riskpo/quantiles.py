"""Quantiles of member scores: per bundle (empirical) or run-wide (tracked).

Spec: ``riskpo.md`` section 2.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .._checks import (
    as_tensor,
    require_bool,
    require_int,
    require_ndim,
    require_number,
    require_real,
)

FLOAT32_MAX = torch.finfo(torch.float32).max


def unbiased_std(values: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Unbiased standard deviation along ``dim``; 0 where there is a single value."""
    count = values.shape[dim]
    if count < 2:
        return torch.zeros_like(values.sum(dim))
    return values.std(dim=dim, correction=1)


def level_tensor(
    levels: tuple[float, float], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """``[2]`` tensor of ``levels`` written on ``device`` (``torch.tensor`` would copy it
    from the host, which waits for a CUDA device)."""
    return torch.stack([torch.full((), level, dtype=dtype, device=device) for level in levels])


def empirical_quantiles(scores: torch.Tensor, levels: tuple[float, float]) -> torch.Tensor:
    """Quantiles of each row of ``scores`` with linear interpolation (``torch.quantile``).

    Args:
        scores: ``[nb, G]`` float32 member scores.
        levels: ``(alpha, beta)``.

    Returns:
        ``[nb, 2]`` float32: ``(q_alpha, q_beta)`` of every bundle.
    """
    q = level_tensor(levels, scores.dtype, scores.device)
    return torch.quantile(scores, q, dim=1).transpose(0, 1).contiguous()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_gather_1d(values: torch.Tensor, group: Any) -> torch.Tensor:
    """Concatenate a 1-D tensor of any per-rank length over all ranks."""
    world = dist.get_world_size(group)
    size = torch.tensor([values.numel()], dtype=torch.long, device=values.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    longest = int(max(int(s) for s in sizes))
    padded = values.new_zeros(longest)
    padded[: values.numel()] = values
    chunks = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(chunks, padded, group=group)
    return torch.cat([c[: int(s)] for c, s in zip(chunks, sizes)])


class QuantileTracker:
    """Run-wide quantile estimates updated by stochastic approximation.

    After each step, for each level ``s`` in ``(alpha, beta)``::

        q_s <- q_s + gamma * (s - mean(1[S < q_s]))

    where the mean runs over every finite member score ``S`` of the step (spec section 2;
    non-finite scores, which only ``advantages(validate=False)`` or a direct
    :meth:`update` can pass, are left out of the mean instead of counting as "not
    below"). The first step with a finite score initialises ``q`` to the empirical
    quantiles of its finite scores; until then the tracker stays uninitialised. Under
    ``torch.distributed`` both the initial quantiles and the indicator means are taken
    over the union of all ranks' scores (all-gather / all-reduce of sums and counts), so
    every rank holds bitwise the same values as one process fed the union. The estimates
    are kept inside the float32 range.

    Every call either completes or leaves the tracker as it was: the new values are
    computed first and assigned last, and :meth:`load_state_dict` checks the whole state
    before taking any of it.

    Started by ``advantages(validate=False)``, which reads nothing back, the tracker cannot
    know whether its first step had a finite score; every later such step then also
    computes the empirical quantiles of its scores (a sort, and an all-gather under
    ``torch.distributed``) to replace values that are still NaN, on the device. A step
    with ``validate=True``, :meth:`update` or :meth:`load_state_dict` settles that.

    Args:
        alpha: lower level, ``0 <= alpha < beta``.
        beta: upper level, ``beta <= 1``.
        gamma: step size of the update, ``> 0``.
        process_group: the ``torch.distributed`` group to reduce over (default: world).
        gathered: True when every rank is already fed the scores of all ranks (as the
            TRL integration does, bundling the gathered rewards): then nothing is
            communicated, since pooling again would count each score once per rank.
    """

    def __init__(
        self,
        alpha: float = 0.2,
        beta: float = 0.8,
        gamma: float = 0.1,
        *,
        process_group: Any = None,
        gathered: bool = False,
    ) -> None:
        self.alpha = require_number("alpha", alpha, low=0.0, high=1.0)
        self.beta = require_number("beta", beta, low=0.0, high=1.0)
        if self.alpha >= self.beta:
            raise ValueError(f"beta: must be greater than alpha ({self.alpha}), got {self.beta}")
        self.gamma = require_number("gamma", gamma, low=0.0, low_open=True)
        self.process_group = process_group
        self.gathered = require_bool("gathered", gathered)
        self.values: torch.Tensor | None = None
        self.num_updates = 0
        # True when ``values`` were set from scores nobody checked (validate=False): they
        # may then be NaN (no finite score yet), which the next step repairs on the device.
        self._unchecked = False

    @property
    def initialized(self) -> bool:
        return self.values is not None

    @property
    def settled(self) -> bool:
        """True when the values are known to be finite (a step need not look at its scores
        to start the tracker)."""
        return self.values is not None and not self._unchecked

    @property
    def levels(self) -> tuple[float, float]:
        return (self.alpha, self.beta)

    def _communicates(self) -> bool:
        return not self.gathered and _distributed()

    def _pooled(self, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.detach().float().flatten()
        return _all_gather_1d(scores, self.process_group) if self._communicates() else scores

    def _checked(self, scores: Any) -> torch.Tensor:
        scores = as_tensor("scores", scores)
        require_real("scores", scores)
        require_ndim("scores", scores, (1, 2), "[M] or [nb, G]")
        return scores

    def initial_values(self, scores: torch.Tensor) -> torch.Tensor | None:
        """Empirical ``[2]`` float32 quantiles of the finite ``scores`` of all ranks.

        None when no rank has a score at all; NaN (not read back) when none is finite.
        Changes nothing.
        """
        pooled = self._pooled(self._checked(scores))
        if pooled.numel() == 0:
            return None
        levels = level_tensor(self.levels, torch.float32, pooled.device)
        finite = torch.where(torch.isfinite(pooled), pooled, torch.nan)
        return torch.nanquantile(finite, levels)

    def initialize(self, scores: torch.Tensor) -> None:
        """Set the estimates to the empirical quantiles of the finite ``scores`` (all ranks).

        Raises ``ValueError`` naming ``scores`` (and changes nothing) when there is no
        finite score to start from.
        """
        values = self.initial_values(scores)
        if values is None or not bool(torch.isfinite(values).all()):
            raise ValueError("scores: no finite score to initialise the tracker from")
        self.values, self._unchecked = values, False

    def values_for_step(
        self, scores: torch.Tensor, *, finite: bool
    ) -> tuple[torch.Tensor | None, bool]:
        """The estimates a step with these ``scores`` uses, and whether they may be NaN.

        An uninitialised tracker (or one whose values may still be NaN) takes the empirical
        quantiles of ``scores`` (collective under ``torch.distributed``). ``finite``: the
        caller knows every score is finite (then the values are). Changes nothing; None
        when no value is known and no rank has a score.
        """
        if self.settled:
            return self.values, False
        fresh = self.initial_values(scores)
        if fresh is None:
            return self.values, self._unchecked
        if self.values is None:
            return fresh, not finite
        values = self.values.to(fresh.device)
        return torch.where(torch.isnan(values), fresh, values), not finite

    def stepped(self, values: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """One stochastic-approximation step from ``values`` with this step's ``scores``.

        Returns the new ``[2]`` float32 estimates (``values`` when no rank has a finite
        score); collective under ``torch.distributed``, no host read. Changes nothing.
        """
        scores = self._checked(scores).detach().float().flatten()
        values = values.to(scores.device)
        usable = torch.isfinite(scores)
        below = ((scores[None, :] < values[:, None]) & usable).sum(dim=1).double()
        totals = torch.cat([below, usable.sum().double()[None]])
        if self._communicates():
            dist.all_reduce(totals, group=self.process_group)
        # No step when no rank had a finite score; decided on the device (no host read).
        fraction = totals[:2] / totals[2].clamp_min(1.0)
        levels = level_tensor(self.levels, torch.float64, values.device)
        stepped = (values.double() + self.gamma * (levels - fraction)).clamp(
            -FLOAT32_MAX, FLOAT32_MAX
        )
        return torch.where(totals[2] > 0, stepped.float(), values)

    def commit(self, values: torch.Tensor | None, *, unchecked: bool) -> None:
        """Take ``values`` (from :meth:`values_for_step` and :meth:`stepped`) as the new
        estimates and count the update; ``unchecked``: they may be NaN."""
        self.values = values
        self._unchecked = unchecked and values is not None
        self.num_updates += 1

    def update(self, scores: torch.Tensor) -> torch.Tensor | None:
        """Apply one stochastic-approximation step with this step's member scores.

        Args:
            scores: this rank's member scores, ``[M]`` (or ``[nb, G]``, flattened).
                Non-finite scores are left out; a tracker that has seen no finite score
                stays uninitialised (one host read decides, on such steps only).

        Returns:
            The new ``[2]`` float32 estimates (None while uninitialised).
        """
        scores = self._checked(scores)
        values, unchecked = self.values_for_step(scores, finite=False)
        if values is not None:
            values = self.stepped(values, scores)
            if unchecked and not bool(torch.isfinite(values).all()):
                values = None
        self.commit(values, unchecked=False)
        return values

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the run exactly (levels, step size, estimates)."""
        values = None if self.values is None else self.values.detach().cpu().clone()
        if values is not None and self._unchecked and not bool(torch.isfinite(values).all()):
            values = None  # no finite score seen yet: uninitialised
        return {
            "alpha": self.alpha,
            "beta": self.beta,
            "gamma": self.gamma,
            "values": values,
            "num_updates": self.num_updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`.

        The levels and step size must equal this tracker's (an error names the option
        that differs); ``values`` must be None or two finite numbers. The whole state is
        checked before any of it is taken.
        """
        values, num_updates = checked_tracker_state(state, self.levels, self.gamma)
        self.values, self.num_updates, self._unchecked = values, num_updates, False

    def __repr__(self) -> str:
        values = None if self.values is None else [round(v, 6) for v in self.values.tolist()]
        return (
            f"QuantileTracker(alpha={self.alpha}, beta={self.beta}, gamma={self.gamma}, "
            f"values={values}, num_updates={self.num_updates})"
        )


TRACKER_STATE_KEYS = ("alpha", "beta", "gamma", "values", "num_updates")


def checked_tracker_state(
    state: Any, levels: tuple[float, float] | None = None, gamma: float | None = None
) -> tuple[torch.Tensor | None, int]:
    """Validate a :meth:`QuantileTracker.state_dict` (without loading it anywhere).

    Args:
        state: the state dict.
        levels, gamma: the options it must match (None: any valid value).

    Returns:
        ``(values, num_updates)``: values as a ``[2]`` float32 CPU tensor or None.

    Raises:
        TypeError / ValueError: naming ``state`` for a malformed state, or the option
        (``alpha``, ``beta``, ``gamma``) whose saved value differs.
    """
    if not isinstance(state, dict):
        raise TypeError(f"state: expected a dict, got {type(state).__name__}")
    missing = sorted(set(TRACKER_STATE_KEYS) - set(state))
    unknown = sorted(set(state) - set(TRACKER_STATE_KEYS))
    if missing or unknown:
        raise ValueError(
            f"state: not a QuantileTracker state (missing keys {missing}, unknown keys {unknown})"
        )
    saved = {
        "alpha": require_number("state['alpha']", state["alpha"], low=0.0, high=1.0),
        "beta": require_number("state['beta']", state["beta"], low=0.0, high=1.0),
        "gamma": require_number("state['gamma']", state["gamma"], low=0.0, low_open=True),
    }
    if saved["alpha"] >= saved["beta"]:
        raise ValueError(f"state: alpha = {saved['alpha']} is not below beta = {saved['beta']}")
    expected = {}
    if levels is not None:
        expected.update(alpha=levels[0], beta=levels[1])
    if gamma is not None:
        expected["gamma"] = gamma
    for name, value in expected.items():
        if saved[name] != value:
            raise ValueError(
                f"{name}: the checkpoint was saved with {name} = {saved[name]}, this tracker "
                f"has {value}"
            )
    num_updates = require_int("state['num_updates']", state["num_updates"], low=0)
    values = state["values"]
    if values is None:
        return None, num_updates
    if isinstance(values, torch.Tensor):
        require_real("state['values']", values)
    values = as_tensor("state['values']", values)
    if values.is_complex() or values.shape != (2,):
        raise ValueError(
            f"state: values must be None or 2 real numbers (q_alpha, q_beta), got shape "
            f"{tuple(values.shape)}"
        )
    values = values.detach().to(device="cpu", dtype=torch.float32).clone()
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"state: values must be finite (or None), got {values.tolist()}")
    return values, num_updates
