"""Meta-training runs (Algorithm 1, Meta-train) with a run folder, progress bar, checkpoints and resume.

A run folder holds::

    config.json        the TrainConfig
    metrics.jsonl      one JSON object per logged iteration
    checkpoint.pt      the latest state (atomic; ``train(..., resume=True)`` continues from it)
    evaluation.json    meta-test error vs adaptation steps (written by ``hbmeta train`` / ``evaluate``)
    plots/             PNGs

Every random number of iteration ``i`` comes from generators seeded with ``(seed, i)``, so a run resumed
from a checkpoint ends with exactly the parameters of an uninterrupted run.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hbmeta.checkpoint import load_checkpoint, save_checkpoint, trim_log
from hbmeta.config import TrainConfig, resolve_device, torch_threads
from hbmeta.experiments import get_experiment
from hbmeta.precision import amp_autocast
from hbmeta.scheduled_training import SchedulerLog, build_scheduler
from hbmeta.schedulers import scheduled_meta_step
from inference.learner import MetaLearner
from models.prior_factory import make_prior

__all__ = ["build_learner", "train", "TrainResult", "iteration_generators", "load_learner"]

CHECKPOINT = "checkpoint.pt"
#: fields that may differ between a run and its resumption
_RESUMABLE_CHANGES = {"iterations", "device", "checkpoint_every", "log_every", "threads", "distributed", "private",
                      "amp"}


def build_learner(config: TrainConfig, device: torch.device | None = None) -> MetaLearner:
    """The network (initialised from ``config.seed``), prior, guide and meta-learner of a run."""
    device = device or resolve_device(config.device)
    experiment = get_experiment(config.experiment)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        net = experiment.make_net(config)
    net.to(device)
    prior = None  # "diagonal": MetaLearner's default prior (and BMAML's particles)
    if config.prior != "diagonal":
        prior = make_prior(config.prior, net, config.prior_scale, config.prior_components, config.prior_scale_ceiling,
                           seed=config.seed)
    return MetaLearner(net, experiment.make_likelihood(config), algorithm=config.algorithm, guide=config.guide,
                       inner=config.inner(), meta_lr=config.meta_lr, gem_plus_mode=config.gem_plus_mode,
                       prior_scale=config.prior_scale, max_prior_scale=config.prior_scale_ceiling, prior=prior)


def iteration_generators(seed: int, iteration: int, device: torch.device) -> tuple[torch.Generator, torch.Generator]:
    """``(task generator on the CPU, noise generator on device)`` for one meta-iteration."""
    base = (seed * 1_000_003 + iteration) * 2
    return torch.Generator().manual_seed(base), torch.Generator(device=device).manual_seed(base + 1)


def load_learner(run_dir: str | Path, device: str = "auto") -> tuple[MetaLearner, TrainConfig, int]:
    """Rebuild the meta-learner of a run folder from its checkpoint: ``(learner, config, iteration)``."""
    dev = resolve_device(device)
    state = load_checkpoint(Path(run_dir) / CHECKPOINT if Path(run_dir).is_dir() else run_dir, map_location=dev)
    config = TrainConfig.from_dict(state["config"])
    learner = build_learner(config, dev)
    learner.load_state_dict(state["learner"])
    return learner, config, int(state["iteration"])


@dataclass
class TrainResult:
    learner: MetaLearner
    config: TrainConfig
    run_dir: Path
    seconds: float
    rank: int = 0  # distributed runs (hbmeta.distributed): only rank 0 wrote the run folder


def _checkpoint(learner: MetaLearner, config: TrainConfig, iteration: int, run_dir: Path, scheduler=None) -> None:
    extra = {} if scheduler is None else {"scheduler": scheduler.state_dict()}
    save_checkpoint({"learner": learner.state_dict(), "config": config.to_dict(), "iteration": iteration,
                     "format": 1, **extra}, run_dir / CHECKPOINT)


def _restore(config: TrainConfig, run_dir: Path, learner: MetaLearner, scheduler=None) -> int:
    state = load_checkpoint(run_dir / CHECKPOINT, map_location=learner.device)
    saved = state["config"]
    saved = TrainConfig.from_dict(saved).to_dict()  # a checkpoint from before a field existed has its default
    changed = {k for k, v in config.to_dict().items() if saved.get(k) != v} - _RESUMABLE_CHANGES
    if changed:
        raise ValueError(f"cannot resume {run_dir}: the config differs from the checkpoint's in {sorted(changed)}")
    learner.load_state_dict(state["learner"])
    if scheduler is not None:  # the task scheduler's parameters, optimizer and baseline (hbmeta.schedulers)
        scheduler.load_state_dict(state["scheduler"])
    return int(state["iteration"])


def check_new_run(run_dir: Path) -> None:
    """A fresh run must not overwrite another: a folder holding a checkpoint needs ``--resume``."""
    if (run_dir / CHECKPOINT).exists():
        raise FileExistsError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")


def open_run_dir(config: TrainConfig, run_dir: Path, resume: bool, start: int) -> Path:
    """Create the run folder, write ``config.json``, trim ``metrics.jsonl`` to ``start`` on resume; its path."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    metrics_path = run_dir / "metrics.jsonl"
    if resume:
        trim_log(metrics_path, start)
    return metrics_path


