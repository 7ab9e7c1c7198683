"""RiskPOTrainer: real TRL training steps on a tiny Qwen2 model on the CPU.

Checks that the trainer optimises exactly ``riskfast.riskpo.policy_loss`` on its batch,
that ``estimator="grpo"`` with B = 1 reproduces TRL's own GRPO advantages, and that a
run resumed from a checkpoint continues exactly as the uninterrupted run (bundling
generator and quantile tracker included).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("trl", reason="TRL is an optional extra: pip install 'riskfast[trl]'")

from datasets import Dataset

from riskfast.demo.task import build_model, build_tokenizer, sample_questions
from riskfast.integrations.trl import (
    RISKPO_STATE_NAME,
    SUPPORTED_TRL,
    RiskPOConfig,
    RiskPOTrainer,
)
from riskfast.riskpo import advantages as riskpo_advantages
from riskfast.riskpo import policy_loss

GROUP = 4
PROMPTS_PER_STEP = 4


def content_reward(completions: list[str], **_: Any) -> list[float]:
    """A deterministic reward that varies across the untrained model's samples."""
    return [float(sum(map(ord, c)) % 3 == 0) for c in completions]


def make_trainer(tmp: Path, *, steps: int = 3, **overrides: Any) -> RiskPOTrainer:
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, "tiny", seed=0)
    questions = sample_questions(64, "train", seed=0)
    dataset = Dataset.from_list([{"prompt": q.prompt, "answer": q.answer} for q in questions])
    options: dict[str, Any] = {
        "output_dir": str(tmp),
        "max_steps": steps,
        "per_device_train_batch_size": GROUP * PROMPTS_PER_STEP,
        "num_generations": GROUP,
        "max_completion_length": 6,
        "learning_rate": 5e-3,
        "bf16": False,
        "activation_checkpointing": False,
        "report_to": "none",
        "logging_steps": 1,
        "save_strategy": "no",
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 0,
        "bundle_size": 2,
        "dataloader_num_workers": 0,
    }
    options.update(overrides)
    return RiskPOTrainer(
        model=model,
        reward_funcs=[content_reward],
        args=RiskPOConfig(**options),
        train_dataset=dataset,
        processing_class=tokenizer,
    )


def params(trainer: RiskPOTrainer) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in trainer.model.parameters()])


def test_supported_version_pinned() -> None:
    import trl

    assert SUPPORTED_TRL == ">=1.16,<1.17"
    assert trl.__version__.startswith("1.16")


def test_config_names_do_not_clash(tmp_path: Path) -> None:
    config = RiskPOConfig(
        output_dir=str(tmp_path),
        bf16=False,
        activation_checkpointing=False,
        use_cpu=True,
        report_to="none",
        num_generations=4,
        per_device_train_batch_size=8,
        risk_beta=0.9,
        beta=0.04,
    )
    assert config.beta == 0.04  # TRL's KL coefficient stays TRL's
    assert config.advantage_options().beta == 0.9
    with pytest.raises(ValueError, match="alpha"):
        RiskPOConfig(
            output_dir=str(tmp_path),
            bf16=False,
            activation_checkpointing=False,
            use_cpu=True,
            num_generations=4,
            per_device_train_batch_size=8,
            risk_alpha=0.9,
            risk_beta=0.5,
        )
    with pytest.raises(ValueError, match="loss_type"):
        RiskPOConfig(
            output_dir=str(tmp_path),
            bf16=False,
            activation_checkpointing=False,
            use_cpu=True,
            num_generations=4,
            per_device_train_batch_size=8,
            loss_type="cispo",
        )


