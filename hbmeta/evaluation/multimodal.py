r"""Multi-modal regression by family (sinusoid, line, quadratic): query MSE per family and a predictive plot."""

from __future__ import annotations

from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from hbmeta.evaluation.stats import mean_ci95, regression_errors
from hbmeta.tasks.multimodal import FAMILIES, MultimodalTasks

__all__ = ["evaluate_by_family", "plot_family_predictive"]


def evaluate_by_family(learner, tasks: MultimodalTasks, steps: tuple[int, ...] = (0, 10), num_tasks: int = 300,
                       num_points: int = 100, seed: int = 12345) -> dict[str, dict[int, dict[str, float]]]:
    """Query MSE of the posterior-predictive mean after each number of adaptation steps, over all tasks and per
    family, with 95% CIs: ``{"all" | family: {steps: {"mse", "ci95", "num_tasks"}}}``. Same tasks for every
    learner (``seed``)."""
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
