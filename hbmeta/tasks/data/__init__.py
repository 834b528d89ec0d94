"""Few-shot image data sets (GEM-BML section 5.2, appendix C.4.2): where the files are, and a small disk cache.

The data live in a *data root* (the folder of ``README.md`` with ``omniglot/`` and ``miniimagenet-splits/``).
Every loader takes ``root``; left out, it is :func:`default_data_root`: the ``HBMETA_DATA`` environment
variable, else ``../shared/data`` relative to the working directory, else ``/work/shared/data``.
Resized images are cached under :func:`default_cache_dir` (``HBMETA_CACHE``, else ``~/.cache/hbmeta``),
keyed by image size and by the source files' size and modification time.

Example:
    >>> from hbmeta.tasks.data import load_omniglot, omniglot_classes
    >>> images, names = load_omniglot()                   # doctest: +SKIP
    >>> train = omniglot_classes(images, names, split="paper", part="train")  # doctest: +SKIP
    >>> train.images.shape                                 # doctest: +SKIP
    torch.Size([4800, 20, 1, 28, 28])
"""

from __future__ import annotations

import hashlib
import os
import pickle
import tempfile
import warnings
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "OmniglotSplit", "default_cache_dir", "default_data_root", "fingerprint", "load_cached", "load_miniimagenet",
    "load_omniglot", "load_omniglot_folder", "missing_data_error", "omniglot_classes", "open_npz", "save_cached",
]

_FALLBACK_ROOTS = (Path("../shared/data"), Path("/work/shared/data"))


def default_data_root() -> Path:
    """``$HBMETA_DATA`` if set, else the first of ``../shared/data`` (from the working directory) and
    ``/work/shared/data`` that exists, else ``../shared/data`` (so that errors name where data were expected)."""
    env = os.environ.get("HBMETA_DATA")
    if env:
        return Path(env).expanduser()
    for candidate in _FALLBACK_ROOTS:
        if candidate.is_dir():
            return candidate.resolve()
    return _FALLBACK_ROOTS[0].resolve()


def default_cache_dir() -> Path:
    """``$HBMETA_CACHE`` if set, else ``~/.cache/hbmeta``."""
    return Path(os.environ.get("HBMETA_CACHE") or Path.home() / ".cache" / "hbmeta").expanduser()


def missing_data_error(expected: Path, what: str, hint: str = "") -> FileNotFoundError:
    """A :class:`FileNotFoundError` that names the path that was expected and how to point at the data."""
    msg = (f"{what} not found: expected {expected}. Point hbmeta at the data folder with --data-root / the "
           f"HBMETA_DATA environment variable (or the root= argument); the default is {default_data_root()}.")
    return FileNotFoundError(f"{msg} {hint}".strip())


class _Archive:
    """The arrays of an open ``.npz`` whose missing keys are named with the ones the file has."""

    def __init__(self, archive, path: Path):
        self._archive, self._path = archive, path

    def __getitem__(self, key: str):
        if key not in self._archive.files:
            raise ValueError(f"{self._path} has no array {key!r} (it has {', '.join(self._archive.files) or 'none'}): "
                             f"it is not the file hbmeta expects; download it again")
        try:
            return self._archive[key]
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            raise ValueError(f"{self._path}: array {key!r} cannot be read ({err}); the file is damaged, download it "
                             f"again") from None


@contextmanager
def open_npz(path: str | Path):
    """``with open_npz(path) as z: z["images"]``: ``numpy.load`` with one-line errors for a truncated or foreign file
    (not a zip archive, a damaged member, a missing array) that name the file."""
    import numpy as np

    path = Path(path)
    with open(path, "rb") as f:  # our own handle: numpy leaves its file open when the zip directory is unreadable
        try:
            archive = np.load(f)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            raise ValueError(f"{path} is not a readable .npz archive ({err}); the file is truncated or damaged, "
                             f"download it again") from None
        if not hasattr(archive, "files"):
            raise ValueError(f"{path} holds one array, not the .npz archive of named arrays hbmeta expects")
        with archive:
            yield _Archive(archive, path)


def fingerprint(*parts: Any, files: tuple[Path, ...] = ()) -> str:
    """A short hash of ``parts`` and of each file's resolved path, size and modification time."""
    items = [repr(p) for p in parts]
    for f in files:
        st = Path(f).stat()
        items.append(f"{Path(f).resolve()}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha1("|".join(items).encode()).hexdigest()[:16]


def load_cached(name: str, cache_dir: str | Path | None = None) -> dict[str, Any] | None:
    """The dict saved by :func:`save_cached` under ``name``, or ``None`` if absent or unreadable."""
    path = Path(cache_dir or default_cache_dir()) / name
    if not path.is_file():
        return None
    try:
        return torch.load(path, weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError):  # truncated or foreign: rebuild from source
        return None


def save_cached(name: str, value: dict[str, Any], cache_dir: str | Path | None = None) -> None:
    """Write ``value`` (tensors, strings, lists) atomically: to a temporary file, then ``os.replace``.

    A cache folder that cannot be written only costs speed: it warns and returns."""
    folder = Path(cache_dir or default_cache_dir())
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(value, f)
            os.replace(tmp, folder / name)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as err:
        warnings.warn(f"could not write the data cache in {folder} ({err}); set HBMETA_CACHE to a writable folder",
                      RuntimeWarning, stacklevel=2)


# the loaders use the helpers above, so they are imported after them
from hbmeta.tasks.data.miniimagenet import load_miniimagenet
from hbmeta.tasks.data.omniglot import OmniglotSplit, load_omniglot, load_omniglot_folder, omniglot_classes
