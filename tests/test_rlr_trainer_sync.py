"""``estimate_grad(..., sync=)``: ranks together estimate what one process would on the union.

Two ranks run as two threads of this process (each with its own copy of the toy
denoiser: ZO perturbs the weights in place), joined by a gather built on a barrier; the
reference is one process given the union of their starts (rank 0's rows, then rank
1's) and the same generator seed. For every estimator the mean of the ranks' gradients
(what the trainer's all-reduce computes) equals the reference's gradient to a few ulps
in float64, the metrics and the generators' final states agree, and a failure on one
rank raises on both and changes nothing. The trainer on two real processes (gloo) is
tested in ``test_rlr_trainer_distributed.py``.
"""

from __future__ import annotations

import copy
import threading

import pytest
import rlr_toy
import torch

from riskfast.rlr import RLRConfig, RLRState, estimate_grad

WORLD = 2
PER_RANK = 4


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with rlr_toy.one_thread():
        yield


@pytest.fixture(scope="module")
def model():
    return rlr_toy.pretrained_denoiser()


class _Shared:
    def __init__(self, world: int) -> None:
        self.barrier = threading.Barrier(world, timeout=60)
        self.slots: list[torch.Tensor | None] = [None] * world


class ThreadSync:
    """A GradientSync whose ranks are threads (gather: every rank's tensor, rank order)."""

    def __init__(self, shared: _Shared, rank: int) -> None:
        self.shared, self.rank, self.world_size = shared, rank, len(shared.slots)

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        self.shared.slots[self.rank] = tensor.detach().clone()
        self.shared.barrier.wait()
        out = torch.cat(list(self.shared.slots))
        self.shared.barrier.wait()  # every rank has read before a slot is overwritten
        return out


