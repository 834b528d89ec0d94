r"""Task distributions. Sinusoid regression (GEM-BML section 5.1, appendix C.4.1).

- ``default`` (Finn et al. 2017): :math:`y = A \sin(x - b)`, :math:`A \in [0.1, 5]`, :math:`b \in [0, \pi]`,
  :math:`x \in [-5, 5]`, no noise.
- ``challenging`` (Yoon et al. 2018, as in the paper): :math:`y = A \sin(w x + b) + \epsilon`,
  :math:`A \in [0.1, 5]`, :math:`b \in [0, 2\pi]`, :math:`w \in [0.5, 2]`, :math:`\epsilon \sim N(0, (0.01 A)^2)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from hbmeta.inference.batch import TaskBatch

__all__ = ["SinusoidTasks", "SinusoidBatch", "SETTINGS"]

SETTINGS = {
    "default": dict(amplitude=(0.1, 5.0), phase=(0.0, math.pi), frequency=(1.0, 1.0), noise=0.0),
    "challenging": dict(amplitude=(0.1, 5.0), phase=(0.0, 2 * math.pi), frequency=(0.5, 2.0), noise=0.01),
}


@dataclass
class SinusoidBatch(TaskBatch):
    """A :class:`TaskBatch` that also knows each task's true function (for plots and test error)."""

    amplitude: Tensor | None = None
    phase: Tensor | None = None
    frequency: Tensor | None = None

    def select(self, index: slice | Tensor) -> "SinusoidBatch":
        parts = (self.x_train, self.y_train, self.x_val, self.y_val, self.amplitude, self.phase, self.frequency)
        return SinusoidBatch(*(t[index] for t in parts))

    def truth(self, x: Tensor) -> Tensor:
        """Noise-free ``y`` of every task at ``x [T, N, 1]``."""
        a, b, w = (t.to(x.device).view(-1, 1, 1) for t in (self.amplitude, self.phase, self.frequency))
        return a * torch.sin(w * x + b)


@dataclass
class SinusoidTasks:
    """Sinusoid regression tasks; ``sample(T, generator)`` draws a meta-batch.

    Args:
        setting: ``"default"`` or ``"challenging"``.
        k_shot: support points per task (K).
        k_query: query points per task.
        x_range: inputs are uniform in this interval.
    """

    setting: str = "default"
    k_shot: int = 10
    k_query: int = 10
    x_range: tuple[float, float] = (-5.0, 5.0)

    def __post_init__(self) -> None:
        if self.setting not in SETTINGS:
            raise ValueError(f"unknown sinusoid setting {self.setting!r}; choose one of {sorted(SETTINGS)}")
        lo, hi = self.x_range
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"x_range must be (low, high) with finite low < high; got {self.x_range!r}")
        if self.k_shot < 1 or self.k_query < 1:
            raise ValueError(f"k_shot and k_query must be >= 1; got {self.k_shot}, {self.k_query}")
        self.spec = SETTINGS[self.setting]

    def _uniform(self, lo_hi: tuple[float, float], shape, generator) -> Tensor:
        lo, hi = lo_hi
        return lo + (hi - lo) * torch.rand(shape, generator=generator)

    def sample(self, num_tasks: int, generator: torch.Generator | None = None, k_query: int | None = None) -> SinusoidBatch:
        """Draw ``num_tasks`` tasks with ``k_shot`` support and ``k_query`` query points each (on the CPU)."""
        k_query = self.k_query if k_query is None else k_query
        a = self._uniform(self.spec["amplitude"], (num_tasks,), generator)
        b = self._uniform(self.spec["phase"], (num_tasks,), generator)
        w = self._uniform(self.spec["frequency"], (num_tasks,), generator)
        if self.setting == "default":
            b = -b  # Finn et al.: A sin(x - phase)
        x = self._uniform(self.x_range, (num_tasks, self.k_shot + k_query, 1), generator)
        y = a.view(-1, 1, 1) * torch.sin(w.view(-1, 1, 1) * x + b.view(-1, 1, 1))
        if self.spec["noise"] > 0:
            y = y + self.spec["noise"] * a.view(-1, 1, 1) * torch.randn(y.shape, generator=generator)
        k = self.k_shot
        return SinusoidBatch(x[:, :k], y[:, :k], x[:, k:], y[:, k:], amplitude=a, phase=b, frequency=w)
