"""The half-order window's activation memory, and the window length a budget allows.

Spec ``rlr.md`` (The estimator): "h from a memory budget: the window's activation memory
grows linearly with h". The window's term backpropagates through h steps of the chain
(from the stored ``x_{j+h-1}`` to the likelihood ratio at the exit step j), so autograd
keeps, until that term's backward, what the h steps saved:

- h = 1: the exit step's activations (its input is the stored chain, which needs no
  gradient, so there is nothing to checkpoint);
- h >= 2 with activation checkpointing (``RLRConfig.checkpoint``, the default): each
  step's input and the few tensors around its checkpoint, and during the backward one
  step's activations, rebuilt a step at a time;
- h >= 2 without checkpointing: every step's activations.

So the peak is linear in h from h = 2 on: ``bytes(h) = bytes(2) + (h - 2) * per_step``.
:func:`window_memory` measures ``bytes(1)``, ``bytes(2)`` and ``per_step`` on the
caller's denoiser and batch by counting the bytes of the tensors autograd saves (each
storage once; parameters, buffers and the stored chain excluded, since they exist
whatever h is), plus one step's activations for the checkpointed backward. It is what
autograd holds, not what an allocator reports: add the parameters, their gradients, the
optimizer state, the stored chain (``(T + 1) x`` the chains' size) and some headroom for
temporaries.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .._checks import require_int
from .config import RLRConfig
from .estimators import _check_arguments, _make_run
from .sampler import Conditioning

__all__ = ["WindowMemory", "window_memory"]


@dataclass(frozen=True)
class WindowMemory:
    """Bytes autograd holds at the peak of RLR's window term, by window length h.

    Attributes:
        first: at h = 1.
        second: at h = 2 (with checkpointing: what the forward holds plus
            ``recompute``).
        per_step: added by each step beyond the second.
        recompute: with checkpointing, one step's activations, rebuilt during the
            backward (part of ``second``); 0 without checkpointing.
        max_window: the longest window the chain allows, ``T - fo_steps``.
    """

    first: int
    second: int
    per_step: int
    recompute: int
    max_window: int

    def bytes_for(self, window: int) -> int:
        """The bytes the window term holds at its peak at length ``window`` (h)."""
        window = require_int("window", window, low=1, high=self.max_window)
        return self.first if window == 1 else self.second + (window - 2) * self.per_step

    def largest_window(self, budget_bytes: int) -> int:
        """The longest window (h) whose :meth:`bytes_for` fits ``budget_bytes``."""
        budget_bytes = require_int("budget_bytes", budget_bytes, low=0)
        fits = [h for h in range(1, self.max_window + 1) if self.bytes_for(h) <= budget_bytes]
        if not fits:
            raise ValueError(
                f"budget_bytes: {budget_bytes} is below the shortest window's "
                f"{self.bytes_for(1)} bytes (h = 1)"
            )
        return max(fits)


class _SavedBytes:
    """Live bytes of the storages autograd saves while active (each storage once).

    A saved tensor is wrapped in a holder; the storage's bytes are counted while any
    holder of it lives (the graph frees its holders when its backward has run).
    """

    def __init__(self, exclude: Iterable[torch.Tensor]) -> None:
        self.excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self.holders: dict[int, int] = {}  # storage -> live holders
        self.sizes: dict[int, int] = {}  # storage -> bytes
        self.live = 0
        self.peak = 0
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _release(self, ptr: int, nbytes: int) -> None:
        self.holders[ptr] -= 1
        if not self.holders[ptr]:
            del self.holders[ptr], self.sizes[ptr]
            self.live -= nbytes

    def live_excluding(self, tensors: Iterable[torch.Tensor]) -> int:
        """Live bytes, less the storages of ``tensors`` (made after this count began)."""
        ptrs = {t.untyped_storage().data_ptr() for t in tensors}
        return self.live - sum(self.sizes.get(ptr, 0) for ptr in ptrs)

    def _pack(self, tensor: torch.Tensor) -> Any:
        storage = tensor.untyped_storage()
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        if ptr in self.excluded or nbytes == 0:
            return tensor
        if ptr not in self.holders:
            self.holders[ptr] = 0
            self.sizes[ptr] = nbytes
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        self.holders[ptr] += 1
        holder = _Held(tensor)
        weakref.finalize(holder, self._release, ptr, nbytes)
        return holder

    @staticmethod
    def _unpack(packed: Any) -> torch.Tensor:
        return packed.tensor if isinstance(packed, _Held) else packed

    def __enter__(self) -> _SavedBytes:  # noqa: PYI034 - Python 3.10 has no typing.Self
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.hooks.__exit__(*exc)


class _Held:
    __slots__ = ("__weakref__", "tensor")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


def _held_by_window(run: Any, window: int, excluded: list[torch.Tensor]) -> int:
    """Bytes the window term of length ``window`` holds before its backward."""
    top = run.num_steps
    exit_step = top - window + 1
    run.set_exit_step(exit_step, run.config.resolved_exit_eta)
    with _SavedBytes(excluded) as saved:
        x_exit = run.pathwise(top, exit_step + 1) if window > 1 else run.xs[exit_step].detach()
        log_prob = run.log_prob(x_exit, exit_step)
        # the term weighs the log-density by the chains' advantages ([N], saved too)
        term = (torch.ones_like(log_prob) * log_prob).mean()
        held = saved.live
        del x_exit, log_prob, term
    return held


def window_memory(
    denoiser: Callable[..., Any],
    scheduler: Any,
    x_T: torch.Tensor,
    *,
    config: RLRConfig,
    cond: Conditioning = None,
    uncond: Conditioning = None,
    parameters: Sequence[torch.Tensor] | None = None,
) -> WindowMemory:
    """Measure what RLR's window term holds on this denoiser and batch (module docstring).

    Args: as :func:`riskfast.rlr.estimate_grad` (``x_T`` ``[B, ...]``: the batch the
    estimator will see; with ``rest="zo"`` it runs ``2B`` chains, and so does this).
    ``config.estimator`` must be ``"rlr"``; its ``window`` and ``window_start`` are not
    used (the measurement sets its own). The parameters and buffers of an
    ``nn.Module`` denoiser are excluded from the count; a plain callable's weights are
    excluded only when passed in ``parameters``.

    Returns:
        :class:`WindowMemory`; ``.largest_window(budget_bytes)`` gives h for a budget.

    It samples the chain once without gradients (T denoiser calls) and runs the window's
    forward (no backward) for h = 1, 2, 3, and with checkpointing for h = 1, 2 without
    it, from its own generator: the caller's generators, the
    parameters and their ``.grad`` are left as they were.
    """
    _check_arguments(config, lambda x: x, x_T, None, None)
    if config.estimator != "rlr":
        raise ValueError(f"config: the window belongs to estimator='rlr', got {config.estimator!r}")
    measured = dataclasses.replace(config, window=1, window_start="uniform")
    run = _make_run(
        denoiser,
        scheduler,
        lambda x: x,
        x_T,
        measured,
        torch.Generator(device=x_T.device).manual_seed(0),
        cond,
        uncond,
        parameters,
        None,
        None,
    )
    max_window = run.num_steps - config.fo_steps
    run.sample(0)
    module_tensors: list[torch.Tensor] = []
    if isinstance(denoiser, torch.nn.Module):
        module_tensors = [*denoiser.parameters(), *denoiser.buffers()]
    excluded = [*run.params, *module_tensors, *(x for x in run.xs if x is not None)]
    held = {h: _held_by_window(run, h, excluded) for h in (1, 2, 3) if h <= max_window}
    recompute = 0
    if config.checkpoint:  # the backward rebuilds one step: what it holds unchecked
        run.config = dataclasses.replace(measured, checkpoint=False)
        recompute = _held_by_window(run, 2, excluded) - _held_by_window(run, 1, excluded)
    return WindowMemory(
        first=held[1],
        second=held.get(2, 0) + recompute,
        per_step=held[3] - held[2] if 3 in held else 0,
        recompute=recompute,
        max_window=max_window,
    )
