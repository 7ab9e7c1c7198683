"""``riskfast demo rlr --quick`` through the CLI, with a temporary cache, and its helpers.

The quick run pretrains a small digit UNet and classifier into a temporary cache
directory, trains every method on the same budget and writes its three files. The test
checks every summary field of every method, that the methods started from the same
evaluation (same start, same fixed samples), that each spent its budget (to within one
step), that the curve in ``metrics.jsonl`` matches the summary, and that the cache is
reused. ``riskfast demo`` (the RiskPO demo) is tested in ``test_demo_train.py``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("peft", reason="the RLR demo trains LoRA adapters: pip install peft")
pytest.importorskip("sklearn", reason="the RLR demo's digits ship with scikit-learn")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, Any]]:
    from riskfast.cli import main

    out = tmp_path_factory.mktemp("demo_rlr")
    cache = tmp_path_factory.mktemp("cache")
    threads = torch.get_num_threads()
    code = main(["demo", "rlr", "--quick", "--out", str(out), "--cache-dir", str(cache)])
    assert code == 0
    assert torch.get_num_threads() == threads  # the demo restores the thread count
    return out, cache, json.loads((out / "summary.json").read_text())


def test_quick_demo_writes_every_summary_field(quick_run) -> None:
    from riskfast.demo.rlr_demo import METHODS, QUICK, SUMMARY_METHOD_FIELDS

    out, _, summary = quick_run
    assert (out / "report.png").stat().st_size > 10_000
    assert list(summary["methods"]) == list(METHODS)
    budget = QUICK["budget"]
    starts = set()
    for method, row in summary["methods"].items():
        missing = [f for f in SUMMARY_METHOD_FIELDS if f not in row]
        assert not missing, (method, missing)
        for field in SUMMARY_METHOD_FIELDS:
            if field not in ("per_seed", "peak_memory_mib"):
                assert isinstance(row[field], (int, float)) and math.isfinite(row[field]), field
        assert row["peak_memory_mib"] is None or row["peak_memory_mib"] >= 0
        for rate in (row["initial_hit_rate"], row["final_hit_rate"]):
            assert 0.0 <= rate <= 1.0
        assert row["initial_reward_mean"] <= 0 and row["final_reward_mean"] <= 0  # log-probs
        assert row["final_reward_std"] >= 0 and row["diversity_final"] > 0
        assert row["model_evaluations"] >= budget and row["steps"] >= 1
        assert row["model_evaluations"] - budget < row["model_evaluations"] / row["steps"]
        assert row["reward_per_model_evaluation"] == pytest.approx(
            (row["final_reward_mean"] - row["initial_reward_mean"]) / row["model_evaluations"]
        )
        assert list(row["per_seed"]) == ["0"]
        starts.add((row["initial_reward_mean"], row["initial_hit_rate"], row["diversity_initial"]))
    # Same pretrained start and the same fixed evaluation samples for every method.
    assert len(starts) == 1
    assert summary["setup"]["cached"] is False
    assert summary["setup"]["classifier_accuracy"] > 0.8


def test_metrics_lines_match_the_summary(quick_run) -> None:
    out, _, summary = quick_run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in records} == {"train", "eval"}
    for method, row in summary["methods"].items():
        evals = [r for r in records if r["kind"] == "eval" and r["method"] == method]
        train = [r for r in records if r["kind"] == "train" and r["method"] == method]
        assert evals[0]["model_evaluations"] == 0
        assert evals[-1]["reward_mean"] == row["final_reward_mean"]
        assert evals[-1]["hit_rate"] == row["final_hit_rate"]
        assert [r["step"] for r in train] == list(range(1, row["steps"] + 1))
        assert train[-1]["model_evaluations"] == row["model_evaluations"]
        counts = [r["model_evaluations"] for r in train]
        assert counts == sorted(counts)


def test_the_pretrained_models_are_cached(quick_run) -> None:
    from riskfast.demo.rlr_demo import QUICK
    from riskfast.demo.rlr_digits import DigitSetup, pretrained

    _, cache, summary = quick_run
    files = list(cache.glob("digits-*.pt"))
    assert len(files) == 1
    again = pretrained(QUICK["setup"], cache)
    assert again["cached"] is True
    assert again["classifier_accuracy"] == summary["setup"]["classifier_accuracy"]
    # Another setting is another key (and file), never the cached one.
    assert DigitSetup(unet_steps=201).key() != QUICK["setup"].key()


def test_demo_help_lists_both_demos(capsys) -> None:
    from riskfast.cli import main

    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = capsys.readouterr().out
    assert "{rlr}" in text and "RiskPO" in text and "demo rlr" in text


def test_bad_options_name_the_option(tmp_path) -> None:
    from riskfast.cli import main

    for argv, name in (
        (["--budget", "0"], "budget"),
        (["--target", "12"], "target"),
        (["--lr", "rlr=abc"], "lr"),
        (["--lr", "gan=1e-3"], "lr"),
    ):
        code = main(["demo", "rlr", "--no-plot", "--out", str(tmp_path), *argv])
        assert code == 2, argv
    assert not (tmp_path / "summary.json").exists()


def test_seed_aggregates_against_scipy() -> None:
    from scipy import stats

    from riskfast.demo.rlr_demo import SUMMARY_METHOD_FIELDS, _aggregate

    fields = [f for f in SUMMARY_METHOD_FIELDS if f != "per_seed"]
    finals = {0: -1.25, 1: -0.5, 2: -2.0, 5: -0.75}
    runs = {
        seed: {**{f: float(seed) for f in fields}, "final_reward_mean": value, "steps": 7}
        for seed, value in finals.items()
    }
    row = _aggregate(runs)
    values = list(finals.values())
    n = len(values)
    half = stats.t.ppf(0.975, n - 1) * stats.tstd(values) / math.sqrt(n)
    assert row["final_reward_mean"] == pytest.approx(sum(values) / n)
    assert row["final_reward_seed_std"] == pytest.approx(stats.tstd(values))
    assert row["final_reward_mean_ci95"] == pytest.approx(half, rel=1e-5)
    seeds = [float(s) for s in finals]
    assert row["final_hit_rate_ci95"] == pytest.approx(
        stats.t.ppf(0.975, n - 1) * stats.tstd(seeds) / math.sqrt(n), rel=1e-5
    )
    assert row["steps"] == 7 and list(row["per_seed"]) == ["0", "1", "2", "5"]
    one = _aggregate({0: runs[0]})
    assert one["final_reward_mean_ci95"] is None and one["final_reward_seed_std"] is None


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux /proc only")
def test_peak_memory_of_each_run_counts_memory_a_previous_run_freed() -> None:
    from riskfast.demo.rlr_demo import _PeakMemory

    # 2 x 16 MiB, half in large blocks (mmap) and half in small ones (glibc's heap, which
    # keeps freed pages unless they are trimmed): every repeat must see both halves.
    expected = 32.0
    for _ in range(3):
        memory = _PeakMemory(torch.device("cpu"))
        with memory:
            large = [torch.ones(1024, 1024) for _ in range(4)]
            small = [torch.ones(64, 64) for _ in range(1024)]
            del large, small
        assert memory.mib is None or memory.mib >= 0.9 * expected
