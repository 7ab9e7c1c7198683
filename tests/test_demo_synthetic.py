"""The synthetic GRPO-vs-RiskPO table (``riskfast explain`` / the demo's first half)."""

from __future__ import annotations

import io
import math
import os
import subprocess
import sys

import pytest

from riskfast.cli import main
from riskfast.demo.synthetic import make_rollout, run_synthetic_demo


def _grpo_by_hand(rewards: list[float]) -> tuple[float, float]:
    """GRPO advantage of a correct and of a wrong answer: (r - mean) / (unbiased std + 1e-6)."""
    g = len(rewards)
    mean = sum(rewards) / g
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / (g - 1))
    return (1 - mean) / (std + 1e-6), (0 - mean) / (std + 1e-6)


def test_demo_table_reports_grpo_advantages_of_each_question() -> None:
    report = run_synthetic_demo(out=io.StringIO(), seed=3)
    for row in report["questions"]:
        rewards = [float(c) for c in row["rewards"]]
        if len(set(rewards)) == 1:
            assert row["GRPO"]["share"] == 0.0
            continue
        right, wrong = _grpo_by_hand(rewards)
        assert float(row["GRPO"]["right"]) == pytest.approx(right, abs=0.006)
        assert float(row["GRPO"]["wrong"]) == pytest.approx(wrong, abs=0.006)


def test_demo_riskpo_weights_are_never_positive_and_shares_sum_to_one() -> None:
    report = run_synthetic_demo(out=io.StringIO(), seed=1, bundle_size=3)
    names = [k for k in report["questions"][0] if k.startswith(("GRPO", "RiskPO"))]
    for name in names:
        shares = [row[name]["share"] for row in report["questions"]]
        assert sum(shares) == pytest.approx(1.0, abs=1e-6) or sum(shares) == 0.0
    for bundle in report["bundles"]:
        assert all(a <= 0.0 for a in bundle["advantages"])
        assert bundle["q_alpha"] <= bundle["q_beta"]
        assert len(bundle["scores"]) == 8
    # Bundling reaches questions whose own answers all agree: B = 1 cannot.
    assert (
        report["questions_with_signal"]["RiskPO B=3"]
        >= report["questions_with_signal"]["RiskPO B=1"]
    )


def test_rollout_has_graded_difficulty() -> None:
    rollout = make_rollout(num_questions=6, group_size=64, seed=0)
    rates = rollout.rewards.view(6, 64).mean(dim=1)
    assert float(rates[0]) > float(rates[-1]) + 0.5
    assert bool((rollout.logp <= 0).all())


def test_cli_reports_bad_levels_as_an_error_naming_the_argument(capsys) -> None:
    assert main(["explain", "--alpha", "0.9", "--beta", "0.1"]) == 2
    assert "alpha" in capsys.readouterr().err


def test_python_dash_m_runs_the_table() -> None:
    env = {**os.environ, "PYTHONWARNINGS": "error::UserWarning"}
    done = subprocess.run(
        [sys.executable, "-m", "riskfast", "explain", "--questions", "4", "--group-size", "4"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert "GRPO" in done.stdout and "RiskPO B=4" in done.stdout
    assert "q_alpha" in done.stdout
