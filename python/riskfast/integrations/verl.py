"""RiskPO in verl: the advantage estimator ``"riskpo"`` and the policy loss ``"riskpo"``.

Importing this module registers both in verl's registries (``register_adv_est`` and
``register_policy_loss`` of ``verl.trainer.ppo.core_algos``). verl imports it itself
when told to::

    VERL_USE_EXTERNAL_MODULES=riskfast.integrations.verl python -m verl.trainer.main_ppo \\
        algorithm.adv_estimator=riskpo \\
        actor_rollout_ref.actor.policy_loss.loss_mode=riskpo \\
        +algorithm.riskpo.bundle_size=5 +algorithm.riskpo.alpha=0.2 +algorithm.riskpo.beta=0.8

**Advantage estimator** :func:`compute_riskpo_outcome_advantage`, verl's signature
``(token_level_rewards [bs, T], response_mask [bs, T], index (np.ndarray of uids),
epsilon, config) -> (advantages [bs, T], returns [bs, T])``. The outcome reward of a
response is the sum of its token-level rewards; responses sharing a uid answer the same
prompt. The advantages are :func:`riskfast.riskpo.advantages` of those rewards, spread
over the response tokens (times ``response_mask``), returned twice as verl's GRPO does.
Its options come from ``config.riskpo`` (``algorithm.riskpo`` in verl's config, added
with ``+algorithm.riskpo.<key>=...``; every key optional): ``estimator``,
``bundle_size``, ``alpha``, ``beta``, ``omega``, ``form``, ``w_mix``,
``natural_baseline``, ``w_upper``, ``normalize``, ``center``, ``credit``, ``score``,
``quantile``, ``shuffle``, ``drop_last`` (the arguments of
:func:`~riskfast.riskpo.advantages`), ``seed`` (of the bundling generator, default 0)
and ``gamma`` (of the quantile tracker, default 0.1). ``epsilon`` and
``norm_adv_by_std_in_grpo`` are not used (RiskPO normalises by the bundle's score std).
Every key is validated at the first call, with errors naming it.

**Checkpoints: verl's do not include RiskPO's state.** verl computes advantages on the
driver process over the whole batch, so the bundling generator and the quantile tracker
live there, in this module. verl 0.9's trainers (``RayPPOTrainer``, the v1 trainers)
save a fixed set of things from the driver (the workers' actor/critic checkpoints, whose
checkpoint managers hold the extra-state hooks, in the worker processes; the
dataloader's ``data.pt``; the TransferQueue state) and offer no hook for driver-side
state, so this module cannot add its state to them without patching private trainer
methods. What a resumed verl run does without it: the generator is seeded again from
``seed`` (the bundles differ from those of the uninterrupted run, with the same
distribution) and a tracker starts again from the first resumed step's empirical
quantiles. To resume exactly, mix :class:`RiskPOCheckpointMixin` into the trainer
(``class Trainer(RiskPOCheckpointMixin, RayPPOTrainer)``): it saves :func:`state_dict`
into each ``global_step_N`` folder verl writes and restores it with
:func:`load_state_dict` when verl resumes from one. A trainer of another shape can call
those two functions itself.

The saved state holds the options that shape it (``bundle_size``, ``shuffle``; with a
tracker ``alpha``, ``beta``, ``gamma``, ``score``, ``drop_last``); after
:func:`load_state_dict` the config of the next call must have the same values, else
``ValueError`` names the option (a different ``seed`` is fine: the restored generator
supersedes it). Without a restore, changing those options between calls starts a fresh
state.

**Policy loss** :func:`compute_policy_loss_riskpo`, verl's ``PolicyLossFn`` signature
``(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
rollout_is_weights) -> (loss, metrics)``. It is :func:`riskfast.riskpo.policy_loss`
with the clip range ``clip_ratio_low`` / ``clip_ratio_high`` (falling back to
``clip_ratio``), the dual clip ``clip_ratio_c`` (as verl's vanilla loss) and verl's
``loss_agg_mode`` with its global normalisers (``config.global_batch_info``:
``dp_size``, ``batch_num_tokens``, ``global_batch_size``, ``loss_scale_factor``). The
importance ratio is the paper's sequence ratio unless the environment variable
``RISKFAST_VERL_RATIO_LEVEL=token`` (or a ``riskpo_ratio_level`` key in a dict-like
config) says otherwise; verl's ``ActorConfig`` is a closed dataclass, so the loss
cannot read a ``riskpo`` section from it. ``rollout_is_weights`` multiply the per-token
surrogate before aggregation, as in verl. The entropy bonus and KL loss stay verl's
(the actor adds them after the policy loss).

With ``RISKFAST_VERL_RATIO_LEVEL=token`` the loss equals verl's ``"vanilla"`` loss on
the same inputs; the sequence ratio gives GSPO's value (without GSPO's clamp at 10).

**Fused policy loss** :func:`compute_fused_policy_loss_riskpo`: the same loss, config
and metrics from the LM head's inputs (``hidden_states[bs, T, H]``, ``vocab_weights[V,
H]``, the response ``target_ids``) instead of log-probs, through
:func:`riskfast.ops.fused_linear_policy_loss` (gradients in the same chunked pass, never
``[bs * T, V]``). verl's registry passes log-probs to a policy loss, so this one is not
registered: an actor that already runs verl's fused kernels (``use_fused_kernels``, which
exposes the hidden states and the head) calls it in place of computing log-probs and
then the registered loss.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from .._checks import (
    UINT64_MAX,
    require_finite,
    require_int,
    require_number,
    require_real,
    require_tensor,
)
from ..riskpo import AdvantageOptions, QuantileTracker
from ..riskpo.loss import RATIO_LEVELS, policy_loss
from ..riskpo.module import (
    DEFAULT_GAMMA,
    check_state_options,
    checked_run_state,
    run_state,
    state_options,
)
from ..riskpo.objective import pending_advantages

ADVANTAGE_ESTIMATOR_NAME = "riskpo"
"""``algorithm.adv_estimator`` value registered by this module."""

POLICY_LOSS_NAME = "riskpo"
"""``actor.policy_loss.loss_mode`` value registered by this module."""

RATIO_LEVEL_ENV = "RISKFAST_VERL_RATIO_LEVEL"
"""Environment variable choosing the ratio of the verl policy loss (default sequence)."""

_ADVANTAGE_KEYS = {name: name for name in AdvantageOptions.names()}
_ADVANTAGE_KEYS.update({"quantile_mode": "quantile"})


def _get(config: Any, key: str, default: Any = None) -> Any:
    """``config[key]`` for dicts, DictConfigs and verl's dataclass configs alike."""
    if config is None:
        return default
    if isinstance(config, Mapping):
        return config.get(key, default)
    getter = getattr(config, "get", None)
    if callable(getter):
        try:
            return getter(key, default)
        except (KeyError, AttributeError):
            return default
    return getattr(config, key, default)


