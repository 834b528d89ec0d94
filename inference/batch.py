"""A meta-batch of tasks: support (train) and query (validation) sets, checked on construction."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["TaskBatch", "check_task_data"]


def check_task_data(x: Tensor, y: Tensor, what: str = "data") -> None:
    """Raise a ``ValueError`` naming the problem if ``x [T, N, ...]`` / ``y [T, N, ...]`` are unusable."""
    if x.dim() < 2 or y.dim() < 2:
        raise ValueError(f"{what}: x and y must be [tasks, points, ...]; got x {tuple(x.shape)}, y {tuple(y.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{what}: the meta-batch has no tasks")
    if x.shape[1] == 0 or y.shape[1] == 0:
        raise ValueError(f"{what}: empty support set (0 points per task); every task needs at least one point")
    if x.shape[:2] != y.shape[:2]:
        raise ValueError(f"{what}: x {tuple(x.shape)} and y {tuple(y.shape)} disagree on [tasks, points]")
    for name, t in (("x", x), ("y", y)):
        # a finite sum proves every entry finite (one cheap reduction); only then look element by element
        if t.is_floating_point() and not torch.isfinite(t.sum()) and not torch.isfinite(t).all():
            bad = (~torch.isfinite(t)).flatten(1).any(1).nonzero().flatten().tolist()
            raise ValueError(f"{what}: {name} contains NaN or inf (task(s) {bad})")


@dataclass
class TaskBatch:
    """``T`` tasks with ``x_train [T, K, ...]``, ``y_train``, ``x_val [T, M, ...]``, ``y_val``."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor

    def __post_init__(self) -> None:
        check_task_data(self.x_train, self.y_train, "support set (train)")
        check_task_data(self.x_val, self.y_val, "query set (val)")
        if self.x_train.shape[0] != self.x_val.shape[0]:
            raise ValueError(f"support set has {self.x_train.shape[0]} tasks but query set has {self.x_val.shape[0]}")
        if self.x_train.shape[2:] != self.x_val.shape[2:]:
            raise ValueError(f"support inputs {tuple(self.x_train.shape[2:])} and query inputs {tuple(self.x_val.shape[2:])} differ in shape")

    @property
    def num_tasks(self) -> int:
        return self.x_train.shape[0]

    def joint(self) -> tuple[Tensor, Tensor]:
        """``D_tr u D_val`` of every task: ``x [T, K+M, ...]``, ``y``."""
        return torch.cat([self.x_train, self.x_val], 1), torch.cat([self.y_train, self.y_val], 1)

    def to(self, device: torch.device | str) -> "TaskBatch":
        if self.x_train.device == torch.device(device):
            return self  # already checked on construction
        return TaskBatch(*(t.to(device) for t in (self.x_train, self.y_train, self.x_val, self.y_val)))

    def select(self, index: slice | Tensor) -> "TaskBatch":
        return TaskBatch(*(t[index] for t in (self.x_train, self.y_train, self.x_val, self.y_val)))
