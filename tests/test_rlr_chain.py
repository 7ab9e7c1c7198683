"""The chain runner ``riskfast.rlr.sample_chain``: denoisers, guidance, the DCoT schedule.

Spec ``rlr.md``, "The chain" and "The prompt technique (DCoT)".
"""

from __future__ import annotations

import pytest
import rlr_toy
import torch
from diffusers import DDIMScheduler

from riskfast.rlr import PromptSchedule, sample_chain, step_with_logprob


def _scheduler(num_steps=10, **config):
    config.setdefault("timestep_spacing", "trailing")
    config.setdefault("set_alpha_to_one", False)
    scheduler = DDIMScheduler(**config)
    scheduler.set_timesteps(num_steps)
    return scheduler


class Recorder(torch.nn.Module):
    """A linear denoiser that records the keyword arguments of every call."""

    def __init__(self, dim=3):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.eye(dim) * 0.5)
        self.calls = []

    def forward(self, x, t, **kwargs):
        self.calls.append({"t": t.clone(), **kwargs})
        shift = kwargs.get("shift", 0.0)
        return x @ self.weight + 1e-4 * t.to(x.dtype)[:, None] + shift


def test_chain_equals_repeated_steps_with_the_same_noises():
    model = Recorder().double()
    scheduler = _scheduler(6)
    x_T = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    chain = sample_chain(
        model,
        scheduler,
        x_T,
        generator=torch.Generator().manual_seed(1),
        return_log_probs=True,
        return_model_outputs=True,
        return_means=True,
    )
    gen = torch.Generator().manual_seed(1)
    x = x_T
    for k, t in enumerate(scheduler.timesteps.tolist()):
        with torch.no_grad():
            out = model(x, torch.full((4,), t))
        step = step_with_logprob(scheduler, out, t, x, generator=gen)
        assert torch.equal(chain.samples[k + 1], step.prev_sample)
        assert torch.equal(chain.model_outputs[k], out)
        torch.testing.assert_close(chain.means[k], step.mean, rtol=0, atol=0)
        torch.testing.assert_close(chain.log_probs[:, k], step.log_prob, rtol=0, atol=0)
        assert chain.sigmas[k] == step.std
        x = step.prev_sample
    assert chain.x0 is chain.samples[-1]
    assert chain.timesteps == scheduler.timesteps.tolist()
    assert chain.evaluations == 4 * 6


def test_chain_keeps_no_graph():
    model = Recorder()
    chain = sample_chain(
        model, _scheduler(4), torch.randn(2, 3), return_log_probs=True, return_model_outputs=True
    )
    assert not any(s.requires_grad for s in chain.samples)
    assert not chain.log_probs.requires_grad
    assert not any(o.requires_grad for o in chain.model_outputs)


def test_eta_zero_and_the_deterministic_last_step_have_no_density():
    scheduler = _scheduler(5, set_alpha_to_one=True)
    chain = sample_chain(Recorder(), scheduler, torch.randn(2, 3), return_log_probs=True)
    assert chain.sigmas[-1] == 0.0 and all(s > 0 for s in chain.sigmas[:-1])
    assert torch.equal(chain.log_probs[:, -1], torch.zeros(2))
    chain = sample_chain(Recorder(), scheduler, torch.randn(2, 3), eta=0.0, return_log_probs=True)
    assert chain.sigmas == [0.0] * 5
    assert torch.equal(chain.log_probs, torch.zeros(2, 5))


def test_class_conditional_unet2d():
    torch.manual_seed(0)
    unet = rlr_toy.tiny_unet2d(num_class_embeds=10, attention=False)
    labels = torch.tensor([1, 2, 3])
    x_T = torch.randn(3, 1, 8, 8)
    chain = sample_chain(
        unet,
        _scheduler(4),
        x_T,
        cond={"class_labels": labels},
        generator=torch.Generator().manual_seed(0),
        return_log_probs=True,
    )
    assert chain.x0.shape == (3, 1, 8, 8)
    assert chain.log_probs.shape == (3, 4) and torch.isfinite(chain.log_probs).all()
    # the label matters: another label gives another sample from the same noises
    other = sample_chain(
        unet,
        _scheduler(4),
        x_T,
        cond={"class_labels": labels + 1},
        generator=torch.Generator().manual_seed(0),
    )
    assert not torch.allclose(chain.x0, other.x0)


