"""Meta-test evaluation (Algorithm 1, Meta-test): error on new tasks after 0..N adaptation steps."""

from __future__ import annotations

import torch

from hbmeta.evaluation.calibration import PREDICTIVES, calibration_errors, class_probabilities, reliability_diagram
from hbmeta.evaluation.stats import mean_ci95
from hbmeta.experiments import TrainConfig, get_experiment, resolve_config
from hbmeta.inference.batch import TaskBatch
from hbmeta.inference.learner import MetaLearner
from hbmeta.tasks.sinusoid import SinusoidBatch, SinusoidTasks

__all__ = ["evaluate_regression", "regression_errors", "evaluate_classification", "classification_outputs",
           "classification_outputs_by_predictive",
           "evaluate_experiment", "compare_calibration"]


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


def classification_outputs(learner: MetaLearner, batch: TaskBatch, steps: tuple[int, ...] = (0, 1, 5, 10),
                           num_samples: int = 16, seed: int = 12345, chunk: int = 50, predictive: str = "bma"
                           ) -> dict[int, torch.Tensor]:
    """Query-set predictive probabilities ``[T, M, classes]`` after each number of adaptation steps.

    The posterior predictive is Bayesian model averaging: the Monte-Carlo mean of the softmax over
    ``num_samples`` guide samples (:func:`hbmeta.evaluation.calibration.predictive_probabilities`); point-estimate
    learners give the softmax of their adapted weights. Tasks run ``chunk`` at a time to bound memory.
    ``predictive="mean"``: the softmax of the predictive's mean instead (:func:`predictive_probabilities`).
    """
    return classification_outputs_by_predictive(learner, batch, steps, num_samples, seed, chunk, (predictive,))[predictive]


def classification_outputs_by_predictive(learner: MetaLearner, batch: TaskBatch, steps: tuple[int, ...],
                                         num_samples: int = 16, seed: int = 12345, chunk: int = 50,
                                         predictives: tuple[str, ...] = PREDICTIVES
                                         ) -> dict[str, dict[int, torch.Tensor]]:
    """:func:`classification_outputs` for several readings of the same predictive at once (one adaptation and one
    ``predict`` per step serve them all): ``{predictive: {step: [T, M, classes]}}``."""
    noise_gen = torch.Generator(device=learner.device).manual_seed(seed + 1)
    wanted = set(steps)
    out = {p: {k: [] for k in sorted(wanted)} for p in predictives}
    for start in range(0, batch.num_tasks, chunk):
        part = batch.select(slice(start, start + chunk))

        def record(step: int, posterior, part=part) -> None:
            if step in wanted:
                pred = learner.predict(posterior, part.x_val.to(learner.device), num_samples, noise_gen)
                for p in predictives:
                    out[p][step].append(class_probabilities(learner, pred, p).cpu())

        learner.adapt(part.x_train, part.y_train, steps=max(steps), generator=noise_gen, callback=record)
    return {p: {k: torch.cat(v) for k, v in by_step.items()} for p, by_step in out.items()}


def evaluate_classification(learner: MetaLearner, tasks, steps: tuple[int, ...] = (0, 1, 5, 10),
                            num_tasks: int = 600, num_samples: int = 8, seed: int = 12345, num_bins: int = 15,
                            chunk: int = 50) -> dict[int, dict[str, float]]:
    """Accuracy on ``num_tasks`` new N-way K-shot tasks after each number of steps, with 95% CIs over tasks,
    and the calibration of the predictive (ECE / MCE with ``num_bins`` equal-width bins; GEM-BML Table 3) and its
    NLL per query point: of the posterior predictive (model averaging; ``accuracy``, ``ece``, ``nll``, ...) and of
    the posterior mean's prediction (``accuracy_mean``, ``ece_mean``, ``nll_mean``, ...; the same numbers for a point
    estimate).

    The same tasks (``seed``) are used for every learner so that numbers are comparable.
    """
    batch = tasks.sample(num_tasks, torch.Generator().manual_seed(seed))
    labels = batch.y_val
    result: dict[int, dict[str, float]] = {}
    outputs = classification_outputs_by_predictive(learner, batch, steps, num_samples, seed, chunk, ("bma", "mean"))
    for predictive, suffix in (("bma", ""), ("mean", "_mean")):
        for k, p in outputs[predictive].items():
            accuracy, ci95 = mean_ci95((p.argmax(-1) == labels).float().mean(1))
            cal = calibration_errors(p, labels, num_bins=num_bins)
            nll = float(-p.clamp_min(1e-12).log().gather(-1, labels.unsqueeze(-1)).mean())
            result.setdefault(k, {"num_bins": num_bins, "num_tasks": num_tasks}).update(
                {f"accuracy{suffix}": accuracy, f"ci95{suffix}": ci95, f"ece{suffix}": float(cal["ece"]),
                 f"mce{suffix}": float(cal["mce"]), f"nll{suffix}": nll})
    return result


