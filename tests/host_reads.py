"""Count the operations that make the host wait for a CUDA device, on any device.

``torch.cuda.set_sync_debug_mode("error")`` is the real oracle, but it needs a GPU. On a
CPU, :class:`HostReadCounter` records, through a ``TorchDispatchMode`` and a few patched
``Tensor`` methods, every call that would read device data on the host or copy host data
to the device synchronously if the tensors lived on CUDA:

* scalar reads (``.item()``, ``bool(t)``, ``int(t)``: ``aten._local_scalar_dense``);
* ops whose output size depends on values (``nonzero``, ``unique``, ``bincount``,
  ``masked_select``, boolean-mask indexing, ``repeat_interleave`` without a size);
* tensors built from Python data (``torch.tensor``: ``aten.lift_fresh``), which on CUDA
  are copied from pageable host memory;
* copies between devices that are not ``non_blocking`` (visible on a GPU only), and
  ``.tolist()`` / ``.numpy()``.

It is a proxy: an op missing from the list would go unseen, so the GPU run
(``benchmarks/gpu_check.py`` runs the test files that use this with
``set_sync_debug_mode("error")`` on top) stays the final word.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_VALUE_SIZED = {
    "aten._local_scalar_dense",
    "aten.nonzero",
    "aten._unique",
    "aten._unique2",
    "aten.unique_dim",
    "aten.unique_consecutive",
    "aten.bincount",
    "aten.masked_select",
    "aten.lift_fresh",
    "aten.equal",
    "aten.is_nonzero",
}
_INDEXING = {"aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_"}
_COPIES = {"aten._to_copy", "aten.copy_"}


def _packet(func: Any) -> str:
    return str(func).rsplit(".", 1)[0] if str(func).count(".") > 1 else str(func)


def _has_mask_index(args: tuple) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return isinstance(indices, (list, tuple)) and any(
        isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in indices
    )


def _blocking_cross_device_copy(name: str, args: tuple, kwargs: dict) -> bool:
    if name == "aten._to_copy":
        target = kwargs.get("device")
        return (
            target is not None
            and torch.device(target) != args[0].device
            and not kwargs.get("non_blocking", False)
        )
    dst, src = args[0], args[1]
    non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
    return isinstance(src, torch.Tensor) and dst.device != src.device and not non_blocking


class HostReadCounter(TorchDispatchMode):
    """Context manager; ``reads`` counts the recorded calls by name."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: Counter[str] = Counter()
        self._saved: dict[str, Any] = {}
        # Inside a counted ``tolist``/``numpy``: on a GPU those copy to the host through
        # ``aten._to_copy``, which is the same read and is not counted twice.
        self._inside_counted_read = 0

    @property
    def total(self) -> int:
        return sum(self.reads.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _packet(func)
        if self._inside_counted_read:
            return func(*args, **kwargs)
        if (
            name in _VALUE_SIZED
            or (name in _INDEXING and _has_mask_index(args))
            or (name == "aten.repeat_interleave" and kwargs.get("output_size") is None)
            or (name in _COPIES and _blocking_cross_device_copy(name, args, kwargs))
        ):
            self.reads[name] += 1
        return func(*args, **kwargs)

    def __enter__(self) -> HostReadCounter:  # noqa: PYI034 (the mode's own __enter__ returns self)
        for method in ("tolist", "numpy"):
            original = getattr(torch.Tensor, method)
            self._saved[method] = original

            def counted(
                tensor: torch.Tensor, *a: Any, _m: str = method, _f: Any = original, **k: Any
            ):
                self.reads[f"Tensor.{_m}"] += 1
                self._inside_counted_read += 1
                try:
                    return _f(tensor, *a, **k)
                finally:
                    self._inside_counted_read -= 1

            setattr(torch.Tensor, method, counted)
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        try:
            super().__exit__(*exc)
        finally:
            for method, original in self._saved.items():
                setattr(torch.Tensor, method, original)
            self._saved.clear()
