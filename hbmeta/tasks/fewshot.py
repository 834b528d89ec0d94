r"""N-way K-shot classification tasks (GEM-BML section 5.2, appendix C.4.2 [1]; the protocol of [2]).

A task picks ``ways`` distinct classes, gives them the labels ``0..ways-1`` in a random order, and draws
``shots + queries`` distinct examples (Omniglot: drawers) of each class without replacement: ``shots``
per class form the support set ``D_tr``, ``queries`` per class the query set ``D_val``. Sampling is
vectorised over tasks (``topk`` of uniform noise is a uniformly random ordered draw without replacement)
and seeded only by the ``torch.Generator`` passed in.

Example:
    >>> import torch
    >>> from hbmeta.tasks.fewshot import FewShotTasks
    >>> tasks = FewShotTasks(torch.rand(10, 20, 1, 28, 28), ways=5, shots=1, queries=15)
    >>> batch = tasks.sample(32, torch.Generator().manual_seed(0))
    >>> batch.x_train.shape, batch.y_val.shape, batch.classes.shape
    (torch.Size([32, 5, 1, 28, 28]), torch.Size([32, 75]), torch.Size([32, 5]))

References:
    [1] Zou, Y. & Lu, X. Gradient-EM Bayesian Meta-learning. NeurIPS 2020.
    [2] Finn, C., Abbeel, P. & Levine, S. Model-Agnostic Meta-Learning for Fast Adaptation of Deep
        Networks. ICML 2017 (section 5.2; the Omniglot / miniImageNet few-shot protocol).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from hbmeta.inference.batch import TaskBatch
from hbmeta.tasks.data import load_miniimagenet, load_omniglot, omniglot_classes

__all__ = ["FewShotBatch", "FewShotTasks", "miniimagenet_tasks", "omniglot_tasks"]


@dataclass
class FewShotBatch(TaskBatch):
    """A :class:`TaskBatch` of classification tasks that also records which data-set classes each task used.

    ``x_train [T, ways*shots, C, H, W]`` float32, ``y_train [T, ways*shots]`` int64 in ``0..ways-1``
    (label-major: the first ``shots`` points have label 0), ``x_val [T, ways*queries, ...]``, ``y_val``, and
    ``classes [T, ways]``: ``classes[t, j]`` is the data-set class that has label ``j`` in task ``t``.
    ``classes`` stays on the CPU when the batch is moved with :meth:`to`.
    """

    classes: Tensor | None = None

    def _parts(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.x_train, self.y_train, self.x_val, self.y_val

    def to(self, device: torch.device | str) -> FewShotBatch:
        if self.x_train.device == torch.device(device):
            return self
        return FewShotBatch(*(t.to(device) for t in self._parts()), classes=self.classes)

    def select(self, index: slice | Tensor) -> FewShotBatch:
        cpu_index = index.cpu() if isinstance(index, Tensor) else index
        classes = None if self.classes is None else self.classes[cpu_index]
        return FewShotBatch(*(t[index] for t in self._parts()), classes=classes)


@dataclass
class FewShotTasks:
    """``ways``-way ``shots``-shot tasks over class-major data; ``sample(T, generator)`` draws a meta-batch.

    Args:
        classes: ``[C, n_per_class, ...]`` examples of each class, on the CPU. ``uint8`` data are scaled by
            1/255 when sampled (so images can be stored at a quarter of the memory); float data are used as is.
        ways: classes per task (N).
        shots: support examples per class (K).
        queries: query examples per class.
        class_names: optional name of each class (for reports).

    Sampling runs on the CPU; move a batch with ``batch.to(device)`` (its ``classes`` index stays on the CPU).
    """

    classes: Tensor = field(repr=False)
    ways: int = 5
    shots: int = 1
    queries: int = 15
    class_names: list[str] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.classes.dim() < 2:
            raise ValueError(f"classes must be [num_classes, n_per_class, ...]; got shape {tuple(self.classes.shape)}")
        if min(self.ways, self.shots, self.queries) < 1:
            raise ValueError(f"ways, shots and queries must be >= 1; got ways={self.ways}, shots={self.shots}, "
                             f"queries={self.queries}")
        if self.ways > self.num_classes:
            raise ValueError(f"ways={self.ways} exceeds the {self.num_classes} classes available")
        self._check_per_class(self.queries)
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {self.num_classes} classes")
        self.classes = self.classes.cpu().contiguous()

    def _examples(self, index: Tensor) -> Tensor:
        """``index [T, ways, k]`` rows of ``classes.flatten(0, 1)`` -> ``[T, ways*k, ...]`` float32."""
        flat = self.classes.flatten(0, 1)  # a view: classes is contiguous
        x = flat.index_select(0, index.flatten()).view(index.shape[0], -1, *flat.shape[1:])
        return x.float().div_(255) if x.dtype == torch.uint8 else x.to(torch.float32)

    def _check_per_class(self, queries: int) -> None:
        if self.shots + queries > self.per_class:
            raise ValueError(f"shots + queries = {self.shots} + {queries} = {self.shots + queries} exceeds the "
                             f"{self.per_class} examples per class")

    @property
    def num_classes(self) -> int:
        return self.classes.shape[0]

    @property
    def per_class(self) -> int:
        return self.classes.shape[1]

    def __repr__(self) -> str:
        return (f"FewShotTasks(ways={self.ways}, shots={self.shots}, queries={self.queries}, "
                f"classes={self.num_classes}, per_class={self.per_class}, example={tuple(self.classes.shape[2:])})")

    def sample(self, num_tasks: int, generator: torch.Generator | None = None,
               k_query: int | None = None) -> FewShotBatch:
        """Draw ``num_tasks`` tasks on the CPU, ``k_query`` (default ``queries``) query examples per class."""
        queries = self.queries if k_query is None else k_query
        if queries < 1:
            raise ValueError(f"k_query must be >= 1; got {queries}")
        self._check_per_class(queries)
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1; got {num_tasks}")
        t, n, m = num_tasks, self.ways, self.shots + queries
        cls = torch.rand(t, self.num_classes, generator=generator).topk(n, dim=1).indices  # [T, ways], label j = column j
        drawers = torch.rand(t, n, self.per_class, generator=generator).topk(m, dim=2).indices  # [T, ways, m]
        index = cls.unsqueeze(-1) * self.per_class + drawers  # rows of classes.flatten(0, 1)
        x_tr, x_val = self._examples(index[:, :, :self.shots]), self._examples(index[:, :, self.shots:])
        labels = torch.arange(n)
        y_tr = labels.repeat_interleave(self.shots).repeat(t, 1)
        y_val = labels.repeat_interleave(queries).repeat(t, 1)
        return FewShotBatch(x_tr, y_tr, x_val, y_val, classes=cls)


def omniglot_tasks(ways: int = 5, shots: int = 1, queries: int = 15, part: str = "train", split: str = "paper",
                   root: str | Path | None = None, seed: int = 0, image_size: int = 28,
                   cache_dir: str | Path | None = None) -> FewShotTasks:
    """Omniglot tasks over the rotated characters of one part of a split (see :mod:`hbmeta.tasks.data.omniglot`).

    ``part="train"`` and ``part="test"`` with the same ``split`` and ``seed`` never share a character."""
    images, names = load_omniglot(root, image_size, cache_dir)
    classes = omniglot_classes(images, names, split=split, part=part, seed=seed, root=root, dtype=torch.uint8)
    return FewShotTasks(classes.images, ways, shots, queries, class_names=classes.names)


def miniimagenet_tasks(ways: int = 5, shots: int = 1, queries: int = 15, part: str = "train",
                       root: str | Path | None = None, csv_root: str | Path | None = None, image_size: int = 84,
                       cache_dir: str | Path | None = None) -> FewShotTasks:
    """miniImageNet tasks over the classes of split ``part`` (``"train"``, ``"val"``, ``"test"``)."""
    images, labels = load_miniimagenet(root, part, csv_root=csv_root, image_size=image_size, cache_dir=cache_dir)
    return FewShotTasks(images, ways, shots, queries, class_names=labels)