def evaluate_experiment(learner: MetaLearner, config: TrainConfig, steps: tuple[int, ...], num_tasks: int | None = None,
                        seed: int = 12345) -> dict[int, dict[str, float]]:
    """Meta-test a run on its experiment's held-out tasks, with the experiment's metric."""
    config = resolve_config(config)
    experiment = get_experiment(config.experiment)
    tasks = experiment.test_tasks(config)
    if experiment.metric == "accuracy":
        return evaluate_classification(learner, tasks, steps, num_tasks or 600, seed=seed)
    if experiment.metric == "r2":  # drug activity: R^2 per held-out assay, mean and median (hbmeta.tasks.drug)
        from hbmeta.evaluation.drug import evaluate_drug

        return evaluate_drug(learner, tasks, steps, num_tasks, seed=seed)
    return evaluate_regression(learner, tasks, steps, num_tasks=num_tasks or 100, seed=seed)


def compare_calibration(run_dirs: list, out_dir, num_tasks: int = 600, seed: int = 12345, num_samples: int = 8,
                        num_bins: int = 15, device: str = "cpu", steps: int | None = None) -> dict:
    """Calibration of several classification runs on the SAME held-out tasks, side by side (GEM-BML Table 3).

    Each run adapts with its own ``test_steps`` (or ``steps`` for all); Bayesian runs predict with the Monte-Carlo average of the
    softmax over ``num_samples`` posterior samples, point-estimate runs with the softmax of their adapted
    weights. Writes ``calibration.json`` and ``reliability.png`` (one panel per run) into ``out_dir``.
    """
    import json
    from pathlib import Path

    from hbmeta.training.runs import load_learner

    results, report, tasks_key = {}, {}, None
    for run in run_dirs:
        learner, config, iteration = load_learner(run, device)
        experiment = get_experiment(config.experiment)
        if experiment.metric != "accuracy":
            raise ValueError(f"{run} is a {config.experiment} run; calibration compares classification runs")
        key = (config.experiment, config.ways, config.k_shot, config.split, config.seed)
        if tasks_key is not None and key != tasks_key:
            raise ValueError(f"{run} has tasks {key}, the first run {tasks_key}: compare runs on the same tasks")
        tasks_key = key
        batch = experiment.test_tasks(config).sample(num_tasks, torch.Generator().manual_seed(seed))
        k = config.inner.test_steps if steps is None else steps
        probs = classification_outputs(learner, batch, (k,), num_samples, seed)[k]
        name = f"{config.algorithm} ({Path(run).name})"
        results[name] = calibration_errors(probs, batch.y_val, num_bins=num_bins)
        acc, ci = mean_ci95((probs.argmax(-1) == batch.y_val).float().mean(1))
        report[name] = {"run": str(run), "iteration": iteration, "steps": k, "accuracy": acc,
                        "ci95": ci, "ece": results[name]["ece"], "mce": results[name]["mce"], "num_bins": num_bins,
                        "num_tasks": num_tasks}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "calibration.json").write_text(json.dumps(report, indent=2))
    plot = reliability_diagram(results, out / "reliability.png")
    return {"runs": report, "files": [str(out / "calibration.json"), str(plot)]}
