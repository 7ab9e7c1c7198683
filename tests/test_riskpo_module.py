"""riskfast.RiskPOLoss: advantages + policy_loss in one module, with resumable state."""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch

import riskfast
from riskfast.riskpo import QuantileTracker, advantages, policy_loss

Q_COUNT, G, T = 5, 4, 6
ADVANTAGE_OPTIONS: dict[str, Any] = {"bundle_size": 2, "alpha": 0.25, "beta": 0.75}
LOSS_OPTIONS: dict[str, Any] = {
    "ratio_level": "token",
    "agg": "seq-mean-token-mean",
    "dual_clip": 3.0,
}


def make_step(step: int) -> dict[str, torch.Tensor]:
    """Token tensors and rewards of one training step (deterministic in ``step``)."""
    gen = torch.Generator().manual_seed(100 + step)
    n = Q_COUNT * G
    old = -torch.rand(n, T, generator=gen) * 2
    lengths = torch.randint(0, T + 1, (n,), generator=gen)
    return {
        "logp": old + (torch.rand(n, T, generator=gen) - 0.5) * 0.8,
        "old_logp": old,
        "mask": torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1),
        "rewards": torch.randint(0, 2, (n,), generator=gen).to(torch.float32),
        "question_ids": torch.arange(Q_COUNT).repeat_interleave(G)[
            torch.randperm(n, generator=gen)
        ],
    }


def forward(
    module: torch.nn.Module, step: dict[str, torch.Tensor], logp: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """Call the module on one step."""
    return module(
        logp if logp is not None else step["logp"],
        step["old_logp"],
        step["mask"],
        step["rewards"],
        step["question_ids"],
    )


@pytest.mark.parametrize("quantile", ["empirical", "tracker"])
def test_forward_equals_advantages_then_policy_loss_by_hand(quantile: str) -> None:
    gamma = {"gamma": 0.2} if quantile == "tracker" else {}  # gamma is the tracker's option
    module = riskfast.RiskPOLoss(
        **ADVANTAGE_OPTIONS, **LOSS_OPTIONS, quantile=quantile, **gamma, seed=7
    )
    gen = torch.Generator().manual_seed(7)
    tracker = QuantileTracker(alpha=0.25, beta=0.75, gamma=0.2)
    for index in range(3):
        step = make_step(index)
        loss, metrics = forward(module, step)
        extra = {"tracker": tracker} if quantile == "tracker" else {}
        result = advantages(
            step["rewards"],
            step["question_ids"],
            **ADVANTAGE_OPTIONS,
            quantile=quantile,
            generator=gen,
            **extra,
        )
        expected, _ = policy_loss(
            step["logp"], step["old_logp"], result.advantages, step["mask"], **LOSS_OPTIONS
        )
        assert torch.equal(module.last_result.advantages, result.advantages), index
        assert torch.equal(module.last_result.bundle_ids, result.bundle_ids), index
        torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)
        for key in ("advantage_mean", "num_bundles", "loss", "clip_frac", "approx_kl"):
            assert key in metrics, key
        assert metrics["loss"] == pytest.approx(loss.item(), rel=1e-6)


def test_gradients_flow_to_logp_and_match_the_functional_path() -> None:
    step = make_step(0)
    module = riskfast.RiskPOLoss(**ADVANTAGE_OPTIONS, **LOSS_OPTIONS, seed=3)
    logp = step["logp"].clone().requires_grad_(True)
    loss, _ = forward(module, step, logp)
    loss.backward()
    assert logp.grad is not None and torch.isfinite(logp.grad).all()
    assert logp.grad.abs().sum() > 0
    reference = step["logp"].clone().requires_grad_(True)
    result = advantages(
        step["rewards"],
        step["question_ids"],
        **ADVANTAGE_OPTIONS,
        generator=torch.Generator().manual_seed(3),
    )
    expected, _ = policy_loss(
        reference, step["old_logp"], result.advantages, step["mask"], **LOSS_OPTIONS
    )
    expected.backward()
    torch.testing.assert_close(logp.grad, reference.grad, rtol=1e-6, atol=1e-8)
    assert not module.last_result.advantages.requires_grad


@pytest.mark.parametrize("quantile", ["empirical", "tracker"])
def test_state_dict_round_trip_resumes_generator_and_tracker_exactly(quantile: str) -> None:
    options = {**ADVANTAGE_OPTIONS, **LOSS_OPTIONS, "quantile": quantile}
    straight = riskfast.RiskPOLoss(**options, seed=11)
    straight_losses = [forward(straight, make_step(i))[0] for i in range(5)]
    interrupted = riskfast.RiskPOLoss(**options, seed=11)
    for i in range(2):
        forward(interrupted, make_step(i))
    buffer = io.BytesIO()
    torch.save(interrupted.state_dict(), buffer)
    buffer.seek(0)
    resumed = riskfast.RiskPOLoss(**options, seed=999)  # another seed: the state must win
    resumed.load_state_dict(torch.load(buffer, weights_only=False))
    for i in range(2, 5):
        loss, _ = forward(resumed, make_step(i))
        assert torch.equal(loss, straight_losses[i]), f"step {i}"
    fresh = riskfast.RiskPOLoss(**options, seed=999)
    differs = [
        not torch.equal(forward(fresh, make_step(i))[0], straight_losses[i]) for i in range(2, 5)
    ]
    assert any(differs), "the check above cannot fail: seeds 11 and 999 give equal losses"


def test_same_seed_modules_agree_and_explicit_bundling_is_honoured() -> None:
    step = make_step(4)
    first = riskfast.RiskPOLoss(**ADVANTAGE_OPTIONS, seed=5)
    second = riskfast.RiskPOLoss(**ADVANTAGE_OPTIONS, seed=5)
    assert torch.equal(forward(first, step)[0], forward(second, step)[0])
    result = first.last_result
    module = riskfast.RiskPOLoss(**ADVANTAGE_OPTIONS, seed=123)
    loss, _ = module(
        step["logp"],
        step["old_logp"],
        step["mask"],
        step["rewards"],
        step["question_ids"],
        bundle_ids=result.bundle_ids,
        member_ids=result.member_ids,
    )
    assert torch.equal(module.last_result.advantages, result.advantages)
    torch.testing.assert_close(
        loss, forward(riskfast.RiskPOLoss(**ADVANTAGE_OPTIONS, seed=5), step)[0]
    )


def test_group_size_equals_consecutive_question_ids_in_the_module() -> None:
    step = make_step(1)
    by_ids = riskfast.RiskPOLoss(**ADVANTAGE_OPTIONS, **LOSS_OPTIONS, seed=4)
    by_size = riskfast.RiskPOLoss(**ADVANTAGE_OPTIONS, **LOSS_OPTIONS, seed=4)
    consecutive = torch.arange(Q_COUNT).repeat_interleave(G)
    args = (step["logp"], step["old_logp"], step["mask"], step["rewards"])
    loss, metrics = by_ids(*args, consecutive)
    loss_by_size, metrics_by_size = by_size(*args, group_size=G)
    assert torch.equal(loss, loss_by_size)
    assert metrics == metrics_by_size
    assert torch.equal(by_ids.last_result.advantages, by_size.last_result.advantages)
