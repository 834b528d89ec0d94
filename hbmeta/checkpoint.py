"""Checkpoints: written atomically (temp file + fsync + rename), read with ``weights_only=True``; run logs
trimmed back to a checkpoint's iteration on resume."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

__all__ = ["save_checkpoint", "load_checkpoint", "trim_log", "atomic_write_text", "CheckpointError"]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or not an hbmeta checkpoint."""


def _atomic_write(path: str | Path, write) -> Path:
    """``write(binary file)`` into a temp file beside ``path``, fsync, rename: a crash leaves the old or the new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_checkpoint(state: dict, path: str | Path) -> Path:
    """Write ``state`` to ``path`` so that a crash at any moment leaves either the old or the new file."""
    return _atomic_write(path, lambda f: torch.save(state, f))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically, as :func:`save_checkpoint` writes checkpoints."""
    return _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors and plain containers only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for truncated / foreign files
        raise CheckpointError(f"checkpoint {path} is corrupt or not a torch file: {err}") from err
    if not isinstance(state, dict) or "learner" not in state or "config" not in state:
        raise CheckpointError(f"{path} is not an hbmeta checkpoint (no 'learner' / 'config' entries)")
    return state


def trim_log(path: str | Path, start: int) -> None:
    """Drop the JSON lines of a run log logged after iteration ``start`` (the checkpoint a run resumes from)."""
    path = Path(path)
    if path.exists():
        kept = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["iteration"] <= start]
        path.write_text("".join(ln + "\n" for ln in kept))
