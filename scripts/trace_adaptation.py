"""Trace a classification run's adaptation step by step: support NLL, support and query accuracy after each step.

The README's Omniglot tables report accuracy after 0 / 1 / 5 / 10 steps; this shows what happens in between.
For each step k = 0..STEPS of the run's own inner update (from the meta-learned prior, on the same held-out tasks
as ``hbmeta bench accuracy``: test seed 12345, 15 queries per class), it prints the posterior predictive's
(Bayesian model average over 8 guide draws) support NLL, support accuracy and query accuracy, and how far the
posterior mean moved in that step, in prior standard deviations.

Usage: .venv/bin/python scripts/trace_adaptation.py RUN [--steps 10] [--tasks 100] [--threads 1]
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch

from hbmeta.evaluation.calibration import predictive_probabilities
from hbmeta.experiments.registry import get_experiment
from hbmeta.training.runs import load_learner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("run", help="a classification run folder (with checkpoint.pt)")
    parser.add_argument("--steps", type=int, default=10, help="adaptation steps to trace")
    parser.add_argument("--tasks", type=int, default=100, help="held-out tasks (test seed 12345)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    learner, config, iteration = load_learner(args.run, "cpu")
    experiment = get_experiment(config.experiment)
    if experiment.metric != "accuracy":
        raise SystemExit(f"{args.run} is a {config.experiment} run; this traces classification runs")
    tasks = experiment.test_tasks(replace(config, k_query=15))
    batch = tasks.sample(args.tasks, torch.Generator().manual_seed(12345))
    generator = torch.Generator().manual_seed(12346)
    scale = getattr(learner.prior, "scale", None)
    print(f"{args.run}: {config.algorithm} at iteration {iteration}, inner update {learner.inner}")
    print("| step | support NLL | support accuracy | query accuracy | mean step / prior sd |")
    print("|---:|---:|---:|---:|---:|")
    previous: list[torch.Tensor] = []

    def record(step: int, posterior) -> None:
        support = predictive_probabilities(learner, posterior, batch.x_train, 8, generator)
        query = predictive_probabilities(learner, posterior, batch.x_val, 8, generator)
        nll = -support.gather(-1, batch.y_train[..., None]).clamp_min(1e-12).log().mean()
        moved = "" if not previous or scale is None else f"{((posterior.loc - previous[0]).abs() / scale).mean():.3f}"
        previous[:] = [posterior.loc.clone()]
        print(f"| {step} | {nll:.3f} | {(support.argmax(-1) == batch.y_train).float().mean():.3f} | "
              f"{(query.argmax(-1) == batch.y_val).float().mean():.3f} | {moved} |", flush=True)

    learner.adapt(batch.x_train, batch.y_train, steps=args.steps, generator=generator, callback=record)


if __name__ == "__main__":
    main()
