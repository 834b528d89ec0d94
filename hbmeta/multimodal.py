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

from inference.batch import TaskBatch

__all__ = ["FAMILIES", "MultimodalBatch", "MultimodalTasks", "evaluate_by_family"]

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


def evaluate_by_family(learner, tasks: MultimodalTasks, steps: tuple[int, ...] = (0, 10), num_tasks: int = 300,
                       num_points: int = 100, seed: int = 12345) -> dict[str, dict[int, dict[str, float]]]:
    """Query MSE of the posterior-predictive mean after each number of adaptation steps, over all tasks and per
    family, with 95% CIs: ``{"all" | family: {steps: {"mse", "ci95", "num_tasks"}}}``. Same tasks for every
    learner (``seed``)."""
    from hbmeta.evaluate import mean_ci95, regression_errors

    batch = tasks.sample(num_tasks, torch.Generator().manual_seed(seed), k_query=num_points)
    errors = regression_errors(learner, batch, steps, seed=seed)
    groups = {"all": torch.ones(num_tasks, dtype=torch.bool)}
    groups.update({name: batch.family == FAMILIES.index(name) for name in tasks.families})
    return {g: {k: dict(zip(("mse", "ci95"), mean_ci95(e[mask])), num_tasks=int(mask.sum())) for k, e in errors.items()}
            for g, mask in groups.items()}


def plot_family_predictive(learners: dict, tasks: MultimodalTasks, path, steps: int = 10, seed: int = 7,
                           num_samples: int = 100):
    """One new task per family (columns); each learner's adapted predictive mean +- 2 sd, the truth and the
    support points. Writes a PNG to ``path`` and returns it."""
    from pathlib import Path

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    batch = tasks.sample(60, torch.Generator().manual_seed(seed))
    grid = torch.linspace(*tasks.x_range, 200).view(1, -1, 1)
    fig = Figure(figsize=(4 * len(tasks.families), 3.4))
    FigureCanvasAgg(fig)
    for col, family in enumerate(tasks.families):
        one = batch.select(slice(i := int((batch.family == FAMILIES.index(family)).nonzero()[0]), i + 1))
        ax = fig.add_subplot(1, len(tasks.families), col + 1)
        ax.plot(grid.flatten(), one.truth(grid).flatten(), "k--", lw=1.2, label="truth")
        for (name, learner), color in zip(learners.items(), ("C0", "C3", "C2", "C1")):
            gen = torch.Generator(device=learner.device).manual_seed(seed)
            post = learner.adapt(one.x_train, one.y_train, steps=steps, generator=gen)
            pred = learner.predict(post, grid, num_samples, gen)
            mean, sd = pred.mean.flatten().cpu(), pred.std.flatten().cpu()
            ax.plot(grid.flatten(), mean, color=color, lw=1.8, label=name)
            ax.fill_between(grid.flatten(), mean - 2 * sd, mean + 2 * sd, color=color, alpha=0.18)
        ax.scatter(one.x_train.flatten(), one.y_train.flatten(), c="k", s=14, zorder=5)
        ax.set_title(f"{family} ({steps} steps)")
        if col == 0:
            ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