def riskpo_section(config: Any) -> dict[str, Any]:
    """The ``riskpo`` options of an algorithm config as a plain dict (empty if absent)."""
    section = _get(config, "riskpo")
    if section is None:
        return {}
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(section, DictConfig):
            section = OmegaConf.to_container(section, resolve=True)
    except ImportError:  # pragma: no cover - verl always has omegaconf
        pass
    if not isinstance(section, Mapping):
        raise TypeError(f"config.riskpo: expected a mapping, got {type(section).__name__}")
    return dict(section)


def options_from_config(config: Any) -> tuple[AdvantageOptions, int, float]:
    """``(AdvantageOptions, seed, gamma)`` from ``config.riskpo``; unknown keys raise.

    Every value is validated here, with errors naming the option (``seed`` an int in
    ``[0, 2**64)``, ``gamma`` a number ``> 0``).
    """
    section = riskpo_section(config)
    known = set(_ADVANTAGE_KEYS) | {"seed", "gamma"}
    unknown = sorted(set(section) - known)
    if unknown:
        raise ValueError(f"config.riskpo: unknown key(s) {unknown}; known: {sorted(known)}")
    kwargs = {_ADVANTAGE_KEYS[k]: v for k, v in section.items() if k in _ADVANTAGE_KEYS}
    seed = require_int("seed", section.get("seed", 0), low=0, high=UINT64_MAX)
    gamma = require_number("gamma", section.get("gamma", DEFAULT_GAMMA), low=0.0, low_open=True)
    return AdvantageOptions(**kwargs), seed, gamma


