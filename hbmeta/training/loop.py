"""Meta-training runs (Algorithm 1, Meta-train) with a run folder, progress bar, checkpoints and resume.

:func:`train` writes the run folder described in :mod:`hbmeta.training.runs`; meta-RL runs go to
:func:`hbmeta.training.rl.train_rl` and torchrun runs to :func:`hbmeta.training.distributed.train_distributed`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from tqdm.auto import tqdm

from hbmeta.experiments.config import TrainConfig
from hbmeta.experiments.registry import get_experiment
from hbmeta.experiments.resolve import resolve_config
from hbmeta.inference.metrics import prior_scale_statistics
from hbmeta.training.runs import (TrainResult, build_learner, check_new_run, iteration_generators, open_run_dir,
                                  restore_run, save_run_checkpoint)
from hbmeta.training.lock import RunLock
from hbmeta.training.monitor import MetricsLog, adaptation_metrics, monitor_generator
from hbmeta.training.runtime import amp_autocast, resolve_device, torch_threads
from hbmeta.training.scheduled import SchedulerLog, build_scheduler
from hbmeta.training.schedulers import scheduled_meta_step

__all__ = ["train"]

#: tasks of the monitoring batch adapted at each logged iteration (at most the meta-batch)
MONITOR_TASKS = 8

def train(config: TrainConfig, run_dir: str | Path, resume: bool = False, progress: bool = True,
          stop_after: int | None = None, tensorboard: bool = False, overwrite: bool = False) -> TrainResult:
    """Meta-train per ``config`` into ``run_dir`` (see :func:`_train`), with ``config.threads`` CPU threads.

    ``config``'s unset fields take their defaults (:func:`hbmeta.experiments.resolve_config`); the result's
    ``config`` is the resolved one. Under torchrun (``config.distributed.enabled``, ``.private`` or
    ``WORLD_SIZE > 1``) the tasks of each meta-batch are split over the ranks:
    :func:`hbmeta.training.distributed.train_distributed`. Every ``log_every`` iterations a line of
    ``metrics.jsonl`` (and with ``tensorboard`` a TensorBoard scalar each) says how the current prior adapts
    (:mod:`hbmeta.training.monitor`).

    The run folder is locked for the whole run (:class:`hbmeta.training.lock.RunLock`: a second writer is refused
    with the holder's name). A fresh run refuses a folder that holds another run's files unless ``overwrite``
    (which removes them first, :func:`hbmeta.training.runs.clear_run`).
    """
    if resume and overwrite:
        raise ValueError("resume=True continues the run in the folder and overwrite=True removes it: choose one")
    if not str(run_dir).strip():
        raise ValueError("the run folder (--out) is empty; name a folder, e.g. --out runs/sinusoid")
    run_dir = Path(run_dir)
    if resume and not run_dir.exists():  # before the lock, which would create the folder
        raise FileNotFoundError(f"--resume: the run folder {run_dir} does not exist, so there is nothing to resume; "
                                f"drop --resume to start a new run there")
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: only rank 0 writes (and checks) the run folder
        return _train_any(config, run_dir, resume, progress, stop_after, tensorboard)
    with RunLock(run_dir):
        if not resume:
            check_new_run(run_dir, overwrite)
        return _train_any(config, run_dir, resume, progress, stop_after, tensorboard)


def _train_any(config: TrainConfig, run_dir: Path, resume: bool, progress: bool, stop_after: int | None,
               tensorboard: bool) -> TrainResult:
    from hbmeta.training.distributed import train_distributed, world_size_from_env

    config = resolve_config(config)
    if get_experiment(config.experiment).metric == "return":  # meta-RL: its own loop, same run folder (hbmeta.tasks.rl)
        from hbmeta.training.rl import train_rl

        return train_rl(config, run_dir, resume, progress, stop_after)
    if config.distributed.enabled or config.distributed.private or world_size_from_env() > 1:
        return train_distributed(config, run_dir, resume, progress, stop_after)
    with torch_threads(config.threads if resolve_device(config.device).type == "cpu" else None):
        return _train(config, run_dir, resume, progress, stop_after, tensorboard)


def _train(config: TrainConfig, run_dir: str | Path, resume: bool, progress: bool,
           stop_after: int | None, tensorboard: bool = False) -> TrainResult:
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
        start = restore_run(config, run_dir, learner, scheduler)
    else:
        check_new_run(run_dir)
        start = 0
    open_run_dir(config, run_dir, resume, start)
    end = config.iterations if stop_after is None else min(config.iterations, start + stop_after)
    began, monitoring = time.perf_counter(), 0.0  # seconds logged are training time: monitoring is left out
    bar = tqdm(range(start, end), initial=start, total=config.iterations, disable=not progress,
               desc=f"{config.algorithm} on {config.experiment}", unit="it")
    schedule_log = None if scheduler is None else SchedulerLog(run_dir, start, resume)
    with MetricsLog(run_dir, tensorboard) as metrics:
        for it in bar:
            task_gen, noise_gen = iteration_generators(config.seed, it, device)
            logged = (it + 1) % config.log_every == 0 or it + 1 == end  # the adaptation numbers only when written
            with amp_autocast(config.amp, device, config.algorithm):
                if scheduler is None:
                    info = learner.meta_step(tasks.sample(config.meta_batch, task_gen), noise_gen, metrics=logged)
                else:  # a pool of candidates, the scheduler picks meta_batch of them (docs/ats.md)
                    info, pool = scheduled_meta_step(learner, scheduler, tasks, config.meta_batch, config.scheduler.pool_size,
                                                     it / max(config.iterations, 1), task_gen, noise_gen,
                                                     update_meta_model=it >= config.scheduler.warmup)
                    schedule_log.write(it + 1, info, pool)
            done = it + 1
            if done % config.log_every == 0 or done == end:
                now = time.perf_counter()
                seconds = now - began - monitoring
                monitor = monitor_generator(config.seed, done)
                adapted = adaptation_metrics(learner, tasks.sample(min(config.meta_batch, MONITOR_TASKS), monitor),
                                             monitor)
                monitoring += time.perf_counter() - now
                record = {"iteration": done, "seconds": seconds, **info, **adapted, **prior_scale_statistics(learner.prior)}
                metrics.write(record)
                bar.set_postfix(query=f"{adapted['query_loss']:.3g}", grad=f"{info['grad_norm']:.3g}")
            if done % config.checkpoint_every == 0 or done == end:
                save_run_checkpoint(learner, config, done, run_dir, scheduler)
    if start == end:
        save_run_checkpoint(learner, config, end, run_dir, scheduler)
    if schedule_log is not None:
        schedule_log.close(run_dir / "plots" / "scheduler_weights.png")
    return TrainResult(learner, config, run_dir, time.perf_counter() - began - monitoring)
