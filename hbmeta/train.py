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

from hbmeta.checkpoint import load_checkpoint, save_checkpoint
from hbmeta.config import TrainConfig, resolve_device, torch_threads
from hbmeta.experiments import get_experiment
from inference.learner import MetaLearner

__all__ = ["build_learner", "train", "TrainResult", "iteration_generators", "load_learner"]

CHECKPOINT = "checkpoint.pt"
#: fields that may differ between a run and its resumption
_RESUMABLE_CHANGES = {"iterations", "device", "checkpoint_every", "log_every", "threads"}


def build_learner(config: TrainConfig, device: torch.device | None = None) -> MetaLearner:
    """The network (initialised from ``config.seed``), prior, guide and meta-learner of a run."""
    device = device or resolve_device(config.device)
    experiment = get_experiment(config.experiment)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        net = experiment.make_net(config)
    net.to(device)
    return MetaLearner(net, experiment.make_likelihood(config), algorithm=config.algorithm, guide=config.guide,
                       inner=config.inner(), meta_lr=config.meta_lr, gem_plus_mode=config.gem_plus_mode,
                       prior_scale=config.prior_scale, max_prior_scale=config.max_prior_scale)


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


def _checkpoint(learner: MetaLearner, config: TrainConfig, iteration: int, run_dir: Path) -> None:
    save_checkpoint({"learner": learner.state_dict(), "config": config.to_dict(), "iteration": iteration,
                     "format": 1}, run_dir / CHECKPOINT)


def _restore(config: TrainConfig, run_dir: Path, learner: MetaLearner) -> int:
    state = load_checkpoint(run_dir / CHECKPOINT, map_location=learner.device)
    saved = state["config"]
    changed = {k for k, v in config.to_dict().items() if saved.get(k) != v} - _RESUMABLE_CHANGES
    if changed:
        raise ValueError(f"cannot resume {run_dir}: the config differs from the checkpoint's in {sorted(changed)}")
    learner.load_state_dict(state["learner"])
    return int(state["iteration"])


def train(config: TrainConfig, run_dir: str | Path, resume: bool = False, progress: bool = True,
          stop_after: int | None = None) -> TrainResult:
    """Meta-train per ``config`` into ``run_dir`` (see :func:`_train`), with ``config.threads`` CPU threads."""
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
    if resume:
        start = _restore(config, run_dir, learner)
    else:
        if (run_dir / CHECKPOINT).exists():
            raise FileExistsError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
        start = 0
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    metrics_path = run_dir / "metrics.jsonl"
    if resume and metrics_path.exists():  # drop lines logged after the checkpoint we resume from
        kept = [ln for ln in metrics_path.read_text().splitlines() if ln and json.loads(ln)["iteration"] <= start]
        metrics_path.write_text("".join(ln + "\n" for ln in kept))
    end = config.iterations if stop_after is None else min(config.iterations, start + stop_after)
    began = time.perf_counter()
    bar = tqdm(range(start, end), initial=start, total=config.iterations, disable=not progress,
               desc=f"{config.algorithm} on {config.experiment}", unit="it")
    with metrics_path.open("a") as metrics:
        for it in bar:
            task_gen, noise_gen = iteration_generators(config.seed, it, device)
            info = learner.meta_step(tasks.sample(config.meta_batch, task_gen), noise_gen)
            done = it + 1
            if done % config.log_every == 0 or done == end:
                scale = float(learner.prior.scale.detach().mean()) if hasattr(learner.prior, "scale") else float("nan")
                record = {"iteration": done, "seconds": time.perf_counter() - began, **info, "prior_scale": scale}
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                bar.set_postfix(grad=f"{info['grad_norm']:.3g}")
            if done % config.checkpoint_every == 0 or done == end:
                _checkpoint(learner, config, done, run_dir)
    if start == end:
        _checkpoint(learner, config, end, run_dir)
    return TrainResult(learner, config, run_dir, time.perf_counter() - began)
