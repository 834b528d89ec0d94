r"""Drug-activity meta-learning on FS-Mol assays (the ATS paper's drug setting, appendix B.1).

A task is an assay: ``x`` a molecule's 2048-dim Morgan fingerprint, ``y`` its pXC50, standardised with the
training fold's mean and standard deviation (an affine map, so the metric below is unchanged by it).
Meta-training draws ``k_shot`` support and ``k_query`` query measurements from each assay; meta-test adapts
on ``k_shot`` measurements of each held-out assay and predicts all its other ones. The metric is the ATS
paper's: the squared Pearson correlation :math:`R^2 = \mathrm{corr}(\hat y, y)^2` per assay, its mean and
median over the test assays. The base model (appendix B.1) is two fully connected layers of 500
LeakyReLU units and a linear output (:func:`drug_net`).

Example:
    >>> tasks = DrugTasks.from_root(part="train", k_shot=16, k_query=16)      # doctest: +SKIP
    >>> tasks.sample(8, torch.Generator().manual_seed(0)).x_train.shape        # doctest: +SKIP
    torch.Size([8, 16, 2048])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from hbmeta.inference.batch import TaskBatch
from hbmeta.tasks.data.drug import DrugAssays, load_drug_assays

__all__ = ["DrugTasks", "drug_net", "squared_correlation"]


def drug_net(in_features: int = 2048, hidden: int = 500) -> nn.Sequential:
    """Appendix B.1's base model: ``in -> 500 -> 500`` LeakyReLU and a linear output."""
    return nn.Sequential(nn.Linear(in_features, hidden), nn.LeakyReLU(), nn.Linear(hidden, hidden), nn.LeakyReLU(),
                         nn.Linear(hidden, 1))


def squared_correlation(pred: Tensor, y: Tensor) -> float:
    """``corr(pred, y)^2`` over one assay's points (0 when either is constant)."""
    p, t = pred.double().flatten(), y.double().flatten()
    p, t = p - p.mean(), t - t.mean()
    denom = p.norm() * t.norm()
    return float((p @ t / denom) ** 2) if denom > 0 else 0.0


@dataclass
class DrugTasks:
    """Tasks over the assays of one FS-Mol fold; ``sample(T, generator)`` draws ``T`` distinct assays.

    Args:
        assays: the fold's assays.
        k_shot, k_query: support / query measurements per task (assays with fewer than ``k_shot + k_query``
            measurements are never drawn).
        y_mean, y_std: the standardisation of ``y`` (the training fold's statistics).
    """

    assays: DrugAssays = field(repr=False)
    k_shot: int = 16
    k_query: int = 16
    y_mean: float = 0.0
    y_std: float = 1.0

    def __post_init__(self) -> None:
        if self.k_shot < 1 or self.k_query < 1:
            raise ValueError(f"k_shot and k_query must be >= 1; got {self.k_shot}, {self.k_query}")
        if not self.y_std > 0:
            raise ValueError(f"y_std must be positive; got {self.y_std}")
        self.eligible = np.flatnonzero(self.assays.sizes >= self.k_shot + self.k_query)
        if len(self.eligible) == 0:
            raise ValueError(f"no assay of fold {self.assays.part!r} has k_shot + k_query = "
                             f"{self.k_shot + self.k_query} measurements")

    @classmethod
    def from_root(cls, root: str | Path | None = None, part: str = "train", k_shot: int = 16,
                  k_query: int = 16) -> DrugTasks:
        """Tasks of fold ``part``, ``y`` standardised with the training fold's statistics."""
        train = load_drug_assays(root, "train")
        assays = train if part == "train" else load_drug_assays(root, part)
        return cls(assays, k_shot, k_query, float(train.y.mean()), float(train.y.std()))

    def standardise(self, y: Tensor) -> Tensor:
        return (y - self.y_mean) / self.y_std

    def sample(self, num_tasks: int, generator: torch.Generator | None = None,
               k_query: int | None = None) -> TaskBatch:
        """``num_tasks`` distinct assays, each with ``k_shot + k_query`` distinct random measurements."""
        k_query = self.k_query if k_query is None else k_query
        if not 1 <= num_tasks <= len(self.eligible):
            raise ValueError(f"num_tasks must be in 1..{len(self.eligible)} (eligible assays); got {num_tasks}")
        m = self.k_shot + k_query
        if m > self.assays.sizes[self.eligible].min():
            raise ValueError(f"k_query={k_query} leaves some eligible assays with fewer than {m} measurements")
        chosen = torch.rand(len(self.eligible), generator=generator).topk(num_tasks).indices
        rows = []
        for a in self.eligible[chosen.numpy()]:
            order = torch.rand(int(self.assays.sizes[a]), generator=generator).topk(m).indices.numpy()
            rows.append(self.assays.offsets[a] + order)
        rows = np.stack(rows)
        x = self.assays.features(rows).view(num_tasks, m, -1)
        y = self.standardise(self.assays.targets(rows)).view(num_tasks, m, 1)
        k = self.k_shot
        return TaskBatch(x[:, :k], y[:, :k], x[:, k:], y[:, k:])

    def split_assay(self, assay: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Support (``k_shot`` random measurements) and query (all the others) of one assay, standardised."""
        rows = self.assays.rows(assay)
        order = torch.randperm(len(rows), generator=generator).numpy()
        sup, qry = rows[order[:self.k_shot]], rows[order[self.k_shot:]]
        return (self.assays.features(sup), self.standardise(self.assays.targets(sup)).unsqueeze(-1),
                self.assays.features(qry), self.standardise(self.assays.targets(qry)).unsqueeze(-1))
