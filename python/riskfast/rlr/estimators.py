"""The RLR gradient estimator and its baselines: one entry point, :func:`estimate_grad`.

Spec: ``spec/rlr.md``, "The estimator". One call samples a batch of chains and adds to
``.grad`` of the trainable parameters an estimate of the gradient of
``-mean(reward)``, as ``loss.backward()`` would, so that an optimizer step raises the
reward. Steps are numbered as in the spec (step ``s``: ``x_s -> x_{s-1}``; step 1
gives ``x_0``). With ``A_b = R_b - baseline_b``:

* **FO** (steps ``1..K``): backprop ``dR/dx_0`` through the steps, ``x_K`` detached.
* **HO** (the window ``{j .. j+h-1}``): from the stored ``x_{j+h-1}``, the window's
  steps run with gradient, their noises fixed as sampled, giving the exit step's mean
  ``Phi_W(theta)``; the term is ``A_b log N(x_{j-1}; Phi_W(theta), sigma_j^2 I)``.
* **rest** (every other step ``C``): ``"zo"`` runs each start twice (an antithetic
  pair sharing ``x_T`` and every inherent noise) with the trainable parameters at
  ``theta +- sigma_p u_i`` at each ``i in C`` and adds
  ``sum_{i in C} u_i mean_pairs(R+ - R-) / (2 sigma_p)``; ``"lr"`` adds
  ``A_b log N(x_{i-1}; mu_theta(x_i), sigma_i^2 I)`` for each ``i in C``; ``"none"``
  drops them (biased).

The terms add with equal weights, which is what makes the sum unbiased for any fixed
``j`` (so for any distribution of ``j``). Baseline: the mean reward of the other
chains, leaving out a ZO chain's antithetic partner too (it shares every noise, so a
baseline containing it correlates with the chain's score term: spec).

Baselines from the same entry point: ``ddpo`` (on-policy likelihood ratio over the
steps), ``draft`` (FO on the last ``K`` steps), ``alignprop`` (FO with ``K`` drawn per
chain), ``full`` (FO through every step: the exact pathwise gradient, the tests'
oracle), ``zo`` (antithetic ZO at every step: the spec's ZO-only comparison). New estimators register with :func:`register_estimator`.

Several processes (``sync=``): each rank passes its own starts and the same generator
state; the call then estimates exactly what one process would on the union of the
ranks' batches (rank order): the inherent noises (and AlignProp's depths) of rank ``r``
are the slice ``r`` of the union's draws, every other draw of the generator (window
start, ZO seeds, DDPO's steps) is the same on every rank, the baseline uses the
rewards of all ranks and the ZO coefficient is the mean over all ranks' pairs. The
terms that average over chains (FO, window, likelihood ratios) average over this
rank's chains, so the caller averages ``.grad`` over the ranks afterwards (an
all-reduce mean: the ZO term, equal on every rank, is unchanged by it).

Recomputation pins values: a step recomputed with gradient returns the stored sample
plus ``mean - mean.detach()``, so every value equals the sampled chain's exactly and
only the gradient flows through the mean (the noise of the step is the sampled one).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

from .._checks import (
    require_floating,
    require_int,
    require_number,
    require_tensor,
)
from ..ops.noise import _resolve_backend as resolve_noise_backend
from ..ops.noise import accumulate_noise_, perturb_
from ..ops.transition import TransitionCoefficients, transition_log_prob, transition_mean
from ..ops.transition import _resolve_backend as resolve_transition_backend
from .config import RLRConfig, checked_window_start
from .sampler import (
    Conditioning,
    GuidedDenoiser,
    add_step_noise,
    check_scheduler,
    transition_coefficients,
)

__all__ = [
    "GradientSync",
    "RLRState",
    "estimate_grad",
    "estimator_names",
    "register_estimator",
    "step_roles",
    "window_starts",
]

_ESTIMATORS: dict[str, Callable[[EstimationRun], None]] = {}
# Whether an estimator runs each start as an antithetic pair (a function of the config).
_ANTITHETIC: dict[str, Callable[[RLRConfig], bool]] = {}
_SEED_HIGH = 2**62


def register_estimator(
    name: str, *, antithetic: bool | Callable[[RLRConfig], bool] = False
) -> Callable[[Callable], Callable]:
    """Register ``fn(run: EstimationRun) -> None`` as ``RLRConfig(estimator=name)``.

    The function samples (``run.sample``), computes rewards (``run.rewards_*``) and
    stages its gradient terms (``run.add_term``, ``run.add_noise_term``);
    :func:`estimate_grad` validates the inputs before and adds the staged gradient to
    ``.grad`` after. ``antithetic`` (a bool, or a function of the config) makes the
    call run each start twice (chains ``b`` and ``b + B``) for a ZO term.
    """
    if not isinstance(name, str) or not name:
        raise TypeError("name: expected a non-empty string")
    if not (isinstance(antithetic, bool) or callable(antithetic)):
        raise TypeError("antithetic: expected a bool or a function of the config")

    def decorator(fn: Callable[[EstimationRun], None]) -> Callable[[EstimationRun], None]:
        if not callable(fn):
            raise TypeError(f"fn: expected a callable estimator, got {type(fn).__name__}")
        _ESTIMATORS[name] = fn
        _ANTITHETIC[name] = antithetic if callable(antithetic) else (lambda _c: antithetic)
        return fn

    return decorator


def estimator_names() -> tuple[str, ...]:
    return tuple(_ESTIMATORS)


class GradientSync(Protocol):
    """What :func:`estimate_grad` needs to act as one process on the union of the ranks.

    ``rank`` in ``[0, world_size)``; ``gather(tensor)`` concatenates every rank's
    ``tensor`` (same shape and dtype on every rank) along dim 0 in rank order and returns
    the result on every rank (``accelerate``'s ``Accelerator.gather`` does; the trainer
    wraps it). Every rank must call :func:`estimate_grad` the same number of times with
    the same config, generator state and batch size.
    """

    rank: int
    world_size: int

    def gather(self, tensor: torch.Tensor) -> torch.Tensor: ...


def _check_sync(sync: Any) -> None:
    if sync is None:
        return
    for name in ("rank", "world_size"):
        value = getattr(sync, name, None)
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"sync: expected an int sync.{name}, got {value!r}")
    if sync.world_size < 1 or not 0 <= sync.rank < sync.world_size:
        raise ValueError(
            f"sync: expected 0 <= rank < world_size, got rank {sync.rank}, world_size "
            f"{sync.world_size}"
        )
    if not callable(getattr(sync, "gather", None)):
        raise TypeError("sync: expected a gather(tensor) method")


# --------------------------------------------------------------------------------------
# Which step gets which term
# --------------------------------------------------------------------------------------


def _check_chain_split(num_steps: Any, fo_steps: Any, window: Any) -> tuple[int, int, int]:
    """``T >= 1``, ``K >= 0``, ``h >= 1`` as ints (the window's fit is checked by the caller)."""
    return (
        require_int("num_steps", num_steps, low=1),
        require_int("fo_steps", fo_steps, low=0),
        require_int("window", window, low=1),
    )


def window_starts(num_steps: int, fo_steps: int, window: int, window_start: Any) -> range:
    """The window starts ``j`` a call may draw: ``{K+1 .. T-h+1}``, or ``{a .. b}``."""
    num_steps, fo_steps, window = _check_chain_split(num_steps, fo_steps, window)
    low, high = fo_steps + 1, num_steps - window + 1
    if low > high:
        raise ValueError(
            f"window: fo_steps ({fo_steps}) + window ({window}) exceeds the chain's "
            f"{num_steps} steps"
        )
    window_start = checked_window_start(window_start)
    if isinstance(window_start, tuple):
        a, b = window_start
        if a < low or b > high:
            raise ValueError(
                f"window_start: ({a}, {b}) must lie within [{low}, {high}] "
                f"(fo_steps={fo_steps}, window={window}, {num_steps} steps)"
            )
        low, high = a, b
    return range(low, high + 1)


def step_roles(num_steps: int, fo_steps: int, window: int, start: int) -> list[str]:
    """Role of each step ``s = 1..T`` (list index ``s - 1``): ``"fo"``, ``"window"``, ``"rest"``.

    FO covers ``1..K``, the window ``j..j+h-1``, the rest every other step; together
    they cover each step exactly once (spec, "three kinds of step").
    """
    num_steps, fo_steps, window = _check_chain_split(num_steps, fo_steps, window)
    start = require_int("start", start)
    if not fo_steps + 1 <= start <= num_steps - window + 1:
        raise ValueError(
            f"start: the window {{{start}..{start + window - 1}}} does not fit after "
            f"{fo_steps} first-order steps in {num_steps} steps"
        )
    roles = []
    for s in range(1, num_steps + 1):
        if s <= fo_steps:
            roles.append("fo")
        elif start <= s < start + window:
            roles.append("window")
        else:
            roles.append("rest")
    return roles


# --------------------------------------------------------------------------------------
# State across calls: the running gradient norms of window_start="grad_norm"
# --------------------------------------------------------------------------------------


class RLRState:
    """Running mean of the window term's gradient norm per window start ``j``.

    Used by ``window_start="grad_norm"``: ``P(j) = softmax(m_j / mean(m) / temperature)``
    over the allowed starts, with unvisited starts given the largest mean seen (so each
    is tried). Any distribution of ``j`` keeps the estimator unbiased; this one spends
    the window where the gradient is largest.
    """

    def __init__(self) -> None:
        self.window_grad_norm: dict[int, float] = {}

    def probabilities(self, starts: Sequence[int], temperature: float) -> torch.Tensor:
        if isinstance(starts, (str, bytes)) or not isinstance(starts, Sequence) or not starts:
            raise ValueError("starts: expected a non-empty sequence of window starts")
        temperature = require_number("temperature", temperature, low=0.0, low_open=True)
        if not self.window_grad_norm:
            return torch.full((len(starts),), 1.0 / len(starts), dtype=torch.float64)
        top = max(self.window_grad_norm.values())
        values = torch.tensor(
            [self.window_grad_norm.get(j, top) for j in starts], dtype=torch.float64
        )
        scale = values.mean().clamp(min=1e-30)
        return torch.softmax(values / scale / temperature, dim=0)

    def update(self, start: int, norm: float, momentum: float) -> None:
        """Fold the window term's ``norm`` at ``start`` into its running mean (a
        non-finite ``norm`` is skipped)."""
        start = require_int("start", start, low=1)
        if isinstance(norm, bool) or not isinstance(norm, (int, float)):
            raise TypeError(f"norm: expected a real number, got {type(norm).__name__}")
        if norm < 0:
            raise ValueError(f"norm: must be >= 0, got {norm}")
        momentum = require_number("momentum", momentum, low=0.0, high=1.0, high_open=True)
        if not math.isfinite(norm):
            return
        old = self.window_grad_norm.get(start)
        self.window_grad_norm[start] = (
            norm if old is None else momentum * old + (1 - momentum) * norm
        )

    def state_dict(self) -> dict[str, Any]:
        return {"window_grad_norm": dict(self.window_grad_norm)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or not isinstance(state.get("window_grad_norm"), dict):
            raise TypeError("state: expected {'window_grad_norm': {start: norm}}")
        values = {}
        for key, value in state["window_grad_norm"].items():
            if isinstance(key, bool) or not isinstance(key, int) or key < 1:
                raise ValueError(f"state: window start {key!r} is not a positive int")
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"state: window start {key}: norm {value!r} is not finite >= 0")
            values[key] = float(value)
        self.window_grad_norm = values


# --------------------------------------------------------------------------------------
# One call's working state and the operations every estimator is built from
# --------------------------------------------------------------------------------------


class _Perturbation:
    """Applies ``theta + scale * u(seed)`` to the trainable parameters and undoes it.

    ``"copy"`` restores from a copy of the parameters taken once (exact); ``"reverse"``
    applies the opposite scale (no copy; exact up to one rounding per element).
    """

    def __init__(self, params: list[torch.Tensor], mode: str, backend: str) -> None:
        self.tensors = [p.detach() for p in params]
        self.mode = mode
        self.backend = backend
        self.backup = [t.clone() for t in self.tensors] if mode == "copy" else None
        self.applied: tuple[int, float] | None = None

    def apply(self, seed: int, scale: float) -> None:
        perturb_(self.tensors, seed, scale, backend=self.backend)
        self.applied = (seed, scale)

    def restore(self) -> None:
        if self.applied is None:
            return
        with torch.no_grad():
            if self.backup is not None:
                for tensor, saved in zip(self.tensors, self.backup):
                    tensor.copy_(saved)
            else:
                seed, scale = self.applied
                perturb_(self.tensors, seed, -scale, backend=self.backend)
        self.applied = None


@dataclass
class EstimationRun:
    """One call of :func:`estimate_grad`: inputs, the sampled chains and staged terms.

    ``xs[s]`` is ``x_s`` (``s = 0..T``, ``[N, ...]``, detached); ``coefficients[s]``
    the scalars of step ``s`` (index 0 unused); ``N = base_batch * repeats`` chains
    (``repeats = 2`` for antithetic pairs: chain ``b`` and ``b + base_batch``). With
    ``sync``, ``union_rewards`` holds every rank's rewards (rank order) and
    :meth:`union_draw_rows` the rows of this rank in a draw made for the union.
    """

    model: GuidedDenoiser
    reward_fn: Callable[[torch.Tensor], torch.Tensor]
    x_T: torch.Tensor
    params: list[torch.Tensor]
    config: RLRConfig
    generator: torch.Generator
    state: RLRState | None
    num_steps: int
    coefficients: list[TransitionCoefficients | None]
    timesteps: list[int]
    scheduler: Any
    base_batch: int
    repeats: int = 1
    xs: list[torch.Tensor | None] = field(default_factory=list)
    rewards: torch.Tensor | None = None
    staged: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    sync: Any = None
    union_rewards: torch.Tensor | None = None

    # ---------------------------------------------------------------- several processes
    @property
    def world_size(self) -> int:
        return 1 if self.sync is None else self.sync.world_size

    def union_draw_rows(self) -> slice:
        """This rank's rows of a ``[world_size * base_batch, ...]`` draw for the union."""
        rank = 0 if self.sync is None else self.sync.rank
        return slice(rank * self.base_batch, (rank + 1) * self.base_batch)

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's ``tensor`` concatenated along dim 0 (the tensor itself alone)."""
        return tensor if self.sync is None else self.sync.gather(tensor)

    def agree(self, error: BaseException | None) -> None:
        """Raise on every rank when any rank failed (its own error where it failed).

        A collective: every rank calls it at the same point, so that one rank's failure
        does not leave the others waiting in the next gather.
        """
        if self.sync is None:
            if error is not None:
                raise error
            return
        failed = torch.tensor([error is not None], dtype=torch.int32, device=self.x_T.device)
        flags = self.sync.gather(failed)
        if error is not None:
            raise error
        if bool(flags.any()):
            ranks = [r for r, flag in enumerate(flags.tolist()) if flag]
            raise RuntimeError(f"sync: the call failed on rank(s) {ranks}; see their errors")

    # ---------------------------------------------------------------- draws
    def draw_int(self, low: int, high: int) -> int:
        """Uniform integer in ``[low, high]`` from the call's generator."""
        draw = torch.randint(
            low, high + 1, (1,), generator=self.generator, device=self.generator.device
        )
        return int(draw.item())

    def draw_seeds(self, count: int) -> list[int]:
        draws = torch.randint(
            0, _SEED_HIGH, (count,), generator=self.generator, device=self.generator.device
        )
        return draws.tolist()

    def set_exit_step(self, step: int, eta: float) -> None:
        """Give step ``step`` the scalars of noise level ``eta`` (the window's exit)."""
        self.coefficients[step] = transition_coefficients(
            self.scheduler, self.timesteps[self.num_steps - step], eta
        )

    # ---------------------------------------------------------------- sampling
    def sample(
        self, noise_seed: int, zo_steps: Sequence[int] = (), zo_seeds: Sequence[int] = ()
    ) -> None:
        """Run the chains without autograd, storing every ``x_s``.

        The inherent noises come from a generator seeded with ``noise_seed`` (one draw
        per step, ``[base_batch, ...]``, shared by antithetic partners). At each step of
        ``zo_steps`` the first ``base_batch`` chains run at ``theta + sigma_p u`` and the
        others at ``theta - sigma_p u``, ``u`` from that step's seed in ``zo_seeds``.
        """
        x_T = self.x_T
        noise_gen = torch.Generator(device=x_T.device).manual_seed(noise_seed)
        x = x_T.detach().repeat(self.repeats, *([1] * (x_T.dim() - 1)))
        self.xs = [None] * (self.num_steps + 1)
        self.xs[self.num_steps] = x
        seeds = dict(zip(zo_steps, zo_seeds))
        perturbation = (
            _Perturbation(self.params, self.config.zo_restore, self.config.backend)
            if seeds
            else None
        )
        b = self.base_batch
        with torch.no_grad():
            for s in range(self.num_steps, 0, -1):
                coeff = self.coefficients[s]
                noise = torch.randn(
                    (self.world_size * b, *x_T.shape[1:]),
                    generator=noise_gen,
                    device=x_T.device,
                    dtype=x_T.dtype,
                )
                if self.sync is not None:
                    noise = noise[self.union_draw_rows()]
                if s in seeds:
                    outs = []
                    for sign, rows in ((1.0, slice(0, b)), (-1.0, slice(b, 2 * b))):
                        try:
                            perturbation.apply(seeds[s], sign * self.config.sigma_p)
                            outs.append(self.model(x[rows], s, rows))
                        finally:
                            perturbation.restore()
                    out = torch.cat(outs)
                else:
                    out = self.model(x, s)
                noise = noise.repeat(self.repeats, *([1] * (noise.dim() - 1)))
                x = add_step_noise(transition_mean(x, out, coeff), coeff.sigma, noise, x_T.dtype)
                self.xs[s - 1] = x

    # ---------------------------------------------------------------- recomputation
    def step_mean(self, x: torch.Tensor, step: int) -> torch.Tensor:
        """``mu_theta(x, step)`` with gradient (checkpointed when configured)."""
        coeff = self.coefficients[step]

        def mean_of(x_in: torch.Tensor) -> torch.Tensor:
            return transition_mean(x_in, self.model(x_in, step), coeff)

        if self.config.checkpoint:
            return _checkpoint(mean_of, x, use_reentrant=False)
        return mean_of(x)

    def pathwise(self, top: int, bottom: int, active: torch.Tensor | None = None) -> torch.Tensor:
        """``x_{bottom-1}`` recomputed from the stored ``x_top`` through steps ``top..bottom``.

        Values equal the stored chain; gradient flows through each step's mean (to the
        parameters and to the step's input). ``active``: ``[N, T+1]`` bool, where
        ``active[b, s]`` false blocks step ``s`` of chain ``b`` (AlignProp's truncation).
        """
        x = self.xs[top].detach()
        for s in range(top, bottom - 1, -1):
            mean = self.step_mean(x, s)
            delta = mean - mean.detach()
            if active is not None:
                mask = active[:, s].to(delta.dtype).view(-1, *([1] * (delta.dim() - 1)))
                delta = delta * mask
            stored = self.xs[s - 1]
            x = (stored.to(delta.dtype) + delta).to(stored.dtype)
        return x

    def log_prob(self, x: torch.Tensor, step: int) -> torch.Tensor:
        """``log N(x_{step-1}; mu_theta(x, step), sigma_step^2 I)``, ``[N]``, with gradient."""
        coeff = self.coefficients[step]
        target = self.xs[step - 1]

        def density(x_in: torch.Tensor) -> torch.Tensor:
            return transition_log_prob(
                target, x_in, self.model(x_in, step), coeff, backend=self.config.backend
            )

        if self.config.checkpoint and x.requires_grad:
            return _checkpoint(density, x, use_reentrant=False)
        return density(x)

    # ---------------------------------------------------------------- rewards
    def _check_reward(self, reward: Any) -> torch.Tensor:
        n = self.base_batch * self.repeats
        if not isinstance(reward, torch.Tensor):
            raise TypeError(
                f"reward_fn: expected a tensor of shape ({n},), got {type(reward).__name__}"
            )
        if not reward.is_floating_point():
            raise TypeError(f"reward_fn: expected a floating tensor, got {reward.dtype}")
        if reward.shape != (n,):
            raise ValueError(
                f"reward_fn: expected shape ({n},) (one reward per chain), got "
                f"{tuple(reward.shape)}"
            )
        if not bool(torch.isfinite(reward.detach()).all()):
            raise ValueError("reward_fn: returned non-finite rewards")
        return reward

    def _set_rewards(self, reward: torch.Tensor) -> None:
        self.rewards = reward.detach()
        self.union_rewards = self.gather(self.rewards) if self.sync is not None else self.rewards

    def _on_every_rank(self, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``compute()``; with ``sync``, a failure on any rank raises on every rank."""
        if self.sync is None:
            return compute()
        error = result = None
        try:
            result = compute()
        except Exception as err:  # noqa: BLE001 - re-raised here once the ranks agreed
            error = err
        self.agree(error)
        return result

    def rewards_of_samples(self) -> torch.Tensor:
        """Rewards of the stored ``x_0`` (no gradient)."""

        def compute() -> torch.Tensor:
            with torch.no_grad():
                return self._check_reward(self.reward_fn(self.xs[0]))

        self._set_rewards(self._on_every_rank(compute))
        return self.rewards

    def rewards_with_gradient(self, x0: torch.Tensor) -> torch.Tensor:
        """Rewards of a recomputed ``x_0`` that carries a graph; they must carry one too."""

        def compute() -> torch.Tensor:
            reward = self._check_reward(self.reward_fn(x0))
            if not reward.requires_grad:
                raise ValueError(
                    "reward_fn: its output has no gradient, but the first-order term needs "
                    "dR/dx_0; use a differentiable reward, or fo_steps=0 with estimator='rlr' "
                    "(or 'ddpo') for a reward without one"
                )
            return reward

        reward = self._on_every_rank(compute)
        self._set_rewards(reward)
        return reward

    def advantages(self) -> torch.Tensor:
        """``A_b = R_b - baseline_b`` (leave-one-out, or leave-pair-out for pairs).

        The other chains are those of every rank (``union_rewards``).
        """
        dtype = torch.float64 if self.x_T.dtype == torch.float64 else torch.float32
        rewards = self.rewards.to(dtype)
        if self.config.baseline == "none":
            return rewards
        if self.sync is None:
            n = rewards.shape[0]
            total = rewards.sum()
        else:
            union = self.union_rewards.to(dtype)
            n = union.shape[0]
            total = union.sum()
        if self.repeats == 2:
            b = self.base_batch
            partner = torch.cat([rewards[b:], rewards[:b]])
            others = n - 2
            excluded = rewards + partner
        else:
            others = n - 1
            excluded = rewards
        if others == 0:
            return rewards
        return rewards - (total - excluded) / others

    def zo_coefficient(self) -> float:
        """``mean_pairs(R+ - R-) / (2 sigma_p)``, the scale of the ZO term's ``sum_i u_i``."""
        b = self.base_batch
        difference = self.gather((self.rewards[:b] - self.rewards[b:]).double()).mean()
        coefficient = float(difference) / (2.0 * self.config.sigma_p)
        self.metrics["zo_coefficient"] = coefficient
        return coefficient

    # ---------------------------------------------------------------- staging
    def _buffer(self, name: str) -> list[torch.Tensor]:
        """The staging buffer of term ``name`` (one shared buffer without term norms)."""
        key = name if self.config.term_norms else "all"
        if key not in self.staged:
            self.staged[key] = [torch.zeros_like(p) for p in self.params]
        return self.staged[key]

    def add_term(self, name: str, loss: torch.Tensor) -> None:
        """Stage ``d loss / d theta`` under term ``name`` (terms add up)."""
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        with torch.no_grad():
            for buffer, g in zip(self._buffer(name), grads):
                if g is not None:
                    buffer.add_(g)

    def add_noise_term(self, name: str, seeds: Sequence[int], scale: float) -> None:
        """Stage ``scale * sum_i u(seeds[i])`` (the ZO term) under term ``name``."""
        buffer = self._buffer(name)
        if seeds:
            accumulate_noise_(buffer, seeds, [scale] * len(seeds), backend=self.config.backend)

    def term_norm(self, name: str) -> float:
        """Norm of a staged term (needs ``term_norms``; 0 for a term never staged)."""
        if name not in self.staged:
            return 0.0
        return _norm(self.staged[name])

    def staged_gradient(self) -> list[torch.Tensor]:
        """The sum of the staged terms (one buffer per parameter)."""
        buffers = list(self.staged.values())
        if not buffers:
            return [torch.zeros_like(p) for p in self.params]
        total = buffers[0]
        with torch.no_grad():
            for other in buffers[1:]:
                for t, o in zip(total, other):
                    t.add_(o)
        return total


def _union_term_norm(run: EstimationRun, name: str) -> float:
    """Norm of term ``name`` averaged over the ranks (this rank's term alone without sync).

    The state of ``window_start="grad_norm"`` is updated with it, so that it stays the
    same on every rank (and equals one process's on the union).
    """
    if run.sync is None or name not in run.staged:
        return run.term_norm(name)
    flat = torch.cat([t.reshape(-1).double() for t in run.staged[name]])
    mean = run.gather(flat[None]).mean(dim=0)
    return float(torch.linalg.vector_norm(mean))


def _norm(tensors: Sequence[torch.Tensor]) -> float:
    return math.sqrt(sum(float(torch.linalg.vector_norm(t.double())) ** 2 for t in tensors))


# --------------------------------------------------------------------------------------
# The estimators
# --------------------------------------------------------------------------------------


def _draw_window_start(run: EstimationRun) -> int:
    cfg = run.config
    starts = window_starts(run.num_steps, cfg.fo_steps, cfg.window, cfg.window_start)
    if cfg.window_start == "grad_norm":
        probs = run.state.probabilities(list(starts), cfg.window_temperature)
        probs = probs.to(run.generator.device)
        index = int(torch.multinomial(probs, 1, generator=run.generator).item())
        return starts[index]
    return run.draw_int(starts[0], starts[-1])


def _likelihood_ratio_term(
    run: EstimationRun, name: str, steps: Sequence[int], weight: float = 1.0
) -> None:
    """Stage ``-weight * mean_b(A_b * log p_b(step))`` for each step (one backward each)."""
    advantages = run.advantages()
    for s in steps:
        log_prob = run.log_prob(run.xs[s].detach(), s)
        run.add_term(name, -(advantages * log_prob).mean() * weight)


@register_estimator("rlr", antithetic=lambda config: config.rest == "zo")
def _rlr(run: EstimationRun) -> None:
    cfg = run.config
    noise_seed = run.draw_seeds(1)[0]
    start = _draw_window_start(run)
    zo_seeds = run.draw_seeds(run.num_steps)
    roles = step_roles(run.num_steps, cfg.fo_steps, cfg.window, start)
    rest = [s for s in range(1, run.num_steps + 1) if roles[s - 1] == "rest"]
    run.set_exit_step(start, cfg.resolved_exit_eta)
    run.metrics["window_start"] = start
    if cfg.rest == "zo":
        run.sample(noise_seed, rest, [zo_seeds[s - 1] for s in rest])
    else:
        run.sample(noise_seed)
    # FO: backprop dR/dx_0 through steps K..1 (x_K detached); it also gives the rewards.
    if cfg.fo_steps > 0:
        reward = run.rewards_with_gradient(run.pathwise(cfg.fo_steps, 1))
        run.add_term("fo", -reward.mean())
    else:
        run.rewards_of_samples()
    # HO: the window's steps pathwise from the stored x_{j+h-1}, a likelihood ratio at j.
    top = start + cfg.window - 1
    x_exit = run.pathwise(top, start + 1) if cfg.window > 1 else run.xs[start].detach()
    log_prob = run.log_prob(x_exit, start)
    run.add_term("window", -(run.advantages() * log_prob).mean())
    if cfg.window_start == "grad_norm":
        run.state.update(start, _union_term_norm(run, "window"), cfg.window_momentum)
    # The rest.
    if cfg.rest == "zo":
        run.add_noise_term("rest", [zo_seeds[s - 1] for s in rest], -run.zo_coefficient())
    elif cfg.rest == "lr":
        _likelihood_ratio_term(run, "rest", rest)


@register_estimator("zo", antithetic=True)
def _zeroth_order(run: EstimationRun) -> None:
    """Antithetic ZO perturbations at every step: the spec's ZO-only comparison."""
    noise_seed = run.draw_seeds(1)[0]
    seeds = run.draw_seeds(run.num_steps)
    steps = list(range(1, run.num_steps + 1))
    run.sample(noise_seed, steps, [seeds[s - 1] for s in steps])
    run.rewards_of_samples()
    run.add_noise_term("zo", [seeds[s - 1] for s in steps], -run.zo_coefficient())


@register_estimator("ddpo")
def _ddpo(run: EstimationRun) -> None:
    cfg = run.config
    noise_seed = run.draw_seeds(1)[0]
    count = max(1, round(cfg.ddpo_step_fraction * run.num_steps))
    if count < run.num_steps:
        order = torch.randperm(run.num_steps, generator=run.generator, device=run.generator.device)[
            :count
        ].cpu()
        steps = sorted(int(i) + 1 for i in order)
    else:
        steps = list(range(1, run.num_steps + 1))
    run.sample(noise_seed)
    run.rewards_of_samples()
    run.metrics["ddpo_steps"] = steps
    _likelihood_ratio_term(run, "lr", steps, weight=run.num_steps / count)


def _pathwise_estimator(
    run: EstimationRun, noise_seed: int, top: int, active: torch.Tensor | None = None
) -> None:
    run.sample(noise_seed)
    reward = run.rewards_with_gradient(run.pathwise(top, 1, active))
    run.add_term("fo", -reward.mean())


@register_estimator("draft")
def _draft(run: EstimationRun) -> None:
    _pathwise_estimator(run, run.draw_seeds(1)[0], run.config.fo_steps)


@register_estimator("full")
def _full(run: EstimationRun) -> None:
    _pathwise_estimator(run, run.draw_seeds(1)[0], run.num_steps)


@register_estimator("alignprop")
def _alignprop(run: EstimationRun) -> None:
    low, high = run.config.alignprop_steps or (1, run.num_steps)
    noise_seed = run.draw_seeds(1)[0]
    union_depth = torch.randint(
        low,
        high + 1,
        (run.world_size * run.base_batch,),
        generator=run.generator,
        device=run.generator.device,
    ).cpu()
    depth = union_depth[run.union_draw_rows()]
    steps = torch.arange(run.num_steps + 1)
    active = (steps[None, :] <= depth[:, None]).to(run.x_T.device)
    run.metrics["alignprop_mean_steps"] = float(union_depth.double().mean())
    _pathwise_estimator(run, noise_seed, int(union_depth.max()), active)


# --------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------


def _trainable_parameters(denoiser: Any, parameters: Any) -> list[torch.Tensor]:
    if parameters is None:
        if not isinstance(denoiser, torch.nn.Module):
            raise TypeError(
                "parameters: required when denoiser is not a torch.nn.Module (give the "
                "tensors to train)"
            )
        params = [p for p in denoiser.parameters() if p.requires_grad]
        name = "denoiser"
    else:
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        params = list(parameters)
        name = "parameters"
        for i, p in enumerate(params):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"parameters[{i}]: expected a tensor, got {type(p).__name__}")
            if not p.requires_grad:
                raise ValueError(f"parameters[{i}]: does not require grad")
    if not params:
        raise ValueError(f"{name}: has no trainable parameters (none with requires_grad)")
    seen = set()
    unique = []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            unique.append(p)
    for i, p in enumerate(unique):
        if not p.is_floating_point():
            raise TypeError(f"{name}: trainable tensor {i} is not floating ({p.dtype})")
        if not p.is_contiguous():
            raise ValueError(
                f"{name}: trainable tensor {i} is not contiguous (ZO perturbs in place)"
            )
    return unique


def _validate(run: EstimationRun) -> None:
    """Every check that does not need the model, before anything is drawn or changed."""
    cfg, T = run.config, run.num_steps
    # A forced compiled backend must exist for these tensors (raises RuntimeError naming it).
    resolve_noise_backend(cfg.backend, run.x_T.device)
    resolve_transition_backend(cfg.backend, run.x_T.device)
    if cfg.estimator == "rlr":
        if cfg.fo_steps + cfg.window > T:
            raise ValueError(
                f"window: fo_steps ({cfg.fo_steps}) + window ({cfg.window}) exceeds the chain's "
                f"{T} steps"
            )
        starts = window_starts(T, cfg.fo_steps, cfg.window, cfg.window_start)
        exit_eta = cfg.resolved_exit_eta
        for j in starts:
            coeff = transition_coefficients(run.scheduler, run.timesteps[T - j], exit_eta)
            if coeff.sigma <= 0.0:
                raise ValueError(
                    f"window_start: the window may exit at step {j} (timestep "
                    f"{run.timesteps[T - j]}), which has sigma = 0, so no likelihood ratio; "
                    "raise fo_steps or restrict window_start"
                )
        if cfg.rest == "lr":
            for s in range(cfg.fo_steps + 1, T + 1):
                if run.coefficients[s].sigma <= 0.0:
                    raise ValueError(
                        f"eta: rest='lr' needs a stochastic step everywhere outside the FO steps, "
                        f"but step {s} has sigma = 0 (eta = {cfg.eta})"
                    )
        if cfg.window_start == "grad_norm" and run.state is None:
            raise ValueError("state: window_start='grad_norm' needs an RLRState (state=RLRState())")
    elif cfg.estimator == "ddpo":
        for s in range(1, T + 1):
            if run.coefficients[s].sigma <= 0.0:
                raise ValueError(
                    f"eta: ddpo needs a stochastic step everywhere, but step {s} (timestep "
                    f"{run.timesteps[T - s]}) has sigma = 0 (eta = {cfg.eta})"
                )
    elif cfg.estimator == "draft":
        if not 1 <= cfg.fo_steps <= T:
            raise ValueError(f"fo_steps: draft needs 1 <= fo_steps <= {T}, got {cfg.fo_steps}")
    elif (
        cfg.estimator == "alignprop"
        and cfg.alignprop_steps is not None
        and cfg.alignprop_steps[1] > T
    ):
        raise ValueError(f"alignprop_steps: hi must be <= {T} steps, got {cfg.alignprop_steps}")


def estimate_grad(
    denoiser: Callable[..., Any],
    scheduler: Any,
    reward_fn: Callable[[torch.Tensor], torch.Tensor],
    x_T: torch.Tensor,
    *,
    config: RLRConfig,
    generator: torch.Generator | None = None,
    cond: Conditioning = None,
    uncond: Conditioning = None,
    parameters: Sequence[torch.Tensor] | None = None,
    state: RLRState | None = None,
    sync: GradientSync | None = None,
) -> dict[str, Any]:
    """Add an estimate of ``d(-mean reward)/d theta`` to ``.grad`` of the trainable parameters.

    Args:
        denoiser: ``denoiser(x_t, t, **kwargs)`` -> tensor or object with ``.sample``
            (diffusers UNets, or any callable; ``t`` is a ``[N]`` int64 tensor).
        scheduler: diffusers ``DDIMScheduler`` or ``DDPMScheduler`` with timesteps set;
            the chain runs over ``scheduler.timesteps``.
        reward_fn: ``reward_fn(x_0) -> [N]`` rewards (differentiable for the first-order
            terms of ``rlr`` with ``fo_steps > 0``, ``draft``, ``alignprop``, ``full``).
        x_T: ``[B, ...]`` starting noise. With ``rest="zo"`` each start is run as an
            antithetic pair: ``N = 2B`` chains (chain ``b`` and ``b + B``), else ``N = B``.
        config: :class:`RLRConfig`.
        generator: the source of every draw (noises, window start, ZO seeds, ...);
            ``None`` uses torch's default CPU generator. The step noises come from the
            first draw, so two estimators called with equal generator states see the
            same noises (a paired comparison).
        cond, uncond: denoiser keyword arguments (a mapping, or a
            :class:`~riskfast.rlr.PromptSchedule` by stage); tensors whose first
            dimension is ``B`` are per chain. ``uncond`` is needed when
            ``config.guidance_scale != 1``.
        parameters: the tensors to train (default: the denoiser's parameters with
            ``requires_grad``; required for a denoiser that is not an ``nn.Module``).
        state: an :class:`RLRState` for ``window_start="grad_norm"``.
        sync: several processes (a :class:`GradientSync`: ``rank``, ``world_size``,
            ``gather``): the call estimates what one process would on the union of
            the ranks' ``x_T`` (rank order), given the same generator state on every
            rank (module docstring). Average ``.grad`` over the ranks after the call.
    Returns:
        metrics: ``estimator``, ``chains``, ``reward_mean``, ``reward_std``,
        ``window_start`` (rlr), ``grad_norm/<term>`` and ``grad_norm/total``,
        ``model_evaluations`` (samples through the denoiser, recomputation included),
        ``zo_coefficient`` (zo), ``ddpo_steps`` (ddpo), ``alignprop_mean_steps``.
        With ``sync``, ``chains``, the rewards and ``model_evaluations`` are those of
        the union (equal on every rank); the ``grad_norm/*`` are this rank's terms.

    The call is atomic: invalid input raises ``ValueError``/``TypeError`` naming the
    argument before anything changes; if it fails later (e.g. a reward with NaN), the
    parameters, their ``.grad`` and ``generator`` are as they were. ZO perturbations
    are always undone (exactly with ``zo_restore="copy"``).
    """
    _check_sync(sync)
    if sync is None:
        generator = _check_arguments(config, reward_fn, x_T, generator, state)
    else:
        # A rank whose input is bad (a NaN in its x_T, say) tells the others before
        # anyone draws, so that every rank raises instead of waiting in a gather.
        x_T = require_tensor("x_T", x_T)
        generator = _agree_on_input(
            sync,
            x_T,
            lambda: _check_call(
                denoiser,
                scheduler,
                reward_fn,
                x_T,
                config,
                _check_arguments(config, reward_fn, x_T, generator, state),
                cond,
                uncond,
                parameters,
                state,
                None,
            ),
        )
    return _estimate(
        _make_run(
            denoiser,
            scheduler,
            reward_fn,
            x_T,
            config,
            generator,
            cond,
            uncond,
            parameters,
            state,
            sync,
        )
    )


def _check_arguments(
    config: Any, reward_fn: Any, x_T: Any, generator: Any, state: Any
) -> torch.Generator:
    """The checks that need neither the model nor the scheduler; returns the generator."""
    if not isinstance(config, RLRConfig):
        raise TypeError(f"config: expected an RLRConfig, got {type(config).__name__}")
    if not callable(reward_fn):
        raise TypeError(f"reward_fn: expected a callable, got {type(reward_fn).__name__}")
    x_T = require_tensor("x_T", x_T)
    require_floating("x_T", x_T)
    if x_T.dim() < 2 or x_T.shape[0] == 0:
        raise ValueError(f"x_T: expected shape [B, ...] with B >= 1, got {tuple(x_T.shape)}")
    if not bool(torch.isfinite(x_T).all()):
        raise ValueError("x_T: holds non-finite values")
    if generator is None:
        generator = torch.default_generator
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
    if state is not None and not isinstance(state, RLRState):
        raise TypeError(f"state: expected an RLRState, got {type(state).__name__}")
    return generator


def _agree_on_input(
    sync: GradientSync, x_T: torch.Tensor, check: Callable[[], torch.Generator]
) -> torch.Generator:
    """Validate on every rank, then agree (one gather): every rank raises if any rank's
    input fails or the batch sizes differ, before anything is drawn."""
    error: BaseException | None = None
    generator = None
    try:
        generator = check()
    except (TypeError, ValueError, RuntimeError) as err:
        error = err
    starts = x_T.shape[0] if x_T.dim() > 0 else 0
    status = torch.tensor([[int(error is not None), starts]], device=x_T.device)
    gathered = sync.gather(status).cpu()
    if error is not None:
        raise error
    failed = [r for r, flag in enumerate(gathered[:, 0].tolist()) if flag]
    if failed:
        raise ValueError(f"sync: the input was rejected on rank(s) {failed}; see their errors")
    sizes = gathered[:, 1].tolist()
    if len(set(sizes)) != 1:
        raise ValueError(f"x_T: every rank must pass the same number of starts, got {sizes}")
    return generator


def _check_call(*args: Any) -> torch.Generator:
    """The validation of :func:`_make_run` alone (nothing drawn, nothing changed)."""
    _make_run(*args)
    return args[5]


def _estimate(run: EstimationRun) -> dict[str, Any]:
    """Run the configured estimator on a validated run and hand its gradient to ``.grad``."""
    config, generator, state, sync, x_T = run.config, run.generator, run.state, run.sync, run.x_T
    model = run.model
    params = run.params
    generator_state = generator.get_state()
    state_backup = state.state_dict() if state is not None else None
    try:
        _ESTIMATORS[config.estimator](run)
    except BaseException:
        generator.set_state(generator_state)
        if state is not None:
            state.load_state_dict(state_backup)
        raise
    term_norms = (
        {f"grad_norm/{name}": run.term_norm(name) for name in run.staged}
        if config.term_norms
        else {}
    )
    gradient = run.staged_gradient()
    rewards = run.union_rewards
    evaluations = model.evaluations
    if sync is not None:
        count = torch.tensor([evaluations], dtype=torch.int64, device=x_T.device)
        evaluations = int(sync.gather(count).sum())
    # Nothing can fail past this point: hand the staged gradient to .grad.
    with torch.no_grad():
        for p, g in zip(params, gradient):
            if p.grad is None:
                p.grad = g
            else:
                p.grad.add_(g)
    metrics = {
        "estimator": config.estimator,
        "chains": int(rewards.shape[0]),
        "reward_mean": float(rewards.double().mean()),
        "reward_std": float(rewards.double().std()) if rewards.shape[0] > 1 else 0.0,
        "model_evaluations": evaluations,
        "grad_norm/total": _norm(gradient),
    }
    metrics.update(term_norms)
    metrics.update(run.metrics)
    return metrics


def _make_run(
    denoiser: Callable[..., Any],
    scheduler: Any,
    reward_fn: Callable[[torch.Tensor], torch.Tensor],
    x_T: torch.Tensor,
    config: RLRConfig,
    generator: torch.Generator,
    cond: Conditioning,
    uncond: Conditioning,
    parameters: Sequence[torch.Tensor] | None,
    state: RLRState | None,
    sync: GradientSync | None,
) -> EstimationRun:
    """The validated :class:`EstimationRun` of one call (nothing drawn yet)."""
    timesteps = check_scheduler(scheduler)
    num_steps = len(timesteps)
    params = _trainable_parameters(denoiser, parameters)
    coefficients: list[TransitionCoefficients | None] = [None] + [
        transition_coefficients(scheduler, timesteps[num_steps - s], config.eta)
        for s in range(1, num_steps + 1)
    ]
    repeats = 2 if _ANTITHETIC[config.estimator](config) else 1
    model = GuidedDenoiser(
        denoiser,
        timesteps,
        cond=cond,
        uncond=uncond,
        guidance_scale=config.guidance_scale,
        base_batch=x_T.shape[0],
        repeats=repeats,
    )
    run = EstimationRun(
        model=model,
        reward_fn=reward_fn,
        x_T=x_T,
        params=params,
        config=config,
        generator=generator,
        state=state,
        num_steps=num_steps,
        coefficients=coefficients,
        timesteps=timesteps,
        scheduler=scheduler,
        base_batch=x_T.shape[0],
        repeats=repeats,
        sync=sync,
    )
    _validate(run)
    return run
