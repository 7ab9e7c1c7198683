"""Options of the RLR gradient estimator and its baselines (spec ``rlr.md``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .._checks import require_bool, require_choice, require_int, set_number

__all__ = ["BASELINES", "RESTS", "WINDOW_STARTS", "ZO_RESTORES", "RLRConfig"]

RESTS = ("zo", "lr", "none")
WINDOW_STARTS = ("uniform", "grad_norm")
BASELINES = ("loo", "none")
ZO_RESTORES = ("copy", "reverse")
OPS_BACKENDS = ("auto", "compiled", "reference")


def checked_window_start(start: Any) -> str | tuple[int, int]:
    """``window_start`` checked: one of :data:`WINDOW_STARTS`, or a pair ``(a, b)`` of ints
    with ``1 <= a <= b``, returned as a tuple (``TypeError``/``ValueError`` naming it)."""
    if isinstance(start, str):
        return require_choice("window_start", start, WINDOW_STARTS)
    if isinstance(start, (tuple, list)) and len(start) == 2:
        low = require_int("window_start[0]", start[0], low=1)
        high = require_int("window_start[1]", start[1], low=1)
        if high < low:
            raise ValueError(f"window_start: expected a <= b in (a, b), got {tuple(start)}")
        return (low, high)
    raise TypeError(
        f"window_start: expected 'uniform', 'grad_norm' or a pair (a, b), got {start!r}"
    )


@dataclass(frozen=True)
class RLRConfig:
    """How one call of :func:`riskfast.rlr.estimate_grad` estimates the gradient.

    Steps are numbered as in the spec: step ``s`` maps ``x_s`` to ``x_{s-1}``, step 1
    produces ``x_0``, step ``T`` starts from the noise.

    Attributes:
        estimator: ``"rlr"`` (default) or a baseline: ``"ddpo"`` (on-policy likelihood
            ratio over sampled steps), ``"draft"`` (backprop through steps
            ``1..fo_steps``), ``"alignprop"`` (truncation point drawn per chain),
            ``"full"`` (backprop through the whole chain: the exact pathwise gradient),
            ``"zo"`` (antithetic zeroth-order perturbations at every step), or a name added with :func:`riskfast.rlr.register_estimator`.
        rest: for ``"rlr"``, how the steps outside the first-order steps and the window
            are estimated: ``"zo"`` (antithetic zeroth-order perturbations of the
            trainable parameters), ``"lr"`` (inherent-noise likelihood ratio) or
            ``"none"`` (dropped: biased, the paper's "without ZO" ablation).
        fo_steps: K, the first-order steps ``1..K`` (``rlr``, ``draft``); 0 for a
            reward without a gradient.
        window: h, the half-order window's length (``rlr``).
        window_start: how the window's first step j is drawn from ``{K+1 .. T-h+1}``:
            ``"uniform"``, ``"grad_norm"`` (softmax over a running mean of the window
            term's gradient norm per j, kept in an :class:`RLRState`), or a pair
            ``(a, b)``: uniform on ``{a .. b}`` (the DCoT restriction to one stage).
        sigma_p: ZO perturbation scale.
        eta: DDIM noise level of the sampling chain (1 for DDPM).
        exit_eta: eta of the window's exit step j; ``None`` means ``eta`` when
            ``eta > 0`` and 1 otherwise (the exit step needs noise: spec).
        baseline: ``"loo"`` subtracts the mean reward of the other chains (leaving out
            a ZO chain's antithetic partner too: spec); ``"none"`` uses the reward.
        guidance_scale: classifier-free guidance weight (1: none).
        checkpoint: activation checkpointing on each backpropagated step.
        zo_restore: how ZO perturbations are undone: ``"copy"`` (a copy of the
            trainable parameters, exact) or ``"reverse"`` (``perturb_`` with the
            opposite scale, no copy, exact up to rounding).
        alignprop_steps: ``(lo, hi)``, the range of AlignProp's per-chain truncation K
            (``None``: ``(1, T)``).
        ddpo_step_fraction: share of the steps DDPO scores per call (drawn uniformly,
            reweighted by ``T / count`` so the estimate stays unbiased).
        window_temperature, window_momentum: of ``window_start="grad_norm"``.
        term_norms: report each term's gradient norm (costs one parameter-sized buffer
            per term; off: one buffer for all).
        backend: of the ops RLR calls (``riskfast.ops.perturb_``,
            ``accumulate_noise_``, ``transition_log_prob``): ``"auto"`` (the compiled
            operators of ``riskfast._C`` where built, else PyTorch), ``"compiled"`` or
            ``"reference"``.
    """

    estimator: str = "rlr"
    rest: str = "zo"
    fo_steps: int = 1
    window: int = 2
    window_start: Any = "uniform"
    sigma_p: float = 1e-3
    eta: float = 1.0
    exit_eta: float | None = None
    baseline: str = "loo"
    guidance_scale: float = 1.0
    checkpoint: bool = True
    zo_restore: str = "copy"
    alignprop_steps: tuple[int, int] | None = None
    ddpo_step_fraction: float = 1.0
    window_temperature: float = 1.0
    window_momentum: float = 0.9
    term_norms: bool = True
    backend: str = "auto"

    def __post_init__(self) -> None:
        from .estimators import estimator_names  # the registry lives with the estimators

        require_choice("estimator", self.estimator, estimator_names())
        require_choice("rest", self.rest, RESTS)
        require_int("fo_steps", self.fo_steps, low=0)
        require_int("window", self.window, low=1)
        object.__setattr__(self, "window_start", checked_window_start(self.window_start))
        set_number(self, "sigma_p", low=0.0, low_open=True)
        set_number(self, "eta", low=0.0, high=1.0)
        if self.exit_eta is not None:
            set_number(self, "exit_eta", low=0.0, high=1.0, low_open=True)
        require_choice("baseline", self.baseline, BASELINES)
        set_number(self, "guidance_scale")
        require_bool("checkpoint", self.checkpoint)
        require_choice("zo_restore", self.zo_restore, ZO_RESTORES)
        if self.alignprop_steps is not None:
            steps = self.alignprop_steps
            if not isinstance(steps, (tuple, list)) or len(steps) != 2:
                raise TypeError(f"alignprop_steps: expected a pair (lo, hi), got {steps!r}")
            low = require_int("alignprop_steps[0]", steps[0], low=1)
            high = require_int("alignprop_steps[1]", steps[1], low=1)
            if high < low:
                raise ValueError(f"alignprop_steps: expected lo <= hi, got {tuple(steps)}")
            object.__setattr__(self, "alignprop_steps", (low, high))
        set_number(self, "ddpo_step_fraction", low=0.0, high=1.0, low_open=True)
        set_number(self, "window_temperature", low=0.0, low_open=True)
        set_number(self, "window_momentum", low=0.0, high=1.0, high_open=True)
        require_bool("term_norms", self.term_norms)
        require_choice("backend", self.backend, OPS_BACKENDS)
        if self.window_start == "grad_norm" and not self.term_norms:
            raise ValueError("term_norms: window_start='grad_norm' needs the window term's norm")

    @property
    def resolved_exit_eta(self) -> float:
        if self.exit_eta is not None:
            return float(self.exit_eta)
        return float(self.eta) if self.eta > 0.0 else 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
