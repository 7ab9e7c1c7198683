"""``riskfast.rlr.estimate_grad``: exact cases, coverage of the steps, atomicity, bad input.

The statistical (unbiasedness) tests are in ``test_rlr_unbiased.py``. Here:

* ``full`` against plain autograd through a DDIM sampler written in this file from the
  DDIM paper's update (no riskfast code), on the same noises; ``draft`` likewise with
  ``x_K`` detached;
* every step covered exactly once by FO, window and rest;
* the contract of a call: adds to ``.grad``, touches only trainable tensors, undoes its
  ZO perturbations, and leaves everything as it was when it fails.
"""

from __future__ import annotations

import math

import pytest
import rlr_toy
import torch
from diffusers import DDIMScheduler

from riskfast.rlr import (
    PromptSchedule,
    RLRConfig,
    RLRState,
    estimate_grad,
    step_roles,
    window_starts,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with rlr_toy.one_thread():
        yield


@pytest.fixture(scope="module")
def model():
    return rlr_toy.pretrained_denoiser()


def _x_T(chains=16, seed=0, dtype=torch.float64):
    return torch.randn(chains, 2, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _grad(model, config, x_T, seed=1, scheduler=None, reward=rlr_toy.reward, **kwargs):
    model.zero_grad(set_to_none=True)
    metrics = estimate_grad(
        model,
        scheduler or rlr_toy.scheduler(),
        reward,
        x_T,
        config=config,
        generator=torch.Generator().manual_seed(seed),
        **kwargs,
    )
    return rlr_toy.flat_grad(model), metrics


def _plain_ddim_gradient(model, scheduler, x_T, generator_seed, eta=1.0, detach_at=None):
    """-d mean(R) / d theta by autograd through the DDIM update (Song et al., eq. 12).

    The noises: a generator seeded with the first draw of ``generator_seed``'s
    generator (``estimate_grad``'s documented rule), one ``randn`` per step.
    """
    first = torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(generator_seed))
    noise_gen = torch.Generator().manual_seed(int(first))
    alphas = scheduler.alphas_cumprod.double()
    timesteps = scheduler.timesteps.tolist()
    x = x_T
    for k, t in enumerate(timesteps):
        s_index = len(timesteps) - k  # spec numbering of this step
        if detach_at is not None and s_index == detach_at:
            x = x.detach()
        a = alphas[t]
        a_prev = alphas[timesteps[k + 1]] if k + 1 < len(timesteps) else alphas[0]
        eps = model(x, torch.full((x.shape[0],), t))
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        sigma = eta * ((1 - a_prev) / (1 - a)).sqrt() * (1 - a / a_prev).sqrt()
        z = torch.randn(x.shape, generator=noise_gen, dtype=x.dtype)
        x = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).sqrt() * eps + sigma * z
    model.zero_grad(set_to_none=True)
    (-rlr_toy.reward(x).mean()).backward()
    return rlr_toy.flat_grad(model)


def test_full_equals_plain_autograd_through_the_sampler(model):
    x_T = _x_T()
    for checkpoint in (True, False):
        ours, metrics = _grad(model, RLRConfig(estimator="full", checkpoint=checkpoint), x_T)
        expected = _plain_ddim_gradient(model, rlr_toy.scheduler(), x_T, 1)
        torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)
        assert metrics["grad_norm/total"] == pytest.approx(float(expected.norm()), rel=1e-10)


def test_draft_equals_plain_autograd_with_x_K_detached(model):
    x_T = _x_T()
    for k in (1, 3):
        ours, _ = _grad(model, RLRConfig(estimator="draft", fo_steps=k), x_T)
        expected = _plain_ddim_gradient(model, rlr_toy.scheduler(), x_T, 1, detach_at=k)
        torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)
    full, _ = _grad(model, RLRConfig(estimator="full"), x_T)
    draft_all, _ = _grad(model, RLRConfig(estimator="draft", fo_steps=10), x_T)
    torch.testing.assert_close(draft_all, full, rtol=1e-12, atol=1e-14)


def test_alignprop_with_a_fixed_depth_is_draft(model):
    x_T = _x_T()
    fixed, metrics = _grad(model, RLRConfig(estimator="alignprop", alignprop_steps=(3, 3)), x_T)
    draft, _ = _grad(model, RLRConfig(estimator="draft", fo_steps=3), x_T)
    torch.testing.assert_close(fixed, draft, rtol=1e-12, atol=1e-14)
    assert metrics["alignprop_mean_steps"] == 3.0


