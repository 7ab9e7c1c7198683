"""``RiskPOLoss``: advantages and policy loss in one module, for trainers."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._checks import require_int
from .loss import policy_loss
from .objective import AdvantageOptions, AdvantageResult, compute_advantages
from .quantiles import QuantileTracker

_LOSS_OPTIONS = (
    "ratio_level",
    "eps_low",
    "eps_high",
    "dual_clip",
    "beta_kl",
    "entropy_coef",
    "agg",
    "max_len",
)


class RiskPOLoss(nn.Module):
    """RiskPO objective as a module: rewards and log-probs in, scalar loss out.

    Holds the state a run needs between steps: a ``torch.Generator`` for the random
    bundling and, with ``quantile="tracker"``, a :class:`QuantileTracker`. Both are part
    of :meth:`state_dict` (as extra state), so saving and loading the module resumes the
    run exactly.

    Args:
        seed: seed of the bundling generator (None: drawn from the global RNG once).
        gamma: step size of the quantile tracker.
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

    def __init__(self, *, seed: int | None = None, gamma: float = 0.1, **options: Any) -> None:
        super().__init__()
        known = set(AdvantageOptions.names()) | set(_LOSS_OPTIONS)
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"options: unknown option(s) {unknown}; known: {sorted(known)}")
        self.advantage_options = AdvantageOptions(
            **{k: v for k, v in options.items() if k in AdvantageOptions.names()}
        )
        self.loss_options = {k: v for k, v in options.items() if k in _LOSS_OPTIONS}
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        self.seed = require_int("seed", seed, low=0)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.tracker: QuantileTracker | None = None
        if self.advantage_options.quantile == "tracker":
            self.tracker = QuantileTracker(
                self.advantage_options.alpha, self.advantage_options.beta, gamma
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
        result = compute_advantages(
            rewards,
            question_ids,
            self.advantage_options,
            group_size=group_size,
            tracker=self.tracker,
            generator=self.generator,
            bundle_ids=bundle_ids,
            member_ids=member_ids,
        )
        self.last_result = result
        return result

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
        result = self.compute_advantages(
            rewards,
            question_ids,
            group_size=group_size,
            bundle_ids=bundle_ids,
            member_ids=member_ids,
        )
        advantages = result.advantages.to(logp.device)
        loss, loss_metrics = policy_loss(
            logp,
            old_logp,
            advantages,
            mask,
            ref_logp=ref_logp,
            entropy=entropy,
            num_items=num_items,
            **self.loss_options,
        )
        return loss, {**result.metrics, **loss_metrics}

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "generator": self.generator.get_state(),
            "tracker": None if self.tracker is None else self.tracker.state_dict(),
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.seed = int(state["seed"])
        self.generator.set_state(state["generator"])
        if self.tracker is not None and state["tracker"] is not None:
            self.tracker.load_state_dict(state["tracker"])

    def extra_repr(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in vars(self.advantage_options).items())
        losses = ", ".join(f"{k}={v!r}" for k, v in self.loss_options.items())
        return ", ".join(x for x in (options, losses, f"seed={self.seed}") if x)