class _RunState:
    """Bundling generator and quantile tracker of the driver process.

    Made from the config at the first call. A later call whose config shapes the state
    differently (other seed, bundling or tracker options) starts a fresh state, unless
    the state was restored by :func:`load_state_dict`: then the config must match the
    restored options (``ValueError`` naming the option), so that a resumed run cannot
    silently continue with other options (a different ``seed`` is fine: the restored
    generator supersedes it).
    """

    def __init__(self) -> None:
        self.options: dict[str, Any] | None = None
        self.seed: int | None = None
        self.restored = False
        self.generator = torch.Generator()
        self.tracker: QuantileTracker | None = None

    def for_options(self, options: AdvantageOptions, seed: int, gamma: float) -> _RunState:
        """This state, or a fresh one for other options; a fresh one is not installed
        here (the caller installs it once its step has succeeded)."""
        wanted = state_options(options, gamma)
        if self.restored and self.options is not None:
            check_state_options(self.options, wanted, "run's config")
            return self
        if (wanted, seed) == (self.options, self.seed):
            return self
        fresh = _RunState()
        fresh.options, fresh.seed = wanted, seed
        fresh.generator = torch.Generator().manual_seed(seed)
        if wanted["quantile"] == "tracker":
            fresh.tracker = QuantileTracker(options.alpha, options.beta, gamma)
        return fresh


_STATE = _RunState()


def reset_state() -> None:
    """Forget the generator and tracker (the next call reseeds from the config)."""
    global _STATE
    _STATE = _RunState()


def state_dict() -> dict[str, Any]:
    """The estimator's run state (generator, tracker, and the options that shape them),
    to save beside a verl checkpoint (see the module docstring)."""
    if _STATE.options is None:
        raise RuntimeError(
            "riskfast.integrations.verl.state_dict: no state yet (no advantage was computed "
            "in this process)"
        )
    return run_state(_STATE.options, int(_STATE.seed or 0), _STATE.generator, _STATE.tracker)


def load_state_dict(state: dict[str, Any]) -> None:
    """Restore :func:`state_dict`. The whole state is checked before any of it is taken;
    afterwards the config of the next call must have the saved options."""
    options, seed, generator_state = checked_run_state(state, torch.Generator(), what="run")
    generator = torch.Generator()
    generator.set_state(generator_state)
    tracker = None
    if options.get("quantile") == "tracker":
        tracker = QuantileTracker(options["alpha"], options["beta"], options["gamma"])
        tracker.load_state_dict(state["tracker"])  # checked above: cannot fail
    fresh = _RunState()
    fresh.options, fresh.seed, fresh.restored = dict(options), seed, True
    fresh.generator, fresh.tracker = generator, tracker
    global _STATE
    _STATE = fresh


STATE_FILE = "riskpo_state.pt"
"""Name of the file :class:`RiskPOCheckpointMixin` writes into verl's ``global_step_N/``."""


def _trainer_option(trainer: Any, key: str, default: Any = None) -> Any:
    return _get(trainer.config.trainer, key, default)


def _resumed_folder(trainer: Any) -> str | None:
    """The ``global_step_N`` folder verl 0.9's ``_load_checkpoint`` just resumed from, or
    None when it did not resume (``resume_mode`` "disable", or "auto" with no checkpoint)."""
    mode = _trainer_option(trainer, "resume_mode", "auto")
    if mode == "disable" or not trainer.global_steps:
        return None
    if mode == "resume_path":
        folder = str(_trainer_option(trainer, "resume_from_path"))
    else:
        folder = _step_folder(trainer)
    return os.path.abspath(folder)


def _step_folder(trainer: Any) -> str:
    """``default_local_dir/global_step_N``, where verl 0.9 saves step N's checkpoint."""
    return os.path.join(
        str(_trainer_option(trainer, "default_local_dir")), f"global_step_{trainer.global_steps}"
    )


