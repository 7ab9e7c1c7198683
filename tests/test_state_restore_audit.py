"""State-restoring entry points refuse a bad state whole (audit of riskpo and integrations).

A refused load or a refused step raises ``ValueError``/``TypeError`` naming the argument
and leaves every state (seed, generator, tracker, the verl run state) as it was.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from riskfast.integrations import verl
from riskfast.riskpo import RiskPOLoss


@pytest.fixture(autouse=True)
def _fresh_verl_state() -> Any:
    verl.reset_state()
    yield
    verl.reset_state()


def _module_snapshot(module: RiskPOLoss) -> dict[str, Any]:
    return copy.deepcopy(module.state_dict()["_extra_state"])


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _stepped_module() -> RiskPOLoss:
    module = RiskPOLoss(bundle_size=2, quantile="tracker", seed=3)
    rewards = torch.tensor([0.0, 1.0, 1.0, 0.0, 0.5, 0.25, 1.0, 0.0])
    module.compute_advantages(rewards, group_size=2)
    return module


@pytest.mark.parametrize("fill", [0, 255])
def test_module_refuses_a_generator_state_torch_cannot_take(fill: int) -> None:
    # Right dtype and shape, content torch refuses ("Invalid mt19937 state"): it was a
    # RuntimeError raised after the seed had been overwritten.
    module = _stepped_module()
    before = _module_snapshot(module)
    bad = module.state_dict()
    bad["_extra_state"] = {
        **bad["_extra_state"],
        "seed": 99,
        "generator": torch.full_like(bad["_extra_state"]["generator"], fill),
    }
    with pytest.raises(ValueError, match="^state: generator is not a valid generator state"):
        module.load_state_dict(bad)
    assert module.seed == 3
    assert _same(_module_snapshot(module), before)


def test_module_refuses_a_saved_option_that_is_a_tensor_of_two_values() -> None:
    # Was a RuntimeError ("Boolean value of Tensor with more than one value is ambiguous").
    module = _stepped_module()
    before = _module_snapshot(module)
    bad = module.state_dict()
    bad["_extra_state"] = copy.deepcopy(bad["_extra_state"])
    bad["_extra_state"]["options"]["bundle_size"] = torch.tensor([2, 2])
    with pytest.raises(ValueError, match="^bundle_size: the checkpoint was saved with"):
        module.load_state_dict(bad)
    assert _same(_module_snapshot(module), before)


def _verl_call(seed: int = 0, rewards: torch.Tensor | None = None) -> dict[str, Any]:
    if rewards is None:
        rewards = torch.tensor([0.0, 1.0, 1.0, 0.0, 0.5, 0.25, 1.0, 0.0])
    token_rewards = torch.zeros(rewards.numel(), 3)
    token_rewards[:, -1] = rewards
    return {
        "token_level_rewards": token_rewards,
        "response_mask": torch.ones(rewards.numel(), 3),
        "index": [i // 2 for i in range(rewards.numel())],
        "config": {"riskpo": {"bundle_size": 2, "quantile": "tracker", "seed": seed}},
    }


def _verl_stepped() -> dict[str, Any]:
    verl.compute_riskpo_outcome_advantage(**_verl_call())
    verl.compute_riskpo_outcome_advantage(**_verl_call())
    return copy.deepcopy(verl.state_dict())


def test_verl_refused_step_with_other_options_keeps_the_run_state() -> None:
    # A call whose config differs (here the seed) used to install a fresh generator and
    # tracker before its rewards were checked: the refused call lost the run's state.
    before = _verl_stepped()
    bad_rewards = torch.tensor([0.0, 1.0, float("nan"), 0.0, 0.5, 0.25, 1.0, 0.0])
    with pytest.raises(ValueError, match=r"^token_level_rewards \(row sums\)"):
        verl.compute_riskpo_outcome_advantage(**_verl_call(seed=1, rewards=bad_rewards))
    assert _same(verl.state_dict(), before)
    # ... and the run continues as if the refused call had not been made.
    expected, _ = verl.compute_riskpo_outcome_advantage(**_verl_call())
    verl.reset_state()
    verl.load_state_dict(before)
    again, _ = verl.compute_riskpo_outcome_advantage(**_verl_call())
    assert torch.equal(expected, again)


@pytest.mark.parametrize(
    ("corrupt", "match"),
    [
        (lambda o: o.pop("gamma"), r"^state: its options are not a RiskPO state's \(missing"),
        (lambda o: o.pop("bundle_size"), r"^state: its options are not a RiskPO state's"),
        (lambda o: o.update(extra=1), r"^state: its options are not a RiskPO state's"),
        (lambda o: o.update(gamma=None), r"^state: its options are not valid \(gamma"),
        (lambda o: o.update(bundle_size=0), r"^state: its options are not valid \(bundle_size"),
        (lambda o: o.update(alpha=torch.tensor([0.2, 0.2])), r"^state: its options are not valid"),
    ],
)
def test_verl_load_state_dict_checks_the_saved_options(corrupt: Any, match: str) -> None:
    # verl restores without a config to compare with: a missing gamma was a raw KeyError,
    # a missing or invalid bundle_size was taken (to fail only at the next call).
    before = _verl_stepped()
    bad = copy.deepcopy(before)
    corrupt(bad["options"])
    with pytest.raises(ValueError, match=match):
        verl.load_state_dict(bad)
    assert _same(verl.state_dict(), before)
    assert not verl._STATE.restored


def test_verl_load_state_dict_refuses_a_generator_state_torch_cannot_take() -> None:
    before = _verl_stepped()
    bad = copy.deepcopy(before)
    bad["generator"] = torch.zeros_like(bad["generator"])
    with pytest.raises(ValueError, match="^state: generator is not a valid generator state"):
        verl.load_state_dict(bad)
    assert _same(verl.state_dict(), before)


def test_verl_load_state_dict_keeps_taking_a_good_state() -> None:
    before = _verl_stepped()
    verl.reset_state()
    verl.load_state_dict(copy.deepcopy(before))
    assert _same(verl.state_dict(), before)
    assert verl._STATE.options == before["options"]
