r"""Omniglot (Lake et al. 2015) for few-shot classification, as in GEM-BML appendix C.4.2 [1]:

    "For Omniglot, 1200 characters are selected for training, and the remaining are used for testing,
    irrespective of the alphabet. Each of the characters is augmented with rotations by multiples of 90
    degrees. ... images are downsampled to 28x28."

- :func:`load_omniglot` reads the 1,623 characters x 20 drawers from ``images_background.npz`` and
  ``images_evaluation.npz`` (background first, so index = global character ID - 1) and downsamples them
  with area interpolation; :func:`load_omniglot_folder` reads the original PNG layout
  ``<Alphabet>/characterNN/<ID>_<DD>.png`` into the same format.
- :func:`omniglot_classes` makes the classes of one part of a split: ``"paper"`` (a seeded random 1200/423
  split of the characters, [1]) or ``"vinyals"`` (the 1028/172/423 split of [2], read from
  ``splits/vinyals/<part>.txt``). Each character gives 4 classes, rotated by 0/90/180/270 degrees
  counter-clockwise (``torch.rot90``, as PIL's ``rotate`` in [2]); train and test never share a character.

References:
    [1] Zou, Y. & Lu, X. Gradient-EM Bayesian Meta-learning. NeurIPS 2020, appendix C.4.2.
    [2] Vinyals, O. et al. Matching Networks for One Shot Learning. NeurIPS 2016 (split files from
        Snell et al., Prototypical Networks, jakesnell/prototypical-networks).
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from hbmeta.tasks.data import default_data_root, fingerprint, load_cached, missing_data_error, open_npz, save_cached

__all__ = ["NUM_CHARACTERS", "NUM_DRAWERS", "OmniglotSplit", "load_omniglot", "load_omniglot_folder",
           "omniglot_classes", "omniglot_dir"]

NUM_CHARACTERS = 1623
NUM_DRAWERS = 20
PAPER_NUM_TRAIN = 1200
#: the paper split's validation characters: the last of its training characters (part ``"val"``), held out of
#: part ``"subtrain"`` (the rest of them) when settings are chosen; ``"train"`` and ``"test"`` are the paper's
PAPER_NUM_VAL = 100
PAPER_PARTS = ("train", "test", "subtrain", "val")
_NPZ = ("images_background.npz", "images_evaluation.npz")
_PNG_NAME = re.compile(r"^(\d+)_(\d+)$")


def omniglot_dir(root: str | Path | None = None) -> Path:
    """The folder holding ``images_background.npz``: ``<root>/omniglot`` or ``root`` itself."""
    root = Path(root).expanduser() if root is not None else default_data_root()
    for candidate in (root / "omniglot", root):
        if (candidate / _NPZ[0]).is_file():
            return candidate
    raise missing_data_error(root / "omniglot" / _NPZ[0], "Omniglot")


def _character_names(csv_path: Path, count: int) -> list[str]:
    """``"Alphabet/characterNN"`` of global IDs ``1..count`` from ``alphabets.csv`` (ID ranges per alphabet)."""
    if not csv_path.is_file():
        raise missing_data_error(csv_path, "Omniglot alphabet table")
    names: list[str | None] = [None] * count
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            first, last = int(row["first_character_id"]), int(row["last_character_id"])
            for cid in range(first, min(last, count) + 1):
                names[cid - 1] = f"{row['alphabet']}/character{cid - first + 1:02d}"
    missing = [i + 1 for i, n in enumerate(names) if n is None]
    if missing:
        raise ValueError(f"{csv_path} names no alphabet for character IDs {missing[:10]}{'...' if len(missing) > 10 else ''}")
    return names  # type: ignore[return-value]


def _downsample_ink(ink: Tensor, size: int, chunk: int = 128) -> Tensor:
    """``ink [N, D, H, W]`` bool -> ``[N, D, size, size]`` uint8 (255 = ink), area-averaged chunk by chunk."""
    n, d, h, w = ink.shape
    if (h, w) == (size, size):
        return ink.to(torch.uint8) * 255
    out = torch.empty(n, d, size, size, dtype=torch.uint8)
    for i in range(0, n, chunk):
        x = ink[i:i + chunk].reshape(-1, 1, h, w).float()
        y = torch.nn.functional.interpolate(x, size=(size, size), mode="area")
        out[i:i + chunk] = (y * 255).round_().to(torch.uint8).view(-1, d, size, size)
    return out


def load_omniglot(root: str | Path | None = None, image_size: int = 28,
                  cache_dir: str | Path | None = None) -> tuple[Tensor, list[str]]:
    """All 1,623 Omniglot characters: ``images [1623, 20, image_size, image_size]`` uint8 (ink 255, background 0)
    and ``names[i] = "Alphabet/characterNN"`` of global character ID ``i + 1``.

    Args:
        root: the data root (holding ``omniglot/``) or the ``omniglot`` folder; default :func:`default_data_root`.
        image_size: side of the downsampled images (28 in [1]; 105 keeps the originals).
        cache_dir: where the resized array is cached (default ``$HBMETA_CACHE`` or ``~/.cache/hbmeta``).
    """
    folder = omniglot_dir(root)
    files = tuple(folder / name for name in _NPZ) + (folder / "alphabets.csv",)
    for f in files:
        if not f.is_file():
            raise missing_data_error(f, "Omniglot")
    key = f"omniglot_{image_size}px_{fingerprint('omniglot', image_size, files=files)}.pt"
    cached = load_cached(key, cache_dir)
    if cached is not None:
        return cached["images"], list(cached["names"])
    parts = []
    for f in files[:2]:
        with open_npz(f) as z:
            parts.append(_downsample_ink(torch.from_numpy(~z["images"]), image_size))
    images = torch.cat(parts)
    names = _character_names(files[2], images.shape[0])
    save_cached(key, {"images": images, "names": names}, cache_dir)
    return images, names


def _read_ink(png: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(png) as im:
        return np.asarray(im.convert("L")) < 128  # white background, dark ink


def _character_key(char_dir: Path, pngs: list[Path]) -> tuple[float, str]:
    """Global character ID from ``<ID>_<DD>.png`` when the names carry one, so the order matches the npz."""
    m = _PNG_NAME.match(pngs[0].stem) if pngs else None
    return (int(m.group(1)) if m else float("inf"), str(char_dir))


def load_omniglot_folder(folder: str | Path, image_size: int = 28) -> tuple[Tensor, list[str]]:
    """Omniglot from the original PNG layout ``<folder>/<Alphabet>/characterNN/<ID>_<DD>.png``, in the format of
    :func:`load_omniglot` (characters ordered by global ID when file names carry it, else by path).

    ``folder`` may also be the unzipped root holding ``images_background/`` and ``images_evaluation/``
    (read in that order)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise missing_data_error(folder, "Omniglot image folder")
    sets = [folder / s for s in ("images_background", "images_evaluation") if (folder / s).is_dir()] or [folder]
    chars: list[tuple[tuple[float, str], Path, list[Path]]] = []
    for s in sets:
        for char_dir in sorted(p for p in s.glob("*/*") if p.is_dir()):
            pngs = sorted(char_dir.glob("*.png"))
            if pngs:
                chars.append((_character_key(char_dir, pngs), char_dir, pngs))
    if not chars:
        raise missing_data_error(folder / "<Alphabet>" / "characterNN" / "<ID>_<DD>.png", "Omniglot PNG files")
    chars.sort(key=lambda c: c[0])
    counts = {len(pngs) for _, _, pngs in chars}
    if len(counts) != 1:
        raise ValueError(f"{folder}: characters have different numbers of drawers {sorted(counts)}; expected one count")
    ink = torch.from_numpy(np.stack([np.stack([_read_ink(p) for p in pngs]) for _, _, pngs in chars]))
    names = [f"{d.parent.name}/{d.name}" for _, d, _ in chars]
    return _downsample_ink(ink, image_size), names