class RiskPOCheckpointMixin:
    """Saves RiskPO's driver-side state (bundling generator, quantile tracker, the options
    that shape them) in verl's checkpoints and restores it on resume, so a resumed run
    draws the bundles and quantiles the uninterrupted run would have drawn.

    Put it first among the bases of the verl trainer the run uses::

        from verl.trainer.ppo.ray_trainer import RayPPOTrainer
        from riskfast.integrations.verl import RiskPOCheckpointMixin

        class Trainer(RiskPOCheckpointMixin, RayPPOTrainer):
            pass

    It wraps verl 0.9's ``_save_checkpoint`` and ``_load_checkpoint``, which
    ``RayPPOTrainer`` and the v1 ``PPOTrainer`` (``verl.trainer.ppo.v1.trainer_base``)
    both define, and reads the ``trainer`` options they read (``default_local_dir``,
    ``resume_mode``, ``resume_from_path``):

    - after verl writes ``default_local_dir/global_step_N/``, it writes
      :data:`STATE_FILE` there (atomically; nothing when no advantage has been computed
      yet, e.g. another estimator). A copy to ``default_hdfs_dir`` is not made: verl 0.9
      cannot resume from HDFS either.
    - after verl resumes from a ``global_step_N`` folder, it restores the state saved
      there (:func:`load_state_dict`: checked whole, and the run's config must then have
      the saved options). A folder without the file (a checkpoint written without the
      mixin) gives a ``UserWarning`` and the fresh state of an unpatched resume.
    """

    def _save_checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        result = super()._save_checkpoint(*args, **kwargs)  # type: ignore[misc]
        if _STATE.options is not None:
            folder = _step_folder(self)
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, STATE_FILE)
            torch.save(state_dict(), path + ".tmp")
            os.replace(path + ".tmp", path)
        return result

    def _load_checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        result = super()._load_checkpoint(*args, **kwargs)  # type: ignore[misc]
        folder = _resumed_folder(self)
        if folder is not None:
            path = os.path.join(folder, STATE_FILE)
            if os.path.exists(path):
                load_state_dict(torch.load(path, weights_only=True))
            else:
                warnings.warn(
                    f"{path} not found (a checkpoint written without RiskPOCheckpointMixin): "
                    "RiskPO's bundling generator and quantile tracker start afresh",
                    UserWarning,
                    stacklevel=2,
                )
        return result


def uids_to_question_ids(index: Any) -> torch.Tensor:
    """Integer ids ``0..Q-1`` in order of first appearance for any array of uids."""
    values = index.tolist() if isinstance(index, np.ndarray | torch.Tensor) else list(index)
    ids: dict[Any, int] = {}
    try:
        return torch.tensor([ids.setdefault(v, len(ids)) for v in values], dtype=torch.long)
    except TypeError as err:  # an unhashable uid
        raise TypeError(f"index: every uid must be hashable ({err})") from None


def compute_riskpo_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray,
    epsilon: float = 1e-6,
    config: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RiskPO advantages in verl's layout (see the module docstring).

    Args:
        token_level_rewards: ``[bs, T]``; a response's reward is its row sum.
        response_mask: ``[bs, T]``, 1 on response tokens.
        index: ``[bs]`` uids (any hashable values); equal uid = same prompt.
        epsilon: unused (verl passes it to every outcome estimator).
        config: the algorithm config; options are read from ``config.riskpo``.
        **kwargs: other keywords verl may pass (ignored).

    Returns:
        ``(advantages, returns)``, both ``[bs, T]`` and equal, zero outside the mask.
    """
    global _STATE
    options, seed, gamma = options_from_config(config)
    require_tensor("token_level_rewards", token_level_rewards)
    require_real("token_level_rewards", token_level_rewards)
    require_tensor("response_mask", response_mask)
    if isinstance(index, (str, bytes)) or not hasattr(index, "__len__"):
        raise TypeError(f"index: expected an array of uids, got {type(index).__name__}")
    if token_level_rewards.dim() != 2:
        raise ValueError(
            f"token_level_rewards: expected [bs, T], got shape {tuple(token_level_rewards.shape)}"
        )
    if response_mask.shape != token_level_rewards.shape:
        raise ValueError(
            f"response_mask: shape {tuple(response_mask.shape)} differs from token_level_rewards "
            f"{tuple(token_level_rewards.shape)}"
        )
    if len(index) != token_level_rewards.shape[0]:
        raise ValueError(
            f"index: has {len(index)} uids for {token_level_rewards.shape[0]} responses"
        )
    question_ids = uids_to_question_ids(index)
    state = _STATE.for_options(options, seed, gamma)
    scores = token_level_rewards.detach().float().sum(dim=-1).cpu()
    # a response's reward is its row sum: a non-finite one is named here, as verl's input
    require_finite("token_level_rewards (row sums)", scores)
    with torch.no_grad():
        # The generator and tracker move (and a fresh state is installed) only once the
        # whole call has succeeded: a refused call leaves the run state as it was.
        result, commit = pending_advantages(
            scores,
            question_ids,
            options,
            tracker=state.tracker,
            generator=state.generator,
        )
        per_response = result.advantages.to(device=token_level_rewards.device)
        advantages = per_response[:, None] * response_mask.to(per_response.dtype)
    commit()
    _STATE = state
    return advantages, advantages


def _ratio_level(config: Any) -> str:
    level = _get(config, "riskpo_ratio_level") if isinstance(config, Mapping) else None
    level = level or os.environ.get(RATIO_LEVEL_ENV, "sequence")
    if level not in RATIO_LEVELS:
        raise ValueError(f"{RATIO_LEVEL_ENV}: must be one of {RATIO_LEVELS}, got {level!r}")
    return level


def _aggregation(
    loss_agg_mode: str, info: Mapping[str, Any], width: int
) -> tuple[str, float | None, int | None]:
    """``(agg, num_items, max_len)`` reproducing verl's ``agg_loss`` with global info."""
    dp_size = int(info.get("dp_size") or 1)
    if loss_agg_mode == "token-sum":
        return "token-mean", 1.0 / dp_size, None
    if loss_agg_mode == "token-mean":
        tokens = info.get("batch_num_tokens")
        if tokens is None and dp_size > 1:
            raise ValueError(
                "config.global_batch_info: batch_num_tokens is needed when dp_size > 1"
            )
        return "token-mean", None if tokens is None else float(tokens) / dp_size, None
    if loss_agg_mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean"):
        sequences = info.get("global_batch_size")
        if sequences is None and dp_size > 1:
            raise ValueError(
                "config.global_batch_info: global_batch_size is needed when dp_size > 1"
            )
        num_items = None if sequences is None else float(sequences) / dp_size
        max_len = None
        if loss_agg_mode == "seq-mean-token-sum-norm":
            factor = info.get("loss_scale_factor")
            max_len = int(factor) if factor is not None else width
        return loss_agg_mode, num_items, max_len
    raise ValueError(f"loss_agg_mode: unsupported {loss_agg_mode!r}")


