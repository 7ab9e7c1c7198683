"""The demo's presets and options (``riskfast demo --preset``) and the multi-seed study
(``riskfast study``) on a tiny budget, including the resume of an interrupted study."""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest

from riskfast.cli import main
from riskfast.demo.presets import BUILTIN, PRESETS, RISKPO_KEYS, TRAINING_KEYS, preset_values


def _demo_args(argv: list[str]) -> argparse.Namespace:
    from riskfast.demo.train import _resolve, add_train_arguments

    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    return _resolve(parser.parse_args(argv))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_sets_every_option_and_the_command_line_wins(name: str) -> None:
    preset = PRESETS[name]
    assert set(preset.riskpo) <= set(RISKPO_KEYS) and set(preset.training) <= set(TRAINING_KEYS)
    args = _demo_args(["--preset", name])
    assert args.preset == name
    assert args.options == {**BUILTIN, **preset.riskpo, **preset.training} == preset_values(name)
    args = _demo_args(["--preset", name, "--beta", "0.85", "--credit", "score",
                       "--no-natural-baseline", "--updates-per-rollout", "1", "--dual-clip", "none"])
    assert args.options["beta"] == 0.85 and args.options["credit"] == "score"
    assert args.options["natural_baseline"] is False
    assert args.options["updates_per_rollout"] == 1 and args.options["dual_clip"] == 0.0
    assert args.options["form"] == preset_values(name)["form"]


def test_official_presets_match_the_official_scripts() -> None:
    math_ = preset_values("official-math")
    assert (math_["form"], math_["alpha"], math_["beta"], math_["w_mix"], math_["credit"]) == (
        "reference_code", 0.2, 0.9, 1.5, "std")
    assert math_["natural_baseline"] and not math_["center"] and math_["bundle_size"] == 5
    assert (math_["updates_per_rollout"], math_["dual_clip"], math_["weight_decay"]) == (2, 3.0, 0.01)
    hard = preset_values("official-hard-math")
    assert (hard["beta"], hard["credit"], hard["natural_baseline"], hard["updates_per_rollout"]) == (
        0.8, "sum_mean", False, 4)
    paper = preset_values("paper")
    assert (paper["form"], paper["alpha"], paper["beta"], paper["omega"], paper["center"]) == (
        "paper", 0.2, 0.8, 0.5, False)


