"""QuantileTracker (spec section 2, quantile="tracker"): updates, checkpoints, data parallel."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from oracles.riskpo_oracle import (
    linear_quantile,
    member_scores,
    oracle_advantages,
    oracle_tracker_update,
)

import riskfast
from riskfast.riskpo import QuantileTracker, advantages


def values_of(tracker: QuantileTracker) -> list[float]:
    """The tracker's (q_alpha, q_beta) as Python floats."""
    assert tracker.values is not None
    return tracker.values.to(torch.float64).tolist()


def test_new_tracker_is_uninitialised() -> None:
    tracker = QuantileTracker(alpha=0.2, beta=0.8, gamma=0.1)
    assert tracker.values is None and not tracker.initialized and tracker.num_updates == 0


def test_update_matches_hand_arithmetic() -> None:
    tracker = QuantileTracker(alpha=0.2, beta=0.8, gamma=0.1)
    # step 1, S = [0,1,2,3,4]: initialise q = (0.8, 3.2) (linear quantiles), then
    # mean(1[S < 0.8]) = 1/5 = 0.2 -> q_a += 0.1*(0.2 - 0.2) = 0.8 ;
    # mean(1[S < 3.2]) = 4/5 -> q_b += 0.1*(0.8 - 0.8) = 3.2
    tracker.update(torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0]))
    assert values_of(tracker) == pytest.approx([0.8, 3.2], abs=1e-6)
    assert tracker.initialized and tracker.num_updates == 1
    assert tracker.values.dtype == torch.float32 and tuple(tracker.values.shape) == (2,)
    # step 2, S = [0]*5: every score is below 0.8 -> q_a = 0.8 + 0.1*(0.2 - 1) = 0.72 ;
    # every score is below 3.2 -> q_b = 3.2 + 0.1*(0.8 - 1) = 3.18
    tracker.update(torch.zeros(5))
    assert values_of(tracker) == pytest.approx([0.72, 3.18], abs=1e-6)
    # step 3, S = [1, 1, 1, 5]: below 0.72: none -> 0.72 + 0.1*0.2 = 0.74 ;
    # below 3.18: 3/4 -> 3.18 + 0.1*(0.8 - 0.75) = 3.185
    tracker.update(torch.tensor([1.0, 1.0, 1.0, 5.0]))
    assert values_of(tracker) == pytest.approx([0.74, 3.185], abs=1e-6)
    assert tracker.num_updates == 3


def test_update_matches_oracle_over_many_steps() -> None:
    gen = torch.Generator().manual_seed(0)
    tracker = QuantileTracker(alpha=0.1, beta=0.75, gamma=0.05)
    expected: tuple[float, float] | None = None
    for _ in range(20):
        # half-integers + 0.25 offsets never meet the tracker's values exactly
        scores = torch.randint(0, 12, (9,), generator=gen).to(torch.float32) / 2 + 0.25
        tracker.update(scores)
        expected = oracle_tracker_update(expected, scores.tolist(), 0.1, 0.75, 0.05)
        assert values_of(tracker) == pytest.approx(list(expected), abs=1e-5)


def test_state_dict_round_trip_resumes_identically() -> None:
    first = QuantileTracker(alpha=0.2, beta=0.9, gamma=0.2)
    for step in range(3):
        first.update(torch.tensor([0.0, 1.0, 3.0, float(step)]))
    state = first.state_dict()
    second = QuantileTracker(alpha=0.2, beta=0.9, gamma=0.2)
    second.load_state_dict(state)
    assert torch.equal(first.values, second.values)
    assert second.initialized and second.num_updates == first.num_updates == 3
    for scores in ([5.0, 0.0, 1.0], [2.0, 2.0, 2.0, 7.0]):
        first.update(torch.tensor(scores))
        second.update(torch.tensor(scores))
        assert torch.equal(first.values, second.values)
    assert first.num_updates == second.num_updates == 5


def test_state_dict_is_a_snapshot_not_a_live_view() -> None:
    tracker = QuantileTracker()
    tracker.update(torch.tensor([0.0, 1.0, 2.0]))
    state = tracker.state_dict()
    saved = QuantileTracker()
    saved.load_state_dict(state)
    tracker.update(torch.tensor([9.0, 9.0, 9.0]))
    restored = QuantileTracker()
    restored.load_state_dict(state)
    assert torch.equal(restored.values, saved.values)
    assert not torch.equal(restored.values, tracker.values)


