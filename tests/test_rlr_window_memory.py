"""``riskfast.rlr.window_memory``: the window's activation memory, linear in h (spec
``rlr.md``: "h from a memory budget").

The oracle for what the estimator holds is the estimator itself: the saved-tensor bytes
alive when ``estimate_grad`` stages the window's term (before its backward), counted
from inside a real call, for h = 1..5. Both sides count with the same saved-tensor
counter, which is checked on its own against graphs whose saved tensors are known by
hand. Physical checks beside it: doubling the batch doubles every number; the
checkpointed backward rebuilds what an unchecked step holds.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from rlr_toy import one_thread, scheduler, tiny_unet2d

from riskfast.rlr import RLRConfig, WindowMemory, estimate_grad, window_memory
from riskfast.rlr import estimators as estimators_module
from riskfast.rlr.memory import _SavedBytes


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    with one_thread():  # tiny tensors: a second thread only oversubscribes a shared machine
        yield


@pytest.fixture(scope="module")
def unet() -> Any:
    torch.manual_seed(0)
    return tiny_unet2d(num_class_embeds=4, attention=True)


def _held_by_the_estimator(unet: Any, x_T: torch.Tensor, config: RLRConfig, cond: Any) -> int:
    """Saved bytes alive when a real ``estimate_grad`` call stages its window term."""
    seen: list[int] = []
    real_add_term = estimators_module.EstimationRun.add_term
    excluded = [*unet.parameters(), *unet.buffers()]

    def add_term(run: Any, name: str, loss: torch.Tensor) -> None:
        if name == "window":
            seen.append(saved.live_excluding([x for x in run.xs if x is not None]))
        real_add_term(run, name, loss)

    estimators_module.EstimationRun.add_term = add_term
    try:
        with _SavedBytes(excluded) as saved:
            estimate_grad(unet, scheduler(10), lambda x: -x.square().mean(dim=(1, 2, 3)), x_T,
                          config=config, generator=torch.Generator().manual_seed(3), cond=cond)
    finally:
        estimators_module.EstimationRun.add_term = real_add_term
        unet.zero_grad(set_to_none=True)
    assert len(seen) == 1
    return seen[0]


@pytest.mark.parametrize("checkpoint", [True, False])
@pytest.mark.parametrize("rest", ["lr", "zo"])
def test_window_memory_is_what_the_estimator_holds(unet: Any, checkpoint: bool, rest: str) -> None:
    x_T = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = {"class_labels": torch.tensor([0, 1, 2])}
    memory = window_memory(unet, scheduler(10), x_T, cond=cond,
                           config=RLRConfig(rest=rest, fo_steps=1, checkpoint=checkpoint))
    assert memory.max_window == 9
    for h in range(1, 6):
        config = RLRConfig(rest=rest, fo_steps=1, window=h, checkpoint=checkpoint)
        held = _held_by_the_estimator(unet, x_T, config, cond)
        rebuilt = memory.recompute if h >= 2 else 0  # rebuilt in the backward, not held
        assert held == memory.bytes_for(h) - rebuilt, (h, held, memory)
    if checkpoint:  # a checkpointed window holds little per step, an unchecked one a step
        plain = window_memory(unet, scheduler(10), x_T, cond=cond,
                              config=RLRConfig(rest=rest, fo_steps=1, checkpoint=False))
        assert memory.recompute == plain.per_step
        assert memory.per_step < plain.per_step / 50
        assert memory.first == plain.first  # h = 1: nothing to checkpoint
    else:
        assert memory.recompute == 0


def test_window_memory_doubles_with_the_batch(unet: Any) -> None:
    gen = torch.Generator().manual_seed(1)
    config = RLRConfig(rest="lr", fo_steps=2)
    small, large = (
        window_memory(unet, scheduler(10), torch.randn(b, 1, 8, 8, generator=gen), config=config,
                      cond={"class_labels": torch.arange(b) % 4})
        for b in (2, 4)
    )
    assert small.max_window == large.max_window == 8
    for field in ("first", "second", "per_step", "recompute"):
        a, b = getattr(small, field), getattr(large, field)
        assert a > 0 and abs(b - 2 * a) <= 0.01 * b, (field, a, b)


def test_window_memory_leaves_the_caller_state_alone(unet: Any) -> None:
    x_T = torch.randn(2, 1, 8, 8)
    before = [p.detach().clone() for p in unet.parameters()]
    default = torch.default_generator.get_state()
    window_memory(unet, scheduler(10), x_T, config=RLRConfig(rest="zo"),
                  cond={"class_labels": torch.tensor([1, 2])})
    assert torch.equal(torch.default_generator.get_state(), default)
    assert all(torch.equal(p, q) for p, q in zip(unet.parameters(), before))
    assert all(p.grad is None for p in unet.parameters())


def test_window_memory_bad_input_is_named(unet: Any) -> None:
    x_T = torch.randn(2, 1, 8, 8)
    with pytest.raises(ValueError, match="^config: the window belongs to estimator='rlr'"):
        window_memory(unet, scheduler(10), x_T, config=RLRConfig(estimator="ddpo"))
    with pytest.raises(TypeError, match="^config:"):
        window_memory(unet, scheduler(10), x_T, config={"window": 2})
    with pytest.raises(ValueError, match="^x_T:"):
        window_memory(unet, scheduler(10), x_T * float("nan"), config=RLRConfig())


def test_largest_window_for_a_budget() -> None:
    memory = WindowMemory(first=100, second=150, per_step=10, recompute=40, max_window=5)
    assert [memory.bytes_for(h) for h in range(1, 6)] == [100, 150, 160, 170, 180]
    cases = {100: 1, 149: 1, 150: 2, 175: 4, 180: 5, 10**12: 5}
    assert {budget: memory.largest_window(budget) for budget in cases} == cases
    with pytest.raises(ValueError, match="^budget_bytes: 99 is below the shortest window's 100"):
        memory.largest_window(99)
    for bad in (0, 6):
        with pytest.raises(ValueError, match="^window:"):
            memory.bytes_for(bad)
    with pytest.raises(TypeError, match="^budget_bytes:"):
        memory.largest_window(1.5e9)


def test_saved_bytes_counts_hand_known_graphs() -> None:
    """The counter on graphs whose saved tensors are known by hand: ``exp`` saves its
    result, ``mul`` saves both operands (the excluded weight is not counted, a storage
    saved twice counts once), ``sin`` saves its input; freeing the graph frees them."""
    n = 1000
    weight = torch.randn(n, requires_grad=True)
    x = torch.randn(n, requires_grad=True)  # made before counting: a new input, counted
    with _SavedBytes([weight]) as saved:
        y = x.exp()  # saves y: 4n
        z = y * weight  # saves y (same storage: no more) and weight (excluded)
        assert saved.live == 4 * n
        w = z.sin()  # saves z: 4n more
        loss = w.sum()
        assert saved.live == 8 * n and saved.peak == 8 * n
        assert saved.live_excluding([y]) == 4 * n
        loss.backward()  # frees the graph and every saved tensor with it
        del y, z, w, loss
        assert saved.live == 0 and saved.peak == 8 * n