def test_text_conditional_unet_with_guidance_equals_the_guidance_formula():
    torch.manual_seed(0)
    unet = rlr_toy.tiny_unet2d_condition(cross_attention_dim=16, attention_head_dim=4)
    text, empty = torch.randn(2, 3, 16), torch.zeros(2, 3, 16)
    x_T = torch.randn(2, 4, 8, 8)
    scheduler = _scheduler(3)
    chain = sample_chain(
        unet,
        scheduler,
        x_T,
        cond={"encoder_hidden_states": text},
        uncond={"encoder_hidden_states": empty},
        guidance_scale=5.0,
        eta=0.0,
        return_model_outputs=True,
    )
    assert chain.evaluations == 2 * 2 * 3
    t = int(scheduler.timesteps[0])
    with torch.no_grad():
        c = unet(x_T, torch.full((2,), t), encoder_hidden_states=text).sample
        u = unet(x_T, torch.full((2,), t), encoder_hidden_states=empty).sample
    torch.testing.assert_close(chain.model_outputs[0], u + 5.0 * (c - u))


def test_prompt_schedule_conditions_each_step_on_its_stage():
    schedule = PromptSchedule([{"shift": 1.0}, {"shift": 2.0}, {"shift": 3.0}])
    # ten steps in thirds: positions 0-3 (k / T < 1/3), 4-6, 7-9
    assert [schedule.stage_of(k, 10) for k in range(10)] == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert schedule.stage_steps(10) == [(7, 10), (4, 6), (1, 3)]
    model = Recorder()
    sample_chain(model, _scheduler(10), torch.randn(2, 3), cond=schedule)
    assert [call["shift"] for call in model.calls] == [1.0] * 4 + [2.0] * 3 + [3.0] * 3
    custom = PromptSchedule([{"shift": 0.0}, {"shift": 1.0}], boundaries=[0.8])
    assert [custom.stage_of(k, 10) for k in range(10)] == [0] * 8 + [1] * 2


def test_per_sample_conditioning_is_passed_per_chain():
    model = Recorder()
    shifts = torch.tensor([[0.0], [1.0]])
    sample_chain(model, _scheduler(2), torch.randn(2, 3), cond={"shift": shifts})
    assert all(torch.equal(call["shift"], shifts) for call in model.calls)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"guidance_scale": 3.0}, "uncond"),
        ({"cond": [1, 2]}, "cond"),
        ({"x_T": torch.randn(3)}, "x_T"),
        ({"eta": -0.1}, "eta"),
        ({"return_log_probs": 1}, "return_log_probs"),
        ({"generator": 3}, "generator"),
    ],
)
def test_bad_input_names_the_argument(kwargs, name):
    args = {"denoiser": Recorder(), "scheduler": _scheduler(3), "x_T": torch.randn(2, 3)}
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=f"^{name}"):
        sample_chain(**args)


def test_denoiser_output_of_the_wrong_shape():
    with pytest.raises(ValueError, match="^denoiser: output shape"):
        sample_chain(lambda x, t: x[:, :1], _scheduler(3), torch.randn(2, 3))
    with pytest.raises(TypeError, match="^denoiser"):
        sample_chain(lambda x, t: "x", _scheduler(3), torch.randn(2, 3))


def test_prompt_schedule_validation():
    with pytest.raises(TypeError, match="^stages"):
        PromptSchedule({"a": 1})
    with pytest.raises(ValueError, match="^boundaries: expected 2"):
        PromptSchedule([{}, {}, {}], boundaries=[0.5])
    with pytest.raises(ValueError, match="^boundaries: must increase"):
        PromptSchedule([{}, {}, {}], boundaries=[0.6, 0.5])
    with pytest.raises(ValueError, match=r"^boundaries\[0\]"):
        PromptSchedule([{}, {}], boundaries=[1.0])