def train(config: TrainConfig, run_dir: str | Path, resume: bool = False, progress: bool = True,
          stop_after: int | None = None) -> TrainResult:
    """Meta-train per ``config`` into ``run_dir`` (see :func:`_train`), with ``config.threads`` CPU threads.

    Under torchrun (``config.distributed``, ``config.private`` or ``WORLD_SIZE > 1``) the tasks of each meta-batch
    are split over the ranks: :func:`hbmeta.distributed.train_distributed`.
    """
    from hbmeta.distributed import train_distributed, world_size_from_env

    if get_experiment(config.experiment).metric == "return":  # meta-RL: its own loop, same run folder (hbmeta.rl)
        from hbmeta.rl.train import train_rl

        return train_rl(config, run_dir, resume, progress, stop_after)
    if config.distributed or config.private or world_size_from_env() > 1:
        return train_distributed(config, run_dir, resume, progress, stop_after)
    with torch_threads(config.threads if resolve_device(config.device).type == "cpu" else None):
        return _train(config, run_dir, resume, progress, stop_after)


def _train(config: TrainConfig, run_dir: str | Path, resume: bool, progress: bool,
           stop_after: int | None) -> TrainResult:
    """Meta-train per ``config`` into ``run_dir``.

    Args:
        resume: continue from ``run_dir/checkpoint.pt`` (same config but for iterations / device / logging).
        progress: show a tqdm progress bar.
        stop_after: stop (with a checkpoint) after this many iterations of this call; for tests of resume.
    """
    run_dir = Path(run_dir)
    device = resolve_device(config.device)
    learner = build_learner(config, device)
    tasks = get_experiment(config.experiment).make_tasks(config)
    scheduler = build_scheduler(config, tasks)  # None for uniform: no pool, today's random streams
    if resume:
        start = _restore(config, run_dir, learner, scheduler)
    else:
        check_new_run(run_dir)
        start = 0
    metrics_path = open_run_dir(config, run_dir, resume, start)
    end = config.iterations if stop_after is None else min(config.iterations, start + stop_after)
    began = time.perf_counter()
    bar = tqdm(range(start, end), initial=start, total=config.iterations, disable=not progress,
               desc=f"{config.algorithm} on {config.experiment}", unit="it")
    schedule_log = None if scheduler is None else SchedulerLog(run_dir, start, resume)
    with metrics_path.open("a") as metrics:
        for it in bar:
            task_gen, noise_gen = iteration_generators(config.seed, it, device)
            with amp_autocast(config.amp, device, config.algorithm):
                if scheduler is None:
                    info = learner.meta_step(tasks.sample(config.meta_batch, task_gen), noise_gen)
                else:  # a pool of candidates, the scheduler picks meta_batch of them (docs/ats.md)
                    info, pool = scheduled_meta_step(learner, scheduler, tasks, config.meta_batch, config.pool_size,
                                                     it / max(config.iterations, 1), task_gen, noise_gen,
                                                     update_meta_model=it >= config.scheduler_warmup)
                    schedule_log.write(it + 1, info, pool)
            done = it + 1
            if done % config.log_every == 0 or done == end:
                scale = float(learner.prior.scale.detach().mean()) if hasattr(learner.prior, "scale") else float("nan")
                record = {"iteration": done, "seconds": time.perf_counter() - began, **info, "prior_scale": scale}
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                bar.set_postfix(grad=f"{info['grad_norm']:.3g}")
            if done % config.checkpoint_every == 0 or done == end:
                _checkpoint(learner, config, done, run_dir, scheduler)
    if start == end:
        _checkpoint(learner, config, end, run_dir, scheduler)
    if schedule_log is not None:
        schedule_log.close(run_dir / "plots" / "scheduler_weights.png")
    return TrainResult(learner, config, run_dir, time.perf_counter() - began)