def _run_ranks(fn):
    """``fn(rank, sync)`` on WORLD threads; returns the results (or the exceptions)."""
    shared = _Shared(WORLD)
    results: list = [None] * WORLD

    def target(rank: int) -> None:
        with rlr_toy.one_thread():
            try:
                results[rank] = fn(rank, ThreadSync(shared, rank))
            except BaseException as err:  # noqa: BLE001 - the test inspects it
                results[rank] = err

    threads = [threading.Thread(target=target, args=(r,)) for r in range(WORLD)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a rank hung"
    return results


def _union_x_T(seed: int = 3) -> torch.Tensor:
    return torch.randn(
        WORLD * PER_RANK, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )


def _one_process(model, config, x_T, seed=11, state=None, reward=rlr_toy.reward):
    model = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    metrics = estimate_grad(
        model,
        rlr_toy.scheduler(),
        reward,
        x_T,
        config=config,
        generator=generator,
        state=state,
    )
    return rlr_toy.flat_grad(model), metrics, generator.get_state()


def _ranks(model, config, x_T, seed=11, states=None, reward=rlr_toy.reward):
    def fn(rank, sync):
        local = copy.deepcopy(model)
        generator = torch.Generator().manual_seed(seed)
        metrics = estimate_grad(
            local,
            rlr_toy.scheduler(),
            reward if not callable(getattr(reward, "for_rank", None)) else reward.for_rank(rank),
            x_T[rank * PER_RANK : (rank + 1) * PER_RANK],
            config=config,
            generator=generator,
            state=None if states is None else states[rank],
            sync=sync,
        )
        return rlr_toy.flat_grad(local), metrics, generator.get_state()

    return _run_ranks(fn)


CONFIGS = {
    "rlr rest=zo": RLRConfig(rest="zo", window=2, sigma_p=1e-2),
    "rlr rest=lr": RLRConfig(rest="lr", window=2),
    "rlr rest=lr K=0": RLRConfig(rest="lr", fo_steps=0, window=3),
    "ddpo (half the steps)": RLRConfig(estimator="ddpo", ddpo_step_fraction=0.5),
    "alignprop": RLRConfig(estimator="alignprop"),
    "draft": RLRConfig(estimator="draft", fo_steps=2),
    "full": RLRConfig(estimator="full"),
    "zo": RLRConfig(estimator="zo", sigma_p=1e-2),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_mean_of_ranks_gradients_equals_one_process_on_the_union(model, name):
    config = CONFIGS[name]
    x_T = _union_x_T()
    reference, ref_metrics, ref_generator = _one_process(model, config, x_T)
    results = _ranks(model, config, x_T)
    for result in results:
        assert not isinstance(result, BaseException), result
    mean = sum(r[0] for r in results) / WORLD
    assert reference.abs().max() > 0
    torch.testing.assert_close(mean, reference, rtol=1e-12, atol=1e-14 * reference.abs().max())
    for grads, metrics, generator in results:
        # Every rank drew the same numbers as the one process (same final state) ...
        assert torch.equal(generator, ref_generator)
        # ... and reports the union's rewards and evaluations.
        assert metrics["chains"] == ref_metrics["chains"]
        assert metrics["model_evaluations"] == ref_metrics["model_evaluations"]
        for key in ("reward_mean", "reward_std", "zo_coefficient", "alignprop_mean_steps"):
            if key in ref_metrics:
                assert metrics[key] == pytest.approx(ref_metrics[key], rel=1e-12, abs=1e-15)
        for key in ("window_start", "ddpo_steps"):
            assert metrics.get(key) == ref_metrics.get(key)
    # The ranks' own estimates differ (each averaged its own chains) except for a ZO-only
    # term, which is equal on every rank.
    if name == "zo":
        assert torch.equal(results[0][0], results[1][0])
    else:
        assert not torch.allclose(results[0][0], results[1][0])


def test_grad_norm_state_stays_equal_on_every_rank_and_to_one_process(model):
    config = RLRConfig(rest="lr", window=2, window_start="grad_norm")
    reference_state, states = RLRState(), [RLRState(), RLRState()]
    for call in range(4):
        x_T = _union_x_T(seed=20 + call)
        reference, _, _ = _one_process(model, config, x_T, seed=30 + call, state=reference_state)
        results = _ranks(model, config, x_T, seed=30 + call, states=states)
        mean = sum(r[0] for r in results) / WORLD
        torch.testing.assert_close(mean, reference, rtol=1e-12, atol=1e-14 * reference.abs().max())
    assert states[0].window_grad_norm == states[1].window_grad_norm
    assert states[0].window_grad_norm.keys() == reference_state.window_grad_norm.keys()
    for j, norm in reference_state.window_grad_norm.items():
        assert states[0].window_grad_norm[j] == pytest.approx(norm, rel=1e-10)


class _FailOnRank:
    """A reward that returns NaN on one rank only."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def for_rank(self, rank: int):
        if rank != self.rank:
            return rlr_toy.reward
        return lambda x0: rlr_toy.reward(x0) * float("nan")


def test_a_failure_on_one_rank_raises_on_every_rank_and_changes_nothing(model):
    config = RLRConfig(rest="zo", window=2)
    x_T = _union_x_T()
    before = copy.deepcopy(model.state_dict())
    results = _ranks(model, config, x_T, reward=_FailOnRank(1))
    assert isinstance(results[1], ValueError) and str(results[1]).startswith("reward_fn:")
    assert isinstance(results[0], RuntimeError) and str(results[0]).startswith("sync:")
    assert "[1]" in str(results[0])
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_ranks_must_agree_on_the_batch_size_before_anything_is_drawn(model):
    config = RLRConfig(rest="lr")

    def fn(rank, sync):
        generator = torch.Generator().manual_seed(5)
        state = generator.get_state()
        try:
            estimate_grad(
                copy.deepcopy(model),
                rlr_toy.scheduler(),
                rlr_toy.reward,
                torch.randn(3 + rank, 2, dtype=torch.float64),
                config=config,
                generator=generator,
                sync=sync,
            )
        except ValueError as err:
            return err, torch.equal(generator.get_state(), state)
        return None

    for result in _run_ranks(fn):
        assert result is not None
        err, unchanged = result
        assert str(err).startswith("x_T: every rank must pass the same number of starts")
        assert unchanged


def test_bad_input_on_one_rank_raises_on_every_rank(model):
    def fn(rank, sync):
        x_T = torch.randn(PER_RANK, 2, dtype=torch.float64)
        if rank == 1:
            x_T[0, 0] = float("nan")
        try:
            estimate_grad(
                copy.deepcopy(model),
                rlr_toy.scheduler(),
                rlr_toy.reward,
                x_T,
                config=RLRConfig(rest="lr"),
                generator=torch.Generator().manual_seed(0),
                sync=sync,
            )
        except ValueError as err:
            return str(err)
        return None

    messages = _run_ranks(fn)
    assert messages[1].startswith("x_T: holds non-finite values")
    assert messages[0].startswith("sync: the input was rejected on rank(s) [1]")


def test_sync_is_validated(model):
    class Bad:
        rank, world_size = 2, 2

        def gather(self, tensor):
            return tensor

    with pytest.raises(ValueError, match="^sync: expected 0 <= rank < world_size"):
        estimate_grad(
            model,
            rlr_toy.scheduler(),
            rlr_toy.reward,
            _union_x_T(),
            config=RLRConfig(rest="lr"),
            sync=Bad(),
        )
    Bad.rank, Bad.gather = 0, None
    with pytest.raises(TypeError, match="^sync: expected a gather"):
        estimate_grad(
            model,
            rlr_toy.scheduler(),
            rlr_toy.reward,
            _union_x_T(),
            config=RLRConfig(rest="lr"),
            sync=Bad(),
        )


def test_a_single_rank_sync_is_the_plain_call(model):
    class Alone:
        rank, world_size = 0, 1

        def gather(self, tensor):
            return tensor

    config = RLRConfig(rest="zo", window=2)
    x_T = _union_x_T()
    reference, _, _ = _one_process(model, config, x_T)
    local = copy.deepcopy(model)
    estimate_grad(
        local,
        rlr_toy.scheduler(),
        rlr_toy.reward,
        x_T,
        config=config,
        generator=torch.Generator().manual_seed(11),
        sync=Alone(),
    )
    assert torch.equal(rlr_toy.flat_grad(local), reference)