def test_uninitialised_state_round_trips() -> None:
    restored = QuantileTracker()
    restored.load_state_dict(QuantileTracker().state_dict())
    assert restored.values is None and not restored.initialized
    restored.update(torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0]))
    assert values_of(restored) == pytest.approx([0.8, 3.2], abs=1e-6)


def test_state_dict_survives_torch_save_and_load(tmp_path: Path) -> None:
    tracker = QuantileTracker(alpha=0.3, beta=0.7)
    tracker.update(torch.tensor([0.0, 1.0, 2.0, 3.0]))
    torch.save(tracker.state_dict(), tmp_path / "tracker.pt")
    restored = QuantileTracker(alpha=0.3, beta=0.7)
    restored.load_state_dict(torch.load(tmp_path / "tracker.pt", weights_only=True))
    assert torch.equal(restored.values, tracker.values)


# q0 = [1,0,0], q1 = [1,1,0], q2 = [0,0,1], shuffle off, B = 2:
# bundle 0 = {q0, q1} -> S = [2, 1, 0] ; bundle 1 = {q2} -> S = [0, 0, 1]
TRACKED_REWARDS = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0]
TRACKED_QIDS = [0, 0, 0, 1, 1, 1, 2, 2, 2]
POOLED = [2.0, 1.0, 0.0, 0.0, 0.0, 1.0]


def test_tracker_mode_uses_tracker_values_and_updates_the_tracker() -> None:
    tracker = QuantileTracker(alpha=0.2, beta=0.8, gamma=0.1)
    tracker.update(torch.tensor([0.0, 0.25, 0.5, 1.25, 2.0]))
    before = values_of(tracker)
    result = advantages(
        torch.tensor(TRACKED_REWARDS),
        torch.tensor(TRACKED_QIDS),
        bundle_size=2,
        shuffle=False,
        normalize=False,
        quantile="tracker",
        tracker=tracker,
    )
    for row in result.quantiles.tolist():
        assert row == pytest.approx(before, abs=1e-6)
    bundle_ids, member_ids = result.bundle_ids.tolist(), result.member_ids.tolist()
    expected = oracle_advantages(
        TRACKED_REWARDS,
        TRACKED_QIDS,
        bundle_ids,
        member_ids,
        normalize=False,
        quantiles=tuple(before),
    )
    assert result.advantages.tolist() == pytest.approx(expected, abs=1e-6)
    scores, _ = member_scores(TRACKED_REWARDS, TRACKED_QIDS, bundle_ids, member_ids)
    assert sorted(s for v in scores.values() for s in v) == sorted(POOLED)
    after = oracle_tracker_update(tuple(before), POOLED, 0.2, 0.8, 0.1)
    assert values_of(tracker) == pytest.approx(list(after), abs=1e-6)
    assert tracker.num_updates == 2


