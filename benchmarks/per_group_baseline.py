"""Straightforward per-group PyTorch implementations, the baseline the benchmarks beat.

These are what one writes first: a Python loop over bundles (advantages) and over
responses (sequence-ratio loss), each step in plain torch. They are benchmark
baselines only; the test oracle lives in ``tests/oracles``.
"""

from __future__ import annotations

import torch


def per_group_advantages(
    rewards: torch.Tensor,
    question_ids: torch.Tensor,
    bundle_size: int = 5,
    alpha: float = 0.2,
    beta: float = 0.8,
    omega: float = 0.5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Mixed-VaR (paper form, normalised) with a loop over bundles."""
    rewards = rewards.float()
    questions = torch.unique(question_ids)
    order = questions[torch.randperm(len(questions), generator=generator)]
    out = torch.zeros_like(rewards)
    for start in range(0, len(order), bundle_size):
        members = []
        for q in order[start : start + bundle_size]:
            idx = torch.nonzero(question_ids == q).flatten()
            members.append(idx[torch.randperm(len(idx), generator=generator)])
        table = torch.stack(members)  # [B, G] response indices; column j = member j
        scores = rewards[table].sum(dim=0)
        a = torch.quantile(scores, alpha)
        b = torch.quantile(scores, beta)
        adv = -(1 + omega) * (a - scores).clamp_min(0) + (scores - a).clamp_min(0)
        adv = adv - (scores - b).clamp_min(0) + a - b
        std = scores.std()
        adv = torch.zeros_like(adv) if bool(std == 0) else adv / (std + 1e-6)
        for row in table:
            out[row] = adv
    return out


def per_sequence_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps: float = 0.2,
) -> torch.Tensor:
    """Sequence-ratio clipped loss, token-mean, with a loop over responses."""
    total = logp.new_zeros(())
    count = 0
    for n in range(logp.shape[0]):
        m = mask[n]
        if not bool(m.any()):
            continue
        s = torch.exp((logp[n][m] - old_logp[n][m]).mean())
        a = advantages[n]
        pg = torch.maximum(-a * s, -a * torch.clamp(s, 1 - eps, 1 + eps))
        total = total + pg * int(m.sum())
        count += int(m.sum())
    return total / max(count, 1)