def test_real_training_steps(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, steps=3)
    before = params(trainer)
    trainer.train()
    after = params(trainer)
    assert torch.isfinite(after).all()
    assert not torch.equal(before, after), "three RiskPO steps did not move the model"
    logs = [h for h in trainer.state.log_history if "riskpo/quantile_alpha" in h]
    assert len(logs) == 3
    for entry in logs:
        for key in (
            "reward",
            "entropy",
            "clip_ratio/region_mean",
            "riskpo/quantile_beta",
            "riskpo/advantage_std",
            "riskpo/zero_advantage_bundle_frac",
        ):
            assert key in entry and entry[key] is not None
    last = trainer.riskpo_last
    # The trainer's advantages are riskfast's on the gathered rewards, with its generator.
    assert last["result"].scores.shape == (PROMPTS_PER_STEP // 2, GROUP)


def test_loss_is_riskfast_policy_loss(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, steps=1, ratio_level="token", dual_clip=3.0)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train() otherwise
    batch = next(iter(trainer.get_train_dataloader()))
    inputs = trainer._prepare_inputs(batch)
    own = trainer.riskpo_last["advantages"]
    assert torch.equal(inputs["advantages"].sort().values, own.sort().values)
    assert own.abs().sum() > 0, "the reward produced no signal; the check would be vacuous"

    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    width = inputs["completion_ids"].shape[1]
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, ids, attention, width
        )
    # An old policy that differs from the current one, so ratios and clipping matter.
    noise = torch.randn(logps.shape, generator=torch.Generator().manual_seed(0))
    inputs["old_per_token_logps"] = logps + 0.3 * noise

    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    grad_trainer = torch.cat([p.grad.flatten().clone() for p in trainer.model.parameters()])

    trainer.model.zero_grad()
    logps2, entropy, _ = trainer._get_per_token_logps_and_entropies(
        trainer.model, ids, attention, width, compute_entropy=True
    )
    normaliser = float(inputs["num_items_in_batch"])  # dapo: one process, no accumulation
    expected, metrics = policy_loss(
        logps2,
        inputs["old_per_token_logps"],
        inputs["advantages"],
        inputs["completion_mask"],
        ratio_level="token",
        eps_low=0.2,
        eps_high=0.2,
        dual_clip=3.0,
        entropy=entropy,
        agg="token-mean",
        num_items=normaliser,
    )
    expected.backward()
    grad_expected = torch.cat([p.grad.flatten().clone() for p in trainer.model.parameters()])
    assert metrics["clip_frac"] > 0, "no token was clipped; the check would not cover clipping"
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad_trainer, grad_expected, rtol=1e-5, atol=1e-7)


def test_grpo_estimator_matches_trl_advantages(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, steps=1, estimator="grpo", bundle_size=1)
    trainer.model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    for _ in range(2):
        trainer._generate_and_score_completions(batch)
        last = trainer.riskpo_last
        ours, theirs = last["advantages"], last["grpo_advantages"]
        assert theirs.abs().sum() > 0
        # TRL divides by (std + 1e-4), riskfast by (std + 1e-6): equal to ~1e-4 relative.
        torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-6)
        # ... and exactly riskfast's function on the same rewards.
        expected = riskpo_advantages(
            last["rewards"], last["question_ids"], estimator="grpo"
        ).advantages
        assert torch.equal(ours, expected)


def _log_at(trainer: RiskPOTrainer, step: int) -> dict[str, Any]:
    return next(h for h in trainer.state.log_history if h.get("step") == step and "reward" in h)


def test_checkpoint_resume_is_exact(tmp_path: Path) -> None:
    common = {"steps": 4, "quantile_mode": "tracker", "save_strategy": "steps", "save_steps": 2}
    full = make_trainer(tmp_path / "full", **common)
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-2"
    assert (checkpoint / RISKPO_STATE_NAME).exists()
    saved = torch.load(checkpoint / RISKPO_STATE_NAME, weights_only=True)
    fresh = torch.Generator().manual_seed(0).get_state()
    assert not torch.equal(saved["generator"], fresh), "the generator state was not advanced"
    assert saved["tracker"]["num_updates"] == 2

    resumed = make_trainer(tmp_path / "resumed", **common)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.riskpo_tracker is not None and full.riskpo_tracker is not None
    assert resumed.riskpo_tracker.num_updates == 4
    assert torch.equal(resumed.riskpo_tracker.values, full.riskpo_tracker.values)
    assert torch.equal(resumed.riskpo_generator.get_state(), full.riskpo_generator.get_state())
    for step in (3, 4):
        a, b = _log_at(full, step), _log_at(resumed, step)
        for key in (
            "reward",
            "riskpo/quantile_alpha",
            "riskpo/quantile_beta",
            "riskpo/advantage_std",
            "entropy",
        ):
            assert a[key] == b[key], (step, key, a[key], b[key])
    assert torch.equal(params(full), params(resumed))