def test_tracker_mode_without_update_leaves_the_tracker_alone() -> None:
    tracker = QuantileTracker(alpha=0.2, beta=0.8)
    tracker.update(torch.tensor([0.0, 3.0]))
    before = tracker.values.clone()
    advantages(
        torch.tensor(TRACKED_REWARDS),
        torch.tensor(TRACKED_QIDS),
        bundle_size=2,
        quantile="tracker",
        tracker=tracker,
        update_tracker=False,
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.equal(tracker.values, before) and tracker.num_updates == 1


def test_tracker_mode_initialises_from_pooled_scores_of_the_first_step() -> None:
    # pooled S = [2,1,0,0,0,1], sorted [0,0,0,1,1,2]: q(0.2) at position 1 -> 0,
    # q(0.8) at position 4 -> 1. Then one update: below 0: 0/6 -> q_a = 0 + 0.1*0.2 = 0.02 ;
    # below 1: 3/6 -> q_b = 1 + 0.1*(0.8 - 0.5) = 1.03
    tracker = QuantileTracker(alpha=0.2, beta=0.8, gamma=0.1)
    result = advantages(
        torch.tensor(TRACKED_REWARDS),
        torch.tensor(TRACKED_QIDS),
        bundle_size=2,
        shuffle=False,
        quantile="tracker",
        tracker=tracker,
    )
    assert linear_quantile(POOLED, 0.2) == 0.0 and linear_quantile(POOLED, 0.8) == 1.0
    for row in result.quantiles.tolist():
        assert row == pytest.approx([0.0, 1.0], abs=1e-6)
    assert values_of(tracker) == pytest.approx([0.02, 1.03], abs=1e-6)


# ----------------------------------------------------------------------------
# two processes, gloo: the indicator mean is over the union of all ranks
# ----------------------------------------------------------------------------
WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch
    import torch.distributed as dist
    from riskfast.riskpo import QuantileTracker

    rank = int(sys.argv[1])
    steps = json.loads(sys.argv[2])
    dist.init_process_group("gloo", rank=rank, world_size=2)
    history = []
    tracker = QuantileTracker(alpha=0.2, beta=0.7, gamma=0.1)
    for step in steps:
        tracker.update(torch.tensor(step[rank], dtype=torch.float32))
        history.append(tracker.values.tolist())
    dist.barrier()
    dist.destroy_process_group()
    print("RESULT" + json.dumps(history))
    """
)


def free_port() -> int:
    """An unused TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_two_ranks(steps: list[list[list[float]]], tmp_path: Path) -> list[list[list[float]]]:
    """Run the worker on two gloo ranks; return each rank's tracker values per step."""
    script = tmp_path / "tracker_worker.py"
    script.write_text(WORKER)
    package_root = str(Path(riskfast.__file__).resolve().parents[1])
    env = dict(os.environ)
    env.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        PYTHONPATH=os.pathsep.join([package_root, env.get("PYTHONPATH", "")]),
        OMP_NUM_THREADS="1",
    )
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(rank), json.dumps(steps)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            pytest.fail("distributed tracker workers timed out")
        assert proc.returncode == 0, err[-3000:]
        line = [x for x in out.splitlines() if x.startswith("RESULT")][-1]
        outputs.append(json.loads(line[len("RESULT") :]))
    return outputs


def test_two_gloo_ranks_match_one_tracker_fed_the_union(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(3)
    steps: list[list[list[float]]] = []
    for _ in range(6):  # equal halves of 8 member scores each step
        union = (torch.randint(0, 9, (16,), generator=gen).to(torch.float32) / 2 + 0.1).tolist()
        steps.append([union[:8], union[8:]])
    for _ in range(3):  # uneven halves: the mean is over the union, not a mean of means
        union = (torch.randint(0, 9, (10,), generator=gen).to(torch.float32) / 2 + 0.1).tolist()
        steps.append([union[:3], union[3:]])
    ranks = run_two_ranks(steps, tmp_path)
    single = QuantileTracker(alpha=0.2, beta=0.7, gamma=0.1)
    oracle: tuple[float, float] | None = None
    for index, step in enumerate(steps):
        union = step[0] + step[1]
        single.update(torch.tensor(union, dtype=torch.float32))
        oracle = oracle_tracker_update(oracle, union, 0.2, 0.7, 0.1)
        expected = single.values.tolist()
        assert ranks[0][index] == ranks[1][index], f"step {index}: ranks disagree"
        assert ranks[0][index] == expected, f"step {index}: {ranks[0][index]} != {expected}"
        assert expected == pytest.approx(list(oracle), abs=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_first_tracker_step_counts_no_score_below_its_own_quantile(backend: str) -> None:
    # G = 1 and one bundle of 5 questions: a single member score S (a float32 sum that
    # is not exact). The tracker starts at q = (S, S), and no score lies strictly below S,
    # so q_a = S + 0.1*(0 - 0) = S and q_b = S + 0.1*(0.5 - 0). If the initial quantile and
    # the scores of the update were computed by two different float32 paths, S < q could
    # hold by one ulp and q would jump by 0.1.
    rewards = torch.tensor([1.7627099, -0.88616019, -0.11551992, -1.9226276, 0.82291616])
    tracker = QuantileTracker(alpha=0.0, beta=0.5, gamma=0.1)
    result = advantages(
        rewards,
        torch.tensor([393, 31, 242, 134, 61]),
        bundle_size=5,
        shuffle=False,
        alpha=0.0,
        beta=0.5,
        quantile="tracker",
        tracker=tracker,
        backend=backend,
    )
    score = result.scores.item()
    assert values_of(tracker) == pytest.approx([score, score + 0.05], abs=1e-6)


# ----------------------------------------------------------------------------
# non-finite scores, checkpoints that do not fit, drop_last (issue 11)
# ----------------------------------------------------------------------------
NAN, INF = float("nan"), float("inf")


def test_a_first_update_without_a_finite_score_leaves_the_tracker_uninitialised() -> None:
    tracker = QuantileTracker(alpha=0.2, beta=0.8, gamma=0.1)
    assert tracker.update(torch.tensor([NAN, INF, -INF])) is None
    assert tracker.values is None and not tracker.initialized and tracker.num_updates == 1
    assert tracker.state_dict()["values"] is None
    # the next finite step starts the tracker as if it were the first
    tracker.update(torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0]))
    expected = oracle_tracker_update(None, [0.0, 1.0, 2.0, 3.0, 4.0], 0.2, 0.8, 0.1)
    assert values_of(tracker) == pytest.approx(list(expected), abs=1e-6)