def compute_policy_loss_riskpo(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """RiskPO's clipped surrogate with verl's signature and metrics.

    Args:
        old_log_prob, log_prob: ``[bs, T]`` behaviour and current log-probs.
        advantages: ``[bs, T]`` (or ``[bs]``).
        response_mask: ``[bs, T]``.
        loss_agg_mode: verl's aggregation mode.
        config: the actor config (``clip_ratio*``, ``clip_ratio_c``,
            ``global_batch_info``).
        rollout_is_weights: optional ``[bs, T]`` weights on the per-token surrogate.

    Returns:
        ``(loss, metrics)`` with ``actor/pg_clipfrac``, ``actor/ppo_kl``,
        ``actor/pg_clipfrac_lower`` (as verl's vanilla loss) and ``actor/riskpo_ratio_mean``.
    """
    mask = response_mask.bool()
    loss, metrics = policy_loss(
        log_prob, old_log_prob, advantages, mask, token_weights=rollout_is_weights,
        **_loss_options(config, loss_agg_mode, int(log_prob.shape[-1])),
    )  # fmt: skip
    return loss, _verl_metrics(metrics, log_prob, old_log_prob, mask)


def compute_fused_policy_loss_riskpo(
    hidden_states: torch.Tensor,
    vocab_weights: torch.Tensor,
    target_ids: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, dict[str, Any], torch.Tensor]:
    """:func:`compute_policy_loss_riskpo` from the LM head's inputs, fused (issue 15).

    The entry point for a verl actor that runs its model with verl's fused kernels
    (``use_fused_kernels``, which hands over ``hidden_states`` and the head's
    ``vocab_weights`` instead of logits): the log-probs of ``target_ids`` under
    ``(hidden_states @ vocab_weights.T + bias) / temperature`` and RiskPO's loss on them
    are one call of :func:`riskfast.ops.fused_linear_policy_loss`, whose chunked pass
    also computes the gradients of the head and the hidden states (``3 N H V``
    multiply-adds, never ``[N, V]``). The config is read exactly as
    :func:`compute_policy_loss_riskpo` reads it, and the loss, its gradients and the
    metrics equal that function's on the same log-probs.

    Args:
        hidden_states: ``[bs, T, H]`` last hidden states at the positions that predict
            the response tokens; vocab_weights: ``[V, H]``; target_ids: ``[bs, T]`` the
            response token ids (anything on padding).
        old_log_prob, advantages, response_mask, loss_agg_mode, config,
            rollout_is_weights: as :func:`compute_policy_loss_riskpo`.
        bias: ``[V]`` or None; temperature: the rollout temperature (verl divides the
            logits by it); chunk_size: tokens per chunk (default: the op's).

    Returns:
        ``(loss, metrics, log_prob)``: the loss and metrics of
        :func:`compute_policy_loss_riskpo`, and the ``[bs, T]`` log-probs (detached, 0
        on padding) for what verl logs or stores beside them.
    """
    from ..ops import fused_linear_policy_loss

    mask = response_mask.bool()
    options = _loss_options(config, loss_agg_mode, int(target_ids.shape[-1]))
    loss, metrics, log_prob = fused_linear_policy_loss(
        hidden_states, vocab_weights, target_ids, old_log_prob, advantages, mask, bias=bias,
        token_weights=rollout_is_weights, temperature=temperature, chunk_size=chunk_size,
        return_logp=True, **options,
    )  # fmt: skip
    return loss, _verl_metrics(metrics, log_prob, old_log_prob, mask), log_prob


def _loss_options(config: Any, loss_agg_mode: str, width: int) -> dict[str, Any]:
    """The :func:`~riskfast.riskpo.policy_loss` options a verl actor config describes."""
    clip = _get(config, "clip_ratio", 0.2)
    low = _get(config, "clip_ratio_low")
    high = _get(config, "clip_ratio_high")
    info = _get(config, "global_batch_info") or {}
    agg, num_items, max_len = _aggregation(loss_agg_mode, info, width)
    return {
        "ratio_level": _ratio_level(config),
        "eps_low": float(clip if low is None else low),
        "eps_high": float(clip if high is None else high),
        "dual_clip": float(_get(config, "clip_ratio_c", 3.0)),
        "agg": agg,
        "max_len": max_len,
        "num_items": num_items,
    }


def _verl_metrics(
    metrics: dict[str, float], log_prob: torch.Tensor, old_log_prob: torch.Tensor,
    mask: torch.Tensor,
) -> dict[str, Any]:  # fmt: skip
    """riskfast's loss metrics under verl's names (``ppo_kl`` as verl's vanilla loss)."""
    with torch.no_grad():
        diff = torch.clamp(log_prob.detach().float() - old_log_prob.detach().float(), -20.0, 20.0)
        ppo_kl = float(
            torch.where(mask, -diff, torch.zeros_like(diff)).sum() / mask.sum().clamp_min(1)
        )
    return {
        "actor/pg_clipfrac": float(metrics["clip_frac"]),
        "actor/ppo_kl": ppo_kl,
        "actor/pg_clipfrac_lower": float(metrics["dual_clip_frac"]),
        "actor/riskpo_ratio_mean": float(metrics["ratio_mean"]),
    }


def _register() -> None:
    try:
        from verl.trainer.ppo import core_algos
    except ImportError as err:
        raise ImportError(
            "riskfast.integrations.verl needs verl (tested with 0.9.1). On a CPU machine: "
            "`pip install --no-deps verl==0.9.1` then `pip install ray tensordict hydra-core "
            f"codetiming dill pandas orjson` ({err})"
        ) from err
    adv_registry = getattr(core_algos, "ADV_ESTIMATOR_REGISTRY", {})
    previous = adv_registry.get(ADVANTAGE_ESTIMATOR_NAME)
    if previous is not None and getattr(previous, "__module__", None) == __name__:
        del adv_registry[ADVANTAGE_ESTIMATOR_NAME]  # re-import of this module: replace
    core_algos.register_adv_est(ADVANTAGE_ESTIMATOR_NAME)(compute_riskpo_outcome_advantage)
    core_algos.register_policy_loss(POLICY_LOSS_NAME)(compute_policy_loss_riskpo)


_register()

__all__ = [
    "ADVANTAGE_ESTIMATOR_NAME",
    "POLICY_LOSS_NAME",
    "RATIO_LEVEL_ENV",
    "STATE_FILE",
    "RiskPOCheckpointMixin",
    "compute_fused_policy_loss_riskpo",
    "compute_policy_loss_riskpo",
    "compute_riskpo_outcome_advantage",
    "load_state_dict",
    "options_from_config",
    "reset_state",
    "state_dict",
    "uids_to_question_ids",
]
