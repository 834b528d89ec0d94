r"""Multi-modal regression tasks: each task is a sinusoid, a line or a quadratic (the mixture prior's testbed).

The three families follow the multimodal few-shot regression benchmark of Vuorio et al. (2019, MMAML):

- sinusoid :math:`y = A \sin(x - \phi)`, :math:`A \in [0.1, 5]`, :math:`\phi \in [0, \pi]`;
- line :math:`y = a x + b`, :math:`a, b \in [-3, 3]`;
- quadratic :math:`y = a x^2 + b x + c`, :math:`a \in [-0.15, 0.15]`, :math:`b, c \in [-3, 3]`;

with :math:`x \in [-5, 5]` and observation noise :math:`N(0, \text{noise}^2)`. A task's family is drawn
uniformly; one Gaussian prior over weights must sit between the families' modes, a mixture of ``K = 3``
Gaussians can put a component on each (GEM-BML section 2.3 / B.2, "future work").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hbmeta.inference.batch import TaskBatch

__all__ = ["FAMILIES", "MultimodalBatch", "MultimodalTasks"]

FAMILIES = ("sinusoid", "line", "quadratic")


def _curve(family: Tensor, coef: Tensor, x: Tensor) -> Tensor:
    """Noise-free ``y [T, N, 1]`` at ``x [T, N, 1]`` for ``family [T]`` (index into FAMILIES), ``coef [T, 3]``."""
    c0, c1, c2 = (coef[:, i].view(-1, 1, 1) for i in range(3))
    sine = c0 * torch.sin(x - c1)
    line = c0 * x + c1
    quad = c0 * x.pow(2) + c1 * x + c2
    f = family.view(-1, 1, 1)
    return torch.where(f == 0, sine, torch.where(f == 1, line, quad))


@dataclass
class MultimodalBatch(TaskBatch):
    """A :class:`TaskBatch` that knows each task's family (index into :data:`FAMILIES`) and coefficients."""

    family: Tensor | None = None
    coef: Tensor | None = None

    def select(self, index: slice | Tensor) -> MultimodalBatch:
        parts = (self.x_train, self.y_train, self.x_val, self.y_val, self.family, self.coef)
        return MultimodalBatch(*(t[index] for t in parts))

    def truth(self, x: Tensor) -> Tensor:
        """Noise-free ``y`` of every task at ``x [T, N, 1]``."""
        return _curve(self.family.to(x.device), self.coef.to(x.device), x)


@dataclass
class MultimodalTasks:
    """Tasks drawn from a mixture of function families; ``sample(T, generator)`` draws a meta-batch.

    Args:
        k_shot: support points per task.
        k_query: query points per task.
        noise: observation noise sd.
        families: which of :data:`FAMILIES` to draw from (uniformly).
    """

    k_shot: int = 10
    k_query: int = 10
    noise: float = 0.3
    families: tuple[str, ...] = FAMILIES
    x_range: tuple[float, float] = (-5.0, 5.0)

    def __post_init__(self) -> None:
        unknown = set(self.families) - set(FAMILIES)
        if unknown or not self.families:
            raise ValueError(f"unknown or no task families {sorted(unknown)}; choose from {FAMILIES}")
        if self.k_shot < 1 or self.k_query < 1:
            raise ValueError(f"k_shot and k_query must be >= 1; got {self.k_shot}, {self.k_query}")
        if self.noise < 0:
            raise ValueError(f"noise must be >= 0; got {self.noise}")
        self._index = torch.tensor([FAMILIES.index(f) for f in self.families])

    def sample(self, num_tasks: int, generator: torch.Generator | None = None, k_query: int | None = None
               ) -> MultimodalBatch:
        """Draw ``num_tasks`` tasks with ``k_shot`` support and ``k_query`` query points each (on the CPU)."""
        k_query = self.k_query if k_query is None else k_query
        family = self._index[torch.randint(len(self._index), (num_tasks,), generator=generator)]
        u = torch.rand((num_tasks, 3), generator=generator)
        lo = torch.tensor([[0.1, 0.0, 0.0], [-3.0, -3.0, 0.0], [-0.15, -3.0, -3.0]])[family]
        hi = torch.tensor([[5.0, torch.pi, 0.0], [3.0, 3.0, 0.0], [0.15, 3.0, 3.0]])[family]
        coef = lo + (hi - lo) * u
        lo_x, hi_x = self.x_range
        x = lo_x + (hi_x - lo_x) * torch.rand((num_tasks, self.k_shot + k_query, 1), generator=generator)
        y = _curve(family, coef, x) + self.noise * torch.randn(x.shape, generator=generator)
        k = self.k_shot
        return MultimodalBatch(x[:, :k], y[:, :k], x[:, k:], y[:, k:], family=family, coef=coef)