@dataclass
class OmniglotSplit:
    """The classes of one part of a split, class-major.

    Attributes:
        images: ``[C, 20, 1, H, W]`` (float in [0, 1] by default) with ``C = 4 x characters``.
        characters: ``[C]`` global character index (ID - 1) of each class; parts of a split never share one.
        rotations: ``[C]`` counter-clockwise rotation of each class in degrees (0, 90, 180, 270).
        names: ``"Alphabet/characterNN/rotDDD"`` of each class.
    """

    images: Tensor = field(repr=False)
    characters: Tensor = field(repr=False)
    rotations: Tensor = field(repr=False)
    names: list[str] = field(repr=False)
    split: str = "paper"
    part: str = "train"

    @property
    def num_classes(self) -> int:
        return self.images.shape[0]

    def __repr__(self) -> str:
        return (f"OmniglotSplit(split={self.split!r}, part={self.part!r}, classes={self.num_classes}, "
                f"characters={self.characters.unique().numel()}, images={tuple(self.images.shape)})")


def _paper_characters(num_chars: int, part: str, seed: int) -> tuple[Tensor, Tensor]:
    if part not in PAPER_PARTS:
        raise ValueError(f"the paper split (GEM-BML appendix C.4.2) has parts 'train' ({PAPER_NUM_TRAIN} characters) "
                         f"and 'test' (the rest), and for choosing settings 'subtrain' and 'val' (the first "
                         f"{PAPER_NUM_TRAIN - PAPER_NUM_VAL} and the last {PAPER_NUM_VAL} of 'train'); got part={part!r}")
    if num_chars <= PAPER_NUM_TRAIN:
        raise ValueError(f"the paper split needs more than {PAPER_NUM_TRAIN} characters; got {num_chars}")
    perm = torch.randperm(num_chars, generator=torch.Generator().manual_seed(seed))
    bounds = {"train": (0, PAPER_NUM_TRAIN), "test": (PAPER_NUM_TRAIN, num_chars),
              "subtrain": (0, PAPER_NUM_TRAIN - PAPER_NUM_VAL), "val": (PAPER_NUM_TRAIN - PAPER_NUM_VAL, PAPER_NUM_TRAIN)}
    chosen = perm[slice(*bounds[part])]
    return chosen.sort().values.repeat_interleave(4), torch.arange(4).repeat(chosen.numel()) * 90


