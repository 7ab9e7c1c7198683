"""``riskfast.rlr.RLRTrainer`` on tiny diffusers models built from configs (no download).

* a ``StableDiffusionPipeline`` of a tiny ``UNet2DConditionModel`` and VAE, prompt
  embeddings given directly (no tokenizer, no text encoder): LoRA adapters change,
  every frozen weight stays bit-equal, the evaluation set's reward is logged and equals
  an independent recomputation;
* checkpoint/resume: N steps straight equal N/2, a checkpoint, a fresh trainer and N/2
  more, bit for bit (weights, optimizer, generator), for RLR with ``grad_norm`` window
  starts and for DDPO (per-prompt statistics);
* adapters saved in the diffusers format and loaded back into a fresh pipeline
  (``StableDiffusionPipeline.load_lora_weights``; ``riskfast.rlr.load_lora_weights``
  for a ``UNet2DModel``) give the same samples;
* DDPO's per-prompt normalisation against a hand computation; gradient accumulation
  against separate ``estimate_grad`` calls; DCoT's window range and conditioning;
  option checks that name the option and change nothing.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import rlr_toy
import torch

pytest.importorskip("peft", reason="LoRA needs peft: pip install 'riskfast[diffusion]'")

from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    UNet2DModel,
)

from riskfast.rlr import (
    DCoT,
    PerPromptStatTracker,
    RLRConfig,
    RLRTrainer,
    TrainerConfig,
    estimate_grad,
    load_lora_weights,
    sample_chain,
)

EMBED_DIM = 16


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with rlr_toy.one_thread():
        yield


def tiny_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """A Stable Diffusion pipeline at toy size: 4 x 8 x 8 latents, 3 x 16 x 16 images."""
    torch.manual_seed(seed)
    unet = rlr_toy.tiny_unet2d_condition(cross_attention_dim=EMBED_DIM)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    )
    scheduler = DDIMScheduler(
        timestep_spacing="trailing", set_alpha_to_one=False, clip_sample=False
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


PROMPT_EMBEDS = torch.randn(3, 5, EMBED_DIM, generator=torch.Generator().manual_seed(7))


def brightness_reward(images: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """Differentiable: each prompt wants a different brightness."""
    target = prompts.to(images.dtype) / 4.0 - 0.25
    return -(images.mean(dim=(1, 2, 3)) - target).square()


def _config(**kwargs) -> TrainerConfig:
    options = {
        "rlr": RLRConfig(rest="zo", window=2, sigma_p=1e-2),
        "max_steps": 3,
        "batch_size": 2,
        "num_inference_steps": 5,
        "learning_rate": 1e-2,
        "progress": False,
        "report_to": "none",
        "cpu": True,
    }
    options.update(kwargs)
    return TrainerConfig(**options)


def _trainer(config=None, seed=0, **kwargs) -> RLRTrainer:
    return RLRTrainer(
        tiny_pipeline(seed),
        brightness_reward,
        config or _config(),
        prompt_embeds=PROMPT_EMBEDS,
        **kwargs,
    )


def _named_state(trainer: RLRTrainer) -> dict[str, torch.Tensor]:
    state = {f"unet.{k}": v.detach().clone() for k, v in trainer.unet.state_dict().items()}
    state.update({f"vae.{k}": v.detach().clone() for k, v in trainer.vae.state_dict().items()})
    return state


def test_lora_adapters_train_and_frozen_weights_do_not(tmp_path):
    trainer = _trainer(_config(eval_samples=4, eval_every=2, output_dir=str(tmp_path)))
    lora_names = {n for n, p in trainer.unet.named_parameters() if p.requires_grad}
    assert lora_names and all("lora_" in n for n in lora_names)
    assert all(not p.requires_grad for p in trainer.vae.parameters())
    before = _named_state(trainer)
    history = trainer.train()
    after = _named_state(trainer)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"unet.{n}" for n in lora_names}
    # Every adapter moved: B from its zero start, A through B's gradient (from step 2).
    assert all(k.split(".", 1)[1] in lora_names for k in changed)
    train = [r for r in history if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert all(r["model_evaluations"] > 0 for r in train)
    assert train[-1]["total_model_evaluations"] == sum(r["model_evaluations"] for r in train)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == json.loads(json.dumps(history))
    assert (tmp_path / "final" / "pytorch_lora_weights.safetensors").is_file()


def test_the_evaluation_set_reward_is_logged_and_fixed():
    trainer = _trainer(_config(eval_samples=4, eval_every=2, max_steps=2))
    fresh = _trainer(_config(eval_samples=4, eval_every=2, max_steps=2))
    # An independent recomputation of the first logged value: the eval set's noises,
    # prompts and step noises are drawn from seed + 1 as documented.
    generator = torch.Generator().manual_seed(1)
    x_T = torch.randn((4, 4, 8, 8), generator=generator)
    indices = torch.randint(0, 3, (4,), generator=generator)
    noise_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    pipe = tiny_pipeline()
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(5)
    chain = sample_chain(
        pipe.unet,
        scheduler,
        x_T,
        eta=1.0,
        generator=torch.Generator().manual_seed(noise_seed),
        cond={"encoder_hidden_states": PROMPT_EMBEDS[indices]},
    )
    with torch.no_grad():
        images = pipe.vae.decode(chain.x0 / pipe.vae.config.scaling_factor).sample
    expected = brightness_reward(images, indices).double().mean()
    history = trainer.train()
    evals = [r for r in history if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 2]
    assert evals[0]["eval/reward_mean"] == pytest.approx(float(expected), rel=1e-5)
    assert fresh.evaluate()["eval/reward_mean"] == evals[0]["eval/reward_mean"]
    assert fresh.evaluate()["eval/reward_mean"] == evals[0]["eval/reward_mean"]
    assert evals[1]["eval/reward_mean"] != evals[0]["eval/reward_mean"]


def _trainable(trainer: RLRTrainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.trainable_parameters]


@pytest.mark.parametrize(
    "rlr",
    [
        RLRConfig(rest="zo", window=2, sigma_p=1e-2, window_start="grad_norm"),
        RLRConfig(estimator="ddpo", ddpo_step_fraction=0.6),
    ],
    ids=["rlr-grad_norm", "ddpo"],
)
def test_resume_continues_bit_for_bit(tmp_path, rlr):
    config = _config(
        rlr=rlr,
        max_steps=4,
        ddpo_epochs=2,
        ddpo_minibatches=2,
        ddpo_min_count=2,
        gradient_accumulation_steps=2,
        output_dir=str(tmp_path / "run"),
    )
    straight = _trainer(config)
    for _ in range(4):
        straight.training_step()
    first = _trainer(config)
    for _ in range(2):
        first.training_step()
    checkpoint = first.save_checkpoint()
    assert checkpoint.name == "checkpoint-2"
    torch.manual_seed(12345)  # a resumed process's global RNG starts elsewhere
    resumed = _trainer(config)
    resumed.load_checkpoint(checkpoint)
    assert resumed.step == 2
    for _ in range(2):
        resumed.training_step()
    for a, b in zip(_trainable(straight), _trainable(resumed)):
        assert torch.equal(a, b)
    assert torch.equal(straight.generator.get_state(), resumed.generator.get_state())
    assert straight.model_evaluations == resumed.model_evaluations
    assert straight.rlr_state.window_grad_norm == resumed.rlr_state.window_grad_norm
    assert straight.stat_tracker.state_dict() == resumed.stat_tracker.state_dict()
    for (_, a), (_, b) in zip(
        sorted(straight.optimizer.state_dict()["state"].items()),
        sorted(resumed.optimizer.state_dict()["state"].items()),
    ):
        assert torch.equal(a["exp_avg"], b["exp_avg"])
        assert torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    if rlr.estimator == "rlr":
        assert resumed.rlr_state.window_grad_norm  # the state was exercised


def test_a_checkpoint_of_another_config_is_refused(tmp_path):
    first = _trainer(_config(output_dir=str(tmp_path)))
    first.training_step()
    path = first.save_checkpoint()
    other = _trainer(_config(output_dir=str(tmp_path), learning_rate=5e-3))
    before = _trainable(other)
    with pytest.raises(
        ValueError, match=r"^directory: saved with another config \(fields \['learning_rate'\]\)"
    ):
        other.load_checkpoint(path)
    assert all(torch.equal(a, b) for a, b in zip(before, _trainable(other)))


def _trainer_state(trainer: RLRTrainer) -> dict:
    optimizer = trainer.optimizer.state_dict()
    return {
        "weights": _trainable(trainer),
        "optimizer": [
            (k, {n: v.clone() if torch.is_tensor(v) else v for n, v in entry.items()})
            for k, entry in sorted(optimizer["state"].items())
        ],
        "generator": trainer.generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "rlr_state": trainer.rlr_state.state_dict(),
        "stat_tracker": trainer.stat_tracker.state_dict(),
        "step": trainer.step,
        "model_evaluations": trainer.model_evaluations,
    }


def _same_state(a: dict, b: dict) -> bool:
    def equal(x, y):
        if torch.is_tensor(x):
            return torch.is_tensor(y) and torch.equal(x, y)
        if isinstance(x, (list, tuple)):
            return len(x) == len(y) and all(equal(u, v) for u, v in zip(x, y))
        if isinstance(x, dict):
            return x.keys() == y.keys() and all(equal(x[k], y[k]) for k in x)
        return x == y

    return equal(a, b)


@pytest.mark.parametrize(
    "corrupt",
    [
        "missing_key",
        "stat_tracker_nan",
        "stat_tracker_shape",
        "rlr_state",
        "optimizer_groups",
        "generator",
        "step",
        "last_weight_shape",
    ],
)
def test_a_refused_checkpoint_changes_nothing(tmp_path, corrupt):
    """Every part of a checkpoint is checked before any is restored: a corrupt one is
    refused with a ValueError naming ``directory``, and the trainer's weights, optimizer
    moments, generator, global RNG, RLR and tracker states and counters stay as they were
    (before, a bad tracker or RLR state was found after the weights, optimizer and RNG
    streams had been overwritten)."""
    from safetensors.torch import load_file, save_file

    config = _config(
        rlr=RLRConfig(rest="zo", window=2, sigma_p=1e-2, window_start="grad_norm"),
        output_dir=str(tmp_path / "run"),
    )
    source = _trainer(config)
    for _ in range(2):
        source.training_step()
    path = source.save_checkpoint()
    state = torch.load(path / "trainer_state.pt", weights_only=False)
    if corrupt == "missing_key":
        del state["stat_tracker"]
    elif corrupt == "stat_tracker_nan":
        state["stat_tracker"] = {"buffers": [("a prompt", [0.5, float("nan")])]}
    elif corrupt == "stat_tracker_shape":
        state["stat_tracker"] = {"buffers": [("a prompt",)]}
    elif corrupt == "rlr_state":
        state["rlr_state"] = {"window_grad_norm": {0: 1.0}}
    elif corrupt == "optimizer_groups":
        state["optimizer"]["param_groups"] = state["optimizer"]["param_groups"] * 2
    elif corrupt == "generator":
        state["generator"] = torch.zeros(3, dtype=torch.uint8)
    elif corrupt == "step":
        state["step"] = -1
    torch.save(state, path / "trainer_state.pt")
    if corrupt == "last_weight_shape":
        weights = load_file(str(path / "unet_trainable.safetensors"))
        last = str(len(weights) - 1)
        weights[last] = torch.zeros(weights[last].numel() + 1)
        save_file(weights, str(path / "unet_trainable.safetensors"))
    target = _trainer(config)
    target.training_step()  # a trainer with its own history, which must survive
    before = _trainer_state(target)
    assert before["step"] == 1 and before["optimizer"]
    with pytest.raises(ValueError, match="^directory: "):
        target.load_checkpoint(path)
    assert _same_state(before, _trainer_state(target))


def test_stat_tracker_load_state_dict_checks_before_replacing():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=2)
    tracker.update(["a", "b", "a"], torch.tensor([1.0, 0.0, 3.0]))
    saved = tracker.state_dict()
    for bad, error in (
        ([], TypeError),
        ({"buffers": [("a", [1.0]), ("a", [2.0])]}, ValueError),
        ({"buffers": [(["unhashable"], [1.0])]}, TypeError),
        ({"buffers": [("a", [1.0, float("inf")])]}, ValueError),
        ({"buffers": [("a", [True])]}, ValueError),
        ({"buffers": [("a", 1.0)]}, ValueError),
    ):
        with pytest.raises(error, match="^state"):
            tracker.load_state_dict(bad)
        assert tracker.state_dict() == saved
    fresh = PerPromptStatTracker(buffer_size=4, min_count=2)
    fresh.load_state_dict(saved)
    assert fresh.state_dict() == saved == {"buffers": [("a", [1.0, 3.0]), ("b", [0.0])]}
    short = PerPromptStatTracker(buffer_size=1, min_count=1)
    short.load_state_dict(saved)  # a smaller buffer keeps the newest rewards
    assert short.state_dict() == {"buffers": [("a", [3.0]), ("b", [0.0])]}


def test_saved_adapters_load_into_a_fresh_pipeline_and_give_the_same_samples(tmp_path):
    trainer = _trainer(_config(max_steps=2))
    trainer.train()
    trainer.save_lora_weights(tmp_path)
    fresh = tiny_pipeline()
    fresh.load_lora_weights(str(tmp_path))
    x_T = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    cond = {"encoder_hidden_states": PROMPT_EMBEDS}

    def samples(unet):
        return sample_chain(
            unet, trainer.scheduler, x_T, generator=torch.Generator().manual_seed(4), cond=cond
        ).x0

    # Both in inference mode: a weight that requires grad takes another GEMM path on the
    # CPU even under no_grad (results then differ by float32 rounding).
    trainer.unet.requires_grad_(False)
    fresh.unet.requires_grad_(False)
    trained = samples(trainer.unet)
    assert torch.equal(samples(fresh.unet), trained)
    assert not torch.equal(samples(tiny_pipeline().unet), trained)


def _digit_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return rlr_toy.tiny_unet2d(num_class_embeds=4)


def _class_reward(images, labels):
    return -(images.mean(dim=(1, 2, 3)) - labels.to(images.dtype) / 4).square()


def test_unet2d_adapters_through_peft_save_and_load(tmp_path):
    scheduler = DDIMScheduler(timestep_spacing="trailing", set_alpha_to_one=False)
    trainer = RLRTrainer(
        _digit_unet(),
        _class_reward,
        _config(rlr=RLRConfig(estimator="draft"), max_steps=2),
        scheduler=scheduler,
        class_labels=[0, 1, 2, 3],
    )
    trainer.train()
    trainer.save_lora_weights(tmp_path)
    fresh = _digit_unet()
    load_lora_weights(fresh, tmp_path)
    trainer.unet.requires_grad_(False)  # inference mode on both (see the test above)
    fresh.requires_grad_(False)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([999, 500, 100, 1])
    labels = torch.arange(4)
    with torch.no_grad():
        assert torch.equal(
            fresh(x, t, class_labels=labels).sample, trainer.unet(x, t, class_labels=labels).sample
        )
        assert not torch.equal(
            _digit_unet()(x, t, class_labels=labels).sample,
            trainer.unet(x, t, class_labels=labels).sample,
        )


def test_full_finetuning_trains_every_unet_weight():
    trainer = _trainer(_config(finetune="full", rlr=RLRConfig(estimator="draft"), max_steps=1))
    before = _named_state(trainer)
    trainer.train()
    after = _named_state(trainer)
    assert not any("lora" in k for k in after)
    assert all(
        not torch.equal(before[k], after[k])
        for k in before
        if k.startswith("unet.") and "weight" in k and "norm" not in k
    )
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("vae."))


def test_per_prompt_normalisation_is_ddpos():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=3)
    rewards = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0])
    keys = [0, 0, 0, 1, 1]
    first = tracker.update(keys, rewards)
    # Prompt 0 has 3 rewards (>= min_count): its own mean and (population) std.
    own = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    assert torch.allclose(first[:3], (own - own.mean()) / (own.std(unbiased=False) + 1e-6))
    # Prompt 1 has 2 < min_count: the batch's statistics.
    batch = rewards.double()
    assert torch.allclose(
        first[3:], (batch[3:] - batch.mean()) / (batch.std(unbiased=False) + 1e-6)
    )
    second = tracker.update([0, 0], torch.tensor([5.0, 7.0]))
    buffer = torch.tensor([2.0, 3.0, 5.0, 7.0], dtype=torch.float64)  # the last 4 of prompt 0
    assert torch.allclose(
        second,
        (torch.tensor([5.0, 7.0]).double() - buffer.mean()) / (buffer.std(unbiased=False) + 1e-6),
    )


def test_gradient_accumulation_averages_the_estimates():
    config = _config(
        rlr=RLRConfig(rest="lr", window=2), gradient_accumulation_steps=2, max_grad_norm=None
    )
    trainer = _trainer(config)
    generator = copy.deepcopy(trainer.generator)
    metrics = trainer.accumulate_gradient()
    accumulated = [p.grad.clone() for p in trainer.trainable_parameters]
    reference = _trainer(config)
    params = reference.trainable_parameters
    total = [torch.zeros_like(p) for p in params]
    for _ in range(2):
        x_T = torch.randn((2, 4, 8, 8), generator=generator)
        indices = torch.randint(0, 3, (2,), generator=generator)

        def reward(x0, indices=indices):
            decoded = reference.vae.decode(x0 / reference.vae.config.scaling_factor).sample
            return brightness_reward(decoded, indices.repeat(x0.shape[0] // 2))

        for p in params:
            p.grad = None
        estimate_grad(
            reference.unet,
            reference.scheduler,
            reward,
            x_T,
            config=config.rlr,
            generator=generator,
            cond={"encoder_hidden_states": PROMPT_EMBEDS[indices]},
            parameters=params,
        )
        for t, p in zip(total, params):
            t.add_(p.grad)
    for got, want in zip(accumulated, total):
        torch.testing.assert_close(got, want / 2, rtol=1e-6, atol=1e-9)
    assert metrics["model_evaluations"] > 0


def test_dcot_window_range_and_stage_conditioning():
    dcot = DCoT(stages=[[3], [10], [10]], window_stage=1)
    assert dcot.window_range(10, fo_steps=1, window=2) == (4, 6)  # the middle third
    with pytest.raises(ValueError, match="^window_stage: stage 1 has none of the 10 steps"):
        DCoT(stages=[[1], [2]], boundaries=[0.95], window_stage=1).window_range(10, 1, 2)
    # The last stage holds step 1 only, which is the first-order step, not a window start.
    with pytest.raises(ValueError, match=r"^window_stage: stage 1 \(steps 1..1\) holds no window"):
        DCoT(stages=[[1], [2]], boundaries=[0.9], window_stage=1).window_range(10, 1, 2)
    seen = []

    class Spy(torch.nn.Module):
        """A denoiser that records the class labels of every call."""

        def __init__(self, unet):
            super().__init__()
            self.unet = unet
            self.config = unet.config

        def forward(self, x, t, class_labels=None):
            seen.append((int(t[0]), class_labels.tolist()))
            return self.unet(x, t, class_labels=class_labels)

    unet = rlr_toy.tiny_unet2d(num_class_embeds=11)
    scheduler = DDIMScheduler(timestep_spacing="trailing", set_alpha_to_one=False)
    trainer = RLRTrainer(
        Spy(unet),
        _class_reward,
        _config(rlr=RLRConfig(rest="lr", window=2), num_inference_steps=9, batch_size=2),
        scheduler=scheduler,
        class_labels=[10],
        dcot=DCoT(stages=[[3], [10], [10]], window_stage=1),
    )
    assert trainer.rlr_config.window_start == (4, 6)
    metrics = trainer.training_step()
    assert 4 <= metrics["window_start"] <= 6
    timesteps = [int(t) for t in trainer.scheduler.timesteps]
    coarse = set(timesteps[:3])
    assert {tuple(labels) for t, labels in seen if t in coarse} == {(3, 3)}
    assert {tuple(labels) for t, labels in seen if t not in coarse} == {(10, 10)}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_steps": -1}, "^max_steps:"),
        ({"batch_size": 0}, "^batch_size:"),
        ({"mixed_precision": "fp16"}, "^mixed_precision:"),
        ({"finetune": "half"}, "^finetune:"),
        ({"report_to": "mlflow"}, "^report_to:"),
        ({"ddpo_clip_range": 0.0}, "^ddpo_clip_range:"),
        ({"rlr": "rlr"}, "^rlr:"),
        ({"lora_target_modules": "to_q"}, "^lora_target_modules:"),
        (
            {"rlr": RLRConfig(estimator="ddpo"), "batch_size": 1, "ddpo_minibatches": 2},
            "^ddpo_minibatches:",
        ),
    ],
)
def test_config_options_are_validated(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        _config(**kwargs)


def test_bad_trainer_arguments_raise_before_anything_changes():
    pipe = tiny_pipeline()
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    cases = [
        ({"prompt_embeds": PROMPT_EMBEDS, "class_labels": [1]}, "^class_labels: give one of"),
        (
            {"prompt_embeds": PROMPT_EMBEDS, "config": _config(lora_target_modules=("nope",))},
            "^lora_target_modules: none of",
        ),
        ({"prompts": ["a cat"]}, "^prompts: strings need a pipeline with encode_prompt"),
        (
            {"prompt_embeds": PROMPT_EMBEDS, "config": _config(rlr=RLRConfig(guidance_scale=3.0))},
            "^negative_prompt_embeds:",
        ),
    ]
    cases.append(
        (
            {"prompt_embeds": PROMPT_EMBEDS, "dcot": DCoT(stages=[PROMPT_EMBEDS[:2]] * 3)},
            "^dcot: stage 0 has 2 prompts, the pool 3",
        )
    )
    cases.append(
        (
            {
                "prompt_embeds": PROMPT_EMBEDS,
                "dcot": DCoT(stages=[PROMPT_EMBEDS] * 3, window_stage=0),
                "config": _config(rlr=RLRConfig(estimator="draft")),
            },
            "^dcot: window_stage applies to estimator='rlr'",
        )
    )
    for kwargs, message in cases:
        config = kwargs.pop("config", _config())
        model = pipe if "prompts" not in kwargs else pipe.unet
        with pytest.raises(ValueError, match=message):
            RLRTrainer(model, brightness_reward, config, scheduler=pipe.scheduler, **kwargs)
    with pytest.raises(ValueError, match="^scheduler: required"):
        RLRTrainer(pipe.unet, brightness_reward, _config())
    with pytest.raises(TypeError, match="^model:"):
        RLRTrainer(object(), brightness_reward, _config())
    assert not getattr(pipe.unet, "peft_config", None)
    after = pipe.unet.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_budget_of_model_evaluations_stops_training():
    trainer = _trainer(
        _config(max_steps=100, max_model_evaluations=100, rlr=RLRConfig(estimator="draft"))
    )
    history = trainer.train()
    steps = [r for r in history if r["kind"] == "train"]
    assert trainer.model_evaluations >= 100
    assert trainer.model_evaluations - steps[-1]["model_evaluations"] < 100
    assert math.isfinite(steps[-1]["reward_mean"])


def test_a_unet_scheduler_and_vae_set_trains_as_its_pipeline():
    # The same model given as parts (a bare UNet2DConditionModel, scheduler=, vae=,
    # prompt_embeds=) and as a StableDiffusionPipeline: the same steps, bit for bit.
    parts = tiny_pipeline()
    by_parts = RLRTrainer(
        parts.unet,
        brightness_reward,
        _config(max_steps=2, eval_samples=2),
        scheduler=parts.scheduler,
        vae=parts.vae,
        prompt_embeds=PROMPT_EMBEDS,
    )
    by_pipeline = _trainer(_config(max_steps=2, eval_samples=2))
    assert by_parts.pipeline is None and by_parts.vae is parts.vae
    history = by_parts.train()
    reference = by_pipeline.train()
    assert [r["reward_mean"] for r in history if r["kind"] == "train"] == [
        r["reward_mean"] for r in reference if r["kind"] == "train"
    ]
    assert all(torch.equal(a, b) for a, b in zip(_trainable(by_parts), _trainable(by_pipeline)))
    assert by_parts.evaluate()["eval/reward_mean"] == by_pipeline.evaluate()["eval/reward_mean"]


def test_the_progress_bar_shows_the_reward(capsys):
    trainer = _trainer(_config(max_steps=2, progress=True))
    history = trainer.train()
    shown = capsys.readouterr().err
    last = [r for r in history if r["kind"] == "train"][-1]
    assert "riskfast rlr" in shown and "2/2" in shown
    assert f"reward={last['reward_mean']:.3f}" in shown
    assert f"evals={trainer.model_evaluations}" in shown
    # With a budget of denoiser evaluations the bar counts evaluations, not steps.
    budgeted = _trainer(
        _config(max_steps=100, max_model_evaluations=60, progress=True, rlr=RLRConfig("draft"))
    )
    budgeted.train()
    shown = capsys.readouterr().err
    assert "riskfast draft" in shown and "60.0/60.0" in shown


def _tiny_text_encoder(tmp_path):
    """A CLIP tokenizer over letters (vocabulary and merges written here) and a one-layer
    ``CLIPTextModel`` whose hidden size is the UNet's cross-attention width."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    tokens = ["<|startoftext|>", "<|endoftext|>"] + list(letters) + [c + "</w>" for c in letters]
    (tmp_path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(
        str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), model_max_length=6
    )
    torch.manual_seed(3)
    encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokens),
            hidden_size=EMBED_DIM,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=6,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    ).eval()
    return tokenizer, encoder


