"""Quantiles of member scores: per bundle (empirical) or run-wide (tracked).

Spec: ``riskpo.md`` section 2.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .._checks import as_tensor, require_ndim, require_number, require_real


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

    where the mean runs over every member score ``S`` of the step (spec section 2). The
    first step initialises ``q`` to the empirical quantiles of its scores. Under
    ``torch.distributed`` both the initial quantiles and the indicator means are taken
    over the union of all ranks' scores (all-gather / all-reduce of sums and counts), so
    every rank holds bitwise the same values as one process fed the union.

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
        self.gathered = bool(gathered)
        self.values: torch.Tensor | None = None
        self.num_updates = 0

    @property
    def initialized(self) -> bool:
        return self.values is not None

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

    def initialize(self, scores: torch.Tensor) -> None:
        """Set the estimates to the empirical quantiles of ``scores`` (all ranks).

        Non-finite scores (which ``advantages(validate=False)`` lets through) are left out.
        """
        pooled = self._pooled(self._checked(scores))
        if pooled.numel() == 0:
            raise ValueError("scores: cannot initialise the tracker from no scores")
        levels = level_tensor(self.levels, torch.float32, pooled.device)
        finite = torch.where(torch.isfinite(pooled), pooled, torch.nan)
        self.values = torch.nanquantile(finite, levels)

    def update(self, scores: torch.Tensor) -> torch.Tensor:
        """Apply one stochastic-approximation step with this step's member scores.

        Args:
            scores: this rank's member scores, ``[M]`` (or ``[nb, G]``, flattened).

        Returns:
            The new ``[2]`` float32 estimates.
        """
        scores = self._checked(scores).detach().float().flatten()
        if self.values is None:
            self.initialize(scores)
        assert self.values is not None
        values = self.values.to(scores.device)
        below = (scores[None, :] < values[:, None]).sum(dim=1).double()
        count = torch.full((1,), float(scores.numel()), dtype=torch.float64, device=below.device)
        totals = torch.cat([below, count])
        if self._communicates():
            dist.all_reduce(totals, group=self.process_group)
        # No step when no rank had a score; decided on the device (no host read).
        fraction = totals[:2] / totals[2].clamp_min(1.0)
        levels = level_tensor(self.levels, torch.float64, values.device)
        stepped = (values.double() + self.gamma * (levels - fraction)).float()
        values = torch.where(totals[2] > 0, stepped, values)
        self.values = values
        self.num_updates += 1
        return values

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the run exactly (levels, step size, estimates)."""
        return {
            "alpha": self.alpha,
            "beta": self.beta,
            "gamma": self.gamma,
            "values": None if self.values is None else self.values.detach().cpu().clone(),
            "num_updates": self.num_updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the levels must match this tracker's."""
        if not isinstance(state, dict):
            raise TypeError(f"state: expected a dict, got {type(state).__name__}")
        missing = {"alpha", "beta", "gamma", "values", "num_updates"} - set(state)
        if missing:
            raise ValueError(f"state: missing keys {sorted(missing)}")
        if (float(state["alpha"]), float(state["beta"])) != self.levels:
            raise ValueError(
                f"state: levels ({state['alpha']}, {state['beta']}) differ from this "
                f"tracker's {self.levels}"
            )
        self.gamma = float(state["gamma"])
        values = state["values"]
        self.values = (
            None if values is None else torch.as_tensor(values, dtype=torch.float32).clone()
        )
        self.num_updates = int(state["num_updates"])

    def __repr__(self) -> str:
        values = None if self.values is None else [round(v, 6) for v in self.values.tolist()]
        return (
            f"QuantileTracker(alpha={self.alpha}, beta={self.beta}, gamma={self.gamma}, "
            f"values={values}, num_updates={self.num_updates})"
        )