def test_rlr_terms_are_the_first_order_window_and_rest_terms(model):
    """rest='none' is FO + HO; its FO part equals draft's; window norms are reported."""
    x_T = _x_T()
    _, rlr_metrics = _grad(model, RLRConfig(rest="none"), x_T)
    draft, _ = _grad(model, RLRConfig(estimator="draft", fo_steps=1), x_T)
    assert rlr_metrics["grad_norm/fo"] == pytest.approx(float(draft.norm()), rel=1e-12)
    assert rlr_metrics["grad_norm/window"] > 0
    assert "grad_norm/rest" not in rlr_metrics
    _, lr_metrics = _grad(model, RLRConfig(rest="lr"), x_T)
    assert lr_metrics["grad_norm/fo"] == rlr_metrics["grad_norm/fo"]
    assert lr_metrics["window_start"] == rlr_metrics["window_start"]
    assert lr_metrics["grad_norm/rest"] > 0


def test_model_evaluations_are_counted(model):
    """rlr, rest='lr', T = 10, K = 1, h = 2, N = 16, no checkpointing: 10 + 1 + 2 + 7 steps."""
    _, metrics = _grad(model, RLRConfig(rest="lr", checkpoint=False), _x_T())
    assert metrics["model_evaluations"] == 16 * (10 + 1 + 2 + 7)
    # checkpointing recomputes each backpropagated step once: FO 1, window 2
    _, metrics = _grad(model, RLRConfig(rest="lr"), _x_T())
    assert metrics["model_evaluations"] == 16 * (10 + 2 * 1 + 2 * 2 + 7)
    _, metrics = _grad(model, RLRConfig(rest="zo", checkpoint=False), _x_T())
    assert metrics["chains"] == 32 and metrics["model_evaluations"] == 32 * (10 + 1 + 2)


@pytest.mark.parametrize("num_steps", range(1, 9))
def test_every_step_is_covered_exactly_once(num_steps):
    for fo_steps in range(num_steps + 1):
        for window in range(1, num_steps - fo_steps + 1):
            starts = window_starts(num_steps, fo_steps, window, "uniform")
            assert list(starts) == list(range(fo_steps + 1, num_steps - window + 2))
            for start in starts:
                roles = step_roles(num_steps, fo_steps, window, start)
                assert len(roles) == num_steps
                assert [s for s in range(1, num_steps + 1) if roles[s - 1] == "fo"] == list(
                    range(1, fo_steps + 1)
                )
                assert [s for s in range(1, num_steps + 1) if roles[s - 1] == "window"] == list(
                    range(start, start + window)
                )
                assert roles.count("rest") == num_steps - fo_steps - window
            for bad in (fo_steps, num_steps - window + 2):
                with pytest.raises(ValueError, match="^start"):
                    step_roles(num_steps, fo_steps, window, bad)


def test_window_start_range_draws_within_it(model):
    seen = set()
    for seed in range(30):
        _, metrics = _grad(model, RLRConfig(rest="none", window_start=(4, 6)), _x_T(4), seed)
        seen.add(metrics["window_start"])
    assert seen == {4, 5, 6}
    with pytest.raises(ValueError, match="^window_start"):
        _grad(model, RLRConfig(rest="none", window_start=(1, 3)), _x_T(4))


def test_estimate_grad_adds_to_existing_gradients(model):
    x_T = _x_T()
    alone, _ = _grad(model, RLRConfig(rest="lr"), x_T)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    estimate_grad(
        model,
        rlr_toy.scheduler(),
        rlr_toy.reward,
        x_T,
        config=RLRConfig(rest="lr"),
        generator=torch.Generator().manual_seed(1),
    )
    torch.testing.assert_close(rlr_toy.flat_grad(model), alone + 1.0, rtol=1e-12, atol=1e-12)


def test_only_trainable_tensors_get_gradients(model):
    frozen = [p for name, p in model.named_parameters() if name.startswith("net.0")]
    for p in frozen:
        p.requires_grad_(False)
    try:
        before = [p.detach().clone() for p in model.parameters()]
        _grad(model, RLRConfig(rest="zo"), _x_T())
        assert all(p.grad is None for p in frozen)
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    finally:
        for p in frozen:
            p.requires_grad_(True)


