"""Named configurations of the demo's RiskPO arm and of the training both arms share.

``riskfast demo --preset NAME`` and ``riskfast study --arms grpo NAME ...`` take these
names. A preset fixes two groups of options:

* ``riskpo``: the RiskPO arm's advantage and loss options (the arguments of
  :func:`riskfast.riskpo.advantages` and the ratio level of the policy loss);
* ``training``: knobs of the training itself, which the demo applies to *both* arms so
  that GRPO and RiskPO stay comparable (updates per rollout, weight decay, dual clip).

An option given on the command line overrides the preset's value; an option that neither
sets takes :data:`BUILTIN`. The learning rate is never part of a preset: the paper's runs
use 1e-6 on 1.5B-parameter models, which says nothing about a 0.1M-parameter model, so
``riskfast study`` tunes it per arm on a validation split.

Sources (spec ``riskpo.md``; the official code is the authors' verl fork,
github.com/RTkenny/RiskPO, read at commit 65ec40c):

``paper``
    The objective as the paper writes it (spec sections 1-4): Mixed-VaR in the paper's
    form ``A = -(1 + omega)(a - z)+ + g(z, a, b)`` with ``alpha = 0.2``, ``beta = 0.8``,
    ``omega = 0.5``, bundles of ``B = 5`` random questions, per-bundle empirical
    quantiles, advantages divided by the bundle's score std, no centring, uniform
    credit, and the paper's length-normalised sequence-level ratio. The paper's runs are
    the official scripts', so its training knobs are ``official-math``'s (2 updates per
    rollout, dual clip 3, weight decay 0.01, gradient clip 1).

``official-math``
    ``scripts/run_qwen2.5_1.5b_MVaR_math.sh`` (MATH + GSM8K, Qwen2.5-1.5B-Instruct):
    ``use_mixing_risk_measure=True, w_mix=1.5`` (``form="reference_code"``),
    ``natural_baseline_adv=True``, ``quantile_down=0.2, quantile_up=0.9``,
    ``bundle_size=5``, ``credit_assign_mode='std'``, ``norm_adv_by_std_in_grpo=True``;
    bundles are consecutive prompts of the shuffled batch and member j holds the j-th
    response of each question (``shuffle_bundles=False``; the demo's loader shuffles
    too). Training: ``rollout.n=5``, ``train_batch_size=1024`` prompts (205 bundles),
    ``ppo_mini_batch_size=512`` (2 updates per rollout, ``ppo_epochs=1``), lr 1e-6, no KL
    or entropy term, 200 steps; verl's actor defaults: clip 0.2, dual clip
    ``clip_ratio_c=3``, token-level ratio, ``token-mean`` aggregation, weight decay 0.01,
    gradient clip 1.0. The script sets ``use_q_track_mode='track', lr_q=0.1``, but at
    that commit the tracked quantiles reach ``compute_advantage`` only through the
    step's ``meta_info``, which is written after the advantages were computed and is
    rebuilt for every batch: the advantages use each bundle's empirical quantiles. The
    preset follows what the code computes (``quantile="empirical"``);
    ``--quantile tracker`` (``tracker_gamma=0.1``) gives the script's intent.

``official-hard-math``
    ``scripts/run_qwen2.5_1.5b_MVaR_dapomath.sh`` (DAPO-Math-17k, the paper's hard-math
    table): as ``official-math`` except ``quantile_up=0.8``,
    ``credit_assign_mode='sum-mean'`` and ``natural_baseline_adv=False``; ``rollout.n=10``,
    512 prompts per step, ``ppo_mini_batch_size=128`` (4 updates per rollout), 500 steps.

Group size and prompts per step are not set by a preset: they fix the sampling budget,
which both arms share and the command line chooses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Preset:
    """One named configuration (see the module docstring for each one's source)."""

    name: str
    summary: str
    riskpo: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)


RISKPO_KEYS = (
    "estimator",
    "form",
    "bundle_size",
    "alpha",
    "beta",
    "omega",
    "w_mix",
    "natural_baseline",
    "normalize",
    "center",
    "credit",
    "score",
    "quantile",
    "tracker_gamma",
    "shuffle_bundles",
    "ratio_level",
)
"""Options of the RiskPO arm a preset may set (argparse destinations)."""

