r"""Meta-test on held-out FS-Mol assays (ATS appendix B.1): :math:`R^2` per assay, its mean and median."""

from __future__ import annotations

import numpy as np
import torch

from hbmeta.evaluation.stats import mean_ci95
from hbmeta.tasks.drug import DrugTasks, squared_correlation

__all__ = ["evaluate_drug"]


def evaluate_drug(learner, tasks: DrugTasks, steps: tuple[int, ...] = (0, 1, 5, 10), num_tasks: int | None = None,
                  num_samples: int = 8, seed: int = 12345, chunk: int = 16) -> dict[int, dict[str, float]]:
    """Meta-test on held-out assays: adapt on ``k_shot`` measurements, :math:`R^2` on all the others.

    Returns ``{steps: {"r2_mean", "ci95", "r2_median", "num_tasks"}}`` over the first ``num_tasks`` assays
    of the fold (all by default). The same support sets (``seed``) are used for every learner.
    """
    count = len(tasks.assays) if num_tasks is None else min(num_tasks, len(tasks.assays))
    if count < 1:
        raise ValueError(f"num_tasks must be >= 1; got {num_tasks}")
    split_gen = torch.Generator().manual_seed(seed)
    splits = [tasks.split_assay(a, split_gen) for a in range(count)]
    noise_gen = torch.Generator(device=learner.device).manual_seed(seed + 1)
    wanted, scores = set(steps), {k: [] for k in sorted(set(steps))}
    for start in range(0, count, chunk):
        part = splits[start:start + chunk]

        def record(step: int, posterior, part=part) -> None:
            if step not in wanted:
                return
            for t, (_, _, xq, yq) in enumerate(part):
                pred = learner.predict(posterior.select(t), xq.unsqueeze(0), num_samples, noise_gen).mean
                scores[step].append(squared_correlation(pred.cpu(), yq))

        x = torch.stack([s[0] for s in part])
        y = torch.stack([s[1] for s in part])
        learner.adapt(x, y, steps=max(steps), generator=noise_gen, callback=record)
    out = {}
    for k, values in scores.items():
        v = torch.tensor(values)
        mean, ci = mean_ci95(v)
        out[k] = {"r2_mean": mean, "ci95": ci, "r2_median": float(np.median(values)), "num_tasks": count}
    return out