@pytest.mark.parametrize("restore", ["copy", "reverse"])
def test_zo_perturbations_are_undone(model, restore):
    before = [p.detach().clone() for p in model.parameters()]
    _grad(model, RLRConfig(rest="zo", zo_restore=restore, sigma_p=1e-2), _x_T())
    for a, b in zip(before, model.parameters()):
        if restore == "copy":
            assert torch.equal(a, b.detach())
        else:  # one rounding each way per perturbation: within a few float64 ulps
            assert torch.allclose(a, b.detach(), rtol=0, atol=1e-15)


def test_reverse_and_copy_restores_give_the_same_gradient(model):
    x_T = _x_T()
    copy, _ = _grad(model, RLRConfig(rest="zo", zo_restore="copy"), x_T)
    reverse, _ = _grad(model, RLRConfig(rest="zo", zo_restore="reverse"), x_T)
    torch.testing.assert_close(copy, reverse, rtol=1e-6, atol=1e-8)


def _snapshot(model, generator):
    params = [p.detach().clone() for p in model.parameters()]
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    return params, grads, generator.get_state()


def _assert_unchanged(model, generator, snapshot):
    params, grads, gen_state = snapshot
    assert all(torch.equal(a, p.detach()) for a, p in zip(params, model.parameters()))
    for g, p in zip(grads, model.parameters()):
        assert (g is None and p.grad is None) or torch.equal(g, p.grad)
    assert torch.equal(gen_state, generator.get_state())


@pytest.mark.parametrize(
    "estimator, rest",
    [("rlr", "zo"), ("rlr", "lr"), ("ddpo", "zo"), ("full", "zo"), ("rlr", "none")],
)
@pytest.mark.parametrize("failure", ["nan", "shape", "raises"])
def test_a_failing_call_changes_nothing(model, estimator, rest, failure):
    def reward(x0):
        r = rlr_toy.reward(x0)
        if failure == "nan":
            return r * torch.tensor(float("nan"), dtype=r.dtype)
        if failure == "shape":
            return r[:-1]
        raise RuntimeError("reward service down")

    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    generator = torch.Generator().manual_seed(3)
    state = RLRState()
    state.update(2, 1.0, 0.9)
    snapshot = _snapshot(model, generator)
    kind = RuntimeError if failure == "raises" else ValueError
    with pytest.raises(kind, match="^reward" if failure != "raises" else "reward service"):
        estimate_grad(
            model,
            rlr_toy.scheduler(),
            reward,
            _x_T(),
            config=RLRConfig(estimator=estimator, rest=rest),
            generator=generator,
            state=state,
        )
    _assert_unchanged(model, generator, snapshot)
    assert state.state_dict() == {"window_grad_norm": {2: 1.0}}
    for p in model.parameters():
        p.grad = None


def test_a_reward_without_gradient_is_refused_for_first_order_terms(model):
    def hit(x0):
        return (x0.detach().norm(dim=1) < 1).double()

    for config in (RLRConfig(), RLRConfig(estimator="full"), RLRConfig(estimator="draft")):
        with pytest.raises(ValueError, match="^reward_fn: its output has no gradient"):
            _grad(model, config, _x_T(), reward=hit)
    # fo_steps=0 (or ddpo) takes it
    _, metrics = _grad(model, RLRConfig(fo_steps=0, rest="lr"), _x_T(), reward=hit)
    assert "grad_norm/fo" not in metrics and metrics["grad_norm/window"] >= 0
    _grad(model, RLRConfig(estimator="ddpo"), _x_T(), reward=hit)


def test_float32_model(model):
    model32 = rlr_toy.pretrained_denoiser().float()
    grad, metrics = _grad(model32, RLRConfig(rest="zo"), _x_T(dtype=torch.float32))
    assert grad.dtype == torch.float32 and torch.isfinite(grad).all()
    assert math.isfinite(metrics["reward_mean"])


class CondRecorder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = rlr_toy.pretrained_denoiser()
        self.labels = []

    def forward(self, x, t, label=None):
        self.labels.append(label)
        return self.inner(x, t) + 0.01 * label.to(x.dtype)[:, None]


