"""Input validation of the public riskfast.rlr helpers found lacking by an API audit.

Each bad input raises ``TypeError``/``ValueError`` naming the argument, before any
state (a tracker's buffers, an :class:`RLRState`, the estimator registry) changes.
"""

from __future__ import annotations

import pytest
import torch

from riskfast import rlr
from riskfast.rlr import estimators

# --------------------------------------------------------------------------------------
# PerPromptStatTracker.update: checks before any buffer changes
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keys", "rewards", "error", "name"),
    [
        (["a", "b"], [1.0, 2.0], TypeError, "rewards"),
        (["a", "b"], torch.tensor([1.0, float("nan")]), ValueError, "rewards"),
        (["a", "b"], torch.tensor([1.0, float("inf")]), ValueError, "rewards"),
        (["a", "b"], torch.ones(2, 2), ValueError, "rewards"),
        (["a"], torch.tensor(1.0), ValueError, "rewards"),
        (["a", "b"], torch.ones(2, dtype=torch.complex64), TypeError, "rewards"),
        ("ab", torch.ones(2), TypeError, "keys"),
        (5, torch.ones(2), TypeError, "keys"),
        ([["a"], ["b"]], torch.ones(2), TypeError, "keys"),
        (["a"], torch.ones(2), ValueError, "keys"),
    ],
)
def test_stat_tracker_update_rejects_bad_input_unchanged(keys, rewards, error, name):
    tracker = rlr.PerPromptStatTracker(buffer_size=4, min_count=2)
    tracker.update(["a", "b"], torch.tensor([1.0, 2.0]))
    before = tracker.state_dict()
    with pytest.raises(error, match=f"^{name}"):
        tracker.update(keys, rewards)
    assert tracker.state_dict() == before


def test_stat_tracker_update_still_accepts_integer_rewards():
    tracker = rlr.PerPromptStatTracker(buffer_size=4, min_count=1)
    advantages = tracker.update([0, 1, 0], torch.tensor([1, 2, 3]))
    assert torch.isfinite(advantages).all()
    assert tracker.state_dict() == {"buffers": [(0, [1.0, 3.0]), (1, [2.0])]}


# --------------------------------------------------------------------------------------
# step_roles / window_starts
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "error", "name"),
    [
        ((10, 1.0, 2, 2), TypeError, "fo_steps"),
        ((10, -1, 2, 0), ValueError, "fo_steps"),
        ((10, 1, 0, 2), ValueError, "window"),
        ((10, 1, -3, 2), ValueError, "window"),
        ((0, 0, 1, 1), ValueError, "num_steps"),
        ((True, 0, 1, 1), TypeError, "num_steps"),
        ((10, 1, 2, 2.0), TypeError, "start"),
        ((10, 1, 2, None), TypeError, "start"),
        ((10, 1, 2, 1), ValueError, "start"),
    ],
)
def test_step_roles_rejects_bad_input(args, error, name):
    with pytest.raises(error, match=f"^{name}"):
        rlr.step_roles(*args)


@pytest.mark.parametrize(
    ("args", "error", "name"),
    [
        ((10, 1.0, 2, "uniform"), TypeError, "fo_steps"),
        ((10, -5, 2, "uniform"), ValueError, "fo_steps"),
        ((10, 1, 0, "uniform"), ValueError, "window"),
        ((-3, 1, 2, "uniform"), ValueError, "num_steps"),
        ((3, 2, 2, "uniform"), ValueError, "window"),
        ((10, 1, 2, "bogus"), ValueError, "window_start"),
        ((10, 1, 2, None), TypeError, "window_start"),
        ((10, 1, 2, (4, 2)), ValueError, r"window_start: expected a <= b"),
        ((10, 1, 2, (2.5, 4)), TypeError, r"window_start\[0\]"),
        ((10, 1, 2, (1, 4)), ValueError, "window_start"),
    ],
)
def test_window_starts_rejects_bad_input(args, error, name):
    with pytest.raises(error, match=f"^{name}"):
        rlr.window_starts(*args)


