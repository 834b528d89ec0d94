"""A run: its folder, checkpoints, random streams and result.

A run folder holds::

    config.json        the TrainConfig
    metrics.jsonl      one JSON object per logged iteration
    checkpoint.pt      the latest state (atomic; ``train(..., resume=True)`` continues from it)
    evaluation.json    meta-test error vs adaptation steps (written by ``hbmeta train``; ``hbmeta evaluate`` writes
                       evaluation-<settings>.json, keyed by its tasks, steps and seed)
    plots/             PNGs
    .lock, .lock.json  the writer's lock and who holds it (:mod:`hbmeta.training.lock`)

Checkpoints are written atomically (temp file + fsync + rename) and read with ``weights_only=True``; run logs
are trimmed back to a checkpoint's iteration on resume. Every random number of iteration ``i`` comes from
:func:`iteration_generators` seeded with ``(seed, i)``, so a run resumed from a checkpoint ends with exactly the
parameters of an uninterrupted run. Every training loop (:mod:`hbmeta.training.loop`, ``.distributed``, ``.rl``)
uses these helpers.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from hbmeta.experiments.config import TrainConfig
from hbmeta.experiments.registry import get_experiment
from hbmeta.experiments.resolve import resolve_config
from hbmeta.inference.learner import MetaLearner
from hbmeta.models.functional import BatchedNet
from hbmeta.models.prior_factory import make_prior
from hbmeta.training.runtime import resolve_device

__all__ = ["save_checkpoint", "load_checkpoint", "trim_log", "atomic_write_text", "CheckpointError", "CheckpointNotFoundError", "RunWriteError",
           "CHECKPOINT", "RUN_FILES", "clear_run",
           "RESUMABLE_CHANGES", "iteration_generators", "TrainResult", "build_learner", "load_learner",
           "save_run_checkpoint", "restore_run", "check_new_run", "open_run_dir", "write_evaluation", "load_learner_state"]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or not an hbmeta checkpoint."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint where one was expected (a wrong path, or a run that never checkpointed)."""


class RunWriteError(OSError):
    """A run file could not be written (disk full, read-only folder); the previous version of the file is intact."""