def test_per_chain_conditioning_follows_antithetic_pairs():
    recorder = CondRecorder()
    labels = torch.arange(4)
    estimate_grad(
        recorder,
        rlr_toy.scheduler(),
        rlr_toy.reward,
        _x_T(4),
        config=RLRConfig(rest="zo", guidance_scale=2.0),
        cond={"label": labels},
        uncond={"label": torch.zeros(4, dtype=torch.long)},
        generator=torch.Generator().manual_seed(0),
    )
    # every call sees the labels of its chains: all 8 (pairs b, b + 4) or one half
    shapes = {tuple(label.tolist()) for label in recorder.labels}
    assert shapes <= {
        (0, 1, 2, 3),
        (0, 1, 2, 3, 0, 1, 2, 3),
        (0, 0, 0, 0),
        (0, 0, 0, 0, 0, 0, 0, 0),
    }
    assert (0, 1, 2, 3, 0, 1, 2, 3) in shapes and (0, 1, 2, 3) in shapes


def test_prompt_schedule_through_estimate_grad():
    recorder = CondRecorder()
    schedule = PromptSchedule([{"label": torch.full((4,), 1)}, {"label": torch.full((4,), 2)}])
    estimate_grad(
        recorder,
        rlr_toy.scheduler(),
        rlr_toy.reward,
        _x_T(4),
        config=RLRConfig(rest="none", checkpoint=False),
        cond=schedule,
        generator=torch.Generator().manual_seed(0),
    )
    # sampling visits 10 steps: positions 0-4 stage 0, 5-9 stage 1
    sampled = [int(label[0]) for label in recorder.labels[:10]]
    assert sampled == [1] * 5 + [2] * 5


def test_grad_norm_window_start_keeps_state(model):
    state = RLRState()
    config = RLRConfig(rest="none", window_start="grad_norm")
    for seed in range(6):
        _grad(model, config, _x_T(8), seed, state=state)
    assert state.window_grad_norm and all(v >= 0 for v in state.window_grad_norm.values())
    probs = state.probabilities(list(range(2, 10)), 1.0)
    assert probs.sum().item() == pytest.approx(1.0)
    restored = RLRState()
    restored.load_state_dict(state.state_dict())
    assert restored.window_grad_norm == state.window_grad_norm
    with pytest.raises(ValueError, match="^state"):
        _grad(model, config, _x_T(8))
    with pytest.raises(ValueError, match="^state"):
        restored.load_state_dict({"window_grad_norm": {3: float("nan")}})


@pytest.mark.parametrize(
    "config_kwargs, name",
    [
        ({"estimator": "bogus"}, "estimator"),
        ({"rest": "xx"}, "rest"),
        ({"fo_steps": -1}, "fo_steps"),
        ({"window": 0}, "window"),
        ({"window_start": "middle"}, "window_start"),
        ({"window_start": (5, 3)}, "window_start"),
        ({"sigma_p": 0.0}, "sigma_p"),
        ({"eta": 2.0}, "eta"),
        ({"exit_eta": 0.0}, "exit_eta"),
        ({"baseline": "mean"}, "baseline"),
        ({"zo_restore": "none"}, "zo_restore"),
        ({"alignprop_steps": (0, 3)}, r"alignprop_steps\[0\]"),
        ({"ddpo_step_fraction": 0.0}, "ddpo_step_fraction"),
        ({"checkpoint": 1}, "checkpoint"),
        ({"window_start": "grad_norm", "term_norms": False}, "term_norms"),
    ],
)
def test_config_validates_its_options(config_kwargs, name):
    with pytest.raises((ValueError, TypeError), match=f"^{name}"):
        RLRConfig(**config_kwargs)


def test_bad_call_input_names_the_argument(model):
    sched = rlr_toy.scheduler()
    good = {
        "denoiser": model,
        "scheduler": sched,
        "reward_fn": rlr_toy.reward,
        "x_T": _x_T(4),
        "config": RLRConfig(rest="lr"),
    }
    cases = [
        ({"x_T": torch.randn(4)}, ValueError, "x_T"),
        ({"x_T": torch.full((4, 2), float("nan"))}, ValueError, "x_T"),
        ({"config": {"estimator": "rlr"}}, TypeError, "config"),
        ({"reward_fn": 3}, TypeError, "reward_fn"),
        ({"scheduler": DDIMScheduler()}, ValueError, "scheduler"),
        ({"config": RLRConfig(window=10)}, ValueError, "window"),
        ({"config": RLRConfig(rest="lr", eta=0.0)}, ValueError, "eta"),
        ({"config": RLRConfig(estimator="ddpo", eta=0.0)}, ValueError, "eta"),
        ({"config": RLRConfig(estimator="draft", fo_steps=11)}, ValueError, "fo_steps"),
        (
            {"config": RLRConfig(estimator="alignprop", alignprop_steps=(1, 11))},
            ValueError,
            "alignprop_steps",
        ),
        ({"denoiser": lambda x, t: x}, TypeError, "parameters"),
        ({"generator": 5}, TypeError, "generator"),
    ]
    for change, kind, name in cases:
        args = dict(good)
        args.update(change)
        snapshot = _snapshot(model, torch.Generator())
        with pytest.raises(kind, match=f"^{name}"):
            estimate_grad(**args)
        _assert_unchanged(model, torch.Generator(), snapshot)


