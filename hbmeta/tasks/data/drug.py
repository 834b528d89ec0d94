"""FS-Mol pXC50 assays (drug activity; the ATS paper's pQSAR ChEMBL set is not available, see ``docs/ats.md``).

Reads ``<root>/drug/fsmol_pxc50_tasks.npz`` (FS-Mol, Stanley et al. 2021, ChEMBL assays with a log activity
value): task = assay, ``x`` = the molecule's Morgan fingerprint (2048 dims, stored as sparse counts),
``y`` = pXC50. The FS-Mol folds (``train`` 4,525 / ``valid`` 23 / ``test`` 112 assays) are the split: the
folds share no assay. Fingerprints are densified only for the molecules a task batch needs.

Example:
    >>> data = load_drug_assays(part="test")                      # doctest: +SKIP
    >>> len(data), data.features(data.rows(0)[:3]).shape          # doctest: +SKIP
    (112, torch.Size([3, 2048]))
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from hbmeta.tasks.data import default_data_root, missing_data_error, open_npz

__all__ = ["DRUG_FILE", "FOLDS", "DrugAssays", "load_drug_assays"]

DRUG_FILE = Path("drug") / "fsmol_pxc50_tasks.npz"
FOLDS = ("train", "valid", "test")


@dataclass
class DrugAssays:
    """The assays of one FS-Mol fold.

    Attributes:
        task_ids: ChEMBL assay id of each assay.
        offsets: ``[A + 1]``: measurements of assay ``a`` are ``offsets[a]:offsets[a+1]`` of ``mol_index`` / ``y``.
        mol_index: ``[N]`` molecule of each measurement.
        y: ``[N]`` pXC50 (float32).
        fp_indptr, fp_indices, fp_counts: the molecules' count fingerprints as CSR rows.
        fp_dim: fingerprint length (2048).
        binary: features are ``count > 0`` (an ECFP bit vector) when ``True``, else ``log(1 + count)``.
    """

    part: str
    task_ids: list[str]
    offsets: np.ndarray
    mol_index: np.ndarray
    y: np.ndarray
    fp_indptr: np.ndarray
    fp_indices: np.ndarray
    fp_counts: np.ndarray
    fp_dim: int
    binary: bool = True

    def __len__(self) -> int:
        return len(self.task_ids)

    @property
    def sizes(self) -> np.ndarray:
        """Measurements per assay ``[A]``."""
        return np.diff(self.offsets)

    def rows(self, assay: int) -> np.ndarray:
        """Measurement rows of assay ``assay``."""
        return np.arange(self.offsets[assay], self.offsets[assay + 1])

    def features(self, rows: np.ndarray) -> Tensor:
        """Dense fingerprints ``[len(rows), fp_dim]`` float32 of the molecules measured in ``rows``."""
        mols = self.mol_index[np.asarray(rows).reshape(-1)]
        start, stop = self.fp_indptr[mols], self.fp_indptr[mols + 1]
        lengths = stop - start
        row_of = np.repeat(np.arange(len(mols)), lengths)
        nnz = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths) + np.repeat(start, lengths)
        out = torch.zeros(len(mols), self.fp_dim)
        values = np.ones(len(nnz), np.float32) if self.binary else np.log1p(self.fp_counts[nnz].astype(np.float32))
        out[torch.from_numpy(row_of), torch.from_numpy(self.fp_indices[nnz].astype(np.int64))] = torch.from_numpy(values)
        return out

    def targets(self, rows: np.ndarray) -> Tensor:
        """pXC50 ``[len(rows)]`` float32."""
        return torch.from_numpy(self.y[np.asarray(rows).reshape(-1)].astype(np.float32))


def load_drug_assays(root: str | Path | None = None, part: str = "train", binary: bool = True) -> DrugAssays:
    """The assays of FS-Mol fold ``part`` (``"train"``, ``"valid"``, ``"test"``) from ``<root>/drug/``."""
    if part not in FOLDS:
        raise ValueError(f"unknown FS-Mol fold {part!r}; choose one of {', '.join(FOLDS)}")
    path = Path(root or default_data_root()) / DRUG_FILE
    if not path.is_file():
        raise missing_data_error(path, "FS-Mol pXC50 tasks (drug activity)")
    with open_npz(path) as data:
        fold = data["task_fold"]
        offsets = data["task_offsets"]
        chosen = np.flatnonzero(fold == part)
        if len(chosen) == 0:
            raise ValueError(f"{path} has no assay in fold {part!r}")
        starts, stops = offsets[chosen], offsets[chosen + 1]
        rows = np.concatenate([np.arange(a, b) for a, b in zip(starts, stops)])
        new_offsets = np.concatenate([[0], np.cumsum(stops - starts)])
        return DrugAssays(part, [str(t) for t in data["task_ids"][chosen]], new_offsets, data["mol_index"][rows],
                          data["y_pxc50"][rows].astype(np.float32), data["fp_indptr"], data["fp_indices"],
                          data["fp_counts"], int(data["fp_dim"]), binary)