def test_non_finite_scores_are_left_out_of_the_initial_quantiles_and_the_indicator_mean() -> None:
    # A NaN used to count as "not below" (pushing q up); an inf is left out as well.
    tracker = QuantileTracker(alpha=0.2, beta=0.8, gamma=0.1)
    tracker.update(torch.tensor([NAN, 0.0, 1.0, INF, 2.0, 3.0, 4.0]))
    expected = oracle_tracker_update(None, [0.0, 1.0, 2.0, 3.0, 4.0], 0.2, 0.8, 0.1)
    assert values_of(tracker) == pytest.approx(list(expected), abs=1e-6)
    tracker.update(torch.tensor([NAN, NAN, NAN, 0.5, -INF, 5.0]))
    expected = oracle_tracker_update(expected, [0.5, 5.0], 0.2, 0.8, 0.1)
    assert values_of(tracker) == pytest.approx(list(expected), abs=1e-6)


def test_initialize_without_a_finite_score_is_refused_and_changes_nothing() -> None:
    tracker = QuantileTracker()
    for scores in (torch.tensor([NAN, NAN]), torch.zeros(0)):
        with pytest.raises(ValueError, match="^scores: no finite score"):
            tracker.initialize(scores)
        assert tracker.values is None and tracker.num_updates == 0


# The Triton interpreter computes with numpy, which warns about the NaN fed on purpose.
@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_an_unvalidated_all_nan_step_does_not_poison_the_next_steps(backend: str) -> None:
    # validate=False: no host read, so the tracker may hold NaN after the first step;
    # the next step starts it from its own finite scores, on the device.
    kwargs = {"group_size": 4, "bundle_size": 2, "quantile": "tracker", "backend": backend}
    tracker = QuantileTracker(gamma=0.2)
    bad = advantages(
        torch.full((16,), NAN),
        tracker=tracker,
        validate=False,
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    )
    assert torch.equal(bad.advantages, torch.zeros(16))
    assert tracker.state_dict()["values"] is None  # saved as uninitialised
    rewards = torch.tensor([1.0, 0, 0, 1, 1, 1, 0, 1, 0, 0, 0, 1, 0, 1, 1, 1])
    reference = QuantileTracker(gamma=0.2)
    for step in range(2):
        out = advantages(
            rewards,
            tracker=tracker,
            validate=False,
            generator=torch.Generator().manual_seed(step),
            **kwargs,
        )
        ref = advantages(
            rewards, tracker=reference, generator=torch.Generator().manual_seed(step), **kwargs
        )
        assert torch.equal(out.advantages, ref.advantages), step
        assert torch.equal(tracker.values, reference.values), step
    assert bool((ref.advantages != 0).any())


def _trained_tracker() -> QuantileTracker:
    tracker = QuantileTracker(alpha=0.2, beta=0.8, gamma=0.1)
    tracker.update(torch.tensor([0.0, 1.0, 2.0, 3.0]))
    return tracker


