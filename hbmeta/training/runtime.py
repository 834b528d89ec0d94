r"""Where and how a run computes: the device (:func:`resolve_device`), CPU threads (:func:`torch_threads`) and
mixed precision for the inner loop, bf16 autocast of the network's forward passes (``--amp``).

Where it is used: :func:`amp_autocast` wraps the meta-gradient computation of a meta-iteration (in
:func:`hbmeta.training.loop.train` and :mod:`hbmeta.training.distributed`). Under :func:`torch.autocast` only the matmul /
convolution kernels of the network's forward passes (tasks x Monte-Carlo samples, the inner SVI) run in
bfloat16; element-wise work stays in float32: the analytic KL, the likelihood's reduction, the guide
parameters and their optimizer, the GEM closed form, the all-reduce and the meta-optimizer.

Why it is safe only for some algorithms: GEM's meta-gradient (GEM-BML section 3.2, Theorem 1) reads only the
posterior parameters the inner update ends at, which are float32 master copies; bf16 noise in the
likelihood's gradient is one more source of the inner loop's Monte-Carlo noise. MAML, ABML and BMAML
differentiate *through* the unrolled inner loop, where bf16 rounding compounds over the steps into the
second-order terms, so :func:`amp_autocast` refuses them.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys
from contextlib import contextmanager

import torch

from hbmeta.inference.learner import get_algorithm

__all__ = ["amp_autocast", "check_amp", "resolve_device", "torch_threads", "keep_freed_memory"]

#: glibc ``mallopt`` parameters (``malloc.h``)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: blocks up to this size come from the heap and are reused, not mapped and unmapped (glibc's cap: 32 MiB on 64-bit)
MMAP_THRESHOLD = 32 * 2**20
#: free memory is handed back to the system only above this much at the top of the heap
TRIM_THRESHOLD = 2**30


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"unknown device {name!r}; choose auto, cpu or cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA device; use --device cpu or auto")
    return torch.device(name)


@contextmanager
def torch_threads(num: int | None):
    """Run with ``num`` intra-op CPU threads (``None``: leave torch's setting), restoring it afterwards.

    Small networks (the 2 x 40 sinusoid MLP) run several times faster on one thread: their kernels are
    too short to pay for waking OpenMP workers.
    """
    before = torch.get_num_threads()
    if num is not None:
        torch.set_num_threads(num)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def keep_freed_memory() -> bool:
    """Make glibc's ``malloc`` keep and reuse freed CPU blocks instead of returning them to the system (Linux only).

    The Gauss-Newton step's temporaries are a few MiB each (``[T, N, P]``). glibc serves blocks that large with
    ``mmap`` and gives them back on ``free``, so every step pays page faults and zeroing for fresh pages; its dynamic
    threshold, which would move such blocks to the reusable heap, is defeated by the mix of sizes. Fixing the mmap
    threshold at 32 MiB and the trim threshold at 1 GiB (the effect of the environment variables
    ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``) made a GEM-BML+ sinusoid meta-iteration 1.5x faster on
    one CPU thread and left MAML's unchanged (README, "Time and memory per meta-iteration"); the price is that the
    process keeps its peak heap. ``hbmeta`` commands call this at start; ``HBMETA_MALLOC=system`` skips it.
    Returns whether the settings were applied (False off glibc, or when skipped).
    """
    if os.environ.get("HBMETA_MALLOC", "") == "system" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another C library: nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def check_amp(algorithm: str) -> None:
    """Raise ``ValueError`` if bf16 autocast is not safe for ``algorithm`` (it backpropagates through the inner loop)."""
    spec = get_algorithm(algorithm)
    if spec.backprop_through_inner:
        raise ValueError(f"--amp is only for algorithms that do not backpropagate through the inner loop; "
                         f"{spec.name!r} does (its second-order terms would see bf16 rounding); drop --amp")


def amp_autocast(enabled: bool, device: torch.device, algorithm: str) -> contextlib.AbstractContextManager:
    """``torch.autocast(device.type, bfloat16)`` when ``enabled`` (after :func:`check_amp`), else a no-op."""
    if not enabled:
        return contextlib.nullcontext()
    check_amp(algorithm)
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
