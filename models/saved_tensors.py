r"""Peak memory saved for backward, measured with :func:`torch.autograd.graph.saved_tensors_hooks`.

:func:`track_saved_bytes` registers a pack hook that records each saved tensor's storage
(``untyped_storage().nbytes()``, deduplicated by ``data_ptr`` with a reference count) and returns a small
holder whose :func:`weakref.finalize` releases the count when autograd frees the saved tensor. The maximum of
the live sum is the memory the autograd graphs held *at once*.

``torch.func`` transforms (``vjp``, ``grad``, ``jacrev``) refuse to run while such hooks are registered. The
package's own transforms run inside :func:`untracked`, which lifts the hooks for their duration: what they
save lives only inside the transform (a Jacobian they return is an ordinary tensor, not a saved one), so the
measure stays "bytes held by graphs that a later ``backward`` will walk".
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

__all__ = ["SavedBytes", "track_saved_bytes", "untracked", "peak_saved_bytes"]

_ACTIVE: list["SavedBytes"] = []


class _Holder:
    __slots__ = ("tensor", "__weakref__")


class SavedBytes:
    """Live and peak saved-for-backward bytes of one :func:`track_saved_bytes` block."""

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0
        self._live: dict[int, list[int]] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda holder: holder.tensor)

    def _release(self, key: int) -> None:
        entry = self._live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= self._live.pop(key)[0]

    def _pack(self, t: Tensor) -> _Holder:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in self._live:
            self._live[key][1] += 1
        else:
            self._live[key] = [storage.nbytes(), 1]
            self.now += storage.nbytes()
            self.peak = max(self.peak, self.now)
        holder = _Holder()
        holder.tensor = t
        weakref.finalize(holder, self._release, key)  # runs when autograd drops the saved tensor
        return holder


@contextmanager
def track_saved_bytes() -> Iterator[SavedBytes]:
    """Record saved-for-backward bytes while the block runs; read ``.peak`` afterwards."""
    tracker = SavedBytes()
    tracker._hooks.__enter__()
    _ACTIVE.append(tracker)
    try:
        yield tracker
    finally:
        _ACTIVE.pop()
        tracker._hooks.__exit__(None, None, None)


@contextmanager
def untracked() -> Iterator[None]:
    """Lift the innermost :func:`track_saved_bytes` hooks for the block (so ``torch.func`` transforms can run)."""
    if not _ACTIVE:
        yield
        return
    tracker = _ACTIVE.pop()
    tracker._hooks.__exit__(None, None, None)
    try:
        with untracked():  # nested trackers, if any, are lifted too
            yield
    finally:
        tracker._hooks.__enter__()
        _ACTIVE.append(tracker)


def peak_saved_bytes(fn: Callable, *args) -> int:
    """Peak of live, storage-deduplicated bytes saved for backward while ``fn(*args)`` runs."""
    with track_saved_bytes() as tracker:
        fn(*args)
    return tracker.peak