BAD_STATES = [
    (
        "nan values",
        {"values": torch.tensor([NAN, 1.0])},
        ValueError,
        "^state: values must be finite",
    ),
    ("inf values", {"values": [0.0, INF]}, ValueError, "^state: values must be finite"),
    ("wrong shape", {"values": torch.zeros(3)}, ValueError, "^state: values must be None or 2"),
    ("2-d values", {"values": torch.zeros(2, 1)}, ValueError, "^state: values must be None or 2"),
    ("string values", {"values": "0.2"}, TypeError, r"^state\['values'\]"),
    ("negative gamma", {"gamma": -0.1}, ValueError, r"^state\['gamma'\]: must be > 0"),
    (
        "other gamma",
        {"gamma": 0.5},
        ValueError,
        "^gamma: the checkpoint was saved with gamma = 0.5",
    ),
    (
        "other alpha",
        {"alpha": 0.1},
        ValueError,
        "^alpha: the checkpoint was saved with alpha = 0.1",
    ),
    ("other beta", {"beta": 0.9}, ValueError, "^beta: the checkpoint was saved with beta = 0.9"),
    ("negative count", {"num_updates": -1}, ValueError, r"^state\['num_updates'\]"),
    ("float count", {"num_updates": 2.0}, TypeError, r"^state\['num_updates'\]"),
    ("unknown key", {"step": 3}, ValueError, r"^state: not a QuantileTracker state .*\['step'\]"),
]


@pytest.mark.parametrize(
    ("change", "error", "match"), [c[1:] for c in BAD_STATES], ids=[c[0] for c in BAD_STATES]
)
def test_load_state_dict_refuses_a_bad_state_whole(
    change: dict, error: type[Exception], match: str
) -> None:
    state = {**_trained_tracker().state_dict(), **change}
    tracker = _trained_tracker()
    tracker.update(torch.tensor([5.0, 6.0]))
    before, count = tracker.values.clone(), tracker.num_updates
    with pytest.raises(error, match=match):
        tracker.load_state_dict(state)
    assert torch.equal(tracker.values, before) and tracker.num_updates == count


def test_load_state_dict_refuses_a_missing_key_and_a_non_dict() -> None:
    tracker = _trained_tracker()
    state = tracker.state_dict()
    del state["values"]
    with pytest.raises(ValueError, match=r"^state: .*missing keys \['values'\]"):
        tracker.load_state_dict(state)
    with pytest.raises(TypeError, match="^state: expected a dict"):
        tracker.load_state_dict([("values", None)])  # type: ignore[arg-type]


def test_drop_last_with_fewer_questions_than_bundle_size_keeps_the_tracker_waiting() -> None:
    # 3 questions, bundles of 5, drop_last: the only bundle is dropped. Valid input: every
    # advantage is 0, nothing feeds the tracker, and the reported quantiles are finite.
    tracker = QuantileTracker(gamma=0.1)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    result = advantages(
        rewards, group_size=2, bundle_size=5, drop_last=True, quantile="tracker", tracker=tracker
    )
    assert torch.equal(result.advantages, torch.zeros(6))
    assert not tracker.initialized
    assert all(math.isfinite(v) for v in result.metrics.values()), result.metrics
    assert result.metrics["dropped_response_frac"] == 1.0
    # Six questions: one kept bundle of five starts the tracker from its scores only.
    rewards = torch.tensor([1.0, 0, 0, 1, 1, 1, 0, 0, 1, 1, 0, 1])
    result = advantages(
        rewards,
        group_size=2,
        bundle_size=5,
        drop_last=True,
        quantile="tracker",
        tracker=tracker,
        shuffle=False,
    )
    kept = result.scores[0].tolist()
    expected = oracle_tracker_update(None, kept, 0.2, 0.8, 0.1)
    assert values_of(tracker) == pytest.approx(list(expected), abs=1e-6)


def test_a_rejected_update_changes_nothing() -> None:
    tracker = _trained_tracker()
    before, count = tracker.values.clone(), tracker.num_updates
    bad_scores = [
        (torch.zeros(2, 2, 2), ValueError),
        (torch.zeros(3, dtype=torch.complex64), TypeError),
        ("0.5", TypeError),
    ]
    for scores, error in bad_scores:
        with pytest.raises(error, match="^scores:"):
            tracker.update(scores)  # type: ignore[arg-type]
        assert torch.equal(tracker.values, before) and tracker.num_updates == count
