"""``riskfast.rlr.step_with_logprob`` against the float64 loop oracle and against diffusers.

Spec ``rlr.md``, "The chain": DDIM with any eta and DDPM, epsilon-, sample- and
v-prediction; the previous timestep is the schedule's next entry, which equals
``DDIMScheduler.step``'s rule for "leading" spacing only.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from oracles import rlr_oracle

from riskfast.rlr import step_with_logprob, transition_coefficients

PREDICTIONS = ("epsilon", "sample", "v_prediction")


def _ddim(num_steps=10, **config):
    scheduler = DDIMScheduler(**config)
    scheduler.set_timesteps(num_steps)
    return scheduler


def _ddpm(num_steps=10, **config):
    scheduler = DDPMScheduler(**config)
    scheduler.set_timesteps(num_steps)
    return scheduler


def _inputs(shape=(3, 2, 4, 4), dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(shape, generator=gen, dtype=dtype)
    model_output = torch.randn(shape, generator=gen, dtype=dtype)
    noise = torch.randn(shape, generator=gen, dtype=dtype)
    return sample, model_output, noise


def _alpha(scheduler, timestep, final):
    return float(scheduler.alphas_cumprod[timestep]) if timestep >= 0 else final


def _oracle_step(scheduler, kind, position, sample, model_output, noise, eta):
    """Per sample: (mean list, std, prev list, log-density) from the loop oracle."""
    timesteps = [int(t) for t in scheduler.timesteps]
    t = timesteps[position]
    prev_t = timesteps[position + 1] if position + 1 < len(timesteps) else -1
    config = scheduler.config
    clip = config.clip_sample_range if config.clip_sample else None
    a_t = float(scheduler.alphas_cumprod[t])
    results = []
    for b in range(sample.shape[0]):
        x = sample[b].reshape(-1).tolist()
        m = model_output[b].reshape(-1).tolist()
        z = noise[b].reshape(-1).tolist()
        if kind == "ddim":
            a_prev = _alpha(scheduler, prev_t, float(scheduler.final_alpha_cumprod))
            mean, s = rlr_oracle.ddim_step(x, m, a_t, a_prev, eta, config.prediction_type, clip)
        else:
            a_prev = _alpha(scheduler, prev_t, 1.0)
            # "fixed_small_log" has fixed_small's variance, computed through a log
            variance = "fixed_large" if config.variance_type == "fixed_large" else "fixed_small"
            mean, s = rlr_oracle.ddpm_step(
                x, m, a_t, a_prev, config.prediction_type, clip, variance
            )
            s = 0.0 if t == 0 else s
        prev = [mi + s * zi for mi, zi in zip(mean, z)]
        log_density = rlr_oracle.gaussian_log_density(prev, mean, s) if s > 0 else None
        results.append((mean, s, prev, log_density))
    return results


def _assert_matches_oracle(out, oracle, shape):
    means = torch.tensor([r[0] for r in oracle], dtype=torch.float64).view(shape)
    prevs = torch.tensor([r[2] for r in oracle], dtype=torch.float64).view(shape)
    torch.testing.assert_close(out.mean, means, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.prev_sample, prevs, rtol=1e-12, atol=1e-12)
    assert out.std == pytest.approx(oracle[0][1], rel=1e-12)
    if oracle[0][3] is None:
        assert out.log_prob is None
    else:
        expected = torch.tensor([r[3] for r in oracle], dtype=torch.float64)
        torch.testing.assert_close(out.log_prob, expected, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
def test_ddim_step_matches_the_loop_oracle(prediction_type, spacing, eta):
    scheduler = _ddim(7, prediction_type=prediction_type, timestep_spacing=spacing)
    sample, model_output, noise = _inputs()
    for position in (0, 3, 6):
        t = int(scheduler.timesteps[position])
        out = step_with_logprob(scheduler, model_output, t, sample, eta=eta, noise=noise)
        oracle = _oracle_step(scheduler, "ddim", position, sample, model_output, noise, eta)
        _assert_matches_oracle(out, oracle, sample.shape)


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_small_log", "fixed_large"])
def test_ddpm_step_matches_the_loop_oracle(prediction_type, variance_type):
    scheduler = _ddpm(
        7, prediction_type=prediction_type, variance_type=variance_type, timestep_spacing="trailing"
    )
    sample, model_output, noise = _inputs(seed=1)
    for position in range(7):
        t = int(scheduler.timesteps[position])
        out = step_with_logprob(scheduler, model_output, t, sample, noise=noise)
        oracle = _oracle_step(scheduler, "ddpm", position, sample, model_output, noise, 1.0)
        _assert_matches_oracle(out, oracle, sample.shape)


def test_ddim_step_equals_diffusers_with_leading_spacing():
    """Same noise, same prev_sample as DDIMScheduler.step (float32, clip_sample on)."""
    for prediction_type in PREDICTIONS:
        scheduler = _ddim(10, prediction_type=prediction_type)  # leading spacing, the default
        sample, model_output, noise = _inputs((4, 3, 8, 8), torch.float32, seed=2)
        for eta in (0.0, 0.5, 1.0):
            for t in scheduler.timesteps.tolist():
                ours = step_with_logprob(scheduler, model_output, t, sample, eta=eta, noise=noise)
                theirs = scheduler.step(model_output, t, sample, eta=eta, variance_noise=noise)
                torch.testing.assert_close(
                    ours.prev_sample, theirs.prev_sample, rtol=1e-5, atol=1e-5
                )


def test_ddim_step_follows_the_schedule_where_diffusers_does_not():
    """Trailing/linspace spacing: diffusers skips to t - 1000 // T, riskfast to the next entry."""
    for spacing in ("linspace", "trailing"):
        scheduler = _ddim(7, timestep_spacing=spacing, clip_sample=False)
        sample, model_output, noise = _inputs((2, 1, 4, 4), torch.float64, seed=3)
        t = int(scheduler.timesteps[1])
        ours = step_with_logprob(scheduler, model_output, t, sample, eta=1.0, noise=noise)
        theirs = scheduler.step(model_output, t, sample, eta=1.0, variance_noise=noise)
        diffusers_prev = t - 1000 // 7
        assert diffusers_prev != int(scheduler.timesteps[2])
        assert not torch.allclose(ours.prev_sample, theirs.prev_sample, rtol=1e-6, atol=1e-6)
        oracle = _oracle_step(scheduler, "ddim", 1, sample, model_output, noise, 1.0)
        _assert_matches_oracle(ours, oracle, sample.shape)


