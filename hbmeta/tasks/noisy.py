r"""Noisy tasks and limited budgets for meta-training (ATS, Yao et al. 2021, appendices C and D).

**Noisy tasks** (appendix C): the support labels of a task are corrupted by *symmetric flipping*: a label
keeps its class with probability :math:`1 - r` and moves to each of the other :math:`N - 1` classes with
probability :math:`r / (N - 1)`, i.e. the transition matrix

.. math:: T_{jk} = P(\tilde y = k \mid y = j) = (1 - r)\,[j = k] + \frac{r}{N - 1}\,[j \ne k]

(appendix C, Figure 2 shows :math:`r = 0.8`, :math:`N = 5`: every entry is 20%). Query labels stay clean.
So that a scheduler has something to tell apart, each task draws its own noise level :math:`r_\tau`
uniformly from the interval of half-width :math:`\min(r, 1 - r)` around the run's ``label_noise`` ``r``
(mean ``r``; e.g. ``r = 0.6`` gives :math:`r_\tau \in [0.2, 1.0]`); the batch records every task's level.

**Limited budgets** (appendix D): meta-training sees only ``class_budget`` classes of the training part,
a seeded random subset (miniImageNet's 16/32/48/64 of appendix D.1; rotated characters on Omniglot).

Example:
    >>> import torch
    >>> from hbmeta.tasks.fewshot import FewShotTasks
    >>> tasks = NoisyTasks(FewShotTasks(torch.rand(10, 20, 1, 28, 28), ways=5, shots=1, queries=2), noise=0.6)
    >>> batch = tasks.sample(4, torch.Generator().manual_seed(0))
    >>> batch.noise_level.shape, bool(((batch.noise_level >= 0.2) & (batch.noise_level <= 1.0)).all())
    (torch.Size([4]), True)

References:
    [1] Yao, H. et al. Meta-learning with an Adaptive Task Scheduler. NeurIPS 2021 (appendices C, D).
    [2] Han, B. et al. Co-teaching: robust training of deep neural networks with extremely noisy labels. 2018.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from hbmeta.tasks.fewshot import FewShotBatch, FewShotTasks


__all__ = [
    "NoisyBatch",
    "NoisyTasks",
    "clean_tasks",
    "flip_labels",
    "noise_levels",
    "restrict_classes",
    "symmetric_transition_matrix",
]


def symmetric_transition_matrix(num_classes: int, noise: float) -> Tensor:
    """``T [N, N]`` with ``T[j, k] = P(noisy label k | true label j)``: ``1 - noise`` on the diagonal,
    ``noise / (N - 1)`` elsewhere (appendix C, Figure 2). Rows sum to 1."""
    if num_classes < 2:
        raise ValueError(f"symmetric flipping needs at least 2 classes; got {num_classes}")
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"noise ratio must be in [0, 1]; got {noise}")
    off = noise / (num_classes - 1)
    return torch.full((num_classes, num_classes), off).fill_diagonal_(1.0 - noise)


def flip_labels(labels: Tensor, noise: Tensor | float, num_classes: int,
                generator: torch.Generator | None = None) -> Tensor:
    """Symmetric flipping of ``labels [T, K]`` with per-task noise ratios ``noise [T]`` (or one float).

    A label is flipped with probability ``noise``; a flipped label moves to one of the other
    ``num_classes - 1`` classes uniformly, which gives exactly :func:`symmetric_transition_matrix`.
    """
    if labels.dim() != 2:
        raise ValueError(f"labels must be [tasks, points]; got shape {tuple(labels.shape)}")
    noise = torch.as_tensor(noise, dtype=torch.float32).expand(labels.shape[0])
    if ((noise < 0) | (noise > 1)).any():
        raise ValueError(f"noise ratios must be in [0, 1]; got {noise.tolist()}")
    flip = torch.rand(labels.shape, generator=generator) < noise.unsqueeze(1)
    shift = torch.randint(1, num_classes, labels.shape, generator=generator)  # to another class, uniformly
    return torch.where(flip, (labels + shift) % num_classes, labels)


def noise_levels(mean: float, num_tasks: int, generator: torch.Generator | None = None) -> Tensor:
    """Per-task noise ratios, uniform on ``[mean - h, mean + h]`` with ``h = min(mean, 1 - mean)`` (mean ``mean``)."""
    if not 0.0 <= mean <= 1.0:
        raise ValueError(f"label_noise must be in [0, 1]; got {mean}")
    half = min(mean, 1.0 - mean)
    return mean - half + 2 * half * torch.rand(num_tasks, generator=generator)


@dataclass
class NoisyBatch(FewShotBatch):
    """A :class:`FewShotBatch` whose support labels were flipped; ``noise_level [T]`` is each task's ratio
    and ``clean_y_train`` the labels before flipping (both stay on the CPU)."""

    noise_level: Tensor | None = None
    clean_y_train: Tensor | None = None

    def to(self, device: torch.device | str) -> NoisyBatch:
        if self.x_train.device == torch.device(device):
            return self
        return NoisyBatch(*(t.to(device) for t in self._parts()), classes=self.classes,
                          noise_level=self.noise_level, clean_y_train=self.clean_y_train)

    def select(self, index: slice | Tensor) -> NoisyBatch:
        cpu = index.cpu() if isinstance(index, Tensor) else index
        base = super().select(index)
        return NoisyBatch(*base._parts(), classes=base.classes, noise_level=self.noise_level[cpu],
                          clean_y_train=self.clean_y_train[cpu])


@dataclass
class NoisyTasks:
    """``base`` tasks whose support labels are flipped with per-task ratios around ``noise``.

    ``sample`` first draws the clean tasks from ``base`` with the generator, then the noise levels and flips.
    """

    base: FewShotTasks
    noise: float

    def __post_init__(self) -> None:
        noise_levels(self.noise, 0)  # validates the ratio

    def sample(self, num_tasks: int, generator: torch.Generator | None = None,
               k_query: int | None = None) -> NoisyBatch:
        clean = self.base.sample(num_tasks, generator, k_query)
        level = noise_levels(self.noise, num_tasks, generator)
        noisy = flip_labels(clean.y_train, level, self.base.ways, generator)
        return NoisyBatch(clean.x_train, noisy, clean.x_val, clean.y_val, classes=clean.classes, noise_level=level,
                          clean_y_train=clean.y_train)

    @property
    def ways(self) -> int:
        return self.base.ways


def restrict_classes(tasks: FewShotTasks, budget: int, seed: int = 0) -> FewShotTasks:
    """The same tasks over a seeded random subset of ``budget`` of their classes (a limited budget, appendix D)."""
    if not tasks.ways <= budget <= tasks.num_classes:
        raise ValueError(f"class_budget must be between ways={tasks.ways} and the {tasks.num_classes} training "
                         f"classes; got {budget}")
    keep = torch.randperm(tasks.num_classes, generator=torch.Generator().manual_seed(seed))[:budget].sort().values
    names = None if tasks.class_names is None else [tasks.class_names[i] for i in keep.tolist()]
    return replace(tasks, classes=tasks.classes[keep], class_names=names)


def clean_tasks(tasks: Any) -> Any:
    """The clean task distribution under a :class:`NoisyTasks` (the tasks themselves otherwise)."""
    return tasks.base if isinstance(tasks, NoisyTasks) else tasks