def test_resume_from_a_checkpoint_with_a_refused_riskpo_state_changes_nothing(
    tmp_path: Path,
) -> None:
    """``train(resume_from_checkpoint=...)`` checks the RiskPO state before the weights,
    optimizer and scheduler load: a checkpoint saved with another ``bundle_size`` is
    refused naming it, with the model, generator and tracker as they were."""
    common = {"steps": 2, "quantile_mode": "tracker", "save_strategy": "steps", "save_steps": 2}
    saver = make_trainer(tmp_path / "saver", **common)
    saver.train()
    checkpoint = tmp_path / "saver" / "checkpoint-2"
    other = make_trainer(tmp_path / "other", **{**common, "bundle_size": 4})
    weights, before = params(other).clone(), _generator_and_tracker(other)
    assert not torch.equal(weights, params(saver))  # the checkpoint would change them
    with pytest.raises(ValueError, match="^bundle_size: the checkpoint was saved with bundle_size = 2"):
        other.train(resume_from_checkpoint=str(checkpoint))
    assert torch.equal(params(other), weights)
    assert _same(before, _generator_and_tracker(other))


def test_no_trl_import_from_riskfast() -> None:
    import subprocess
    import sys

    code = "import sys, riskfast, riskfast.integrations; print('trl' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ}, check=True
    )
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("found", ["1.15.2", "1.17.0", "2.0.0"])
def test_unsupported_trl_version_is_a_clear_error(
    found: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.metadata

    import riskfast.integrations.trl as integration

    monkeypatch.setattr(importlib.metadata, "version", lambda name: found)
    with pytest.raises(ImportError, match=r"supports TRL >=1\.16,<1\.17, found trl " + found):
        integration._check_trl_version()


def test_fused_logprobs_match_trl_and_train(tmp_path: Path) -> None:
    """use_fused_logprobs=True: riskfast's fused op computes the same log-probs and entropies
    as TRL's own chunked head, and training runs through it. (The reference model's
    log-probs go through the same method; a from-config model cannot be reloaded as a
    reference here, so beta stays 0.)"""
    trainer = make_trainer(tmp_path, steps=2, use_fused_logprobs=True)
    gen = torch.Generator().manual_seed(3)
    input_ids = torch.randint(1, 10, (4, 9), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :2] = 0  # a left-padded prompt
    model = trainer.model
    fused = trainer._get_per_token_logps_and_entropies(
        model, input_ids, attention_mask, 5, compute_entropy=True
    )
    assert trainer.riskpo_logprob_head.calls == 1, "riskfast's op did not run"
    trainer.args.use_fused_logprobs = False
    plain = trainer._get_per_token_logps_and_entropies(
        model, input_ids, attention_mask, 5, compute_entropy=True
    )
    trainer.args.use_fused_logprobs = True
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused[1], plain[1], rtol=1e-5, atol=1e-5)
    assert bool((fused[0] <= 0).all())

    before = params(trainer)
    calls = trainer.riskpo_logprob_head.calls
    trainer.train()
    assert torch.isfinite(params(trainer)).all()
    assert not torch.equal(before, params(trainer))
    assert trainer.riskpo_logprob_head.calls >= calls + 2  # at least one loss pass per step


# ------------------------------------------------ issue 11: options, atomic calls, checkpoints
def _config(tmp: Path, **overrides: Any) -> RiskPOConfig:
    return RiskPOConfig(
        output_dir=str(tmp),
        bf16=False,
        activation_checkpointing=False,
        use_cpu=True,
        report_to="none",
        num_generations=4,
        per_device_train_batch_size=8,
        **overrides,
    )