def _length_reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    target = torch.tensor([len(p) / 10.0 - 0.25 for p in prompts], dtype=images.dtype)
    return -(images.mean(dim=(1, 2, 3)) - target).square()


def test_string_prompts_through_a_text_encoder_given_as_parts_or_in_a_pipeline(tmp_path):
    # Strings encoded by a bare set's text_encoder= and tokenizer= equal diffusers'
    # StableDiffusionPipeline.encode_prompt on the same components, and train the same.
    tokenizer, encoder = _tiny_text_encoder(tmp_path)
    prompts = ["a cat", "dog", "a red fox"]
    parts, whole = tiny_pipeline(), tiny_pipeline()
    whole.text_encoder, whole.tokenizer = copy.deepcopy(encoder), tokenizer
    by_parts = RLRTrainer(
        parts.unet,
        _length_reward,
        _config(max_steps=2, eval_samples=2),
        scheduler=parts.scheduler,
        vae=parts.vae,
        text_encoder=encoder,
        tokenizer=tokenizer,
        prompts=prompts,
    )
    by_pipeline = RLRTrainer(
        whole, _length_reward, _config(max_steps=2, eval_samples=2), prompts=prompts
    )
    expected = whole.encode_prompt(prompts, torch.device("cpu"), 1, False)[0]
    assert by_parts.pool.shape == (3, 6, EMBED_DIM)
    assert torch.equal(by_parts.pool, expected) and torch.equal(by_pipeline.pool, expected)
    history, reference = by_parts.train(), by_pipeline.train()
    assert [r["reward_mean"] for r in history if r["kind"] == "train"] == [
        r["reward_mean"] for r in reference if r["kind"] == "train"
    ]
    assert all(torch.equal(a, b) for a, b in zip(_trainable(by_parts), _trainable(by_pipeline)))
    assert not any(p.requires_grad for p in encoder.parameters())


def test_text_encoder_arguments_are_checked_before_anything_changes(tmp_path):
    tokenizer, encoder = _tiny_text_encoder(tmp_path)
    pipe = tiny_pipeline()
    cases = [
        ({"text_encoder": encoder}, ValueError, "^tokenizer: give text_encoder and tokenizer"),
        ({"tokenizer": tokenizer}, ValueError, "^text_encoder: give text_encoder and tokenizer"),
        ({"text_encoder": object(), "tokenizer": tokenizer}, TypeError, "^text_encoder: expected"),
        ({"text_encoder": encoder, "tokenizer": 3}, TypeError, "^tokenizer: expected"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            RLRTrainer(
                pipe.unet,
                _length_reward,
                _config(),
                scheduler=pipe.scheduler,
                prompts=["a cat"],
                **kwargs,
            )
    with pytest.raises(ValueError, match="^text_encoder: only with a bare UNet"):
        RLRTrainer(
            pipe,
            _length_reward,
            _config(),
            text_encoder=encoder,
            tokenizer=tokenizer,
            prompts=["a"],
        )
    assert all(p.requires_grad for p in encoder.parameters())
    assert not getattr(pipe.unet, "peft_config", None)