def _vinyals_characters(names: list[str], part: str, root: str | Path | None) -> tuple[Tensor, Tensor]:
    if part not in ("train", "val", "test", "trainval"):
        raise ValueError(f"the Vinyals split has parts 'train', 'val', 'test', 'trainval'; got part={part!r}")
    path = omniglot_dir(root) / "splits" / "vinyals" / f"{part}.txt"
    if not path.is_file():
        raise missing_data_error(path, "Omniglot Vinyals split file")
    index = {n: i for i, n in enumerate(names)}
    chars, rots = [], []
    for line in path.read_text().split():
        name, _, rot = line.rpartition("/")
        if name not in index or not re.fullmatch(r"rot(000|090|180|270)", rot):
            raise ValueError(f"{path}: {line!r} names no loaded character/rotation")
        chars.append(index[name])
        rots.append(int(rot[3:]))
    return torch.tensor(chars), torch.tensor(rots)


def omniglot_classes(images: Tensor, names: list[str], split: str = "paper", part: str = "train", seed: int = 0,
                     root: str | Path | None = None, dtype: torch.dtype = torch.float32) -> OmniglotSplit:
    """The rotated classes of ``part`` (``"train"``, ``"test"``; the paper split also ``"subtrain"`` and ``"val"``, a
    split of ``"train"`` for choosing settings; Vinyals also ``"val"``, ``"trainval"``).

    Args:
        images: ``[num_chars, 20, H, W]`` uint8 from :func:`load_omniglot`; ``names`` its character names.
        split: ``"paper"`` (seeded random 1200/423 characters, irrespective of the alphabet, [1]; its ``"val"`` is the
            last :data:`PAPER_NUM_VAL` of the 1200, held out of ``"subtrain"``) or ``"vinyals"`` (1028/172/423, [2]).
        seed: seeds the paper split's permutation of the characters (same seed, same split for every part).
        root: where the Vinyals split files are (``<root>/omniglot/splits/vinyals``).
        dtype: ``torch.float32`` gives values in [0, 1]; ``torch.uint8`` keeps 0..255 (a quarter of the memory).
    """
    if images.dim() != 4 or images.shape[0] != len(names):
        raise ValueError(f"images must be [characters, drawers, H, W] with one name per character; "
                         f"got {tuple(images.shape)} and {len(names)} names")
    if split == "paper":
        chars, rots = _paper_characters(images.shape[0], part, seed)
    elif split == "vinyals":
        chars, rots = _vinyals_characters(names, part, root)
    else:
        raise ValueError(f"unknown Omniglot split {split!r}; choose 'paper' or 'vinyals'")
    out = torch.empty((chars.numel(), *images.shape[1:]), dtype=images.dtype)
    for k in range(4):
        mask = rots == 90 * k
        out[mask] = torch.rot90(images[chars[mask]], k, dims=(-2, -1))
    out = out.unsqueeze(2)
    out = out.to(dtype).div_(255) if dtype.is_floating_point else out.to(dtype)
    class_names = [f"{names[c]}/rot{r:03d}" for c, r in zip(chars.tolist(), rots.tolist())]
    return OmniglotSplit(out, chars, rots, class_names, split, part)
