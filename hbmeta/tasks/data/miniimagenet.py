"""miniImageNet (Vinyals et al. 2016) with the Ravi & Larochelle (2017) split, for GEM-BML section 5.2 [1].

64 training, 16 validation and 20 test classes of 600 RGB images each, downsampled to 84x84. The split
CSVs (``filename,label``) are in ``<data root>/miniimagenet-splits``; the **images are not**: ImageNet
images are not redistributable, so point ``root`` at your own copy in the standard layout
``<root>/images/<filename>`` (for example ``images/n0153282900000005.jpg``).

References:
    [1] Zou, Y. & Lu, X. Gradient-EM Bayesian Meta-learning. NeurIPS 2020, section 5.2, appendix C.4.2.
    [2] Ravi, S. & Larochelle, H. Optimization as a Model for Few-Shot Learning. ICLR 2017.
"""

from __future__ import annotations

import csv
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from hbmeta.tasks.data import default_data_root, fingerprint, load_cached, missing_data_error, save_cached

__all__ = ["SPLITS", "load_miniimagenet"]

SPLITS = ("train", "val", "test")
_NOT_SHIPPED = ("ImageNet images are not redistributable and are not in the shared data folder ({data}), which holds "
                "only the split CSVs (miniimagenet-splits/). Get miniImageNet yourself and pass root= (or --data-root / "
                "HBMETA_DATA) pointing at the folder that holds images/.")


def _images_dir(root: Path) -> Path:
    for candidate in (root, root / "miniimagenet"):
        if (candidate / "images").is_dir():
            return candidate / "images"
    raise missing_data_error(root / "images", "miniImageNet images folder",
                             f"(also looked in {root / 'miniimagenet' / 'images'}). "
                             + _NOT_SHIPPED.format(data=default_data_root()))


def _split_csv(split: str, csv_root: str | Path | None, root: Path, images: Path) -> Path:
    if csv_root is not None:
        candidates = [Path(csv_root).expanduser()]
    else:  # next to images/ (the standard layout), then the data root's miniimagenet-splits/
        candidates = [images.parent, root / "miniimagenet-splits", default_data_root() / "miniimagenet-splits"]
    for folder in candidates:
        if (folder / f"{split}.csv").is_file():
            return folder / f"{split}.csv"
    raise missing_data_error(candidates[-1] / f"{split}.csv", f"miniImageNet split file {split}.csv",
                             "Pass csv_root= to name the folder with train.csv / val.csv / test.csv.")


def _read_split(path: Path, per_class: int | None) -> tuple[list[str], list[list[str]]]:
    """Class labels in order of first appearance and each class's file names (all, or the first ``per_class``)."""
    files: dict[str, list[str]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            files.setdefault(row["label"], []).append(row["filename"])
    if not files:
        raise ValueError(f"{path} lists no images (expected a header 'filename,label' and rows)")
    counts = {label: len(v) for label, v in files.items()}
    if per_class is None and len(set(counts.values())) != 1:
        raise ValueError(f"{path}: classes have different numbers of images {sorted(set(counts.values()))}; "
                         f"pass per_class= to keep the first n of each")
    if per_class is not None and (per_class < 1 or per_class > min(counts.values())):
        raise ValueError(f"per_class={per_class} but the smallest class in {path} has {min(counts.values())} images")
    n = per_class or next(iter(counts.values()))
    return list(files), [v[:n] for v in files.values()]


def _read_rgb(path: Path, size: int) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.LANCZOS)
        return np.array(im)  # writable, for torch.from_numpy


def load_miniimagenet(root: str | Path | None = None, split: str = "train", csv_root: str | Path | None = None,
                      image_size: int = 84, per_class: int | None = None,
                      cache_dir: str | Path | None = None) -> tuple[Tensor, list[str]]:
    """The classes of one miniImageNet split: ``images [C, n, 3, image_size, image_size]`` uint8 and class labels
    (WordNet IDs), class-major in the CSV's order.

    Args:
        root: the folder holding ``images/`` (or a data root holding ``miniimagenet/images/``);
            default :func:`default_data_root`.
        split: ``"train"`` (64 classes), ``"val"`` (16) or ``"test"`` (20).
        csv_root: the folder with ``<split>.csv``; default next to ``images/``, else ``<data root>/miniimagenet-splits``.
        image_size: images are resized (Lanczos) to this square size; 84 in [1].
        per_class: keep the first ``n`` images of each class; ``None`` requires equal counts (600 each).
        cache_dir: where the decoded array is cached (default ``$HBMETA_CACHE`` or ``~/.cache/hbmeta``).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown miniImageNet split {split!r}; choose one of {SPLITS}")
    root = Path(root).expanduser() if root is not None else default_data_root()
    images_dir = _images_dir(root)
    csv_path = _split_csv(split, csv_root, root, images_dir)
    key = (f"miniimagenet_{split}_{image_size}px_"
           f"{fingerprint('miniimagenet', per_class, str(images_dir.resolve()), files=(csv_path, images_dir))}.pt")
    cached = load_cached(key, cache_dir)
    if cached is not None:
        return cached["images"], list(cached["labels"])
    labels, files = _read_split(csv_path, per_class)
    paths = [images_dir / name for names in files for name in names]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise missing_data_error(missing[0], f"miniImageNet image ({len(missing)} of {len(paths)} listed in {csv_path} "
                                 f"are missing)", _NOT_SHIPPED.format(data=default_data_root()))
    out = torch.empty(len(labels), len(files[0]), 3, image_size, image_size, dtype=torch.uint8)
    flat = out.view(-1, 3, image_size, image_size)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for i, arr in enumerate(pool.map(lambda p: _read_rgb(p, image_size), paths)):
            flat[i] = torch.from_numpy(arr).permute(2, 0, 1)
    save_cached(key, {"images": out, "labels": labels}, cache_dir)
    return out, labels