def _atomic_write(path: str | Path, write) -> Path:
    """``write(binary file)`` into a temp file beside ``path``, fsync, rename: a crash leaves the old or the new file.

    Raises:
        RunWriteError: when the folder cannot be written or the disk fills up, saying that the old file is intact.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as RuntimeError("[enforce fail ...")
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        kept = f"the previous {path.name} is intact" if path.exists() else f"no {path.name} was written"
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise RunWriteError(f"could not write {path} ({reason}); {kept}: free disk space or make {path.parent} "
                            f"writable, then resume") from err
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_checkpoint(state: dict, path: str | Path) -> Path:
    """Write ``state`` to ``path`` so that a crash at any moment leaves either the old or the new file."""
    return _atomic_write(path, lambda f: torch.save(state, f))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically, as :func:`save_checkpoint` writes checkpoints."""
    return _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def _check_zip_crc(path: Path) -> None:
    """``torch.save`` writes a zip archive with a CRC-32 per entry, which ``torch.load`` does not verify: a flipped
    byte inside a tensor loads silently as a wrong weight. Check every entry's CRC (one read of the file)."""
    try:
        if not zipfile.is_zipfile(path):
            return  # not a zip: torch.load says what it is
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except Exception as err:  # noqa: BLE001 - a damaged header surfaces as BadZipFile, struct.error, KeyError, ...
        raise CheckpointError(f"checkpoint {path} is corrupt: {str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}") from None
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} is corrupt: its entry {bad!r} fails its checksum (CRC-32)")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors and plain containers only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"checkpoint not found: {path}")
    _check_zip_crc(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for truncated / foreign files
        lines = str(err).strip().splitlines() or [type(err).__name__]
        reason = "its contents are damaged (not plain tensors and containers)" if "Weights only load failed" in lines[0] \
            else lines[0][:200]  # torch's own messages run to many lines
        raise CheckpointError(f"checkpoint {path} is corrupt or not a torch file: {reason}") from err
    if not isinstance(state, dict) or "learner" not in state or "config" not in state:
        raise CheckpointError(f"{path} is not an hbmeta checkpoint (no 'learner' / 'config' entries)")
    return state


def trim_log(path: str | Path, start: int) -> None:
    """Drop the JSON lines of a run log logged after iteration ``start`` (the checkpoint a run resumes from)."""
    path = Path(path)
    if path.exists():
        kept, lines = [], path.read_text().splitlines()
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                iteration = json.loads(line)["iteration"]
            except (ValueError, KeyError, TypeError):
                if number == len(lines):  # the last line, cut short by a kill: drop it
                    continue
                raise CheckpointError(f"{path} line {number} is not a JSON record with an 'iteration': "
                                      f"{line[:60]!r}; fix or delete that line, then resume") from None
            if iteration <= start:
                kept.append(line)
        atomic_write_text(path, "".join(ln + "\n" for ln in kept))


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
    batched = BatchedNet(net, hide=config.model.hide_names())  # the prior covers what is not hidden
    prior = None  # "diagonal": MetaLearner's default prior (and BMAML's particles)
    if config.model.prior != "diagonal":
        prior = make_prior(config.model.prior, batched, config.model.prior_scale, config.model.prior_components,
                           config.model.prior_scale_ceiling, seed=config.seed)
    return MetaLearner(batched, experiment.make_likelihood(config), algorithm=config.algorithm,
                       guide=config.model.guide, inner=config.inner_config(), meta_lr=config.meta_lr,
                       gem_plus_mode=config.inner.gem_plus_mode, prior_scale=config.model.prior_scale,
                       max_prior_scale=config.model.prior_scale_ceiling, prior=prior,
                       hidden_gradient=config.inner.hidden_gradient or "fisher")


def load_learner(run_dir: str | Path, device: str = "auto") -> tuple[MetaLearner, TrainConfig, int]:
    """Rebuild the meta-learner of a run folder from its checkpoint: ``(learner, config, iteration)``."""
    dev = resolve_device(device)
    state = load_checkpoint(Path(run_dir) / CHECKPOINT if Path(run_dir).is_dir() else run_dir, map_location=dev)
    try:
        config = TrainConfig.from_dict(state["config"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"the config inside {run_dir} is not a valid hbmeta config: {err}") from None
    learner = build_learner(config, dev)
    load_learner_state(learner, state["learner"], run_dir)
    return learner, config, int(state["iteration"])


def load_learner_state(learner: MetaLearner, state: dict, where: str | Path) -> None:
    """``learner.load_state_dict(state)``, with a :class:`CheckpointError` naming the file when the state does not
    fit the learner its config builds (missing entries, other shapes)."""
    try:
        learner.load_state_dict(state)
    except (KeyError, RuntimeError, ValueError, TypeError, AttributeError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"the learner state in {where} does not match the learner its config builds "
                              f"({type(err).__name__}: {first}); it was damaged or spliced from another run") from None


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
    iteration = state["iteration"]
    if not isinstance(iteration, int) or isinstance(iteration, bool) or iteration < 0 \
            or iteration > saved.get("iterations", iteration):
        raise CheckpointError(f"{run_dir / CHECKPOINT} claims iteration {iteration!r}, outside 0..{saved.get('iterations')} "
                              f"of its own config: the file is damaged or not from this run")
    if iteration > config.iterations:
        raise ValueError(f"cannot resume {run_dir}: its checkpoint is at iteration {iteration} but --iterations is "
                         f"{config.iterations}; give --iterations {iteration} or more")
    load_learner_state(learner, state["learner"], run_dir / CHECKPOINT)
    if scheduler is not None:  # the task scheduler's parameters, optimizer and baseline (hbmeta.training.schedulers)
        scheduler.load_state_dict(state["scheduler"])
    return int(state["iteration"])


#: what a run writes into its folder (``--overwrite`` removes these and nothing else)
RUN_FILES = ("config.json", "metrics.jsonl", CHECKPOINT, "evaluation.json", "scheduler.jsonl", "plots", "tensorboard")


def clear_run(run_dir: Path) -> list[str]:
    """Remove what an earlier run wrote into ``run_dir`` (:data:`RUN_FILES`; other files stay); the names removed."""
    removed = []
    for name in RUN_FILES:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed


def check_new_run(run_dir: Path, overwrite: bool = False) -> None:
    """A fresh run must not overwrite another, nor append to the logs of one that crashed before its first
    checkpoint: a folder holding any of :data:`RUN_FILES` needs ``--resume`` (with a checkpoint) or ``--overwrite``."""
    found = [name for name in RUN_FILES if (run_dir / name).exists()]
    if not found:
        return
    if overwrite:
        clear_run(run_dir)
    elif CHECKPOINT in found:
        raise FileExistsError(f"{run_dir} already holds a run; pass --resume to continue it, --overwrite to start it "
                              f"afresh, or choose another --out")
    else:
        raise FileExistsError(f"{run_dir} holds {', '.join(found)} of a run that never wrote a checkpoint; pass "
                              f"--overwrite to start afresh (it removes them) or choose another --out")


def write_evaluation(folder: str | Path, results, **settings) -> Path:
    """Write an ``hbmeta evaluate`` result to ``folder/evaluation-<settings>.json`` (e.g.
    ``evaluation-tasks20-steps2-seed12345.json``), with ``settings`` inside: the training run's ``evaluation.json``
    and evaluations with other settings are never overwritten. Atomic, like every run file."""
    key = "-".join(f"{name}{value}" for name, value in settings.items() if name != "checkpoint_iteration")
    payload = {"settings": settings, "results": results}
    return atomic_write_text(Path(folder) / f"evaluation-{key}.json", json.dumps(payload, indent=2, default=str))


def open_run_dir(config: TrainConfig, run_dir: Path, resume: bool, start: int) -> Path:
    """Create the run folder, write ``config.json``, trim ``metrics.jsonl`` to ``start`` on resume; its path."""
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.json", json.dumps(config.to_dict(), indent=2))
    metrics_path = run_dir / "metrics.jsonl"
    if resume:
        trim_log(metrics_path, start)
    return metrics_path
