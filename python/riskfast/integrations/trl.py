"""RiskPO in TRL: ``RiskPOConfig`` and ``RiskPOTrainer``, drop-ins for GRPO.

Switching a TRL GRPO run to RiskPO is a change of two names::

    from riskfast.integrations.trl import RiskPOConfig, RiskPOTrainer

    args = RiskPOConfig(output_dir="out", bundle_size=5, risk_alpha=0.2, risk_beta=0.8)
    trainer = RiskPOTrainer(model=model, reward_funcs=reward_fn, args=args,
                            train_dataset=dataset, processing_class=tokenizer)
    trainer.train()

What changes against ``GRPOTrainer`` (spec ``riskpo.md``):

* **Advantages.** After TRL has generated and scored the completions, the rewards of
  the whole generation batch, gathered over all processes exactly as TRL gathers them
  for its own group normalisation, are passed to :func:`riskfast.riskpo.advantages`
  (bundles of ``bundle_size`` prompts, member scores, quantiles, Mixed-VaR weights).
  Every process draws the bundles from its own ``torch.Generator`` seeded with
  ``bundle_seed`` (default: ``seed``), so all ranks compute identical advantages, and
  each keeps the slice of its own completions. Rewards of several reward functions are
  summed with ``reward_weights`` first (TRL's ``sum_then_normalize``).
* **Loss.** :func:`riskfast.riskpo.policy_loss` with the sequence-level (default) or
  token-level ratio, clip ``(epsilon, epsilon_high)``, optional dual clip, the k3 KL to
  the reference when ``beta > 0`` and the static entropy bonus ``entropy_coef``. The
  aggregation follows TRL's ``loss_type``: ``dapo`` (default: token mean over the
  whole generation batch, the same normaliser as TRL), ``bnpo`` (token mean of the
  micro-batch), ``grpo`` (mean over sequences of the token mean) and ``dr_grpo``
  (token sum / ``max_completion_length``, mean over sequences).
* **State.** The bundling generator and, with ``quantile_mode="tracker"``, the
  quantile tracker are saved in every checkpoint (``riskpo_state.pt``) and restored by
  ``trainer.train(resume_from_checkpoint=...)``, so a resumed run continues exactly.
  The file also holds the options that shape that state (``bundle_size``,
  ``shuffle_bundles``; with a tracker also ``risk_alpha``, ``risk_beta``,
  ``tracker_gamma``, ``score``, ``drop_last_bundle``): resuming with other values
  raises ``ValueError`` naming the option, instead of continuing a different run.
* **Metrics** (logged with TRL's): ``riskpo/quantile_alpha``, ``riskpo/quantile_beta``,
  ``riskpo/advantage_mean``, ``riskpo/advantage_std``, ``riskpo/score_mean``,
  ``riskpo/zero_advantage_bundle_frac``, ``riskpo/num_bundles``, ``riskpo/approx_kl``,
  ``riskpo/ratio_mean``, ``clip_ratio/region_mean``, ``entropy``, ``policy_loss``.

RiskPO fields of :class:`RiskPOConfig` and the :func:`riskfast.riskpo.advantages` /
:func:`~riskfast.riskpo.policy_loss` argument each one sets. ``alpha``/``beta`` are
renamed because ``GRPOConfig.beta`` is already TRL's KL coefficient (it stays that,
and becomes ``beta_kl`` of the policy loss), and the clip range stays TRL's
``epsilon``/``epsilon_high``:

=========================  =====================================
RiskPOConfig               riskfast argument
=========================  =====================================
``estimator``              ``estimator`` (``"mvar"`` default)
``bundle_size``            ``bundle_size`` (B, default 5)
``risk_alpha``             ``alpha`` (default 0.2)
``risk_beta``              ``beta`` (default 0.8)
``omega``                  ``omega`` (default 0.5)
``form``                   ``form`` (``"paper"`` default)
``w_mix``                  ``w_mix``
``natural_baseline``       ``natural_baseline``
``w_upper``                ``w_upper``
``normalize``              ``normalize`` (default True)
``center``                 ``center`` (default False)
``credit``                 ``credit``
``score``                  ``score``
``quantile_mode``          ``quantile`` (``"empirical"``/``"tracker"``)
``tracker_gamma``          ``QuantileTracker(gamma=...)``
``shuffle_bundles``        ``shuffle``
``drop_last_bundle``       ``drop_last``
``bundle_seed``            seed of the bundling generator
``ratio_level``            ``ratio_level`` (``"sequence"`` default)
``dual_clip``              ``dual_clip`` (default None: off)
``epsilon``                ``eps_low``
``epsilon_high``           ``eps_high`` (default: ``epsilon``)
``beta``                   ``beta_kl``
``entropy_coef``           ``entropy_coef``
``use_fused_logprobs``     policy/reference log-probs through
                           :func:`riskfast.ops.fused_linear_logprobs`
``use_fused_loss``         the loss through
                           :func:`riskfast.ops.fused_linear_policy_loss`
=========================  =====================================

``use_fused_loss=True`` is the counterpart of TRL's Liger GRPO loss: the training loss
is computed from the model's last hidden states and its LM head by
:func:`riskfast.ops.fused_linear_policy_loss`, with the gradients of the head and of the
hidden states in the same chunked pass (``3 N H V`` multiply-adds instead of ``4``,
never ``[N, V]``). The backbone runs through TRL's own fused-LM-head forward (so PEFT,
FSDP's gathered head, multimodal inputs and ``cast_lm_head_to_fp32`` behave as in TRL);
only its projection is replaced. The loss, its gradients and the logged metrics equal
the unfused path's. Models with logit soft-capping or a logit scale fall back to the
unfused loss.

Not supported (``RiskPOConfig`` raises ``ValueError`` naming the field): the loss types
``cispo``, ``sapo``, ``vespo`` and ``luspo``; ``top_entropy_quantile < 1``;
``off_policy_mask_threshold``; ``delta``; adaptive entropy control; vLLM with importance-sampling correction;
``multi_objective_aggregation="normalize_then_sum"``. A completion that no reward
function scored (all returned None) is an error, since RiskPO cannot leave it out of a
bundle member.

TRL's ``importance_sampling_level`` is not used (``ratio_level`` decides), nor is
``use_bias_correction_kl`` (the KL term is the plain k3 estimator; with the default
``num_iterations=1`` the ratio is 1 and both agree).

Supported TRL versions: :data:`SUPPORTED_TRL` (checked at import).
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

SUPPORTED_TRL = ">=1.16,<1.17"
"""TRL versions this module is tested against; importing it with another one raises."""

_TRL_MIN = (1, 16)
_TRL_BELOW = (1, 17)


def _check_trl_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("trl")
    except PackageNotFoundError:
        raise ImportError(
            "riskfast.integrations.trl needs TRL "
            f"{SUPPORTED_TRL}: install it with `pip install 'riskfast[trl]'` "
            f"or `pip install 'trl{SUPPORTED_TRL}'`"
        ) from None
    parts: list[int] = []
    for piece in found.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    key = tuple(parts + [0] * (2 - len(parts)))
    if not (_TRL_MIN <= key < _TRL_BELOW):
        raise ImportError(
            f"riskfast.integrations.trl supports TRL {SUPPORTED_TRL}, found trl {found}: "
            f"install a supported version with `pip install 'trl{SUPPORTED_TRL}'` "
            "(GRPOTrainer internals that RiskPOTrainer overrides change between releases)"
        )
    return found


TRL_VERSION = _check_trl_version()

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOConfig, GRPOTrainer

from .._checks import UINT64_MAX, require_bool, require_int, set_number
from ..riskpo import AdvantageOptions, AdvantageResult, QuantileTracker, compute_advantages
from ..riskpo.loss import RATIO_LEVELS, policy_loss
from ..riskpo.module import checked_run_state, run_state, state_options

RISKPO_STATE_NAME = "riskpo_state.pt"
"""File in each checkpoint folder holding the bundling generator and quantile tracker."""

SUPPORTED_LOSS_TYPES = ("dapo", "bnpo", "grpo", "dr_grpo")
"""TRL ``loss_type`` values whose aggregation RiskPOTrainer reproduces."""

_AGG_OF_LOSS_TYPE = {
    "dapo": "token-mean",
    "bnpo": "token-mean",
    "grpo": "seq-mean-token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
}


_FIELD_OF_ARGUMENT = {
    "alpha": "risk_alpha",
    "beta": "risk_beta",
    "gamma": "tracker_gamma",
    "quantile": "quantile_mode",
    "shuffle": "shuffle_bundles",
    "drop_last": "drop_last_bundle",
}
"""RiskPOConfig field of each riskfast argument whose name differs (for error messages)."""


@contextlib.contextmanager
def _config_field_names() -> Iterator[None]:
    """Re-raise riskfast's ``TypeError``/``ValueError`` with the RiskPOConfig field's name
    in front (``risk_alpha: ...`` instead of ``alpha: ...``)."""
    try:
        yield
    except (TypeError, ValueError) as err:
        argument, colon, rest = str(err).partition(":")
        if not colon or argument not in _FIELD_OF_ARGUMENT:
            raise
        raise type(err)(f"{_FIELD_OF_ARGUMENT[argument]}:{rest}") from None


def _risk_help(text: str) -> dict[str, Any]:
    return {"help": text}


@dataclass
class RiskPOConfig(GRPOConfig):
    """``GRPOConfig`` plus the RiskPO fields (see the module docstring for the mapping).

    Every GRPO field keeps its meaning; in particular ``beta`` is still the KL
    coefficient and ``epsilon``/``epsilon_high`` the clip range. The RiskPO quantile
    levels are ``risk_alpha`` and ``risk_beta``.
    """

    estimator: str = field(
        default="mvar",
        metadata=_risk_help(
            "Advantage estimator of riskfast.riskpo.advantages: 'mvar' (Mixed-VaR, RiskPO), "
            "'rvar', 'cvar', 'upper', or the mean baselines 'grpo', 'dr_grpo', 'rloo'."
        ),
    )
    bundle_size: int = field(default=5, metadata=_risk_help("Prompts per bundle (B)."))
    risk_alpha: float = field(default=0.2, metadata=_risk_help("Lower quantile level alpha."))
    risk_beta: float = field(
        default=0.8,
        metadata=_risk_help(
            "Upper quantile level (RiskPO's beta; GRPOConfig.beta is the KL coef)."
        ),
    )
    omega: float = field(default=0.5, metadata=_risk_help("Lower-tail weight of Mixed-VaR."))
    form: str = field(default="paper", metadata=_risk_help("'paper' or 'reference_code'."))
    w_mix: float = field(
        default=1.5, metadata=_risk_help("Mixing weight of form='reference_code'.")
    )
    natural_baseline: bool = field(
        default=True, metadata=_risk_help("Range-VaR baseline term of form='reference_code'.")
    )
    w_upper: float = field(default=1.5, metadata=_risk_help("Upper-tail weight of 'upper'."))
    normalize: bool = field(
        default=True, metadata=_risk_help("Divide advantages by the bundle's score std.")
    )
    center: bool = field(
        default=False, metadata=_risk_help("Subtract each bundle's mean advantage.")
    )
    credit: str = field(
        default="uniform",
        metadata=_risk_help(
            "Credit mode: 'uniform', 'std', 'score' or 'sum_mean' (spec section 3)."
        ),
    )
    score: str = field(default="sum", metadata=_risk_help("Member score: 'sum' or 'mean'."))
    quantile_mode: str = field(
        default="empirical", metadata=_risk_help("'empirical' per bundle or run-wide 'tracker'.")
    )
    tracker_gamma: float = field(
        default=0.1, metadata=_risk_help("Step size of the quantile tracker.")
    )
    shuffle_bundles: bool = field(
        default=True, metadata=_risk_help("Random bundles and members (else consecutive).")
    )
    drop_last_bundle: bool = field(
        default=False, metadata=_risk_help("Give a smaller last bundle advantage 0.")
    )
    bundle_seed: int | None = field(
        default=None, metadata=_risk_help("Seed of the bundling generator (default: seed).")
    )
    ratio_level: str = field(
        default="sequence",
        metadata=_risk_help("Importance ratio of the RiskPO loss: 'sequence' or 'token'."),
    )
    dual_clip: float | None = field(
        default=None, metadata=_risk_help("Dual-clip constant c > 1 for negative advantages.")
    )
    use_fused_logprobs: bool = field(
        default=False,
        metadata=_risk_help(
            "Compute the policy and reference log-probs (and entropies) with "
            "riskfast.ops.fused_linear_logprobs inside TRL's fused LM head (Triton on CUDA, "
            "chunked PyTorch on CPU) instead of TRL's own chunked function."
        ),
    )

    use_fused_loss: bool = field(
        default=False,
        metadata=_risk_help(
            "Compute the RiskPO training loss with riskfast.ops.fused_linear_policy_loss from "
            "the last hidden states and the LM head, gradients in the same chunked pass "
            "(the counterpart of TRL's Liger GRPO loss)."
        ),
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        with _config_field_names():
            self.advantage_options()  # validates every advantage field
        if self.ratio_level not in RATIO_LEVELS:
            raise ValueError(
                f"ratio_level: must be one of {RATIO_LEVELS}, got {self.ratio_level!r}"
            )
        if self.dual_clip is not None:
            set_number(self, "dual_clip", low=1.0, low_open=True)
        set_number(self, "tracker_gamma", low=0.0, low_open=True)
        if self.bundle_seed is not None:
            require_int("bundle_seed", self.bundle_seed, low=0, high=UINT64_MAX)
        require_bool("use_fused_logprobs", self.use_fused_logprobs)
        require_bool("use_fused_loss", self.use_fused_loss)
        if self.loss_type not in SUPPORTED_LOSS_TYPES:
            raise ValueError(
                f"loss_type: RiskPOTrainer supports {SUPPORTED_LOSS_TYPES}, got {self.loss_type!r}"
            )
        unsupported = {
            "top_entropy_quantile": self.top_entropy_quantile < 1.0,
            "off_policy_mask_threshold": self.off_policy_mask_threshold is not None,
            "delta": self.delta is not None,
            "use_adaptive_entropy": self.use_adaptive_entropy,
            "vllm_importance_sampling_correction": self.use_vllm
            and self.vllm_importance_sampling_correction,
            "multi_objective_aggregation": self.multi_objective_aggregation != "sum_then_normalize",
        }
        for name, bad in unsupported.items():
            if bad:
                raise ValueError(
                    f"{name}: not supported by RiskPOTrainer (value {getattr(self, name)!r}); "
                    "see riskfast.integrations.trl for the supported options"
                )

    def advantage_options(self) -> AdvantageOptions:
        """The :class:`riskfast.riskpo.AdvantageOptions` these fields describe."""
        return AdvantageOptions(
            estimator=self.estimator,
            bundle_size=self.bundle_size,
            alpha=self.risk_alpha,
            beta=self.risk_beta,
            omega=self.omega,
            form=self.form,
            w_mix=self.w_mix,
            natural_baseline=self.natural_baseline,
            w_upper=self.w_upper,
            normalize=self.normalize,
            center=self.center,
            credit=self.credit,
            score=self.score,
            quantile=self.quantile_mode,
            shuffle=self.shuffle_bundles,
            drop_last=self.drop_last_bundle,
        )


class GatheredQuantileTracker(QuantileTracker):
    """A :class:`QuantileTracker` fed the rewards of *all* processes on every process.

    RiskPOTrainer computes the bundles from the gathered rewards, so every rank already
    sees every member score; pooling them again over ranks would count each score once
    per rank. This is the base tracker with ``gathered=True``: no communication, and
    on every rank the same values as one process fed the same rollouts.
    """

    def __init__(self, alpha: float = 0.2, beta: float = 0.8, gamma: float = 0.1) -> None:
        super().__init__(alpha, beta, gamma, gathered=True)


class _RiskfastLogProbHead:
    """Stands in for TRL's ``ChunkedLogProbFunction`` inside its fused LM head.

    TRL 1.16 patches the model's forward (``add_fused_lm_head``) so that
    ``model(..., fused_lm_head=True)`` returns per-token log-probs without materialising
    the logits; the projection itself is ``ChunkedLogProbFunction.apply(hidden[M, H],
    weight[V, H], bias, targets[M], temperature, chunk_size, softcapping, logit_scale,
    outputs)``. This object has the same ``apply`` and computes log-probs and entropy
    with :func:`riskfast.ops.fused_linear_logprobs`, leaving masking, the backbone and
    data parallelism to TRL. What riskfast's op does not cover (logit soft-capping, a
    logit scale, outputs other than the entropy) goes to TRL's own function.
    """

    def __init__(self, original: Any) -> None:
        self.original = original
        self.calls = 0

    def apply(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        temperature: float,
        chunk_size: int,
        final_logit_softcapping: float | None = None,
        logit_scale: float = 1.0,
        outputs: tuple[str, ...] = ("entropy",),
    ) -> tuple[torch.Tensor, torch.Tensor | None, None, None, None]:
        extra = set(outputs) - {"log_probs", "entropy"}
        if final_logit_softcapping is not None or logit_scale != 1.0 or extra:
            return self.original.apply(
                hidden, weight, bias, targets, temperature, chunk_size,
                final_logit_softcapping, logit_scale, outputs,
            )  # fmt: skip
        from ..ops import fused_linear_logprobs

        if weight.dtype != hidden.dtype:  # as autocast would: project in the activations' dtype
            weight = weight.to(hidden.dtype)
            bias = None if bias is None else bias.to(hidden.dtype)
        self.calls += 1
        if "entropy" in outputs:
            logp, entropy = fused_linear_logprobs(
                hidden, weight, targets, bias=bias, temperature=temperature, return_entropy=True
            )
            return logp, entropy, None, None, None
        logp = fused_linear_logprobs(hidden, weight, targets, bias=bias, temperature=temperature)
        return logp, None, None, None, None


_MODEL_INPUT_NAMES = (
    "pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
    "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids",
)  # fmt: skip
"""The (multimodal) inputs of a batch that ``_compute_loss`` hands on to the model."""


class _CapturingLMHead:
    """Stands in for TRL's ``ChunkedLogProbFunction`` to hand the projection's inputs over.

    With ``use_fused_loss`` the loss needs the LM head's inputs (``hidden[M, H]``, the
    head's ``weight`` and ``bias``, the temperature) rather than its log-probs: this
    object records them and returns zeros in place of the per-token outputs, which TRL's
    forward only scatters into its output. What the fused loss does not cover (logit
    soft-capping, a logit scale) goes to TRL's own function, and nothing is recorded.
    """

    def __init__(self, original: Any) -> None:
        self.original = original
        self.captured: tuple[Any, ...] | None = None

    def apply(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        temperature: float,
        chunk_size: int,
        final_logit_softcapping: float | None = None,
        logit_scale: float = 1.0,
        outputs: tuple[str, ...] = ("entropy",),
    ) -> tuple[torch.Tensor | None, ...]:
        if final_logit_softcapping is not None or logit_scale != 1.0:
            return self.original.apply(
                hidden, weight, bias, targets, temperature, chunk_size,
                final_logit_softcapping, logit_scale, outputs,
            )  # fmt: skip
        if weight.dtype != hidden.dtype:  # as autocast would: project in the activations' dtype
            weight = weight.to(hidden.dtype)
            bias = None if bias is None else bias.to(hidden.dtype)
        self.captured = (hidden, weight, bias, float(temperature))
        zeros = torch.zeros(hidden.shape[0], device=hidden.device, dtype=torch.float32)
        entropy = zeros if "entropy" in outputs else None
        return zeros, entropy, None, None, None


def _completion_hidden(
    hidden: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, width: int
) -> torch.Tensor:
    """``[B, width, H]`` hidden states predicting the completion tokens (0 on padding).

    TRL's fused forward projects either every shifted position (``[B * (L - 1), H]``) or
    only those with a label (the completion tokens the attention mask keeps, in row-major
    order), depending on the device; both are laid back onto the completion grid.
    """
    b, length = input_ids.shape
    if hidden.shape[0] == b * (length - 1):
        return hidden.view(b, length - 1, -1)[:, -width:]
    labelled = attention_mask[:, -width:] != 0
    grid = hidden.new_zeros((b, width, hidden.shape[-1]))
    return grid.index_put((labelled,), hidden)


class RiskPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` whose advantages and loss are RiskPO's (see the module docstring).

    Takes exactly ``GRPOTrainer``'s arguments; ``args`` must be a :class:`RiskPOConfig`.

    Attributes:
        riskpo_options: the :class:`riskfast.riskpo.AdvantageOptions` in use.
        riskpo_generator: the bundling generator (CPU, identical on every rank).
        riskpo_tracker: the quantile tracker (``quantile_mode="tracker"``) or None.
        riskpo_last: what the last generation batch computed: ``rewards`` and
            ``question_ids`` (all processes), ``result`` (the
            :class:`~riskfast.riskpo.AdvantageResult`), ``grpo_advantages`` (TRL's own
            advantages of this process's slice) and ``advantages`` (RiskPO's slice).
    """

    _tag_names: ClassVar[list[str]] = ["trl", "grpo", "riskpo", "riskfast"]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        config = kwargs.get("args", args[2] if len(args) > 2 else None)
        if not isinstance(config, RiskPOConfig):
            raise TypeError(
                "args: RiskPOTrainer needs a RiskPOConfig (a GRPOConfig with the RiskPO fields), "
                f"got {type(config).__name__}"
            )
        super().__init__(*args, **kwargs)
        self.riskpo_options = config.advantage_options()
        seed = config.seed if config.bundle_seed is None else config.bundle_seed
        self.riskpo_seed = require_int("seed", seed, low=0, high=UINT64_MAX)
        self.riskpo_generator = torch.Generator().manual_seed(self.riskpo_seed)
        self.riskpo_tracker: GatheredQuantileTracker | None = None
        if self.riskpo_options.quantile == "tracker" and self.riskpo_options.is_risk:
            self.riskpo_tracker = GatheredQuantileTracker(
                config.risk_alpha, config.risk_beta, config.tracker_gamma
            )
        self.riskpo_last: dict[str, Any] = {}
        self._riskpo_gathered_rewards: torch.Tensor | None = None

    # ----------------------------------------------------------------- log-probs
    def _get_per_token_logps_and_entropies(self, *args: Any, **kwargs: Any) -> Any:
        """TRL's log-probs, or riskfast's fused kernel when ``use_fused_logprobs`` is set.

        Serves the policy and the reference model alike (TRL calls this for both).
        """
        if not self.args.use_fused_logprobs:
            return super()._get_per_token_logps_and_entropies(*args, **kwargs)
        import trl.trainer.utils as trl_utils

        original = trl_utils._ChunkedLogProbFunction
        self.riskpo_logprob_head = getattr(
            self, "riskpo_logprob_head", None
        ) or _RiskfastLogProbHead(original)
        trl_utils._ChunkedLogProbFunction = self.riskpo_logprob_head
        try:
            return super()._get_per_token_logps_and_entropies(*args, **kwargs)
        finally:
            trl_utils._ChunkedLogProbFunction = original

    # ----------------------------------------------------------------- advantages
    def _calculate_rewards(
        self, inputs: Any, prompts: Any, completions: Any, completion_ids_list: Any
    ) -> torch.Tensor:
        rewards_per_func = super()._calculate_rewards(
            inputs, prompts, completions, completion_ids_list
        )
        self._riskpo_gathered_rewards = rewards_per_func  # [N_global, n_funcs], all processes
        return rewards_per_func

    def riskpo_advantages(
        self, rewards: torch.Tensor, group_size: int, *, train: bool = True
    ) -> AdvantageResult:
        """RiskPO advantages of one generation batch (all processes' completions).

        ``rewards[N]`` are stored prompt by prompt, ``group_size`` completions each (TRL's
        layout). In training this advances the bundling generator and updates the tracker; in
        evaluation a fresh generator seeded with ``bundle_seed`` is used and the tracker
        is read but not updated, so evaluating never changes a training run.
        """
        generator = self.riskpo_generator
        tracker = self.riskpo_tracker
        if not train:
            generator = torch.Generator().manual_seed(self.riskpo_seed)
            tracker = copy.deepcopy(tracker)
        return compute_advantages(
            rewards.detach().float().cpu(),
            None,
            self.riskpo_options,
            group_size=group_size,
            tracker=tracker,
            update_tracker=train,
            generator=generator,
        )

    def _generate_and_score_completions(self, inputs: Any) -> dict[str, Any]:
        self._riskpo_gathered_rewards = None
        output = super()._generate_and_score_completions(inputs)
        rewards_per_func = self._riskpo_gathered_rewards
        if rewards_per_func is None:  # pragma: no cover - TRL always scores
            raise RuntimeError("RiskPOTrainer: TRL did not call _calculate_rewards")
        mode = "train" if self.model.training else "eval"
        group = self.num_generations if mode == "train" else self.num_generations_eval
        unscorable = torch.isnan(rewards_per_func).all(dim=1)
        if bool(unscorable.any()):
            raise ValueError(
                "rewards: every reward function returned None for "
                f"{int(unscorable.sum())} completion(s); RiskPO needs a reward for each "
                "completion of a bundle"
            )
        weights = self.reward_weights.to(rewards_per_func.device)
        rewards = (rewards_per_func * weights[None, :]).nansum(dim=1)
        total = rewards.numel()
        if total % group:
            raise ValueError(
                f"rewards: {total} completions is not a multiple of num_generations ({group})"
            )
        result = self.riskpo_advantages(rewards, group, train=mode == "train")

        local = output["advantages"].shape[0]
        start = self.accelerator.process_index * local
        own = result.advantages[start : start + local].to(
            device=output["advantages"].device, dtype=torch.float32
        )
        self.riskpo_last = {
            "rewards": rewards.detach().cpu(),
            "question_ids": torch.arange(total) // group,
            "result": result,
            "grpo_advantages": output["advantages"].detach().cpu(),
            "advantages": own.detach().cpu(),
        }
        output["advantages"] = own

        # Replace the advantages TRL logged for the completions table with RiskPO's.
        logged = self._logs.get("advantages") if isinstance(self._logs, dict) else None
        if logged is not None and len(logged) >= total:
            for _ in range(total):
                logged.pop()
            logged.extend(result.advantages.tolist())

        skipped = {"num_questions", "group_size"}
        if not self.riskpo_options.drop_last:
            skipped.add("dropped_response_frac")
        for name, value in result.metrics.items():
            if name not in skipped:
                self._metrics[mode][f"riskpo/{name}"].append(float(value))
        return output

    # ----------------------------------------------------------------------- loss
    def _riskpo_aggregation(
        self, inputs: dict[str, Any], mask: torch.Tensor, mode: str
    ) -> tuple[str, float | None, int | None]:
        """``(agg, num_items, max_len)`` reproducing TRL's normaliser of ``loss_type``."""
        loss_type = self.loss_type
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        if loss_type == "dapo":
            normaliser = (
                inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            )
            if mode == "train":
                normaliser = (
                    normaliser
                    * self.current_gradient_accumulation_steps
                    / self.args.steps_per_generation
                )
            return "token-mean", float(normaliser), None
        if loss_type == "bnpo":
            return "token-mean", float(mask.sum().clamp(min=1)) * accumulation, None
        sequences = float(mask.shape[0]) * accumulation
        if loss_type == "grpo":
            return "seq-mean-token-mean", sequences, None
        if loss_type == "dr_grpo":
            return "seq-mean-token-sum-norm", sequences, int(self.max_completion_length)
        raise ValueError(f"loss_type: unsupported {loss_type!r}")  # pragma: no cover

    def _riskpo_fused_loss(
        self, model: Any, inputs: dict[str, Any], model_inputs: dict[str, Any], mask: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float], torch.Tensor | None] | None:
        """``use_fused_loss``: the loss from the LM head's inputs (None: not covered).

        Runs the model once through TRL's fused-LM-head forward with the projection
        replaced by :class:`_CapturingLMHead`, then
        :func:`riskfast.ops.fused_linear_policy_loss` on the completion tokens.
        """
        import trl.trainer.utils as trl_utils

        from ..ops import fused_linear_policy_loss

        original = trl_utils._ChunkedLogProbFunction
        head = _CapturingLMHead(original)
        trl_utils._ChunkedLogProbFunction = head
        try:
            # one model call for the whole micro-batch: one capture
            _, _, aux_loss = super()._get_per_token_logps_and_entropies(
                model, **model_inputs, batch_size=model_inputs["input_ids"].shape[0]
            )
        finally:
            trl_utils._ChunkedLogProbFunction = original
        if head.captured is None:
            return None
        hidden, weight, bias, temperature = head.captured
        completion_ids = inputs["completion_ids"]
        hidden = _completion_hidden(
            hidden, model_inputs["input_ids"], model_inputs["attention_mask"],
            completion_ids.shape[1],
        )  # fmt: skip
        mode = "train" if self.model.training else "eval"
        agg, num_items, max_len = self._riskpo_aggregation(inputs, mask, mode)
        config: RiskPOConfig = self.args  # type: ignore[assignment]
        loss, metrics = fused_linear_policy_loss(
            hidden,
            weight,
            completion_ids.to(hidden.device),
            inputs.get("old_per_token_logps"),  # None: on-policy, as the unfused path
            inputs["advantages"],
            mask,
            bias=bias,
            ref_logp=inputs.get("ref_per_token_logps") if self.beta != 0.0 else None,
            ratio_level=config.ratio_level,
            eps_low=self.epsilon_low,
            eps_high=self.epsilon_high,
            dual_clip=config.dual_clip,
            beta_kl=float(self.beta),
            entropy_coef=float(self.entropy_coef),
            agg=agg,
            max_len=max_len,
            num_items=num_items,
            temperature=temperature,
            compute_entropy=True,  # the entropy metric TRL logs
        )
        return loss, metrics, aux_loss

    def _compute_loss(self, model: Any, inputs: dict[str, Any]) -> torch.Tensor:
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        logits_to_keep = completion_ids.size(1)
        mask = (
            completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        )

        model_inputs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "logits_to_keep": logits_to_keep,
            "compute_entropy": True,
            "compute_aux_loss": self.aux_loss_enabled,
            **{name: inputs.get(name) for name in _MODEL_INPUT_NAMES},
        }
        mode = "train" if self.model.training else "eval"
        fused = None
        if self.args.use_fused_loss:
            fused = self._riskpo_fused_loss(model, inputs, model_inputs, mask)
        if fused is not None:
            loss, metrics, aux_loss = fused
            return self._riskpo_finish_loss(loss, metrics, aux_loss, mask, mode)

        per_token_logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model, **model_inputs
        )
        old_per_token_logps = inputs.get("old_per_token_logps")
        if old_per_token_logps is None:
            old_per_token_logps = per_token_logps.detach()
        ref_per_token_logps = inputs.get("ref_per_token_logps") if self.beta != 0.0 else None
        agg, num_items, max_len = self._riskpo_aggregation(inputs, mask, mode)
        config: RiskPOConfig = self.args  # type: ignore[assignment]

        loss, metrics = policy_loss(
            per_token_logps,
            old_per_token_logps,
            inputs["advantages"],
            mask,
            ratio_level=config.ratio_level,
            eps_low=self.epsilon_low,
            eps_high=self.epsilon_high,
            dual_clip=config.dual_clip,
            ref_logp=ref_per_token_logps,
            beta_kl=float(self.beta),
            entropy=entropies,
            entropy_coef=float(self.entropy_coef),
            agg=agg,
            max_len=max_len,
            num_items=num_items,
        )
        return self._riskpo_finish_loss(loss, metrics, aux_loss, mask, mode)

    def _riskpo_finish_loss(
        self,
        loss: torch.Tensor,
        metrics: dict[str, float],
        aux_loss: torch.Tensor | None,
        mask: torch.Tensor,
        mode: str,
    ) -> torch.Tensor:
        """Adds the MoE auxiliary loss and logs the loss metrics (fused and unfused alike)."""
        if self.aux_loss_enabled and aux_loss is not None:
            accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
            loss = loss + self.router_aux_loss_coef * aux_loss / accumulation
        self._riskpo_log_loss_metrics(mode, metrics, mask)
        return loss

    def _riskpo_log_loss_metrics(
        self, mode: str, metrics: dict[str, float], mask: torch.Tensor
    ) -> None:
        """Token-weighted means over all processes, under TRL's metric names."""
        tokens = float(mask.sum())
        names = ("clip_frac", "entropy", "approx_kl", "ratio_mean", "dual_clip_frac")
        local = [metrics.get(n, 0.0) * tokens for n in names] + [tokens, metrics["pg_loss"], 1.0]
        if "kl" in metrics:
            local.append(metrics["kl"] * tokens)
        stats = torch.tensor(local, dtype=torch.float64, device=self.accelerator.device)
        totals = self.accelerator.reduce(stats, reduction="sum").tolist()
        count = max(totals[len(names)], 1.0)
        means = dict(zip(names, (t / count for t in totals[: len(names)])))
        processes = max(totals[len(names) + 2], 1.0)
        self._metrics[mode]["entropy"].append(means["entropy"])
        self._metrics[mode]["clip_ratio/region_mean"].append(means["clip_frac"])
        self._metrics[mode]["riskpo/approx_kl"].append(means["approx_kl"])
        self._metrics[mode]["riskpo/ratio_mean"].append(means["ratio_mean"])
        self._metrics[mode]["riskpo/dual_clip_frac"].append(means["dual_clip_frac"])
        self._metrics[mode]["policy_loss"].append(totals[len(names) + 1] / processes)
        if "kl" in metrics:
            self._metrics[mode]["kl"].append(totals[-1] / count)

    # ------------------------------------------------------------------ checkpoints
    def _riskpo_state_options(self) -> dict[str, Any]:
        tracker = self.riskpo_tracker
        return state_options(self.riskpo_options, None if tracker is None else tracker.gamma)

    def riskpo_state_dict(self) -> dict[str, Any]:
        """The run state RiskPO adds: bundling generator, tracker, seed, and the options
        that shape them (:func:`riskfast.riskpo.module.state_options`)."""
        return run_state(
            self._riskpo_state_options(),
            self.riskpo_seed,
            self.riskpo_generator,
            self.riskpo_tracker,
        )

    def load_riskpo_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`riskpo_state_dict` (generator, tracker).

        The saved options must equal this trainer's (``ValueError`` naming the option
        otherwise, e.g. a checkpoint of ``bundle_size=2`` resumed with ``bundle_size=5``);
        the whole state is checked before any of it is taken.
        """
        with _config_field_names():
            _, seed, generator_state = checked_run_state(
                state, self.riskpo_generator, expected=self._riskpo_state_options(), what="trainer"
            )
        self.riskpo_seed = seed
        self.riskpo_generator.set_state(generator_state)
        if self.riskpo_tracker is not None:
            self.riskpo_tracker.load_state_dict(state["tracker"])  # checked: cannot fail

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            output_dir = os.path.join(self._get_output_dir(trial=trial), folder)
            torch.save(self.riskpo_state_dict(), os.path.join(output_dir, RISKPO_STATE_NAME))

    def _checked_riskpo_checkpoint(self, checkpoint: str) -> dict[str, Any] | None:
        """The checkpoint's RiskPO state checked against this trainer (``ValueError``
        naming the option or ``state``), or None where the checkpoint has none."""
        path = os.path.join(checkpoint, RISKPO_STATE_NAME)
        if not os.path.exists(path):
            return None
        state = torch.load(path, weights_only=True)
        with _config_field_names():
            checked_run_state(
                state, self.riskpo_generator, expected=self._riskpo_state_options(), what="trainer"
            )
        return state

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        # The RiskPO state is checked before the weights load, so that a checkpoint whose
        # RiskPO state will be refused leaves the model as it was.
        self._checked_riskpo_checkpoint(resume_from_checkpoint)
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        state = None if checkpoint is None else self._checked_riskpo_checkpoint(checkpoint)
        super()._load_optimizer_and_scheduler(checkpoint)
        if state is not None:
            self.load_riskpo_state_dict(state)


__all__ = [
    "RISKPO_STATE_NAME",
    "SUPPORTED_LOSS_TYPES",
    "SUPPORTED_TRL",
    "TRL_VERSION",
    "GatheredQuantileTracker",
    "RiskPOConfig",
    "RiskPOTrainer",
]
