"""The fused policy loss in the integrations equals their unfused path (issue 15).

* TRL: ``RiskPOConfig(use_fused_loss=True)`` computes the loss with
  :func:`riskfast.ops.fused_linear_policy_loss` from the last hidden states and the LM
  head; on the same batch of a tiny Qwen2 model (the one ``test_integration_trl.py``
  trains) its loss, every parameter gradient and the logged metrics equal the unfused
  ``policy_loss`` path's, for both ratio levels, TRL's loss types, the KL term and the
  entropy bonus, and training runs through it.
* verl: :func:`riskfast.integrations.verl.compute_fused_policy_loss_riskpo` equals the
  registered ``compute_policy_loss_riskpo`` on log-probs computed densely from the same
  hidden states, for every ``loss_agg_mode`` and both ratio levels.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

import pytest
import torch


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).double().norm() / ref.double().norm().clamp_min(1e-30))


# ----------------------------------------------------------------------------------- TRL


def _trl_trainer(tmp: Path, **overrides: Any):
    pytest.importorskip("trl", reason="TRL is an optional extra: pip install 'riskfast[trl]'")
    sys.path.insert(0, str(Path(__file__).parent))
    try:
        from test_integration_trl import make_trainer
    finally:
        sys.path.pop(0)
    return make_trainer(tmp, **overrides)


def _batch(trainer) -> dict[str, Any]:
    """A prepared training batch whose old log-probs differ from the current ones."""
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train() otherwise
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert inputs["advantages"].abs().sum() > 0, "no signal: the comparison would be vacuous"
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, ids, attention, inputs["completion_ids"].shape[1]
        )
    gen = torch.Generator().manual_seed(0)
    inputs["old_per_token_logps"] = logps + 0.3 * torch.randn(logps.shape, generator=gen)
    inputs["ref_per_token_logps"] = logps + 0.5 * torch.randn(logps.shape, generator=gen)
    return inputs


def _loss_and_grads(trainer, inputs: dict[str, Any], fused: bool):
    from riskfast.ops import fused_policy_loss

    trainer.args.use_fused_loss = fused
    trainer._metrics["train"].clear()
    trainer.model.zero_grad()
    calls = []
    original = fused_policy_loss._run

    def counting_run(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    fused_policy_loss._run = counting_run
    try:
        loss = trainer.compute_loss(trainer.model, inputs)
    finally:
        fused_policy_loss._run = original
    assert len(calls) == int(fused), "the fused loss did (not) run"
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters()}
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items() if v}
    return loss.detach(), grads, logged


@pytest.fixture(scope="module")
def trl_case(tmp_path_factory: pytest.TempPathFactory):
    """One tiny trainer and one prepared batch, shared: each case sets the loss options."""
    trainer = _trl_trainer(tmp_path_factory.mktemp("trl"), steps=1)
    return trainer, _batch(trainer)


@pytest.mark.parametrize(
    "options",
    [
        {"ratio_level": "sequence"},
        {"ratio_level": "token", "dual_clip": 3.0, "beta": 0.05, "entropy_coef": 0.01},
        {"ratio_level": "sequence", "loss_type": "grpo", "epsilon_high": 0.28},
        {"ratio_level": "token", "loss_type": "dr_grpo"},
        {"ratio_level": "sequence", "loss_type": "bnpo", "beta": 0.05},
    ],
    ids=["sequence-dapo", "token-dapo-kl-entropy", "sequence-grpo", "token-dr_grpo", "bnpo-kl"],
)
def test_trl_fused_loss_equals_the_unfused_loss(trl_case, options: dict) -> None:
    trainer, inputs = trl_case
    # The options _compute_loss reads. (beta is set on the trainer, not the config: a
    # model built from a config cannot be reloaded as TRL's reference model here.)
    config_fields = {"ratio_level": "sequence", "dual_clip": None}
    trainer_fields = {"beta": 0.0, "entropy_coef": 0.0, "loss_type": "dapo",
                      "epsilon_high": trainer.epsilon_low}  # fmt: skip
    for name, default in config_fields.items():
        setattr(trainer.args, name, options.get(name, default))
    for name, default in trainer_fields.items():
        setattr(trainer, name, options.get(name, default))
    loss, grads, logged = _loss_and_grads(trainer, inputs, fused=False)
    loss_f, grads_f, logged_f = _loss_and_grads(trainer, inputs, fused=True)
    torch.testing.assert_close(loss_f, loss, rtol=1e-5, atol=1e-7)
    assert grads.keys() == grads_f.keys()
    for name, grad in grads.items():
        if grad.abs().max() > 0:
            assert _rel(grads_f[name], grad) < 1e-4, name
        else:
            assert grads_f[name].abs().max() <= 1e-9, name
    assert logged.keys() == logged_f.keys()
    for key, value in logged.items():
        assert logged_f[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    assert ("kl" in logged_f) == bool(options.get("beta"))
    assert logged_f["clip_ratio/region_mean"] > 0, "no token clipped: clipping not covered"


def test_trl_fused_loss_on_policy_and_training(tmp_path: Path) -> None:
    trainer = _trl_trainer(tmp_path, steps=2, use_fused_loss=True)
    inputs = _batch(trainer)
    del inputs["old_per_token_logps"]  # TRL's one-iteration case: ratio 1
    loss, grads, _ = _loss_and_grads(trainer, inputs, fused=False)
    loss_f, grads_f, logged_f = _loss_and_grads(trainer, inputs, fused=True)
    torch.testing.assert_close(loss_f, loss, rtol=1e-5, atol=1e-7)
    for name, grad in grads.items():
        assert _rel(grads_f[name], grad) < 1e-4 or grad.abs().max() == 0, name
    assert logged_f["riskpo/ratio_mean"] == pytest.approx(1.0)

    from riskfast.ops import fused_policy_loss

    calls = []
    original = fused_policy_loss._run

    def counting_run(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    before = torch.cat([p.detach().flatten().clone() for p in trainer.model.parameters()])
    fused_policy_loss._run = counting_run
    try:
        trainer.train()
    finally:
        fused_policy_loss._run = original
    after = torch.cat([p.detach().flatten().clone() for p in trainer.model.parameters()])
    assert len(calls) >= 2, "the training steps did not go through the fused loss"
    assert torch.isfinite(after).all() and not torch.equal(before, after)


def test_trl_use_fused_loss_is_validated(tmp_path: Path) -> None:
    pytest.importorskip("trl", reason="TRL is an optional extra: pip install 'riskfast[trl]'")
    from riskfast.integrations.trl import RiskPOConfig

    with pytest.raises(TypeError, match="use_fused_loss"):
        RiskPOConfig(
            output_dir=str(tmp_path), bf16=False, activation_checkpointing=False, use_cpu=True,
            report_to="none", num_generations=4, per_device_train_batch_size=8,
            use_fused_loss="yes",
        )  # fmt: skip


def test_trl_compact_hidden_states_are_laid_back_on_the_completion_grid() -> None:
    pytest.importorskip("trl", reason="TRL is an optional extra: pip install 'riskfast[trl]'")
    from riskfast.integrations.trl import _completion_hidden

    b, length, width, h = 3, 7, 4, 5
    attention = torch.ones(b, length, dtype=torch.long)
    attention[0, -2:] = 0  # a short completion
    attention[1, :2] = 0  # a left-padded prompt
    full = torch.randn(b, length - 1, h)
    # the compact layout: the rows whose shifted label is a completion token, row-major
    labelled = torch.zeros(b, length - 1, dtype=torch.bool)
    labelled[:, -width:] = attention[:, -width:] != 0
    compact = _completion_hidden(full[labelled], torch.zeros(b, length), attention, width)
    every = _completion_hidden(full.reshape(-1, h), torch.zeros(b, length), attention, width)
    assert torch.equal(every, full[:, -width:])
    keep = attention[:, -width:] != 0
    assert torch.equal(compact[keep], full[:, -width:][keep])
    assert torch.equal(compact[~keep], torch.zeros_like(compact[~keep]))


# ---------------------------------------------------------------------------------- verl


def _verl_module():
    try:
        importlib.import_module("verl.trainer.ppo.core_algos")
    except Exception as err:  # noqa: BLE001 - verl's import errors vary by platform
        pytest.skip(f"verl not importable ({err!r})")
    return importlib.import_module("riskfast.integrations.verl")


def _verl_config(**kwargs: Any) -> Any:
    from verl.workers.config import ActorConfig

    return ActorConfig(strategy="fsdp", rollout_n=4, ppo_micro_batch_size_per_gpu=2, **kwargs)


AGG_MODES = ["token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum",
             "seq-mean-token-sum-norm"]  # fmt: skip


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("mode", AGG_MODES)
def test_verl_fused_loss_equals_the_registered_loss(
    mode: str, level: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = _verl_module()
    monkeypatch.setenv(module.RATIO_LEVEL_ENV, level)
    config = _verl_config(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0)
    gen = torch.Generator().manual_seed(7)
    bs, t, h, v, temperature = 6, 7, 8, 23, 0.9
    hidden = torch.randn(bs, t, h, generator=gen)
    weight = torch.randn(v, h, generator=gen)
    targets = torch.randint(0, v, (bs, t), generator=gen)
    lengths = torch.tensor([7, 3, 0, 5, 1, 6])
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
    with torch.no_grad():
        dense = torch.log_softmax(hidden @ weight.T / temperature, -1)
        logp0 = dense.gather(-1, targets[..., None]).squeeze(-1)
    old = logp0 + 0.3 * torch.randn(bs, t, generator=gen)
    adv = torch.randn(bs, generator=gen)[:, None] * mask
    weights = torch.rand(bs, t, generator=gen) + 0.5

    h_ref, w_ref = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    log_prob = torch.log_softmax(h_ref @ w_ref.T / temperature, -1)
    log_prob = log_prob.gather(-1, targets[..., None]).squeeze(-1)
    loss, metrics = module.compute_policy_loss_riskpo(
        old, log_prob, adv, mask, mode, config, rollout_is_weights=weights
    )
    loss.backward()

    h_f, w_f = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss_f, metrics_f, logp_f = module.compute_fused_policy_loss_riskpo(
        h_f, w_f, targets, old, adv, mask, mode, config, rollout_is_weights=weights,
        temperature=temperature, chunk_size=4,
    )  # fmt: skip
    loss_f.backward()
    torch.testing.assert_close(loss_f.detach(), loss.detach(), rtol=1e-5, atol=1e-7)
    assert _rel(h_f.grad, h_ref.grad) < 1e-4
    assert _rel(w_f.grad, w_ref.grad) < 1e-4
    assert metrics_f.keys() == metrics.keys()
    for key, value in metrics.items():
        assert metrics_f[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    on = mask.bool()
    torch.testing.assert_close(logp_f[on], log_prob.detach()[on], rtol=1e-5, atol=1e-6)
