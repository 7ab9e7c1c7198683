"""``advantages`` without host synchronisation (spec ``kernels.md``: bundle advantages,
one launch, no host synchronisation).

With ``group_size`` (responses stored question by question) and ``validate=False`` the
call must not read anything back from the device; with ``validate=True`` it reads one
number (spec ``riskpo.md`` section 5 still refuses non-finite rewards). On a CPU the
:class:`HostReadCounter` proxy checks this; on a GPU (``benchmarks/gpu_check.py`` runs
this file there) ``torch.cuda.set_sync_debug_mode("error")`` checks it as well.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from host_reads import HostReadCounter
from kernel_device import DEVICE

from riskfast.riskpo import QuantileTracker, advantages
from riskfast.riskpo.bundling import (
    _bundling_from_question_bundle,
    consecutive_layout,
    draw_bundling,
    group_layout,
)
from riskfast.riskpo.quantiles import level_tensor

BACKENDS = ["torch", "triton"]
CASES = [
    {},
    {"estimator": "mvar", "form": "reference_code", "credit": "std", "center": True},
    {"estimator": "cvar", "score": "mean", "bundle_size": 3, "drop_last": True},
    {"estimator": "upper", "shuffle": False, "bundle_size": 1},
    {"estimator": "grpo"},
    {"estimator": "rloo"},
]
# The interpreter computes with numpy, which warns about the NaN and inf fed on purpose.
pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]
CASE_IDS = [",".join(f"{k}={v}" for k, v in c.items()) or "defaults" for c in CASES]


def _rollout(questions: int, group: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    rewards = (torch.rand(questions * group, generator=gen) < 0.5).float()
    rewards[:group] = 1.0  # one question whose answers all agree
    return rewards.to(DEVICE)


def _consecutive_ids(questions: int, group: int) -> torch.Tensor:
    return torch.arange(questions, device=DEVICE).repeat_interleave(group)


def _assert_same_result(out, ref) -> None:
    for name in ("advantages", "bundle_ids", "member_ids", "scores", "quantiles"):
        assert torch.equal(getattr(out, name), getattr(ref, name)), name
    assert out.metrics == ref.metrics


@contextlib.contextmanager
def _strict_device():
    """On CUDA, make any synchronising call raise (the GPU's own oracle)."""
    if DEVICE.type != "cuda":
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ------------------------------------------------------------------ the probe itself


def test_host_read_counter_sees_each_kind_of_host_read() -> None:
    x = torch.tensor([0.0, 2.0, -1.0, 2.0])
    tolist, numpy = torch.Tensor.tolist, torch.Tensor.numpy
    reads = {
        "item": lambda: x.sum().item(),
        "bool": lambda: bool((x > 0).any()),
        "mask index": lambda: x[x > 0],
        "nonzero": lambda: torch.nonzero(x),
        "unique": lambda: torch.unique(x),
        "bincount": lambda: torch.bincount(x.long().clamp_min(0)),
        "tensor from data": lambda: torch.tensor([1.0, 2.0]),
        "tolist": lambda: x.tolist(),
        "repeat_interleave": lambda: torch.arange(3).repeat_interleave(torch.tensor([1, 2, 3])),
    }
    for what, call in reads.items():
        with HostReadCounter() as counter:
            call()
        assert counter.total >= 1, f"{what}: not counted"
    with HostReadCounter() as counter:
        y = torch.full((4,), 3.0) * x + 1
        torch.sort(y).values.cumsum(0)
        torch.where(y > 0, y, torch.zeros_like(y))
        x.repeat_interleave(2)
    assert counter.total == 0, dict(counter.reads)
    # Leaving the counter restores the patched methods.
    assert torch.Tensor.tolist is tolist and torch.Tensor.numpy is numpy


def test_a_counted_tolist_is_one_read_with_the_copy_it_makes(monkeypatch) -> None:
    # On a GPU, Tensor.tolist copies to the host through aten._to_copy: one read, counted
    # once (the GPU run saw {'Tensor.tolist': 1, 'aten._to_copy': 1} for one tolist).
    # Simulated on the CPU by a tolist that dispatches a value-sized op before reading.
    original = torch.Tensor.tolist

    def tolist_through_an_op(tensor, *args, **kwargs):
        torch.nonzero(tensor)  # stands for the device-to-host copy
        return original(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "tolist", tolist_through_an_op)
    x = torch.tensor([0.0, 2.0])
    with HostReadCounter() as counter:
        assert x.tolist() == [0.0, 2.0]
        torch.nonzero(x)  # outside a counted method: counted
    assert dict(counter.reads) == {"Tensor.tolist": 1, "aten.nonzero": 1}


# ------------------------------------------------------------ same numbers, fewer reads


@pytest.mark.parametrize(("questions", "group"), [(1, 1), (7, 1), (5, 4), (13, 16)])
def test_consecutive_layout_equals_the_layout_of_consecutive_question_ids(
    questions: int, group: int
) -> None:
    layout = consecutive_layout(questions * group, group, DEVICE)
    ref = group_layout(_consecutive_ids(questions, group))
    for name in ("question_index", "position", "response_index"):
        assert torch.equal(getattr(layout, name), getattr(ref, name)), name
    assert (layout.num_questions, layout.group_size) == (ref.num_questions, ref.group_size)


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize(("questions", "bundle"), [(1, 5), (10, 5), (11, 5), (11, 3), (4, 7)])
def test_drawn_bundle_sizes_and_slots_match_a_loop_over_the_assignment(
    questions: int, bundle: int, shuffle: bool
) -> None:
    # The drawn bundling writes the bundle sizes from Q and B alone (no bincount); a plain
    # loop over its question -> bundle assignment must find the same sizes and slots
    # (slot = rank among the bundle's questions, in question order).
    layout = consecutive_layout(questions * 3, 3, DEVICE)
    drawn = draw_bundling(
        layout, bundle, shuffle=shuffle, generator=torch.Generator().manual_seed(questions)
    )
    assignment = drawn.question_bundle.tolist()
    sizes: dict[int, int] = {}
    slots = []
    for b in assignment:
        slots.append(sizes.get(b, 0))
        sizes[b] = sizes.get(b, 0) + 1
    assert sorted(sizes) == list(range(len(sizes)))
    assert drawn.bundle_num_questions.tolist() == [sizes[b] for b in range(len(sizes))]
    assert drawn.question_slot.tolist() == slots
    assert drawn.num_bundles == len(sizes)
    assert drawn.max_bundle_questions == max(sizes.values())
    counted = _bundling_from_question_bundle(drawn.question_bundle, drawn.member_of_position)
    assert torch.equal(counted.bundle_num_questions, drawn.bundle_num_questions)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_level_tensor_equals_the_levels_built_on_the_host(dtype: torch.dtype) -> None:
    for levels in ((0.2, 0.8), (0.0, 1.0), (0.1, 0.30000000000000004)):
        assert torch.equal(
            level_tensor(levels, dtype, DEVICE), torch.tensor(levels, dtype=dtype, device=DEVICE)
        )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_group_size_and_unvalidated_calls_give_bitwise_the_validated_question_ids_result(
    case: dict, backend: str
) -> None:
    questions, group = 11, 8
    rewards = _rollout(questions, group, seed=3)
    ref = advantages(
        rewards,
        _consecutive_ids(questions, group),
        generator=torch.Generator().manual_seed(9),
        backend=backend,
        **case,
    )
    for validate in (True, False):
        out = advantages(
            rewards,
            group_size=group,
            generator=torch.Generator().manual_seed(9),
            backend=backend,
            validate=validate,
            **case,
        )
        _assert_same_result(out, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_explicit_bundling_works_with_group_size_too(backend: str) -> None:
    questions, group = 6, 4
    rewards = _rollout(questions, group, seed=6)
    gen = torch.Generator().manual_seed(2)
    bundle_of_question = torch.randperm(questions, generator=gen) % 3
    bundle_ids = bundle_of_question.repeat_interleave(group).to(DEVICE)
    member_ids = torch.argsort(torch.rand(questions, group, generator=gen), dim=1)
    member_ids = member_ids.flatten().to(DEVICE)
    explicit = {"bundle_ids": bundle_ids, "member_ids": member_ids, "backend": backend}
    ref = advantages(rewards, _consecutive_ids(questions, group), **explicit)
    out = advantages(rewards, group_size=group, **explicit)
    _assert_same_result(out, ref)
    # The given bundling is honoured: same members, bundles relabelled only.
    assert torch.equal(out.member_ids, member_ids)
    same_given = bundle_ids[:, None] == bundle_ids[None, :]
    assert torch.equal(out.bundle_ids[:, None] == out.bundle_ids[None, :], same_given)


# --------------------------------------------------------------------- no host reads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_group_size_without_validation_reads_nothing_back_from_the_device(
    case: dict, backend: str
) -> None:
    rewards = _rollout(20, 16, seed=1)
    kwargs = {"group_size": 16, "backend": backend, "validate": False, **case}
    if DEVICE.type == "cuda":
        kwargs["generator"] = torch.Generator(device="cuda").manual_seed(0)
    advantages(rewards, **kwargs)  # compile and cache outside the counted call
    with HostReadCounter() as counter, _strict_device():
        result = advantages(rewards, **kwargs)
    assert counter.total == 0, f"host reads {dict(counter.reads)}"
    assert bool(torch.isfinite(result.advantages).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_cpu_generator_with_cuda_rewards_still_reads_nothing_back(backend: str) -> None:
    # The bundling draws reach the device through pinned memory, asynchronously; on a
    # CPU the draws and the rewards share a device, so this checks the call's other parts.
    rewards = _rollout(20, 16, seed=2)
    kwargs = {"group_size": 16, "backend": backend, "validate": False}
    advantages(rewards, generator=torch.Generator().manual_seed(0), **kwargs)
    with HostReadCounter() as counter, _strict_device():
        advantages(rewards, generator=torch.Generator().manual_seed(0), **kwargs)
    assert counter.total == 0, f"host reads {dict(counter.reads)}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_tracker_is_initialised_used_and_updated_without_host_reads(backend: str) -> None:
    tracker = QuantileTracker(0.2, 0.8, gamma=0.1)
    reference = QuantileTracker(0.2, 0.8, gamma=0.1)
    kwargs = {"group_size": 16, "backend": backend, "quantile": "tracker"}
    for step in range(3):
        rewards = _rollout(20, 16, seed=10 + step)
        if step == 0:  # compile outside the counted calls, on a throw-away tracker
            advantages(
                rewards, validate=False, tracker=QuantileTracker(), update_tracker=False, **kwargs
            )
        generator = torch.Generator(device=DEVICE).manual_seed(step)
        with HostReadCounter() as counter, _strict_device():
            out = advantages(
                rewards, validate=False, tracker=tracker, generator=generator, **kwargs
            )
        assert counter.total == 0, f"step {step}: host reads {dict(counter.reads)}"
        generator = torch.Generator(device=DEVICE).manual_seed(step)
        ref = advantages(rewards, tracker=reference, generator=generator, **kwargs)
        _assert_same_result(out, ref)
        assert torch.equal(tracker.values, reference.values)


@pytest.mark.parametrize("backend", BACKENDS)
def test_validation_costs_exactly_one_host_read(backend: str) -> None:
    rewards = _rollout(20, 16, seed=4)
    advantages(rewards, group_size=16, backend=backend)
    with HostReadCounter() as counter:
        advantages(rewards, group_size=16, backend=backend)
    assert counter.total == 1, f"host reads {dict(counter.reads)}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_question_ids_cost_two_more_host_reads(backend: str) -> None:
    # Finding the questions: unique (its size is data), then both ends of the counts.
    rewards = _rollout(20, 16, seed=4)
    ids = _consecutive_ids(20, 16).flip(0)
    advantages(rewards, ids, backend=backend)
    with HostReadCounter() as counter:
        advantages(rewards, ids, backend=backend)
    assert counter.total == 3, f"host reads {dict(counter.reads)}"


# ------------------------------------------------------- unvalidated bad rewards


BAD_CASES = [
    (bad, case)
    for bad in ("nan", "inf", "-inf", "overflow")
    for case in ({}, {"credit": "std"}, {"estimator": "grpo"}, {"quantile": "tracker"})
    # GRPO scores single rewards, so two large rewards never overflow its scores.
    if not (bad == "overflow" and case.get("estimator") == "grpo")
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("bad", "case"), BAD_CASES, ids=str)
def test_unvalidated_bad_rewards_zero_their_bundle_and_leave_the_others_unchanged(
    bad: str, case: dict, backend: str
) -> None:
    # 6 questions of 4, bundles of 2 consecutive questions, member j = position j
    # (shuffle=False): bundle 0 holds responses 0..7 (question 0, responses 0..3, for
    # GRPO). A non-finite reward at response 1, or 3e38 at responses 1 and 5 (member 1
    # of bundle 0: its score overflows float32), must poison bundle 0 only.
    group = 4
    clean = _rollout(6, group, seed=7) * 0.5 + 0.25
    poisoned = clean.clone()
    if bad == "overflow":
        poisoned[1] = poisoned[1 + group] = 3e38
    else:
        poisoned[1] = float(bad)
    first = group if case.get("estimator") == "grpo" else 2 * group
    kwargs = {"group_size": group, "bundle_size": 2, "shuffle": False, "backend": backend, **case}
    tracked = case.get("quantile") == "tracker"

    def run(values: torch.Tensor, validate: bool):
        if tracked:
            kwargs["tracker"] = QuantileTracker()
        return advantages(values, validate=validate, **kwargs)

    with pytest.raises(ValueError, match="^rewards:"):
        run(poisoned, validate=True)
    out = run(poisoned, validate=False)
    assert bool(torch.isfinite(out.advantages).all()), out.advantages
    assert torch.equal(out.advantages[:first], torch.zeros(first, device=DEVICE))
    if tracked:
        # The tracker starts from the finite scores only: finite values, a signal elsewhere.
        assert bool(torch.isfinite(kwargs["tracker"].values).all()), kwargs["tracker"]
        assert bool((out.advantages[first:] != 0).any())
    else:
        # Per-bundle quantiles: the other bundles get exactly what clean rewards give.
        ref = run(clean, validate=True)
        assert torch.equal(out.advantages[first:], ref.advantages[first:])


# -------------------------------------------------------------------- argument errors


def test_group_size_and_validate_arguments_are_checked_by_name() -> None:
    rewards = torch.ones(12)
    ids = torch.arange(3).repeat_interleave(4)
    cases = [
        ({}, ValueError, "question_ids"),
        ({"question_ids": ids, "group_size": 4}, ValueError, "group_size"),
        ({"group_size": 5}, ValueError, "group_size"),
        ({"group_size": 0}, ValueError, "group_size"),
        ({"group_size": 4.0}, TypeError, "group_size"),
        ({"group_size": 4, "validate": "no"}, TypeError, "validate"),
    ]
    for kwargs, error, name in cases:
        with pytest.raises(error, match=f"^{name}:"):
            advantages(rewards, **kwargs)


def test_the_inputs_are_not_modified() -> None:
    rewards = _rollout(6, 4, seed=8)
    rewards[3] = float("nan")
    before = rewards.clone()
    for backend in BACKENDS:
        advantages(rewards, group_size=4, backend=backend, validate=False, credit="std")
    assert torch.equal(rewards.isnan(), before.isnan())
    assert torch.equal(rewards.nan_to_num(), before.nan_to_num())
