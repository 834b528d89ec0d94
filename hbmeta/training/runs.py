"""A run: its folder, checkpoints, random streams and result.

A run folder holds::

    config.json        the TrainConfig
    metrics.jsonl      one JSON object per logged iteration
    checkpoint.pt      the latest state (atomic; ``train(..., resume=True)`` continues from it)
    evaluation.json    meta-test error vs adaptation steps (written by ``hbmeta train`` / ``evaluate``)
    plots/             PNGs

Checkpoints are written atomically (temp file + fsync + rename) and read with ``weights_only=True``; run logs
are trimmed back to a checkpoint's iteration on resume. Every random number of iteration ``i`` comes from
:func:`iteration_generators` seeded with ``(seed, i)``, so a run resumed from a checkpoint ends with exactly the
parameters of an uninterrupted run. Every training loop (:mod:`hbmeta.training.loop`, ``.distributed``, ``.rl``)
uses these helpers.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from hbmeta.experiments.config import TrainConfig
from hbmeta.experiments.registry import get_experiment
from hbmeta.experiments.resolve import resolve_config
from hbmeta.inference.learner import MetaLearner
from hbmeta.models.prior_factory import make_prior
from hbmeta.training.runtime import resolve_device

__all__ = ["save_checkpoint", "load_checkpoint", "trim_log", "atomic_write_text", "CheckpointError", "CHECKPOINT",
           "RESUMABLE_CHANGES", "iteration_generators", "TrainResult", "build_learner", "load_learner",
           "save_run_checkpoint", "restore_run", "check_new_run", "open_run_dir"]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or not an hbmeta checkpoint."""


def _atomic_write(path: str | Path, write) -> Path:
    """``write(binary file)`` into a temp file beside ``path``, fsync, rename: a crash leaves the old or the new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_checkpoint(state: dict, path: str | Path) -> Path:
    """Write ``state`` to ``path`` so that a crash at any moment leaves either the old or the new file."""
    return _atomic_write(path, lambda f: torch.save(state, f))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically, as :func:`save_checkpoint` writes checkpoints."""
    return _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors and plain containers only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for truncated / foreign files
        raise CheckpointError(f"checkpoint {path} is corrupt or not a torch file: {err}") from err
    if not isinstance(state, dict) or "learner" not in state or "config" not in state:
        raise CheckpointError(f"{path} is not an hbmeta checkpoint (no 'learner' / 'config' entries)")
    return state


def trim_log(path: str | Path, start: int) -> None:
    """Drop the JSON lines of a run log logged after iteration ``start`` (the checkpoint a run resumes from)."""
    path = Path(path)
    if path.exists():
        kept = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["iteration"] <= start]
        path.write_text("".join(ln + "\n" for ln in kept))


# ------------------------------------------------------------------------------------------ run folders
CHECKPOINT = "checkpoint.pt"
#: fields that may differ between a run and its resumption
RESUMABLE_CHANGES = {"iterations", "device", "checkpoint_every", "log_every", "threads", "distributed", "private",
                      "amp"}


def iteration_generators(seed: int, iteration: int, device: torch.device) -> tuple[torch.Generator, torch.Generator]:
    """``(task generator on the CPU, noise generator on device)`` for one meta-iteration."""
    base = (seed * 1_000_003 + iteration) * 2
    return torch.Generator().manual_seed(base), torch.Generator(device=device).manual_seed(base + 1)


@dataclass
class TrainResult:
    learner: MetaLearner
    config: TrainConfig
    run_dir: Path
    seconds: float
    rank: int = 0  # distributed runs (hbmeta.training.distributed): only rank 0 wrote the run folder


def build_learner(config: TrainConfig, device: torch.device | None = None) -> MetaLearner:
    """The network (initialised from ``config.seed``), prior, guide and meta-learner of a run."""
    config = resolve_config(config)
    device = device or resolve_device(config.device)
    experiment = get_experiment(config.experiment)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        net = experiment.make_net(config)
    net.to(device)
    prior = None  # "diagonal": MetaLearner's default prior (and BMAML's particles)
    if config.model.prior != "diagonal":
        prior = make_prior(config.model.prior, net, config.model.prior_scale, config.model.prior_components,
                           config.model.prior_scale_ceiling, seed=config.seed)
    return MetaLearner(net, experiment.make_likelihood(config), algorithm=config.algorithm, guide=config.model.guide,
                       inner=config.inner_config(), meta_lr=config.meta_lr, gem_plus_mode=config.inner.gem_plus_mode,
                       prior_scale=config.model.prior_scale, max_prior_scale=config.model.prior_scale_ceiling,
                       prior=prior)


def load_learner(run_dir: str | Path, device: str = "auto") -> tuple[MetaLearner, TrainConfig, int]:
    """Rebuild the meta-learner of a run folder from its checkpoint: ``(learner, config, iteration)``."""
    dev = resolve_device(device)
    state = load_checkpoint(Path(run_dir) / CHECKPOINT if Path(run_dir).is_dir() else run_dir, map_location=dev)
    config = TrainConfig.from_dict(state["config"])
    learner = build_learner(config, dev)
    learner.load_state_dict(state["learner"])
    return learner, config, int(state["iteration"])


def save_run_checkpoint(learner: MetaLearner, config: TrainConfig, iteration: int, run_dir: Path, scheduler=None) -> None:
    extra = {} if scheduler is None else {"scheduler": scheduler.state_dict()}
    save_checkpoint({"learner": learner.state_dict(), "config": config.to_dict(), "iteration": iteration,
                     "format": 1, **extra}, run_dir / CHECKPOINT)


def restore_run(config: TrainConfig, run_dir: Path, learner: MetaLearner, scheduler=None) -> int:
    state = load_checkpoint(run_dir / CHECKPOINT, map_location=learner.device)
    # by flat name: a checkpoint from before a field existed has its default, one from before the parts is flat
    saved = TrainConfig.from_dict(state["config"]).to_flat()
    changed = {k for k, v in config.to_flat().items() if saved.get(k) != v} - RESUMABLE_CHANGES
    if changed:
        raise ValueError(f"cannot resume {run_dir}: the config differs from the checkpoint's in {sorted(changed)}")
    learner.load_state_dict(state["learner"])
    if scheduler is not None:  # the task scheduler's parameters, optimizer and baseline (hbmeta.training.schedulers)
        scheduler.load_state_dict(state["scheduler"])
    return int(state["iteration"])


def check_new_run(run_dir: Path) -> None:
    """A fresh run must not overwrite another: a folder holding a checkpoint needs ``--resume``."""
    if (run_dir / CHECKPOINT).exists():
        raise FileExistsError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")


def open_run_dir(config: TrainConfig, run_dir: Path, resume: bool, start: int) -> Path:
    """Create the run folder, write ``config.json``, trim ``metrics.jsonl`` to ``start`` on resume; its path."""
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.json", json.dumps(config.to_dict(), indent=2))
    metrics_path = run_dir / "metrics.jsonl"
    if resume:
        trim_log(metrics_path, start)
    return metrics_path
