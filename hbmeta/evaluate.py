"""Meta-test evaluation (Algorithm 1, Meta-test): error on new tasks after 0..N adaptation steps."""

from __future__ import annotations

import math

import torch

from hbmeta.tasks import SinusoidBatch, SinusoidTasks
from inference.learner import MetaLearner

__all__ = ["evaluate_regression", "regression_errors", "mean_ci95"]


def mean_ci95(values: torch.Tensor) -> tuple[float, float]:
    """Mean and half-width of the normal 95% confidence interval over tasks."""
    values = values.double()
    half = 1.96 * values.std(unbiased=True).item() / math.sqrt(values.numel()) if values.numel() > 1 else float("nan")
    return values.mean().item(), half


@torch.no_grad()
def _mse(learner: MetaLearner, posterior, x, y, num_samples, generator) -> torch.Tensor:
    pred = learner.predict(posterior, x, num_samples, generator)
    return (pred.mean - y.to(pred.mean.device)).pow(2).flatten(1).mean(1).cpu()


def regression_errors(learner: MetaLearner, batch: SinusoidBatch, steps: tuple[int, ...] = (0, 1, 5, 10),
                      num_samples: int = 32, seed: int = 12345) -> dict[int, torch.Tensor]:
    """Per-task query MSE ``[T]`` of the posterior-predictive mean after each number of adaptation steps."""
    noise_gen = torch.Generator(device=learner.device).manual_seed(seed + 1)
    out: dict[int, torch.Tensor] = {}
    wanted = set(steps)

    def record(step: int, posterior) -> None:
        if step in wanted:
            out[step] = _mse(learner, posterior, batch.x_val, batch.y_val, num_samples, noise_gen)

    learner.adapt(batch.x_train, batch.y_train, steps=max(steps), generator=noise_gen, callback=record)
    return {k: out[k] for k in sorted(out)}


def evaluate_regression(learner: MetaLearner, tasks: SinusoidTasks, steps: tuple[int, ...] = (0, 1, 5, 10),
                        num_tasks: int = 100, num_points: int = 100, num_samples: int = 32, seed: int = 12345
                        ) -> dict[int, dict[str, float]]:
    """Adapt to ``num_tasks`` new tasks from their K-shot support sets and report the query MSE of the
    posterior-predictive mean after each number of steps in ``steps``, with 95% confidence intervals.

    The same tasks (``seed``) are used for every learner so that numbers are comparable.
    """
    batch = tasks.sample(num_tasks, torch.Generator().manual_seed(seed), k_query=num_points)
    errors = regression_errors(learner, batch, steps, num_samples, seed)
    return {k: dict(zip(("mse", "ci95"), mean_ci95(v))) for k, v in errors.items()}
