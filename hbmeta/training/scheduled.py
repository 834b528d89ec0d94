"""The task scheduler inside a meta-training run: building it from a config, its per-iteration log and plot.

``hbmeta.training.loop`` calls these when ``config.scheduler.name`` is not ``"uniform"`` (a uniform run is unchanged:
no pool, the same random streams as before). The log ``scheduler.jsonl`` holds one line per iteration with
the pool's sampling weights, the chosen indices, each candidate's label-noise level (noisy tasks) and its
features; :func:`plot_scheduler_weights` draws ``plots/scheduler_weights.png`` from it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from hbmeta.experiments.config import TrainConfig
from hbmeta.experiments.registry import get_experiment
from hbmeta.tasks.noisy import clean_tasks
from hbmeta.training.runs import trim_log
from hbmeta.training.schedulers import AdaptiveTaskScheduler, GreedyLossScheduler, TaskScheduler

__all__ = ["SCHEDULER_LOG", "VALIDATION_TASKS", "SchedulerLog", "build_scheduler", "plot_scheduler_weights"]

SCHEDULER_LOG = "scheduler.jsonl"
#: held-out validation tasks whose loss improvement is ATS's reward (a few keep it cheap)
VALIDATION_TASKS = 8


def build_scheduler(config: TrainConfig, tasks) -> TaskScheduler | None:
    """The run's scheduler (``None`` for uniform). ATS's validation tasks come from the experiment's
    ``make_val_tasks`` (drug: the FS-Mol valid fold) or else the clean training tasks, drawn once (seeded)."""
    if config.scheduler.name == "uniform":
        return None
    if config.scheduler.name == "greedy":
        return GreedyLossScheduler(config.scheduler.temperature)
    experiment = get_experiment(config.experiment)
    source = experiment.make_val_tasks(config) if experiment.make_val_tasks else clean_tasks(tasks)
    validation = source.sample(VALIDATION_TASKS, torch.Generator().manual_seed(config.seed + 7919))
    return AdaptiveTaskScheduler(validation, config.scheduler.temperature, config.scheduler.lr, seed=config.seed)


class SchedulerLog:
    """Appends one JSON line per iteration to ``run_dir/scheduler.jsonl`` (trimmed to ``start`` on resume)."""

    def __init__(self, run_dir: Path, start: int, resume: bool):
        self.path = Path(run_dir) / SCHEDULER_LOG
        if resume:
            trim_log(self.path, start)
        else:
            self.path.write_text("")
        self.file = self.path.open("a")

    def write(self, iteration: int, info: dict, record: dict) -> None:
        extra = {k: info[k] for k in ("reward", "val_loss") if k in info}
        self.file.write(json.dumps({"iteration": iteration, **extra, **record}) + "\n")
        self.file.flush()

    def close(self, plot_path: Path | None = None) -> Path | None:
        self.file.close()
        return plot_scheduler_weights(self.path, plot_path) if plot_path is not None else None


def plot_scheduler_weights(log_path: str | Path, path: str | Path) -> Path | None:
    """Weight x pool size (1 = uniform) of every candidate against its noise level (or, without noise, its
    query loss), coloured by iteration; and the mean weight of the cleaner vs noisier half of each pool."""
    from matplotlib.figure import Figure  # object-oriented: no pyplot, no display backend

    records = [json.loads(ln) for ln in Path(log_path).read_text().splitlines() if ln]
    if not records:
        return None
    key = "noise" if records[0].get("noise") is not None else "query_loss"
    if records[0].get(key) is None:
        return None
    its, xs, ws, low, high = [], [], [], [], []
    for r in records:
        n = len(r["weights"])
        w = torch.tensor(r["weights"]) * n
        x = torch.tensor(r[key])
        its += [r["iteration"]] * n
        xs += x.tolist()
        ws += w.tolist()
        order = x.argsort()
        low.append(float(w[order[: n // 2]].mean()))
        high.append(float(w[order[n - n // 2:]].mean()))
    fig = Figure(figsize=(11, 4))
    a, b = fig.subplots(1, 2)
    sc = a.scatter(xs, ws, c=its, s=6, cmap="viridis", alpha=0.6)
    fig.colorbar(sc, ax=a, label="iteration")
    a.axhline(1.0, color="k", lw=0.8, ls="--")
    a.set_xlabel("task label-noise level" if key == "noise" else "query loss after adaptation")
    a.set_ylabel("sampling weight x pool size (1 = uniform)")
    a.set_title("ATS sampling weights")
    k = max(1, len(records) // 20)
    smooth = torch.nn.functional.avg_pool1d  # moving average over k iterations
    rows = [r["iteration"] for r in records][k - 1:]
    for series, label in ((low, "cleaner half of pool"), (high, "noisier half of pool")):
        values = smooth(torch.tensor(series).view(1, 1, -1), k, 1).flatten()
        b.plot(rows[: len(values)], values, label=label if key == "noise" else label.replace(
            "cleaner", "lower-loss").replace("noisier", "higher-loss"))
    b.axhline(1.0, color="k", lw=0.8, ls="--")
    b.set_xlabel("iteration")
    b.set_ylabel(f"mean weight x pool size ({k}-iteration average)")
    b.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
