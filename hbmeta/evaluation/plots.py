"""Plots written into run folders (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from hbmeta.inference.learner import MetaLearner  # noqa: E402
from hbmeta.tasks.sinusoid import SinusoidBatch  # noqa: E402

__all__ = ["plot_sinusoid_predictive", "save_figure"]


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Lay out ``fig``, write it to ``path`` (creating the folder) as a PNG and close it; the path."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_sinusoid_predictive(learners: dict[str, MetaLearner], batch: SinusoidBatch, path: str | Path,
                             task: int = 0, steps: int = 10, num_samples: int = 100, seed: int = 0) -> Path:
    """One test task: each learner's adapted prediction; Bayesian ones with mean +- 2 sd bands.

    Shows the K support points and the true function.
    """
    one = batch.select(slice(task, task + 1))
    grid = torch.linspace(-5, 5, 200).view(1, -1, 1)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(grid.flatten(), one.truth(grid).flatten(), "k--", lw=1.5, label="truth")
    for (name, learner), color in zip(learners.items(), ("C0", "C3", "C2", "C1")):
        gen = torch.Generator(device=learner.device).manual_seed(seed)
        post = learner.adapt(one.x_train, one.y_train, steps=steps, generator=gen)
        pred = learner.predict(post, grid, num_samples, gen)
        mean, sd = pred.mean.flatten().cpu(), pred.std.flatten().cpu()
        ax.plot(grid.flatten(), mean, color=color, lw=2, label=f"{name} ({steps} steps)")
        if post.kind != "delta":
            ax.fill_between(grid.flatten(), mean - 2 * sd, mean + 2 * sd, color=color, alpha=0.2,
                            label=f"{name} mean $\\pm$ 2 sd")
    ax.scatter(one.x_train.flatten(), one.y_train.flatten(), c="k", zorder=5, label=f"support (K={one.x_train.shape[1]})")
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_title("Posterior predictive on a new sinusoid task")
    ax.legend(fontsize=8, loc="best")
    return save_figure(fig, path)