def test_eta_zero_sampling_forces_a_noisy_exit_step(model):
    """eta = 0 with rest='zo': the chain is deterministic except the window's exit (spec)."""
    _, metrics = _grad(model, RLRConfig(rest="zo", eta=0.0), _x_T())
    assert math.isfinite(metrics["grad_norm/window"]) and metrics["grad_norm/window"] > 0
    with pytest.raises(ValueError, match="^window_start: the window may exit at step 1"):
        _grad(
            model,
            RLRConfig(rest="none", fo_steps=0),
            _x_T(),
            scheduler=rlr_toy.scheduler(set_alpha_to_one=True),
        )


def test_registered_estimators_are_reachable_from_the_config(model):
    from riskfast.rlr import register_estimator
    from riskfast.rlr.estimators import _ANTITHETIC, _ESTIMATORS

    @register_estimator("test-last-step-lr", antithetic=True)
    def last_step(run):
        run.sample(run.draw_seeds(1)[0])
        run.rewards_of_samples()
        run.add_term("lr", -(run.advantages() * run.log_prob(run.xs[1], 1)).mean())

    try:
        _, metrics = _grad(model, RLRConfig(estimator="test-last-step-lr"), _x_T(4))
        assert metrics["chains"] == 8 and metrics["grad_norm/lr"] > 0
    finally:
        _ESTIMATORS.pop("test-last-step-lr")
        _ANTITHETIC.pop("test-last-step-lr")
    with pytest.raises(ValueError, match="^estimator"):
        RLRConfig(estimator="test-last-step-lr")


def test_zeroth_order_only_takes_a_reward_without_gradient(model):
    def hit(x0):
        return (x0.detach().norm(dim=1) < 1).double()

    before = [p.detach().clone() for p in model.parameters()]
    grad, metrics = _grad(model, RLRConfig(estimator="zo"), _x_T(), reward=hit)
    assert metrics["chains"] == 32 and torch.isfinite(grad).all()
    assert metrics["grad_norm/zo"] == pytest.approx(float(grad.norm()), rel=1e-12)
    assert all(torch.equal(a, p.detach()) for a, p in zip(before, model.parameters()))


def test_full_with_a_ddpm_scheduler_equals_plain_autograd(model):
    """DDPM's posterior mean (Ho et al., eq. 7), written here, on the same noises."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(timestep_spacing="trailing", clip_sample=False)
    scheduler.set_timesteps(6)
    x_T = _x_T()
    ours, _ = _grad(model, RLRConfig(estimator="full"), x_T, scheduler=scheduler)
    first = torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(1))
    noise_gen = torch.Generator().manual_seed(int(first))
    alphas = scheduler.alphas_cumprod.double()
    timesteps = scheduler.timesteps.tolist()
    x = x_T
    for k, t in enumerate(timesteps):
        a = alphas[t]
        a_prev = alphas[timesteps[k + 1]] if k + 1 < len(timesteps) else torch.tensor(1.0)
        beta = 1 - a / a_prev
        eps = model(x, torch.full((x.shape[0],), t))
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        mean = a_prev.sqrt() * beta / (1 - a) * x0 + (1 - beta).sqrt() * (1 - a_prev) / (1 - a) * x
        sigma = ((1 - a_prev) / (1 - a) * beta).clamp(min=1e-20).sqrt()
        x = mean + sigma * torch.randn(x.shape, generator=noise_gen, dtype=x.dtype)
    model.zero_grad(set_to_none=True)
    (-rlr_toy.reward(x).mean()).backward()
    torch.testing.assert_close(ours, rlr_toy.flat_grad(model), rtol=1e-10, atol=1e-12)
