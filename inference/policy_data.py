"""The data of a policy-gradient step for ``T`` tasks: states, actions and advantage weights, checked on construction.

This is RL's counterpart of :class:`~hbmeta.inference.batch.TaskBatch`: ``K`` episodes of ``H`` steps per task are
flattened to ``N = K H`` points; padding after an episode's end has ``mask = 0`` and ``advantage = 0``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["PolicyData"]


@dataclass
class PolicyData:
    """``obs [T, N, obs_dim]``, ``actions [T, N, act_dim]``, ``advantages [T, N]``, ``mask [T, N]`` (1 = real step)."""

    obs: Tensor
    actions: Tensor
    advantages: Tensor
    mask: Tensor

    def __post_init__(self) -> None:
        if self.obs.dim() != 3 or self.actions.dim() != 3:
            raise ValueError(f"obs and actions must be [tasks, steps, dim]; got {tuple(self.obs.shape)}, "
                             f"{tuple(self.actions.shape)}")
        shape = self.obs.shape[:2]
        for name, t in (("actions", self.actions), ("advantages", self.advantages), ("mask", self.mask)):
            if t.shape[:2] != shape:
                raise ValueError(f"{name} {tuple(t.shape)} disagrees with obs {tuple(self.obs.shape)} on [tasks, steps]")
            if not torch.isfinite(t).all():
                raise ValueError(f"{name} contains NaN or inf")
        if not torch.isfinite(self.obs).all():
            raise ValueError("obs contains NaN or inf")
        if (self.mask.sum(1) < 1).any():
            raise ValueError("a task has no valid step (mask all zero)")

    @property
    def num_tasks(self) -> int:
        return self.obs.shape[0]

    @property
    def num_steps(self) -> Tensor:
        """Valid steps per task ``[T]``."""
        return self.mask.sum(1)

    def targets(self) -> Tensor:
        """``y [T, N, act_dim + 1]`` = actions and advantage weights, the "targets" of the PG likelihood."""
        return torch.cat([self.actions, (self.advantages * self.mask).unsqueeze(-1)], -1)

    @staticmethod
    def cat(parts: list[PolicyData]) -> PolicyData:
        """``D_tr u D_val``: the union of several data sets of the same tasks (along the step dimension)."""
        return PolicyData(*(torch.cat([getattr(p, f) for p in parts], 1) for f in ("obs", "actions", "advantages", "mask")))

    def to(self, device: torch.device | str) -> PolicyData:
        return PolicyData(self.obs.to(device), self.actions.to(device), self.advantages.to(device), self.mask.to(device))