def test_quick_leaves_options_given_on_the_command_line() -> None:
    from riskfast.demo.train import DEFAULT_PRESET, DEMO_LR

    args = _demo_args(["--quick", "--steps", "3", "--warm-target", "0.3"])
    assert (args.steps, args.model_size, args.warm_target) == (3, "tiny", 0.3)
    args = _demo_args(["--quick"])
    assert (args.steps, args.warm_target) == (40, None)
    args = _demo_args([])
    assert (args.steps, args.model_size, args.warm_target, args.prompts_per_step) == (
        150, "mini", 0.4, 100)
    assert (args.grpo_lr, args.riskpo_lr) == (DEMO_LR["grpo"], DEMO_LR[DEFAULT_PRESET])


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--beta", "1.5"], "beta"),
        (["--alpha", "0.9", "--beta", "0.8"], "alpha"),
        (["--form", "reference_code", "--alpha", "0"], "alpha"),
        (["--bundle-size", "0"], "bundle-size"),
        (["--estimator", "foo"], "estimator"),
        (["--dual-clip", "0.5"], "dual-clip"),
        (["--updates-per-rollout", "0"], "updates-per-rollout"),
        (["--updates-per-rollout", "3"], "updates-per-rollout"),  # 80 completions
        (["--tracker-gamma", "0"], "tracker-gamma"),
        (["--weight-decay", "-1"], "weight-decay"),
        (["--riskpo-lr", "0"], "riskpo-lr"),
        (["--grpo-lr=-1e-3"], "grpo-lr"),
        (["--steps", "0"], "steps"),
        (["--train-questions", "0"], "train-questions"),
        (["--grpo-trainer", "trl", "--dual-clip", "3"], "grpo-trainer"),
    ],
)
def test_demo_bad_option_is_named(argv: list[str], flag: str, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", *argv, "--out", str(tmp_path / "out"), "--no-plot"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"riskfast demo: error: {flag}:"), err
    assert not (tmp_path / "out").exists()


def test_unknown_preset_is_named() -> None:
    with pytest.raises(ValueError, match="^preset: must be one of"):
        preset_values("official")
    with pytest.raises(SystemExit):
        _demo_args(["--preset", "official"])


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_runs_in_quick(name: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    pytest.importorskip("trl", reason="the demo trains through TRL: pip install 'riskfast[trl]'")
    from riskfast.demo.train import run_training

    cache = tmp_path_factory.getbasetemp() / "preset_warm_start.pt"  # shared by the presets
    out = tmp_path_factory.mktemp(name)
    argv = ["--quick", "--preset", name, "--method", "riskpo", "--steps", "2", "--warm-steps", "10",
            "--eval-questions", "8", "--eval-every", "1", "--no-plot", "--out", str(out),
            "--device", "cpu", "--warm-start", str(cache)]
    args = _parser().parse_args(argv)
    summary = run_training(args)
    row = summary["methods"]["riskpo"]
    assert row["preset"] == name
    assert row["riskpo_options"] == {k: preset_values(name)[k] for k in RISKPO_KEYS}
    assert row["training"] == {k: preset_values(name)[k] for k in TRAINING_KEYS}
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x["kind"] == "train"]
    assert [x["step"] for x in train] == [1, 2]  # one line per rollout, whatever the updates
    assert all(math.isfinite(x["reward_mean"]) for x in train)
    machine = summary["environment"]
    assert machine["threads"] == 1 and machine["torch"] and machine["cpu"]


def test_demo_trains_on_a_fixed_set_when_asked(tmp_path_factory: pytest.TempPathFactory,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """``--train-questions N``: the RL prompts are epochs over N fixed training questions,
    and the summary says so."""
    pytest.importorskip("trl", reason="the demo trains through TRL: pip install 'riskfast[trl]'")
    from riskfast.demo import train
    from riskfast.demo.task import rl_questions

    streams: list[list[Any]] = []

    def recording(count: int, **kw: Any) -> list[Any]:
        streams.append(rl_questions(count, **kw))
        return streams[-1]

    monkeypatch.setattr(train, "rl_questions", recording)
    cache = tmp_path_factory.getbasetemp() / "preset_warm_start.pt"
    out = tmp_path_factory.mktemp("fixed")
    argv = ["--quick", "--method", "grpo", "--steps", "3", "--warm-steps", "10",
            "--train-questions", "4", "--eval-questions", "8", "--eval-every", "3", "--no-plot",
            "--out", str(out), "--device", "cpu", "--warm-start", str(cache)]
    summary = train.run_training(_parser().parse_args(argv))
    (stream,) = streams
    assert len(stream) == 30 and len(set(stream)) == 4  # 3 steps x 10 prompts over 4 questions
    assert summary["config"]["train_questions"] == 4
    assert "(7.5 epochs over a fixed set of 4 training questions)" in train.format_table(summary)


def test_study_config_records_a_fixed_training_set_only_when_set() -> None:
    from riskfast.demo.study import _resolve, add_study_arguments, study_config
    from riskfast.demo.train import train_set_text

    parser = argparse.ArgumentParser()
    add_study_arguments(parser)
    plain = study_config(_resolve(parser.parse_args(["--quick"])))
    assert "train_questions" not in plain  # older studies' fingerprints stay valid
    fixed = study_config(_resolve(parser.parse_args(["--quick", "--train-questions", "12"])))
    assert fixed == {**plain, "train_questions": 12}
    assert train_set_text(fixed) == " (2.5 epochs over a fixed set of 12 training questions)"
    assert train_set_text({"steps": 300, "prompts_per_step": 100, "train_questions": 2000}) == (
        " (15 epochs over a fixed set of 2000 training questions)")
    assert train_set_text(plain) == ""


def _parser() -> argparse.ArgumentParser:
    from riskfast.demo.train import add_train_arguments

    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    return parser


# ---------------------------------------------------------------------------- the study


def test_t_interval() -> None:
    from riskfast.demo.study import t_interval

    stats = t_interval([1.0, 2.0, 3.0])
    assert stats["mean"] == 2.0
    assert stats["high"] - 2.0 == pytest.approx(4.303 / math.sqrt(3))
    assert stats["low"] == pytest.approx(2.0 - 4.303 / math.sqrt(3))
    assert t_interval([0.5])["low"] is None


def test_seed_tables_pair_each_seed_before_averaging() -> None:
    """Hand case: a = (1, 3), b = (0, 1) over seeds 0, 1. The paired differences are
    (1, 2): mean 1.5, standard deviation 1/sqrt(2), half-width t(1) 12.706 * 0.5; the
    unpaired arms' half-widths are 12.706 * 1 and 12.706 * 0.5."""
    from riskfast.demo.study import seed_tables

    by = {("a", 0): {"m": 1.0}, ("a", 1): {"m": 3.0}, ("b", 0): {"m": 0.0}, ("b", 1): {"m": 1.0}}
    table, diffs = seed_tables(by, [0, 1], ["a", "b"], [("a", "b"), ("b", "a"), ("a", "a")], ["m"])
    assert list(diffs) == ["a - b", "b - a", "a - a"] and list(table) == ["a", "b"]
    d = diffs["a - b"]["m"]
    assert d["values"] == [1.0, 2.0] and d["mean"] == 1.5
    # seeds where the first arm does not beat the second (a tie counts)
    assert [diffs[p]["m"]["at_or_below_zero"] for p in diffs] == [0, 2, 2]
    assert "at_or_below_zero" not in table["a"]["m"]
    assert d["high"] - 1.5 == pytest.approx(12.706 * 0.5, abs=1e-3)
    assert table["a"]["m"]["mean"] == 2.0
    assert table["a"]["m"]["high"] - 2.0 == pytest.approx(12.706, abs=1e-3)
    assert table["b"]["m"]["high"] - 0.5 == pytest.approx(12.706 * 0.5, abs=1e-3)


STUDY_ARGV = ["study", "--quick", "--seeds", "0", "1", "--arms", "grpo", "paper", "official-math",
              "--lr-grid", "official-math=1e-3", "--device", "cpu"]


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    pytest.importorskip("trl", reason="the study trains through TRL: pip install 'riskfast[trl]'")
    out = tmp_path_factory.mktemp("study") / "out"
    assert main([*STUDY_ARGV, "--out", str(out)]) == 0
    return out, json.loads((out / "summary.json").read_text())


def test_study_table_has_every_field(tiny_study: tuple[Path, dict[str, Any]]) -> None:
    from riskfast.demo.study import METRICS, TABLE_FIELDS

    out, summary = tiny_study
    assert [row["arm"] for row in summary["table"]] == ["warm start", "grpo", "paper", "official-math"]
    for row in summary["table"] + summary["differences_vs_grpo"] + summary["differences_vs_warm_start"]:
        assert set(TABLE_FIELDS) <= set(row), row["arm"]
        assert row["seeds"] == [0, 1]
        for metric in METRICS:
            stats = row[metric]
            assert len(stats["values"]) == 2 and all(math.isfinite(v) for v in stats["values"])
            assert stats["low"] <= stats["mean"] <= stats["high"]
    assert [row["arm"] for row in summary["differences_vs_grpo"]] == ["paper - grpo",
                                                                      "official-math - grpo"]
    # each arm's learning rate comes from its own grid, picked per seed on validation
    assert summary["grids"] == {"grpo": [3e-4, 1e-3], "paper": [3e-4, 1e-3], "official-math": [1e-3]}
    for arm, per_seed in summary["selected"].items():
        assert set(per_seed) == {"0", "1"}
        assert all(v["lr"] in summary["grids"][arm] for v in per_seed.values())
    assert len(summary["runs"]) == 2 * (2 + 2 + 1)
    for run in summary["runs"]:
        assert set(run["val"]) >= set(METRICS) and set(run["test"]) >= set(METRICS)
    machine = summary["machine"]
    assert machine["cpu"] and machine["torch"] and machine["threads"] == 1
    table = (out / "table.md").read_text()
    assert all(f"| {arm} |" in table for arm in ("warm start", "grpo", "paper", "official-math"))
    assert "pass@16" in table and "entropy" in table
    assert (out / "report.png").stat().st_size > 10_000
    with (out / "curves.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {r["arm"] for r in rows} == {"grpo", "paper", "official-math"}
    assert {r["kind"] for r in rows} == {"train", "eval"}
    steps = summary["config"]["steps"]
    evals = sorted({int(r["step"]) for r in rows if r["kind"] == "eval"})
    assert evals[0] == 0 and evals[-1] == steps


def test_study_reselects_under_another_metric_without_retraining(
    tiny_study: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    """``--select`` picks among finished runs: a finished study summarised again under
    ``pass@1`` retrains nothing and keeps, per seed and arm, the run with the best
    validation pass@1 (ties: the smaller rate)."""
    out, summary = tiny_study
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    results = sorted(copy.glob("seed*/*/lr*/result.json"))
    before = {p: p.stat().st_mtime_ns for p in results}
    assert main([*STUDY_ARGV, "--out", str(copy), "--select", "pass@1", "--no-plot"]) == 0
    assert {p: p.stat().st_mtime_ns for p in results} == before
    again = json.loads((copy / "summary.json").read_text())
    assert again["config"]["select"] == "pass@1"
    assert again["runs"] == summary["runs"]
    for arm, per_seed in again["selected"].items():
        for seed, chosen in per_seed.items():
            runs = [r for r in summary["runs"] if r["arm"] == arm and r["seed"] == int(seed)]
            best = max(runs, key=lambda r: (r["val"]["pass@1"], -r["lr"]))
            assert (chosen["lr"], chosen["val_score"]) == (best["lr"], best["val"]["pass@1"])
    assert "by validation pass@1" in (copy / "table.md").read_text()


def _large_k_script() -> Any:
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "study_large_k.py"
    spec = importlib.util.spec_from_file_location("study_large_k", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_large_k_script_reproduces_the_study_from_stored_or_retrained_policies(
    tiny_study: tuple[Path, dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from riskfast.demo.study import METRICS, POLICY_FILE, _run_dir

    out, summary = tiny_study
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    script = _large_k_script()
    args = script._study_args([*STUDY_ARGV[1:], "--out", str(copy)])
    (_run_dir(copy, 0, "grpo", summary["selected"]["grpo"]["0"]["lr"]) / POLICY_FILE).unlink()
    assert script.main(["--samples", "16", "--", *STUDY_ARGV[1:], "--out", str(copy)]) == 0
    result = json.loads((copy / "large_k.json").read_text())
    # each paired difference at the largest k, with its seeds at or below zero, printed
    printed = capsys.readouterr().out
    for name, row in result["differences"].items():
        cell = row["pass@16"]
        assert cell["at_or_below_zero"] == sum(v <= 0 for v in cell["values"])
        assert f"| {name} | {cell['mean']:+.3f} [" in printed
        assert f"| {cell['at_or_below_zero']} of 2 |" in printed
        # and seed by seed
        assert f"| {name} | {cell['values'][0]:+.3f} | {cell['values'][1]:+.3f} |" in printed
    warm = result["table"]["warm start"]["pass@16"]["values"]
    assert "| pass@16 by seed | 0 | 1 |" in printed
    assert f"| warm start | {warm[0]:.3f} | {warm[1]:.3f} |" in printed
    got = {(r["arm"], r["seed"]): r["test"] for r in result["runs"]}
    assert {(r["arm"], r["seed"]): r["policy"] for r in result["runs"]} == {
        **{("warm start", s): None for s in (0, 1)},
        **{(arm, s): "stored" for arm in ("grpo", "paper", "official-math") for s in (0, 1)},
        ("grpo", 0): "retrained",
    }
    # 16 samples on the study's evaluation seed: the study's own numbers, to the bit, for
    # the warm starts and every selected run (its policy as the study stored it, except
    # one whose policy.pt is gone: retrained from the stored warm start)
    assert len(list(out.glob(f"seed*/*/lr*/{POLICY_FILE}"))) == len(summary["runs"])
    expected = {("warm start", int(s)): w["test"] for s, w in summary["warm_start"].items()}
    for run in summary["runs"]:
        if run["lr"] == summary["selected"][run["arm"]][str(run["seed"])]["lr"]:
            expected[(run["arm"], run["seed"])] = run["test"]
    assert set(got) == set(expected) and len(expected) == 2 * 4
    for key, test in expected.items():
        assert {m: got[key][m] for m in METRICS} == {m: test[m] for m in METRICS}, key
    assert result["table"]["grpo"]["pass@16"]["values"] == [
        expected[("grpo", s)]["pass@16"] for s in (0, 1)
    ]
    # per level: the levels' pass@k, weighted by their number of test questions, is the
    # overall pass@k of each run; the per-level table is over the same seeds
    from collections import Counter

    from riskfast.demo.study import _questions

    for run in result["runs"]:
        counts = Counter(q.level for q in _questions(args, run["seed"])[1])
        for metric in ("pass@1", "pass@16"):
            weighted = sum(counts[int(lvl)] * v[metric] for lvl, v in run["test_by_level"].items())
            assert weighted / sum(counts.values()) == pytest.approx(run["test"][metric], abs=1e-12)
    level = next(iter(result["by_level"]))
    assert result["by_level"][level]["table"]["grpo"]["pass@16"]["values"] == [
        by_seed["test_by_level"][level]["pass@16"]
        for by_seed in result["runs"] if by_seed["arm"] == "grpo"
    ]
    assert "grpo - warm start" in result["by_level"][level]["differences"]
    with pytest.raises(SystemExit):
        script.main(["--samples", "16"])  # no "--" before the study's options

    # a second call reuses every stored run (nothing retrained, the same file), a call
    # over more seeds than were stored retrains only the missing ones, and --fresh or
    # another --samples retrains everything
    calls: list[tuple[int, str | None]] = []
    real_one = script._one

    def counting_one(task: Any) -> Any:
        calls.append((task[1], task[2]))
        return real_one(task)

    script._one = counting_one
    first = (copy / "large_k.json").read_text()
    assert script.main(["--samples", "16", "--", *STUDY_ARGV[1:], "--out", str(copy)]) == 0
    assert calls == [] and (copy / "large_k.json").read_text() == first
    trimmed = json.loads(first)
    trimmed["runs"] = [r for r in trimmed["runs"] if r["seed"] == 0]
    (copy / "large_k.json").write_text(json.dumps(trimmed))
    # (--retrain: seed 1's runs retrained although their policies are stored; same numbers)
    assert script.main(["--samples", "16", "--retrain", "--", *STUDY_ARGV[1:], "--out", str(copy)]) == 0
    assert sorted(calls, key=str) == sorted([(1, None), (1, "grpo"), (1, "paper"),
                                             (1, "official-math")], key=str)
    again, before = json.loads((copy / "large_k.json").read_text()), json.loads(first)
    assert {r["policy"] for r in again["runs"] if r["seed"] == 1} == {None, "retrained"}
    for row in again["runs"] + before["runs"]:
        row.pop("seconds")
        row.pop("policy")
    assert again["runs"] == before["runs"] and again["table"] == before["table"]
    calls.clear()
    assert script.main(["--samples", "8", "--", *STUDY_ARGV[1:], "--out", str(copy)]) == 0
    assert len(calls) == 8
    calls.clear()
    assert script.main(["--samples", "8", "--fresh", "--", *STUDY_ARGV[1:], "--out", str(copy)]) == 0
    assert len(calls) == 8

    # a run stored without per-level numbers (an older script's) is retrained, unless
    # --report-only, which tables the stored runs and leaves the per-level table out
    full = json.loads((copy / "large_k.json").read_text())
    older = json.loads(json.dumps(full))
    del older["runs"][0]["test_by_level"]
    (copy / "large_k.json").write_text(json.dumps(older))
    calls.clear()
    argv8 = ["--samples", "8", "--", *STUDY_ARGV[1:], "--out", str(copy)]
    assert script.main(["--report-only", *argv8]) == 0
    reported = json.loads((copy / "large_k.json").read_text())
    assert calls == [] and "by_level" not in reported and reported["table"] == full["table"]
    assert script.main(argv8) == 0
    assert calls == [(older["runs"][0]["seed"], None)]  # the warm start of the first seed
    assert json.loads((copy / "large_k.json").read_text())["by_level"] == full["by_level"]
    (copy / "large_k.json").write_text(json.dumps({**older, "runs": older["runs"][1:]}))
    with pytest.raises(SystemExit, match="seed 0 warm start"):
        script.main(["--report-only", *argv8])

    # each finished run is stored at once: a call that dies midway keeps the runs it
    # finished and every earlier one, and the next call trains only what is left
    (copy / "large_k.json").write_text(json.dumps(full))
    calls.clear()

    def dies_on_the_third(task: Any) -> Any:
        if len(calls) == 2:
            raise RuntimeError("interrupted")
        return counting_one(task)

    script._one = dies_on_the_third
    with pytest.raises(RuntimeError, match="interrupted"):
        script.main(["--fresh", *argv8])
    kept = json.loads((copy / "large_k.json").read_text())
    assert len(kept["runs"]) == 8 and "table" not in kept
    assert sum(r["seconds"] != f["seconds"] for r, f in zip(kept["runs"], full["runs"])) == 2
    with pytest.raises(SystemExit, match="exclude"):
        script.main(["--fresh", "--report-only", *argv8])


def test_large_k_every_rate_tables_each_rate_of_each_grid(
    tiny_study: tuple[Path, dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--every-rate``: every run of every grid evaluated (the study's own numbers at 16
    samples), a table by rate over the seeds with each rate's paired difference from the
    warm start; the tables of the selected runs unchanged."""
    out, summary = tiny_study
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    script = _large_k_script()
    argv = ["--samples", "16", "--", *STUDY_ARGV[1:], "--out", str(copy)]
    assert script.main(argv) == 0
    selected_only = json.loads((copy / "large_k.json").read_text())
    capsys.readouterr()
    assert script.main(["--every-rate", *argv]) == 0
    printed = capsys.readouterr().out
    result = json.loads((copy / "large_k.json").read_text())
    assert result["table"] == selected_only["table"]
    assert result["differences"] == selected_only["differences"]
    grids = summary["grids"]
    assert set(result["by_rate"]) == {f"{a} lr {lr:g}" for a, rates in grids.items() for lr in rates}
    assert sum(len(rates) for rates in grids.values()) > len(grids)  # some grid has 2 rates
    # each rate's values: the study's own test numbers of that run, seed by seed (16
    # samples on the study's evaluation seed), and its difference from the warm start
    warm = {int(s): w["test"] for s, w in summary["warm_start"].items()}
    for arm, rates in grids.items():
        for lr in rates:
            row = result["by_rate"][f"{arm} lr {lr:g}"]
            runs = {r["seed"]: r["test"] for r in summary["runs"] if r["arm"] == arm and r["lr"] == lr}
            for metric in ("pass@1", "pass@16", "entropy"):
                assert row[metric]["values"] == [runs[s][metric] for s in (0, 1)], (arm, lr)
            gap = row["pass@16 - warm start"]
            assert gap["values"] == [runs[s]["pass@16"] - warm[s]["pass@16"] for s in (0, 1)]
            assert gap["at_or_below_zero"] == sum(v <= 0 for v in gap["values"])
            assert f"| {arm} lr {lr:g} | {row['pass@1']['mean']:.3f} [" in printed
            assert f"| {gap['at_or_below_zero']} of 2 |" in printed
    # a selected rate's row is the arm's row of the main table
    for arm, per_seed in summary["selected"].items():
        if len({v["lr"] for v in per_seed.values()}) == 1:
            lr = per_seed["0"]["lr"]
            assert result["by_rate"][f"{arm} lr {lr:g}"]["pass@16"] == result["table"][arm]["pass@16"]
    # --report-only with --every-rate names the rates never evaluated
    (copy / "large_k.json").write_text(json.dumps(selected_only))
    unselected = [(a, lr) for a, rates in grids.items() for lr in rates
                  if lr != summary["selected"][a]["0"]["lr"]]
    with pytest.raises(SystemExit, match=f"seed 0 {unselected[0][0]}"):
        script.main(["--report-only", "--every-rate", *argv])


def test_study_in_parallel_equals_the_study_in_one_process(
    tiny_study: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    """``--jobs 2`` trains the warm starts and then the runs two at a time, each in its own
    process on one thread: every number equals the one-process study's, to the bit."""
    _, summary = tiny_study
    parallel = tmp_path / "out"
    assert main([*STUDY_ARGV, "--out", str(parallel), "--jobs", "2", "--no-plot"]) == 0
    again = json.loads((parallel / "summary.json").read_text())
    assert again["warm_start"] == {
        s: {**w, "seconds": again["warm_start"][s]["seconds"]} for s, w in summary["warm_start"].items()
    }
    strip = lambda runs: [{k: v for k, v in r.items() if k != "seconds"} for r in runs]
    assert strip(again["runs"]) == strip(summary["runs"])
    assert again["table"] == summary["table"] and again["selected"] == summary["selected"]


def test_study_resumes_an_interrupted_study(tiny_study: tuple[Path, dict[str, Any]],
                                            tmp_path: Path) -> None:
    out, summary = tiny_study
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    # Interrupted: the last seed's official-math run died midway, no summary written yet.
    run = copy / "seed1" / "official-math" / "lr0.001"
    (run / "result.json").unlink()
    (run / "metrics.jsonl").write_text('{"partial": true}\n')
    for name in ("summary.json", "table.md", "curves.csv", "report.png"):
        (copy / name).unlink()
    kept = copy / "seed0" / "grpo" / "lr0.001" / "result.json"
    kept_mtime = kept.stat().st_mtime_ns
    assert main([*STUDY_ARGV, "--out", str(copy), "--no-plot"]) == 0
    resumed = json.loads((copy / "summary.json").read_text())
    assert kept.stat().st_mtime_ns == kept_mtime  # finished runs are not trained again
    assert resumed["table"] == summary["table"]  # the retrained run is bitwise the same
    assert resumed["selected"] == summary["selected"]
    assert (copy / "table.md").read_text() == (out / "table.md").read_text()


def test_study_report_only_reads_finished_runs_and_names_missing_ones(
    tiny_study: tuple[Path, dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--report-only`` rebuilds the report of the finished seeds without training (no
    result file touched, the same table), and refuses, naming what is missing and
    writing nothing, where a run or a warm start is not finished or no study exists."""
    out, summary = tiny_study
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    for name in ("summary.json", "table.md"):
        (copy / name).unlink()
    results = sorted(copy.glob("seed*/*/lr*/result.json"))
    before = {p: p.stat().st_mtime_ns for p in results}
    assert main([*STUDY_ARGV, "--out", str(copy), "--no-plot", "--report-only"]) == 0
    assert {p: p.stat().st_mtime_ns for p in results} == before
    again = json.loads((copy / "summary.json").read_text())
    assert again["table"] == summary["table"] and again["selected"] == summary["selected"]
    assert (copy / "table.md").read_text() == (out / "table.md").read_text()
    # one seed of the two, read alone: its numbers (a study in progress, read so far)
    assert main([*STUDY_ARGV, "--seeds", "0", "--out", str(copy), "--no-plot", "--report-only"]) == 0
    seed0 = json.loads((copy / "summary.json").read_text())
    assert seed0["seeds"] == [0]
    assert seed0["table"][1]["pass@1"]["values"] == summary["table"][1]["pass@1"]["values"][:1]
    # missing: an unfinished run and a seed never started; nothing is trained or written
    (copy / "seed1" / "official-math" / "lr0.001" / "result.json").unlink()
    listing = sorted(str(p) for p in copy.rglob("*"))
    capsys.readouterr()
    three_seeds = [*STUDY_ARGV, "--seeds", "0", "1", "2"]
    assert main([*three_seeds, "--out", str(copy), "--no-plot", "--report-only"]) == 2
    err = capsys.readouterr().err
    assert "report-only: 7 not finished" in err, err  # 1 run + seed 2's warm start and 5 runs
    assert "seed 1 official-math lr 0.001" in err and "seed 2 warm start" in err
    assert sorted(str(p) for p in copy.rglob("*")) == listing
    assert main([*STUDY_ARGV, "--out", str(tmp_path / "none"), "--report-only"]) == 2
    assert "holds no study" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


def test_study_progress_shows_finished_runs_picks_and_grid_edges(
    tiny_study: tuple[Path, dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--progress`` writes nothing and prints, per seed and arm, the finished runs, their
    validation scores, the rate picked so far (the study's own pick where the grid is
    complete) and whether the pick sits at an edge of the grid; a seed not started shows
    no runs; with ``--report-only``, or where no study exists, it refuses."""
    from riskfast.demo.study import _resolve, add_study_arguments, study_progress

    out, summary = tiny_study
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "seed1" / "paper" / "lr0.001" / "result.json").unlink()
    listing = {str(p): p.stat().st_mtime_ns for p in copy.rglob("*")}
    capsys.readouterr()
    argv = [*STUDY_ARGV, "--seeds", "0", "1", "2", "--out", str(copy)]
    assert main([*argv, "--progress"]) == 0
    printed = capsys.readouterr().out
    assert {str(p): p.stat().st_mtime_ns for p in copy.rglob("*")} == listing
    parser = argparse.ArgumentParser()
    add_study_arguments(parser)
    rows = {(r["seed"], r["arm"]): r for r in study_progress(_resolve(parser.parse_args(argv[1:])))}
    assert len(rows) == 3 * 3
    val = {(r["seed"], r["arm"], r["lr"]): r["val"] for r in summary["runs"]}
    for (seed, arm), row in rows.items():
        grid = summary["grids"][arm]
        if seed == 2:  # never started: no warm start, no runs
            assert (row["warm_start"], row["finished"], row["pick"], row["complete"]) == (
                False, 0, None, False)
            continue
        assert row["warm_start"] and row["grid"] == sorted(grid)
        finished = [lr for lr in grid if (seed, arm) != (1, "paper") or lr != 1e-3]
        assert row["val_scores"] == {
            f"{lr:g}": sum(val[(seed, arm, lr)][f"pass@{k}"] for k in (1, 2, 4, 8, 16)) / 5
            for lr in finished
        }
        assert row["finished"] == len(finished) and row["complete"] == (len(finished) == len(grid))
        if row["complete"]:
            assert row["pick"] == summary["selected"][arm][str(seed)]["lr"]
            # a grid of one or two rates: every pick is at an edge
            assert row["edge"] == ("low" if row["pick"] == min(grid) else "high")
        else:
            assert (row["pick"], row["edge"]) == (3e-4, None)
            assert f"| 1 | paper | ready | 1/2 | 0.0003 {row['val_scores']['0.0003']:.4f} | 0.0003 so far |  |" in printed
    assert "| 0 | official-math | ready | 1/1 |" in printed and "one rate: grow the grid |" in printed
    assert "| 2 | grpo | missing | 0/2 | - | - |  |" in printed
    assert "9 of 15 runs finished." in printed
    assert main([*argv, "--progress", "--report-only"]) == 2
    assert "progress: --progress and --report-only exclude each other" in capsys.readouterr().err
    assert main([*STUDY_ARGV, "--out", str(tmp_path / "none"), "--progress"]) == 2
    assert "progress: " in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


def test_study_refuses_other_settings_in_the_same_folder(
    tiny_study: tuple[Path, dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    out, _ = tiny_study
    assert main([*STUDY_ARGV, "--out", str(out), "--steps", "4", "--no-plot"]) == 2
    err = capsys.readouterr().err
    assert "out:" in err and "steps" in err


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--arms", "grpo", "nope"], "arms"),
        (["--arms", "grpo", "grpo"], "arms"),
        (["--seeds", "0", "0"], "seeds"),
        (["--lr-grid", "official-math=1e-3"], "lr-grid"),  # not one of the arms
        (["--lr-grid", "grpo=0"], "lr-grid"),
        (["--steps", "0"], "steps"),
        (["--updates-per-rollout", "3"], "updates-per-rollout"),
        (["--val-questions", "0"], "val-questions"),
        (["--train-questions", "-2"], "train-questions"),
    ],
)
def test_study_bad_option_is_named(argv: list[str], flag: str, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["study", "--quick", "--arms", "grpo", "paper", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"riskfast study: error: {flag}:"), err
    assert not out.exists()


def test_demo_reproduces_a_study_run(tiny_study: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    """``riskfast demo`` with a study's settings trains the study's run bit for bit (same
    warm start, rollouts and evaluations on one machine), for both arms."""
    from riskfast.demo.study import QUICK
    from riskfast.demo.train import run_training

    _, summary = tiny_study
    settings = ["--seed", "0", "--steps", str(QUICK["steps"]), "--model-size", QUICK["model_size"],
                "--max-digits", str(QUICK["max_digits"]), "--warm-steps", str(QUICK["warm_steps"]),
                "--warm-batch", str(QUICK["warm_batch"]), "--warm-lr", str(QUICK["warm_lr"]),
                "--warm-target", str(QUICK["warm_target"]),
                "--prompts-per-step", str(QUICK["prompts_per_step"]),
                "--group-size", str(QUICK["group_size"]), "--eval-every", str(QUICK["eval_every"]),
                "--eval-questions", str(QUICK["test_questions"]), "--device", "cpu", "--no-plot",
                "--preset", "paper", "--grpo-lr", "1e-3", "--riskpo-lr", "3e-4",
                *(f"--{k.replace('_', '-')}={v}" for k, v in summary["config"]["training"].items()),
                "--out", str(tmp_path / "demo")]
    demo = run_training(_parser().parse_args(settings))
    study_runs = {(r["seed"], r["arm"], r["lr"]): r for r in summary["runs"]}
    for method, arm, lr in (("grpo", "grpo", 1e-3), ("riskpo", "paper", 3e-4)):
        expected = study_runs[(0, arm, lr)]["test"]
        got = demo["methods"][method]
        assert got["pass@k"] == {k[len("pass@"):]: v for k, v in expected.items()
                                 if k.startswith("pass@")}, method
        assert got["final_entropy"] == expected["entropy"], method


def test_every_demo_asks_for_matplotlib_before_training(monkeypatch):
    # One check serves riskfast demo, riskfast demo rlr and riskfast study; with
    # matplotlib missing it names the fix, and --no-plot needs no matplotlib.
    import sys

    from riskfast.demo import _plot, rlr_demo, study, train

    assert train.require_matplotlib is rlr_demo.require_matplotlib is study.require_matplotlib
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"^report\.png needs matplotlib .*pass --no-plot$"):
        _plot.require_matplotlib(False)
    assert _plot.require_matplotlib(True) is None