@pytest.mark.parametrize(
    ("overrides", "error", "name"),
    [
        ({"risk_alpha": 1.5}, ValueError, "risk_alpha"),
        ({"risk_alpha": 0.9, "risk_beta": 0.5}, ValueError, "risk_alpha"),
        ({"quantile_mode": "kde"}, ValueError, "quantile_mode"),
        ({"shuffle_bundles": "yes"}, TypeError, "shuffle_bundles"),
        ({"bundle_size": 2**63}, ValueError, "bundle_size"),
        ({"omega": 10**400}, ValueError, "omega"),
        ({"bundle_seed": -1}, ValueError, "bundle_seed"),
        ({"bundle_seed": 2**64}, ValueError, "bundle_seed"),
        ({"tracker_gamma": 0.0}, ValueError, "tracker_gamma"),
        ({"dual_clip": 1.0}, ValueError, "dual_clip"),
        ({"use_fused_logprobs": "yes"}, TypeError, "use_fused_logprobs"),
    ],
)
def test_config_fields_are_validated_under_their_own_names(
    tmp_path: Path, overrides: dict[str, Any], error: type[Exception], name: str
) -> None:
    with pytest.raises(error, match=f"^{name}:"):
        _config(tmp_path, **overrides)


def _generator_and_tracker(trainer: RiskPOTrainer) -> tuple[torch.Tensor, Any, int]:
    tracker = trainer.riskpo_tracker
    values = None if tracker is None or tracker.values is None else tracker.values.clone()
    return (
        trainer.riskpo_generator.get_state(),
        values,
        0 if tracker is None else tracker.num_updates,
    )


def _same(a: tuple[torch.Tensor, Any, int], b: tuple[torch.Tensor, Any, int]) -> bool:
    values_equal = (a[1] is None and b[1] is None) or (
        a[1] is not None and b[1] is not None and torch.equal(a[1], b[1])
    )
    return torch.equal(a[0], b[0]) and values_equal and a[2] == b[2]


def test_riskpo_state_carries_its_options_and_a_bad_one_changes_nothing(tmp_path: Path) -> None:
    rewards = torch.tensor([1.0, 0, 0, 1, 1, 1, 0, 1, 0, 0, 0, 1, 0, 1, 1, 1])
    saver = make_trainer(tmp_path / "a", quantile_mode="tracker", bundle_size=2)
    saver.riskpo_advantages(rewards, GROUP)
    state = saver.riskpo_state_dict()
    assert state["options"]["bundle_size"] == 2 and state["options"]["quantile"] == "tracker"

    loader = make_trainer(tmp_path / "b", quantile_mode="tracker", bundle_size=4, tracker_gamma=0.3)
    loader.riskpo_advantages(rewards, GROUP)
    before = _generator_and_tracker(loader)
    with pytest.raises(
        ValueError, match="^bundle_size: the checkpoint was saved with bundle_size = 2"
    ):
        loader.load_riskpo_state_dict(state)
    assert _same(before, _generator_and_tracker(loader))
    # a rejected advantage step leaves generator and tracker alone as well
    with pytest.raises(ValueError, match="^rewards:"):
        loader.riskpo_advantages(rewards * float("nan"), GROUP)
    assert _same(before, _generator_and_tracker(loader))

    same_bundles = make_trainer(
        tmp_path / "c", quantile_mode="tracker", bundle_size=2, tracker_gamma=0.3
    )
    with pytest.raises(ValueError, match="^tracker_gamma: the checkpoint was saved with gamma"):
        same_bundles.load_riskpo_state_dict(state)
    matching = make_trainer(tmp_path / "d", quantile_mode="tracker", bundle_size=2)
    corrupt = {
        **state,
        "tracker": {**state["tracker"], "values": torch.tensor([float("nan"), 1.0])},
    }
    with pytest.raises(ValueError, match="^state: values must be finite"):
        matching.load_riskpo_state_dict(corrupt)
    assert not matching.riskpo_tracker.initialized
    matching.load_riskpo_state_dict(state)
    assert _same(_generator_and_tracker(saver), _generator_and_tracker(matching))
