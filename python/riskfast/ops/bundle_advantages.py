"""Dispatch to the bundle-advantages Triton kernel (``kernels/bundle_advantages.py``).

``riskfast.riskpo.advantages`` calls :func:`bundle_advantages` on CUDA (or when forced
with ``backend="triton"``); its PyTorch path in ``riskfast.riskpo`` is the reference the
tests compare the kernel with. This module imports nothing of ``riskfast.riskpo``.
"""

from __future__ import annotations

import torch

from ._kernels import load_kernels

MAX_KERNEL_MEMBERS = 64
"""Largest group size G the kernel handles in one program (spec/kernels.md: up to 64)."""

BUILTIN_ESTIMATORS = frozenset({"mvar", "rvar", "cvar", "upper", "grpo", "dr_grpo", "rloo"})


def bundle_advantages(
    rewards: torch.Tensor,
    member_response: torch.Tensor,
    kept: torch.Tensor,
    tracked_quantiles: torch.Tensor | None,
    *,
    estimator: str,
    form: str,
    alpha: float,
    beta: float,
    omega: float,
    w_mix: float,
    natural_baseline: bool,
    w_upper: float,
    score_mean: bool,
    normalize: bool,
    center: bool,
    credit: str = "uniform",
    credit_std: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Member scores, quantiles and advantages of every bundle in one kernel launch.

    Args:
        rewards: ``[N]`` float32 (already validated and cast by the caller).
        member_response: ``[nb, K, G]`` int64 response index per bundle, question slot
            and member (-1 in empty slots); ``K = 1`` for the mean-based estimators.
        kept: ``[nb]`` bool, False for a dropped bundle (advantage 0).
        tracked_quantiles: ``[2]`` float32 tracker values, or None for the empirical
            per-bundle quantiles.
        credit: ``"uniform"``, ``"std"``, ``"score"`` or ``"sum_mean"`` (spec section 3).
        credit_std: the older spelling of ``credit="std"`` (True overrides ``credit``).
        The remaining keywords are those of ``riskfast.riskpo.advantages``.

    Returns:
        ``scores [nb, G]``, ``quantiles [nb, 2]``, ``member_advantages [nb, G]`` and
        ``advantages [N]``, all float32. No host synchronisation.
    """
    kernel = load_kernels().bundle_advantages

    key = (estimator, form if estimator == "mvar" else None)
    if key not in kernel.ESTIMATOR_CODES:
        raise ValueError(f"estimator: the kernel does not implement {estimator!r}")
    if credit_std:
        credit = "std"
    if credit not in kernel.CREDIT_CODES:
        raise ValueError(f"credit: must be one of {sorted(kernel.CREDIT_CODES)}, got {credit!r}")
    nb, _, g = member_response.shape
    device = rewards.device
    rewards = rewards.float().contiguous()
    member_response = member_response.long().contiguous()
    scores = torch.empty(nb, g, dtype=torch.float32, device=device)
    quantiles = torch.empty(nb, 2, dtype=torch.float32, device=device)
    member_advantages = torch.empty(nb, g, dtype=torch.float32, device=device)
    advantages = torch.zeros_like(rewards)
    tracked = (
        tracked_quantiles.float().contiguous()
        if tracked_quantiles is not None
        else torch.zeros(2, dtype=torch.float32, device=device)
    )
    kernel.launch_bundle_advantages(
        rewards,
        member_response,
        tracked,
        kept.to(torch.int8).contiguous(),
        scores,
        quantiles,
        member_advantages,
        advantages,
        estimator_code=kernel.ESTIMATOR_CODES[key],
        alpha=alpha,
        beta=beta,
        omega=omega,
        w_mix=w_mix,
        natural_c=1.0 if natural_baseline else 0.0,
        w_upper=w_upper,
        score_mean=score_mean,
        normalize=normalize,
        center=center,
        credit_code=kernel.CREDIT_CODES[credit],
        use_tracker=tracked_quantiles is not None,
    )
    return scores, quantiles, member_advantages, advantages
