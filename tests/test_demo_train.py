"""The training demo (``riskfast demo``) in its ``--quick`` form, and its task helpers."""

from __future__ import annotations

import argparse
import itertools
import json
import math
from pathlib import Path
from typing import Any

import pytest

from riskfast.demo.task import (
    Question,
    build_tokenizer,
    exact_match_reward,
    pass_at_k,
    rl_questions,
    sample_questions,
    split_of,
)


def test_pass_at_k_unbiased_estimator() -> None:
    assert pass_at_k(16, 0, 1) == 0.0
    assert pass_at_k(16, 16, 16) == 1.0
    assert pass_at_k(16, 4, 1) == pytest.approx(0.25)
    assert pass_at_k(16, 1, 16) == 1.0
    assert pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)
    for c in range(17):
        values = [pass_at_k(16, c, k) for k in (1, 2, 4, 8, 16)]
        assert values == sorted(values)


def test_task_is_reversed_addition_with_held_out_split() -> None:
    q = Question(123, 45, 3)
    assert (q.prompt, q.answer) == ("321+54=", "861")
    assert exact_match_reward(["861", " 861", "8610", "86"], answer=["861"] * 4) == [1.0, 1.0, 0.0, 0.0]
    test = sample_questions(200, "test", seed=0, unique=True)
    train = sample_questions(2000, "train", seed=0)
    assert {split_of(x.a, x.b) for x in test} == {"test"}
    assert not {(x.a, x.b) for x in test} & {(x.a, x.b) for x in train}
    assert {x.level for x in test} == {1, 2, 3, 4}
    tokenizer = build_tokenizer()
    ids = tokenizer(q.prompt, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(q.prompt)
    assert tokenizer.decode(ids) == q.prompt


def test_rl_questions_fresh_draws_or_epochs_over_a_fixed_set() -> None:
    # Unset: the stream is the plain training-pool draw (older runs keep their prompts).
    assert rl_questions(50, max_digits=3, seed=4) == sample_questions(50, "train", max_digits=3, seed=4)
    # A fixed set of 7: three epochs cut at 20, each epoch a new order of the same 7.
    pool = sample_questions(7, "train", max_digits=3, seed=4, unique=True)
    stream = rl_questions(20, max_digits=3, seed=4, train_questions=7)
    assert len(set(pool)) == 7
    assert sorted(stream[:7], key=str) == sorted(pool, key=str)
    assert sorted(stream[7:14], key=str) == sorted(pool, key=str)
    assert set(stream[14:]) <= set(pool) and len(set(stream[14:])) == 6
    assert [stream.count(q) for q in pool].count(3) == 6
    assert stream[:7] != stream[7:14]  # reshuffled
    assert {split_of(q.a, q.b) for q in stream} == {"train"}
    assert rl_questions(20, max_digits=3, seed=4, train_questions=7) == stream  # a function of the seed
    assert rl_questions(0, max_digits=3, train_questions=7) == []
    with pytest.raises(ValueError, match="^train_questions: must be >= 1"):
        rl_questions(5, train_questions=0)
    with pytest.raises(TypeError, match="^train_questions: must be an int"):
        rl_questions(5, train_questions=True)
    with pytest.raises(ValueError, match="^count: must be >= 0"):
        rl_questions(-1, train_questions=3)
    # one-digit questions: 100 pairs, about half of them in the training split
    ones = len(sample_questions(1000, "train", max_digits=1, unique=True))
    assert 30 < ones < 70
    assert len(set(rl_questions(2 * ones, max_digits=1, train_questions=ones))) == ones
    with pytest.raises(ValueError, match=f"^train_questions: .* only {ones} distinct"):
        rl_questions(5, max_digits=1, train_questions=ones + 1)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    pytest.importorskip("trl", reason="the demo trains through TRL: pip install 'riskfast[trl]'")
    from riskfast.demo.train import add_train_arguments, run_training

    out = tmp_path_factory.mktemp("demo")
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    args = parser.parse_args(["--quick", "--out", str(out), "--device", "cpu"])
    return out, run_training(args)


def test_quick_demo_summary(quick_run: tuple[Path, dict[str, Any]]) -> None:
    from riskfast.demo.train import KS, METHODS, SUMMARY_METHOD_FIELDS

    out, summary = quick_run
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert (out / "report.png").stat().st_size > 10_000
    assert set(summary["methods"]) == set(METHODS)
    blocks = [summary["warm_start"], *summary["methods"].values()]
    for block in blocks:
        values = [block["pass@k"][str(k)] for k in KS]
        assert all(0.0 <= v <= 1.0 for v in values)
        assert all(a <= b + 1e-12 for a, b in itertools.pairwise(values)), values
        assert math.isfinite(block["final_entropy"]) and block["final_entropy"] >= 0
        for row in block["pass@k_by_level"].values():
            assert list(row) == [str(k) for k in KS]
    for method, row in summary["methods"].items():
        missing = [f for f in SUMMARY_METHOD_FIELDS if f not in row]
        assert not missing, (method, missing)
        assert row["steps"] == summary["config"]["steps"]
    assert summary["methods"]["riskpo"]["trainer"] == "riskfast.RiskPOTrainer"
    assert summary["methods"]["grpo"]["estimator"] == "grpo"


def test_quick_demo_metrics_lines(quick_run: tuple[Path, dict[str, Any]]) -> None:
    from riskfast.demo.train import EVAL_RECORD_FIELDS, METHODS, TRAIN_RECORD_FIELDS

    out, summary = quick_run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = summary["config"]["steps"]
    for method in METHODS:
        train = [r for r in records if r["kind"] == "train" and r["method"] == method]
        assert [r["step"] for r in train] == list(range(1, steps + 1))
        for record in train:
            assert set(TRAIN_RECORD_FIELDS) <= set(record), set(TRAIN_RECORD_FIELDS) - set(record)
            for name in ("reward_mean", "quantile_alpha", "quantile_beta", "entropy", "clip_frac"):
                assert isinstance(record[name], float) and math.isfinite(record[name]), name
            assert record["quantile_alpha"] <= record["quantile_beta"]
        evals = [r for r in records if r["kind"] == "eval" and r["method"] == method]
        assert evals[0]["step"] == 0 and evals[-1]["step"] == steps
        for record in evals:
            assert set(EVAL_RECORD_FIELDS) <= set(record)