TRAINING_KEYS = (
    "updates_per_rollout",
    "weight_decay",
    "dual_clip",
    "max_grad_norm",
    "clip_epsilon",
    "loss_type",
    "kl_coef",
    "entropy_coef",
)
"""Training knobs both arms share (argparse destinations)."""

BUILTIN: dict[str, Any] = {
    # RiskPO arm: the spec's defaults.
    "estimator": "mvar",
    "form": "paper",
    "bundle_size": 5,
    "alpha": 0.2,
    "beta": 0.8,
    "omega": 0.5,
    "w_mix": 1.5,
    "natural_baseline": True,
    "normalize": True,
    "center": False,
    "credit": "uniform",
    "score": "sum",
    "quantile": "empirical",
    "tracker_gamma": 0.1,
    "shuffle_bundles": True,
    "ratio_level": "sequence",
    # Training: TRL's defaults for a GRPO run, one update per rollout.
    "updates_per_rollout": 1,
    "weight_decay": 0.0,
    "dual_clip": 0.0,  # 0: off
    "max_grad_norm": 1.0,
    "clip_epsilon": 0.2,
    "loss_type": "dapo",
    "kl_coef": 0.0,
    "entropy_coef": 0.0,
}
"""Value of every preset-able option when neither the preset nor the command line sets it."""

_OFFICIAL_TRAINING = {
    "updates_per_rollout": 2,
    "weight_decay": 0.01,
    "dual_clip": 3.0,
    "max_grad_norm": 1.0,
    "clip_epsilon": 0.2,
    "loss_type": "dapo",
    "kl_coef": 0.0,
    "entropy_coef": 0.0,
}

PRESETS: dict[str, Preset] = {
    "paper": Preset(
        "paper",
        "the paper's Mixed-VaR (alpha .2, beta .8, omega .5, B 5), uniform credit, "
        "sequence ratio; the official training knobs",
        riskpo={
            "estimator": "mvar",
            "form": "paper",
            "bundle_size": 5,
            "alpha": 0.2,
            "beta": 0.8,
            "omega": 0.5,
            "normalize": True,
            "center": False,
            "credit": "uniform",
            "score": "sum",
            "quantile": "empirical",
            "shuffle_bundles": True,
            "ratio_level": "sequence",
        },
        training=dict(_OFFICIAL_TRAINING),
    ),
    "official-math": Preset(
        "official-math",
        "official MATH script: reference-code Mixed-VaR (w_mix 1.5, alpha .2, beta .9, "
        "B 5), std credit, token ratio; 2 updates per rollout, dual clip 3, weight decay .01",
        riskpo={
            "estimator": "mvar",
            "form": "reference_code",
            "bundle_size": 5,
            "alpha": 0.2,
            "beta": 0.9,
            "w_mix": 1.5,
            "natural_baseline": True,
            "normalize": True,
            "center": False,
            "credit": "std",
            "score": "sum",
            "quantile": "empirical",
            "tracker_gamma": 0.1,
            "shuffle_bundles": False,
            "ratio_level": "token",
        },
        training=dict(_OFFICIAL_TRAINING),
    ),
    "official-hard-math": Preset(
        "official-hard-math",
        "official DAPO-Math script: as official-math with beta .8, sum_mean credit, no "
        "natural baseline; 4 updates per rollout",
        riskpo={
            "estimator": "mvar",
            "form": "reference_code",
            "bundle_size": 5,
            "alpha": 0.2,
            "beta": 0.8,
            "w_mix": 1.5,
            "natural_baseline": False,
            "normalize": True,
            "center": False,
            "credit": "sum_mean",
            "score": "sum",
            "quantile": "empirical",
            "tracker_gamma": 0.1,
            "shuffle_bundles": False,
            "ratio_level": "token",
        },
        training={**_OFFICIAL_TRAINING, "updates_per_rollout": 4},
    ),
}
"""Every named preset."""


def preset_values(name: str | None) -> dict[str, Any]:
    """The full option set of preset ``name`` (None: :data:`BUILTIN`), both groups."""
    values = dict(BUILTIN)
    if name is None:
        return values
    if name not in PRESETS:
        raise ValueError(f"preset: must be one of {sorted(PRESETS)}, got {name!r}")
    values.update(PRESETS[name].riskpo)
    values.update(PRESETS[name].training)
    return values
