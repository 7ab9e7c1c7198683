"""verl integration: ``"riskpo"`` advantage estimator and policy loss.

With verl installed, the functions are fetched through verl's own registries
(``get_adv_estimator_fn`` / ``get_policy_loss_fn``), called with verl's tensor layout
and configs, and compared with riskfast's functions and with verl's own GRPO estimator
and vanilla / GSPO losses. Without verl those tests skip with the reason, and a
fallback test checks the same signature contract against a stand-in registry.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import types
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from riskfast.riskpo import advantages as riskpo_advantages
from riskfast.riskpo import policy_loss

# verl 0.9.1's calling conventions (verl/trainer/ppo/core_algos.py).
ADV_PARAMS = ["token_level_rewards", "response_mask", "index", "epsilon", "config"]
LOSS_PARAMS = [
    "old_log_prob",
    "log_prob",
    "advantages",
    "response_mask",
    "loss_agg_mode",
    "config",
    "rollout_is_weights",
]
AGG_MODES = [
    "token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
    "token-sum",
]


@pytest.fixture(autouse=True)
def _fresh_run_state() -> Any:
    """The estimator keeps its generator and tracker in the driver process; start each
    test from none (a state restored by one test would bind the next test's config)."""
    module = sys.modules.get("riskfast.integrations.verl")
    if module is not None:
        module.reset_state()
    yield


def _verl() -> Any:
    try:
        return importlib.import_module("verl.trainer.ppo.core_algos")
    except Exception as err:  # noqa: BLE001 - ImportError or a broken optional dependency
        print(f"verl cannot be imported: {err!r}", file=sys.stderr)
        pytest.skip(
            f"verl not importable ({err!r}); on a CPU: pip install --no-deps verl==0.9.1 && "
            "pip install ray tensordict hydra-core codetiming dill pandas orjson"
        )


def verl_batch(seed: int = 0, prompts: int = 6, group: int = 4, width: int = 7) -> dict[str, Any]:
    """verl's layout: uids interleaved, outcome reward on each response's last token."""
    gen = torch.Generator().manual_seed(seed)
    bs = prompts * group
    order = torch.randperm(bs, generator=gen)
    uids = np.array([f"uid-{int(i) // group}" for i in order], dtype=object)
    lengths = torch.randint(1, width + 1, (bs,), generator=gen)
    lengths[0] = 0  # an empty response
    mask = (torch.arange(width)[None, :] < lengths[:, None]).float()
    outcome = torch.randint(0, 2, (bs,), generator=gen).float()
    rewards = torch.zeros(bs, width)
    last = (lengths - 1).clamp_min(0)
    rewards[torch.arange(bs), last] = outcome * (lengths > 0)
    old = -torch.rand(bs, width, generator=gen) * 2
    new = old + 0.4 * torch.randn(bs, width, generator=gen)
    return {"rewards": rewards, "mask": mask, "uids": uids, "old": old, "new": new}


def question_ids(uids: np.ndarray) -> torch.Tensor:
    seen: dict[Any, int] = {}
    return torch.tensor([seen.setdefault(u, len(seen)) for u in uids.tolist()])


def check_advantage_fn(fn: Callable[..., Any], config: Any) -> None:
    """``fn`` in verl's layout equals riskfast.riskpo.advantages on the outcome rewards."""
    batch = verl_batch()
    adv, returns = fn(
        token_level_rewards=batch["rewards"],
        response_mask=batch["mask"],
        index=batch["uids"],
        config=config,
    )
    assert adv.shape == batch["rewards"].shape and torch.equal(adv, returns)
    expected = riskpo_advantages(
        batch["rewards"].sum(-1),
        question_ids(batch["uids"]),
        bundle_size=3,
        generator=torch.Generator().manual_seed(7),
    ).advantages
    torch.testing.assert_close(adv, expected[:, None] * batch["mask"], rtol=0, atol=0)
    assert adv.abs().sum() > 0


# --------------------------------------------------------------------- with verl
def test_registered_in_verl_registries() -> None:
    core_algos = _verl()
    module = importlib.import_module("riskfast.integrations.verl")
    assert core_algos.get_adv_estimator_fn("riskpo") is module.compute_riskpo_outcome_advantage
    assert core_algos.get_policy_loss_fn("riskpo") is module.compute_policy_loss_riskpo
    assert (
        list(inspect.signature(core_algos.get_adv_estimator_fn("riskpo")).parameters)[:5]
        == ADV_PARAMS
    )
    assert (
        list(inspect.signature(core_algos.get_policy_loss_fn("riskpo")).parameters) == LOSS_PARAMS
    )
    importlib.reload(module)  # a second import must not clash with the first registration
    assert core_algos.get_adv_estimator_fn("riskpo").__module__ == module.__name__


def test_advantage_estimator_through_verl() -> None:
    core_algos = _verl()
    from omegaconf import OmegaConf

    module = importlib.import_module("riskfast.integrations.verl")
    fn = core_algos.get_adv_estimator_fn("riskpo")
    module.reset_state()
    check_advantage_fn(fn, OmegaConf.create({"riskpo": {"bundle_size": 3, "seed": 7}}))

    # The generator advances between calls; state_dict / load_state_dict replay a call.
    config = OmegaConf.create({"riskpo": {"bundle_size": 3, "seed": 7, "quantile": "tracker"}})
    batch = verl_batch(seed=1)
    call = {
        "token_level_rewards": batch["rewards"],
        "response_mask": batch["mask"],
        "index": batch["uids"],
        "config": config,
    }
    module.reset_state()
    fn(**call)
    saved = module.state_dict()
    second, _ = fn(**call)
    module.load_state_dict(saved)
    again, _ = fn(**call)
    assert torch.equal(second, again)


def test_grpo_through_riskpo_matches_verl_grpo() -> None:
    core_algos = _verl()
    from omegaconf import OmegaConf

    batch = verl_batch(seed=2)
    ours, _ = core_algos.get_adv_estimator_fn("riskpo")(
        token_level_rewards=batch["rewards"],
        response_mask=batch["mask"],
        index=batch["uids"],
        config=OmegaConf.create({"riskpo": {"estimator": "grpo"}}),
    )
    theirs, _ = core_algos.compute_grpo_outcome_advantage(
        token_level_rewards=batch["rewards"],
        response_mask=batch["mask"],
        index=batch["uids"],
    )
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def _actor_config(**kwargs: Any) -> Any:
    from verl.workers.config import ActorConfig

    return ActorConfig(strategy="fsdp", rollout_n=4, ppo_micro_batch_size_per_gpu=2, **kwargs)


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("distributed", [False, True])
def test_token_ratio_loss_equals_verl_vanilla(
    mode: str, distributed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    core_algos = _verl()
    monkeypatch.setenv("RISKFAST_VERL_RATIO_LEVEL", "token")
    config = _actor_config(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0)
    batch = verl_batch(seed=3)
    if distributed:  # as verl's actor fills it for a data-parallel step
        config.global_batch_info.update(
            dp_size=2,
            batch_num_tokens=int(batch["mask"].sum()) * 2,
            global_batch_size=int((batch["mask"].sum(-1) > 0).sum()) * 2,
            loss_scale_factor=None,
        )
    adv = torch.randn(batch["mask"].shape[0], generator=torch.Generator().manual_seed(5))
    adv = adv[:, None] * batch["mask"]
    weights = torch.rand(batch["mask"].shape, generator=torch.Generator().manual_seed(6)) + 0.5
    for is_weights in (None, weights):
        results = []
        for name in ("riskpo", "vanilla"):
            logp = batch["new"].clone().requires_grad_(True)
            loss, metrics = core_algos.get_policy_loss_fn(name)(
                old_log_prob=batch["old"],
                log_prob=logp,
                advantages=adv,
                response_mask=batch["mask"],
                loss_agg_mode=mode,
                config=config,
                rollout_is_weights=is_weights,
            )
            loss.backward()
            results.append((loss.detach(), logp.grad.clone(), metrics))
        (ours, g_ours, m_ours), (theirs, g_theirs, m_theirs) = results
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g_ours, g_theirs, rtol=1e-5, atol=1e-7)
        for key in ("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"):
            assert m_ours[key] == pytest.approx(m_theirs[key], rel=1e-5, abs=1e-7), key


def test_sequence_ratio_loss_equals_verl_gspo_value(monkeypatch: pytest.MonkeyPatch) -> None:
    core_algos = _verl()
    monkeypatch.delenv("RISKFAST_VERL_RATIO_LEVEL", raising=False)
    config = _actor_config(clip_ratio_low=0.2, clip_ratio_high=0.2, clip_ratio_c=1e9)
    batch = verl_batch(seed=4)
    adv = torch.randn(batch["mask"].shape[0], generator=torch.Generator().manual_seed(5))
    adv = adv[:, None] * batch["mask"]
    values = []
    for name in ("riskpo", "gspo"):
        loss, _ = core_algos.get_policy_loss_fn(name)(
            old_log_prob=batch["old"],
            log_prob=batch["new"],
            advantages=adv,
            response_mask=batch["mask"],
            loss_agg_mode="seq-mean-token-mean",
            config=config,
        )
        values.append(loss)
    torch.testing.assert_close(values[0], values[1], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------- without verl
def _stand_in_verl(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """A registry with verl 0.9.1's decorator API, installed in place of verl."""
    core = types.ModuleType("verl.trainer.ppo.core_algos")
    core.ADV_ESTIMATOR_REGISTRY = {}
    core.POLICY_LOSS_REGISTRY = {}

    def register_adv_est(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
            if name in core.ADV_ESTIMATOR_REGISTRY and core.ADV_ESTIMATOR_REGISTRY[name] != fn:
                raise ValueError(f"Adv estimator {name} has already been registered")
            core.ADV_ESTIMATOR_REGISTRY[name] = fn
            return fn

        return decorator

    def register_policy_loss(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
            core.POLICY_LOSS_REGISTRY[name] = fn
            return fn

        return decorator

    core.register_adv_est = register_adv_est
    core.register_policy_loss = register_policy_loss
    core.get_adv_estimator_fn = lambda name: core.ADV_ESTIMATOR_REGISTRY[name]
    core.get_policy_loss_fn = lambda name: core.POLICY_LOSS_REGISTRY[name]
    for name in ("verl", "verl.trainer", "verl.trainer.ppo"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "verl.trainer.ppo.core_algos", core)
    sys.modules["verl.trainer.ppo"].core_algos = core  # type: ignore[attr-defined]
    monkeypatch.delitem(sys.modules, "riskfast.integrations.verl", raising=False)
    return core


def test_signature_contract_without_verl(monkeypatch: pytest.MonkeyPatch) -> None:
    core = _stand_in_verl(monkeypatch)
    module = importlib.import_module("riskfast.integrations.verl")
    adv_fn = core.get_adv_estimator_fn("riskpo")
    loss_fn = core.get_policy_loss_fn("riskpo")
    assert adv_fn is module.compute_riskpo_outcome_advantage
    assert loss_fn is module.compute_policy_loss_riskpo
    adv_params = inspect.signature(adv_fn).parameters
    assert list(adv_params)[:5] == ADV_PARAMS
    assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in adv_params.values())
    assert list(inspect.signature(loss_fn).parameters) == LOSS_PARAMS

    module.reset_state()
    check_advantage_fn(adv_fn, {"riskpo": {"bundle_size": 3, "seed": 7}})

    # The loss with a plain mapping config equals riskfast.riskpo.policy_loss.
    batch = verl_batch(seed=8)
    adv = torch.randn(batch["mask"].shape[0], generator=torch.Generator().manual_seed(1))
    config = {
        "clip_ratio": 0.2,
        "clip_ratio_low": 0.2,
        "clip_ratio_high": 0.28,
        "clip_ratio_c": 3.0,
        "global_batch_info": {},
    }
    loss, metrics = loss_fn(
        old_log_prob=batch["old"],
        log_prob=batch["new"],
        advantages=adv[:, None] * batch["mask"],
        response_mask=batch["mask"],
        loss_agg_mode="token-mean",
        config=config,
    )
    expected, _ = policy_loss(
        batch["new"], batch["old"], adv, batch["mask"], eps_low=0.2, eps_high=0.28, dual_clip=3.0
    )
    torch.testing.assert_close(loss, expected)
    assert set(metrics) >= {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"}
    with pytest.raises(ValueError, match="config.riskpo"):
        adv_fn(
            token_level_rewards=batch["rewards"],
            response_mask=batch["mask"],
            index=batch["uids"],
            config={"riskpo": {"bundel_size": 3}},
        )


# ------------------------------------------------ issue 11: options, atomic calls, checkpoints
def _estimator_call(config: Any, seed: int = 1) -> dict[str, Any]:
    batch = verl_batch(seed=seed)
    return {
        "token_level_rewards": batch["rewards"],
        "response_mask": batch["mask"],
        "index": batch["uids"],
        "config": config,
    }


def test_options_from_config_names_each_bad_value() -> None:
    _verl()
    module = importlib.import_module("riskfast.integrations.verl")
    cases = [
        ({"seed": "7"}, TypeError, "seed"),
        ({"seed": -1}, ValueError, "seed"),
        ({"seed": 2**64}, ValueError, "seed"),
        ({"gamma": 0.0}, ValueError, "gamma"),
        ({"bundle_size": 2**63}, ValueError, "bundle_size"),
        ({"quantile_mode": "kde"}, ValueError, "quantile"),
    ]
    for section, error, name in cases:
        with pytest.raises(error, match=f"^{name}:"):
            module.options_from_config({"riskpo": section})


def test_saved_state_carries_its_options_and_a_resumed_config_must_match() -> None:
    _verl()
    module = importlib.import_module("riskfast.integrations.verl")
    tracked = {"bundle_size": 3, "seed": 7, "quantile": "tracker", "gamma": 0.2}
    fn = module.compute_riskpo_outcome_advantage
    fn(**_estimator_call({"riskpo": tracked}))
    saved = module.state_dict()
    assert saved["options"]["bundle_size"] == 3 and saved["options"]["gamma"] == 0.2
    expected, _ = fn(**_estimator_call({"riskpo": tracked}, seed=2))

    module.reset_state()
    module.load_state_dict(saved)
    restored = module.state_dict()
    for other, name in (
        ({**tracked, "bundle_size": 5}, "bundle_size"),
        ({**tracked, "gamma": 0.1}, "gamma"),
        ({**tracked, "quantile": "empirical"}, "quantile"),
    ):
        with pytest.raises(ValueError, match=f"^{name}: the checkpoint was saved with"):
            fn(**_estimator_call({"riskpo": other}, seed=2))
        assert torch.equal(module.state_dict()["generator"], restored["generator"])
    # a rejected step (non-finite rewards) leaves the restored state alone too
    bad = _estimator_call({"riskpo": tracked}, seed=2)
    bad["token_level_rewards"] = bad["token_level_rewards"] * float("nan")
    with pytest.raises(ValueError, match=r"^token_level_rewards \(row sums\):"):
        fn(**bad)
    assert torch.equal(module.state_dict()["generator"], restored["generator"])
    assert module.state_dict()["tracker"]["num_updates"] == restored["tracker"]["num_updates"]
    # the matching config (another seed is fine: the restored generator wins) continues
    again, _ = fn(**_estimator_call({"riskpo": {**tracked, "seed": 99}}, seed=2))
    assert torch.equal(again, expected)


def test_the_estimator_names_its_own_bad_inputs_and_changes_nothing() -> None:
    _verl()
    module = importlib.import_module("riskfast.integrations.verl")
    fn = module.compute_riskpo_outcome_advantage
    config = {"riskpo": {"bundle_size": 3, "seed": 7, "quantile": "tracker"}}
    fn(**_estimator_call(config))
    before = module.state_dict()
    good = _estimator_call(config, seed=2)
    rewards, mask, uids = good["token_level_rewards"], good["response_mask"], good["index"]
    cases = [
        ({"token_level_rewards": rewards.tolist()}, TypeError, r"^token_level_rewards:"),
        ({"token_level_rewards": rewards.to(torch.complex64)}, TypeError, r"^token_level_rewards:"),
        ({"token_level_rewards": rewards[0]}, ValueError, r"^token_level_rewards:"),
        ({"response_mask": mask.tolist()}, TypeError, r"^response_mask:"),
        ({"index": 3}, TypeError, r"^index:"),
        ({"index": [[u] for u in uids.tolist()]}, TypeError, r"^index: every uid must be hashable"),
        ({"index": uids[:-1]}, ValueError, r"^index:"),
    ]
    for change, error, match in cases:
        with pytest.raises(error, match=match):
            fn(**{**good, **change})
        after = module.state_dict()
        assert torch.equal(after["generator"], before["generator"]), match
        assert torch.equal(after["tracker"]["values"], before["tracker"]["values"]), match
    inf = rewards.clone()
    inf[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"^token_level_rewards \(row sums\):"):
        fn(**{**good, "token_level_rewards": inf})
    assert torch.equal(module.state_dict()["generator"], before["generator"])


@pytest.mark.parametrize(
    ("corrupt", "match"),
    [
        (lambda s: s.update(version=1), "^state: not a RiskPO state"),
        (lambda s: s.update(generator=torch.zeros(3, dtype=torch.uint8)), "^state: generator"),
        (lambda s: s["tracker"].update(values=torch.tensor([0.0, float("inf")])), "^state: values"),
        (lambda s: s["tracker"].update(alpha=0.3), "^alpha: the checkpoint"),
    ],
)
def test_a_corrupt_saved_state_is_refused_whole(corrupt: Any, match: str) -> None:
    _verl()
    module = importlib.import_module("riskfast.integrations.verl")
    config = {"riskpo": {"bundle_size": 3, "quantile": "tracker"}}
    module.compute_riskpo_outcome_advantage(**_estimator_call(config))
    good = module.state_dict()
    bad = module.state_dict()
    corrupt(bad)
    with pytest.raises(ValueError, match=match):
        module.load_state_dict(bad)
    current = module.state_dict()
    assert torch.equal(current["generator"], good["generator"])
    assert torch.equal(current["tracker"]["values"], good["tracker"]["values"])


class _VerlCheckpointing:
    """Stand-in for verl 0.9's trainer checkpointing (``RayPPOTrainer`` and the v1
    ``PPOTrainer``): the folder ``default_local_dir/global_step_N`` with ``data.pt``,
    ``latest_checkpointed_iteration.txt``, and the three ``resume_mode``s."""

    def __init__(self, root: Any, resume_mode: str = "auto", resume_from_path: Any = None):
        trainer = types.SimpleNamespace(
            default_local_dir=str(root), resume_mode=resume_mode,
            resume_from_path=None if resume_from_path is None else str(resume_from_path),
        )
        self.config = types.SimpleNamespace(trainer=trainer)
        self.global_steps = 0

    def _save_checkpoint(self) -> None:
        import os

        folder = os.path.join(self.config.trainer.default_local_dir, f"global_step_{self.global_steps}")
        os.makedirs(folder, exist_ok=True)
        torch.save({"dataloader": self.global_steps}, os.path.join(folder, "data.pt"))
        with open(os.path.join(self.config.trainer.default_local_dir,
                               "latest_checkpointed_iteration.txt"), "w") as handle:
            handle.write(str(self.global_steps))

    def _load_checkpoint(self) -> None:
        import os

        self.global_steps = 0
        mode, root = self.config.trainer.resume_mode, self.config.trainer.default_local_dir
        if mode == "disable":
            return
        if mode == "auto":
            latest = os.path.join(root, "latest_checkpointed_iteration.txt")
            if not os.path.exists(latest):
                return
            with open(latest) as handle:
                folder = os.path.join(root, f"global_step_{int(handle.read())}")
        else:
            folder = self.config.trainer.resume_from_path
        self.global_steps = int(folder.split("global_step_")[-1])
        assert torch.load(os.path.join(folder, "data.pt"))["dataloader"] == self.global_steps


def _verl_trainer_source(name: str) -> str:
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("verl")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("verl is not installed: pip install --no-deps verl==0.9.1")
    return (Path(spec.submodule_search_locations[0]) / name).read_text()


@pytest.mark.parametrize("path", ["trainer/ppo/ray_trainer.py", "trainer/ppo/v1/trainer_base.py"])
def test_verl_trainers_checkpoint_as_the_mixin_expects(path: str) -> None:
    """The stand-in above follows the installed verl: each trainer defines both methods,
    names the folder ``default_local_dir/global_step_{global_steps}`` and resumes from
    ``resume_from_path`` or the latest folder, setting ``global_steps`` from its name
    (read from the source: importing the trainers needs GPU-only packages)."""
    import ast

    source = _verl_trainer_source(path)
    methods = {node.name: ast.get_source_segment(source, node) for node in ast.walk(ast.parse(source))
               if isinstance(node, ast.FunctionDef)}
    save, load = methods["_save_checkpoint"], methods["_load_checkpoint"]
    assert 'self.config.trainer.default_local_dir, f"global_step_{self.global_steps}"' in save
    assert "find_latest_ckpt_path(checkpoint_folder)" in load
    assert "global_step_folder = self.config.trainer.resume_from_path" in load
    assert 'self.global_steps = int(global_step_folder.split("global_step_")[-1])' in load
    assert 'resume_mode == "disable"' in load


def test_checkpoint_mixin_resumes_the_bundles_and_tracker_exactly(tmp_path: Any) -> None:
    """A run saved at step 2 and resumed (auto or resume_path) draws at step 3 the
    advantages the uninterrupted run drew; without a saved state the resume warns and
    starts afresh; nothing is written before any advantage exists."""
    import os

    _verl()
    module = importlib.import_module("riskfast.integrations.verl")

    class Trainer(module.RiskPOCheckpointMixin, _VerlCheckpointing):
        pass

    config = {"riskpo": {"bundle_size": 3, "seed": 5, "quantile": "tracker", "gamma": 0.2}}
    fn = module.compute_riskpo_outcome_advantage
    run = Trainer(tmp_path / "run")
    run.global_steps = 1
    run._save_checkpoint()  # no advantage yet: verl's files only
    assert not (tmp_path / "run" / "global_step_1" / module.STATE_FILE).exists()
    for step in (1, 2):
        run.global_steps = step
        fn(**_estimator_call(config, seed=step))
    run._save_checkpoint()
    expected, _ = fn(**_estimator_call(config, seed=3))
    fresh_state = module.state_dict()

    for resumed in (Trainer(tmp_path / "run"),
                    Trainer(tmp_path / "elsewhere", "resume_path",
                            os.path.relpath(tmp_path / "run" / "global_step_2"))):
        module.reset_state()
        resumed._load_checkpoint()
        assert resumed.global_steps == 2
        got, _ = fn(**_estimator_call(config, seed=3))
        assert torch.equal(got, expected)
        assert torch.equal(module.state_dict()["tracker"]["values"], fresh_state["tracker"]["values"])

    # the mixin's file holds the whole state; a resume with other options is refused
    module.reset_state()
    Trainer(tmp_path / "run")._load_checkpoint()
    with pytest.raises(ValueError, match="^bundle_size: the checkpoint was saved with"):
        fn(**_estimator_call({"riskpo": {**config["riskpo"], "bundle_size": 4}}, seed=3))

    # a checkpoint written without the mixin: verl resumes, RiskPO warns and starts afresh
    module.reset_state()
    plain = _VerlCheckpointing(tmp_path / "plain")
    plain.global_steps = 2
    plain._save_checkpoint()
    with pytest.warns(UserWarning, match="starts? afresh"):
        Trainer(tmp_path / "plain")._load_checkpoint()
    first, _ = fn(**_estimator_call(config, seed=1))
    module.reset_state()
    assert torch.equal(first, fn(**_estimator_call(config, seed=1))[0])
    # resume disabled or nothing to resume from: no restore, no warning
    import warnings

    for idle in (Trainer(tmp_path / "run", "disable"), Trainer(tmp_path / "empty")):
        module.reset_state()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            idle._load_checkpoint()
        assert idle.global_steps == 0
        with pytest.raises(RuntimeError, match="no state yet"):
            module.state_dict()
