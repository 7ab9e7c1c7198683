"""pytest-benchmark suite: RiskPO advantages and policy loss, vectorised vs per-group.

Run: ``.venv/bin/python -m pytest benchmarks/test_bench_riskpo.py --benchmark-only``.
Shapes follow ``spec/kernels.md``: N = 512 x 16 and 4,096 x 16 responses with B = 5; policy loss at
8k and 64k response tokens (sequence ratio, token-mean).
"""

from __future__ import annotations

import pytest
import torch
from per_group_baseline import per_group_advantages, per_sequence_policy_loss

from riskfast.riskpo import advantages, policy_loss

GROUP = 16
QUESTION_COUNTS = (512, 4096)
TOKEN_SHAPES = {"8k": (64, 128), "64k": (512, 128)}


@pytest.fixture(scope="module", params=QUESTION_COUNTS, ids=lambda q: f"{q}x{GROUP}")
def rollout(request) -> tuple[torch.Tensor, torch.Tensor]:
    questions = request.param
    gen = torch.Generator().manual_seed(0)
    rewards = (torch.rand(questions * GROUP, generator=gen) < 0.4).float()
    question_ids = torch.arange(questions).repeat_interleave(GROUP)
    return rewards, question_ids


def _tokens(shape: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(1)
    n, t = shape
    logp = (-torch.rand(n, t, generator=gen) * 3).requires_grad_(True)
    old = logp.detach() + 0.05 * torch.randn(n, t, generator=gen)
    adv = torch.randn(n, generator=gen)
    lengths = torch.randint(t // 4, t + 1, (n,), generator=gen)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    return logp, old, adv, mask


def test_advantages_vectorised(benchmark, rollout) -> None:
    rewards, question_ids = rollout
    benchmark.group = f"advantages N={rewards.numel() // GROUP}x{GROUP} B=5"
    gen = torch.Generator()
    result = benchmark(
        lambda: advantages(rewards, question_ids, bundle_size=5, generator=gen.manual_seed(0))
    )
    assert result.advantages.shape == rewards.shape


def test_advantages_group_size_unvalidated(benchmark, rollout) -> None:
    # The call that never waits for a CUDA device: layout from G, no value checks.
    rewards, question_ids = rollout
    benchmark.group = f"advantages N={rewards.numel() // GROUP}x{GROUP} B=5"
    gen = torch.Generator()
    result = benchmark(
        lambda: advantages(
            rewards, group_size=GROUP, validate=False, bundle_size=5, generator=gen.manual_seed(0)
        )
    )
    reference = advantages(rewards, question_ids, bundle_size=5, generator=gen.manual_seed(0))
    assert torch.equal(result.advantages, reference.advantages)


def test_advantages_per_group_baseline(benchmark, rollout) -> None:
    rewards, question_ids = rollout
    benchmark.group = f"advantages N={rewards.numel() // GROUP}x{GROUP} B=5"
    gen = torch.Generator()
    out = benchmark(
        lambda: per_group_advantages(rewards, question_ids, 5, generator=gen.manual_seed(0))
    )
    assert out.shape == rewards.shape


@pytest.mark.parametrize("size", list(TOKEN_SHAPES))
def test_policy_loss_vectorised(benchmark, size: str) -> None:
    benchmark.group = f"policy_loss fwd+bwd {size} tokens"
    logp, old, adv, mask = _tokens(TOKEN_SHAPES[size])

    def step() -> torch.Tensor:
        logp.grad = None
        loss, _ = policy_loss(logp, old, adv, mask)
        loss.backward()
        return loss

    assert torch.isfinite(benchmark(step))


@pytest.mark.parametrize("size", list(TOKEN_SHAPES))
def test_policy_loss_per_sequence_baseline(benchmark, size: str) -> None:
    benchmark.group = f"policy_loss fwd+bwd {size} tokens"
    logp, old, adv, mask = _tokens(TOKEN_SHAPES[size])

    def step() -> torch.Tensor:
        logp.grad = None
        loss = per_sequence_policy_loss(logp, old, adv, mask)
        loss.backward()
        return loss

    assert torch.isfinite(benchmark(step))