def test_ddpm_step_equals_diffusers():
    scheduler = _ddpm(10, timestep_spacing="leading")
    sample, model_output, _ = _inputs((3, 2, 4, 4), torch.float32, seed=4)
    for t in scheduler.timesteps.tolist():
        noise = torch.randn(sample.shape, generator=torch.Generator().manual_seed(t))
        ours = step_with_logprob(scheduler, model_output, t, sample, noise=noise)
        theirs = scheduler.step(model_output, t, sample, generator=torch.Generator().manual_seed(t))
        torch.testing.assert_close(ours.prev_sample, theirs.prev_sample, rtol=1e-5, atol=1e-5)
        assert (ours.log_prob is None) == (t == 0)


def test_log_prob_of_a_given_prev_sample_and_reduce_mean():
    scheduler = _ddim(10, timestep_spacing="trailing")
    sample, model_output, noise = _inputs(seed=5)
    t = int(scheduler.timesteps[2])
    taken = step_with_logprob(scheduler, model_output, t, sample, eta=1.0, noise=noise)
    scored = step_with_logprob(scheduler, model_output, t, sample, prev_sample=taken.prev_sample)
    torch.testing.assert_close(scored.log_prob, taken.log_prob, rtol=1e-12, atol=1e-12)
    mean_reduced = step_with_logprob(
        scheduler, model_output, t, sample, prev_sample=taken.prev_sample, reduce="mean"
    )
    dims = sample[0].numel()
    torch.testing.assert_close(mean_reduced.log_prob, taken.log_prob / dims)
    # by hand: the density of mean + s * z is -|z|^2 / 2 - D log s - D log(2 pi) / 2
    z2 = noise.reshape(noise.shape[0], -1).square().sum(1)
    by_hand = -0.5 * z2 - dims * (math.log(taken.std) + 0.5 * math.log(2 * math.pi))
    torch.testing.assert_close(taken.log_prob, by_hand, rtol=1e-10, atol=1e-8)