def test_window_starts_takes_a_list_pair_as_the_config_does():
    assert rlr.window_starts(10, 1, 2, [2, 4]) == range(2, 5)
    assert rlr.window_starts(10, 1, 2, "uniform") == range(2, 10)


# --------------------------------------------------------------------------------------
# RLRState and register_estimator
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "error", "name"),
    [
        (("x", 1.0, 0.9), TypeError, "start"),
        ((0, 1.0, 0.9), ValueError, "start"),
        ((2, -1.0, 0.9), ValueError, "norm"),
        ((2, "1", 0.9), TypeError, "norm"),
        ((2, 1.0, 1.0), ValueError, "momentum"),
        ((2, 1.0, float("nan")), ValueError, "momentum"),
    ],
)
def test_rlr_state_update_rejects_bad_input_unchanged(args, error, name):
    state = rlr.RLRState()
    state.update(2, 1.0, 0.9)
    before = state.state_dict()
    with pytest.raises(error, match=f"^{name}"):
        state.update(*args)
    assert state.state_dict() == before


@pytest.mark.parametrize(
    ("args", "error", "name"),
    [(([], 1.0), ValueError, "starts"), (([2, 3], 0.0), ValueError, "temperature")],
)
def test_rlr_state_probabilities_rejects_bad_input(args, error, name):
    state = rlr.RLRState()
    state.update(2, 1.0, 0.9)
    with pytest.raises(error, match=f"^{name}"):
        state.probabilities(*args)


def test_register_estimator_rejects_a_non_callable_unregistered():
    names = rlr.estimator_names()
    with pytest.raises(TypeError, match="^fn"):
        rlr.register_estimator("audit_not_callable")(5)
    assert rlr.estimator_names() == names
    assert "audit_not_callable" not in estimators._ANTITHETIC


# --------------------------------------------------------------------------------------
# call_denoiser, GuidedDenoiser, PromptSchedule, DCoT
# --------------------------------------------------------------------------------------


def _identity(x, t):
    return x


@pytest.mark.parametrize(
    ("args", "error", "name"),
    [
        ((5, torch.zeros(2, 3), 5, {}), TypeError, "denoiser"),
        ((_identity, [[0.0]], 5, {}), TypeError, "sample"),
        ((_identity, torch.tensor(1.0), 5, {}), ValueError, "sample"),
        ((_identity, torch.zeros(2, 3), 5.5, {}), TypeError, "timestep"),
        ((_identity, torch.zeros(2, 3), -1, {}), ValueError, "timestep"),
        ((_identity, torch.zeros(2, 3), 5, None), TypeError, "kwargs"),
        ((_identity, torch.zeros(2, 3), 5, [1]), TypeError, "kwargs"),
    ],
)
def test_call_denoiser_rejects_bad_input(args, error, name):
    with pytest.raises(error, match=f"^{name}"):
        rlr.call_denoiser(*args)


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"timesteps": 10, "base_batch": 2}, TypeError, "timesteps"),
        ({"timesteps": [10, 5], "base_batch": 0}, ValueError, "base_batch"),
        ({"timesteps": [10, 5], "base_batch": 2.0}, TypeError, "base_batch"),
        ({"timesteps": [10, 5], "base_batch": 2, "repeats": 0}, ValueError, "repeats"),
        ({"timesteps": [10, 5], "base_batch": 2, "repeats": 2.0}, TypeError, "repeats"),
    ],
)
def test_guided_denoiser_validates_its_options(kwargs, error, name):
    with pytest.raises(error, match=f"^{name}"):
        rlr.GuidedDenoiser(_identity, **kwargs)


