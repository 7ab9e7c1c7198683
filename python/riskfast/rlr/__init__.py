"""RLR: the Recursive Likelihood Ratio optimizer for diffusion models (spec ``rlr.md``).

Public API:

* :func:`estimate_grad` with :class:`RLRConfig` - one gradient estimate (``rlr`` and
  the baselines ``ddpo``, ``draft``, ``alignprop``, ``full``) added to ``.grad``;
* :func:`step_with_logprob` - one DDIM/DDPM step with its log-density;
* :func:`sample_chain` - chains on any diffusers-style denoiser, with guidance and a
  :class:`PromptSchedule` (DCoT);
* :func:`register_estimator` - add an estimator; :func:`step_roles` - which step gets
  which term; :class:`RLRState` - state of ``window_start="grad_norm"``;
* :class:`RLRTrainer` with :class:`TrainerConfig` - reward fine-tuning of a diffusers
  model (LoRA through peft or full), RLR or a baseline by one config field, one or
  several processes (``accelerate launch``), checkpoints that resume exactly;
  :class:`DCoT` - its per-stage prompts and window stage;
* :func:`add_lora`, :func:`save_lora_weights`, :func:`load_lora_weights` - adapters in
  the diffusers format.

``import riskfast.rlr`` does not import diffusers, accelerate or peft; they are imported
on first use.
"""

from .config import BASELINES, RESTS, WINDOW_STARTS, ZO_RESTORES, RLRConfig
from .estimators import (
    EstimationRun,
    GradientSync,
    RLRState,
    estimate_grad,
    estimator_names,
    register_estimator,
    step_roles,
    window_starts,
)
from .lora import add_lora, load_lora_weights, save_lora_weights
from .memory import WindowMemory, window_memory
from .sampler import (
    Chain,
    GuidedDenoiser,
    PromptSchedule,
    StepOutput,
    call_denoiser,
    sample_chain,
    step_with_logprob,
    transition_coefficients,
)
from .trainer import DCoT, PerPromptStatTracker, RLRTrainer, TrainerConfig

__all__ = [
    "BASELINES",
    "RESTS",
    "WINDOW_STARTS",
    "ZO_RESTORES",
    "Chain",
    "DCoT",
    "EstimationRun",
    "GradientSync",
    "GuidedDenoiser",
    "PerPromptStatTracker",
    "PromptSchedule",
    "RLRConfig",
    "RLRState",
    "RLRTrainer",
    "StepOutput",
    "TrainerConfig",
    "WindowMemory",
    "add_lora",
    "call_denoiser",
    "estimate_grad",
    "estimator_names",
    "load_lora_weights",
    "register_estimator",
    "sample_chain",
    "save_lora_weights",
    "step_roles",
    "step_with_logprob",
    "transition_coefficients",
    "window_memory",
    "window_starts",
]