def test_dtypes_of_the_outputs():
    scheduler = _ddim(10)
    t = int(scheduler.timesteps[0])
    for dtype, expected in (
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float64, torch.float64),
    ):
        sample, model_output, noise = _inputs(dtype=dtype)
        out = step_with_logprob(scheduler, model_output, t, sample, noise=noise)
        assert out.prev_sample.dtype == dtype
        assert out.log_prob.dtype == expected
        assert torch.isfinite(out.log_prob).all()


def test_eta_zero_gives_no_log_density():
    scheduler = _ddim(10)
    sample, model_output, _ = _inputs()
    t = int(scheduler.timesteps[0])
    out = step_with_logprob(scheduler, model_output, t, sample, eta=0.0)
    assert out.std == 0.0 and out.log_prob is None
    torch.testing.assert_close(out.prev_sample, out.mean)


def test_generator_draws_the_noise_reproducibly():
    scheduler = _ddim(10)
    sample, model_output, _ = _inputs()
    t = int(scheduler.timesteps[0])
    a = step_with_logprob(
        scheduler, model_output, t, sample, generator=torch.Generator().manual_seed(9)
    )
    b = step_with_logprob(
        scheduler, model_output, t, sample, generator=torch.Generator().manual_seed(9)
    )
    assert torch.equal(a.prev_sample, b.prev_sample)


def test_transition_coefficients_of_the_last_ddim_step():
    """set_alpha_to_one=True: the last step lands on alpha-bar 1 with sigma 0."""
    scheduler = _ddim(10, timestep_spacing="trailing")
    last = int(scheduler.timesteps[-1])
    assert transition_coefficients(scheduler, last, 1.0).sigma == 0.0
    scheduler = _ddim(10, timestep_spacing="trailing", set_alpha_to_one=False)
    assert transition_coefficients(scheduler, last, 1.0).sigma > 0.0


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"model_output": torch.zeros(3, 2)}, "model_output"),
        ({"sample": torch.zeros(0, 2)}, "sample"),
        ({"timestep": 5}, "timestep"),
        ({"eta": 1.5}, "eta"),
        ({"reduce": "max"}, "reduce"),
        ({"noise": torch.zeros(2, 2), "prev_sample": torch.zeros(2, 2)}, "noise"),
        ({"noise": torch.zeros(2, 3)}, "noise"),
        ({"sample": torch.zeros(2, 2, dtype=torch.long)}, "sample"),
    ],
)
def test_bad_input_names_the_argument(kwargs, name):
    scheduler = _ddim(10)
    args = {
        "scheduler": scheduler,
        "model_output": torch.zeros(2, 2),
        "timestep": int(scheduler.timesteps[0]),
        "sample": torch.zeros(2, 2),
    }
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=f"^{name}"):
        step_with_logprob(**args)


def test_scheduler_errors():
    with pytest.raises(ValueError, match="^scheduler: its timesteps are not set"):
        step_with_logprob(DDIMScheduler(), torch.zeros(2, 2), 0, torch.zeros(2, 2))
    with pytest.raises(TypeError, match="^scheduler"):
        step_with_logprob(object(), torch.zeros(2, 2), 0, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="^scheduler: dynamic thresholding"):
        step_with_logprob(_ddim(10, thresholding=True), torch.zeros(2, 2), 900, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="^eta: DDPMScheduler"):
        step_with_logprob(_ddpm(10), torch.zeros(2, 2), 900, torch.zeros(2, 2), eta=0.5)
    with pytest.raises(ValueError, match="^scheduler: DDPMScheduler variance_type"):
        step_with_logprob(
            _ddpm(10, variance_type="learned"), torch.zeros(2, 2), 900, torch.zeros(2, 2)
        )