@pytest.mark.parametrize(
    ("call", "error", "name"),
    [
        (lambda s: s.stage_steps(0), ValueError, "num_steps"),
        (lambda s: s.stage_steps(2.0), TypeError, "num_steps"),
        (lambda s: s.stage_of(0, 0), ValueError, "num_steps"),
        (lambda s: s.stage_of(4, 4), ValueError, "position"),
        (lambda s: s.cond_at(-1, 4), ValueError, "position"),
    ],
)
def test_prompt_schedule_checks_positions(call, error, name):
    with pytest.raises(error, match=f"^{name}"):
        call(rlr.PromptSchedule([{}, {}]))


def test_dcot_window_range_names_its_arguments():
    with pytest.raises(ValueError, match="^window_stage"):
        rlr.DCoT([["a"], ["b"]]).window_range(10, 1, 1)
    with pytest.raises(TypeError, match="^num_steps"):
        rlr.DCoT([["a"], ["b"]], window_stage=1).window_range(10.0, 1, 1)
    assert rlr.DCoT([["a"], ["b"]], window_stage=1).window_range(10, 1, 1) == (2, 5)


# --------------------------------------------------------------------------------------
# Configs store the float they validated: a 1-element tensor or an int becomes a float
# --------------------------------------------------------------------------------------


def test_configs_store_their_numbers_as_floats() -> None:
    """``require_number`` accepts a 1-element tensor or an int; the configs keep the
    float it returns, so that equal settings compare and serialise equal (a resumed
    trainer compares ``to_dict()`` with the saved one)."""
    from riskfast.riskpo.objective import AdvantageOptions

    given = rlr.RLRConfig(eta=torch.tensor(0.5), sigma_p=1, window_temperature=torch.tensor([2.0]))
    plain = rlr.RLRConfig(eta=0.5, sigma_p=1.0, window_temperature=2.0)
    assert given == plain and given.to_dict() == plain.to_dict()
    assert all(type(getattr(given, n)) is float for n in ("eta", "sigma_p", "window_temperature"))
    trainer = rlr.TrainerConfig(rlr=given, learning_rate=torch.tensor(0.25), weight_decay=0)
    assert type(trainer.learning_rate) is float and trainer.learning_rate == 0.25
    assert type(trainer.weight_decay) is float
    assert trainer == rlr.TrainerConfig(rlr=plain, learning_rate=0.25, weight_decay=0.0)
    options = AdvantageOptions(alpha=torch.tensor(0.25), beta=1, omega=torch.tensor(2.0))
    assert options == AdvantageOptions(alpha=0.25, beta=1.0, omega=2.0)
    assert hash(options) == hash(AdvantageOptions(alpha=0.25, beta=1.0, omega=2.0))
    assert all(type(getattr(options, n)) is float for n in ("alpha", "beta", "omega", "w_mix"))
    # a rejected value still names its field
    with pytest.raises(ValueError, match="^eta"):
        rlr.RLRConfig(eta=torch.tensor(1.5))
    with pytest.raises(TypeError, match="^learning_rate"):
        rlr.TrainerConfig(rlr=plain, learning_rate=torch.ones(2))


def test_trl_config_stores_its_numbers_as_floats(tmp_path) -> None:
    pytest.importorskip(
        "trl", reason="RiskPOConfig extends TRL's GRPOConfig: pip install 'riskfast[trl]'"
    )
    from riskfast.integrations.trl import RiskPOConfig

    config = RiskPOConfig(
        output_dir=str(tmp_path),
        bf16=False,
        use_cpu=True,
        report_to="none",
        tracker_gamma=torch.tensor(0.5),
        dual_clip=3,
    )
    assert type(config.tracker_gamma) is float and config.tracker_gamma == 0.5
    assert type(config.dual_clip) is float and config.dual_clip == 3.0


def test_philox_normal_names_a_device_it_cannot_fill() -> None:
    from riskfast.ops import philox_normal

    with pytest.raises(ValueError, match="^device: 'meta'"):
        philox_normal(8, 1, device="meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="^device: cuda"):
            philox_normal(8, 1, device="cuda")
    assert torch.equal(philox_normal(8, 1, device="cpu"), philox_normal(8, 1))
