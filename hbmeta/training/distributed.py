r"""Meta-training on many workers with ``torch.distributed``: only posteriors (or GEM gradients) on the wire.

GEM's meta-update needs only the result of each task's inner update, the posterior parameters
:math:`\lambda_\tau`, never its computation graph or its data (GEM-BML section 1, Broader impact, appendix
B.5). So the inner updates of a meta-batch can run on separate processes, machines and devices:

.. math::
    \nabla_\Theta \mathcal{L} = \frac1T \sum_{r=1}^{R} \sum_{\tau \in \mathcal{T}_r}
    \hat g_\tau(\lambda_\tau), \qquad \hat g_\tau = \mathbb{E}_{q(\theta;\lambda_\tau)} \nabla_\Theta \log p(\theta; \Theta)

where rank ``r`` adapts its share :math:`\mathcal{T}_r` of the ``T`` tasks. Launch with ``torchrun`` (gloo on
CPU, NCCL on CUDA); every rank draws the *full* meta-batch with the run's seeded task generator
(:func:`hbmeta.training.runs.iteration_generators`) and keeps its contiguous slice, and draws the inner loop's
full-batch reparameterisation noise and keeps its columns (:func:`sliced_noise`), so a run on ``R`` ranks ends
at the parameters of the single-process run to float precision (only the order of the sum over tasks differs).

Two ways to combine the ranks:

- **default**: each rank sums its tasks' meta-gradients, one ``all_reduce`` (SUM, ``[n P]`` floats) per
  iteration, every rank takes the same meta-optimizer step (as DistributedDataParallel does). Works for every
  algorithm whose meta-gradient is a mean over tasks (:data:`DISTRIBUTABLE`).
- **private** (``--private``, GEM-BML / GEM-BML+ only): the parameter-server form of appendix B.5. Workers
  send only their tasks' posterior parameters (``gather`` of ``[T_r, k P]``: means and scales) to rank 0, which
  computes the GEM gradient, steps the meta-optimizer and ``broadcast`` s the new prior ``Theta`` (``[P]``
  tensors). A worker's task data never leaves it, and neither does anything computed from it but its
  posteriors; the server needs no data and no graph.

Rank 0 writes ``config.json``, ``metrics.jsonl`` and the (atomic) checkpoints; on ``--resume`` every rank loads
the same ``checkpoint.pt`` (put ``--out`` on a filesystem all nodes see) and the prior is broadcast from rank
0 before the first step. A worker that dies makes the others fail in their next collective with
:class:`WorkerLostError`; torchrun then stops the job and reports the first failure.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.elastic.multiprocessing.errors import get_error_handler
from tqdm.auto import tqdm

from hbmeta.experiments.config import TrainConfig
from hbmeta.experiments.registry import get_experiment
from hbmeta.experiments.resolve import resolve_config
from hbmeta.inference.batch import TaskBatch
from hbmeta.inference.gem import gem_bml_gradient, gem_gradient, gem_plus_posteriors
from hbmeta.inference.inner import NoiseFn
from hbmeta.inference.learner import MetaLearner
from hbmeta.models.posterior import Posterior
from hbmeta.training.runs import (
    CHECKPOINT,
    TrainResult,
    save_run_checkpoint,
    restore_run,
    build_learner,
    check_new_run,
    iteration_generators,
    open_run_dir,
)
from hbmeta.training.runtime import resolve_device, torch_threads
from hbmeta.training.runtime import amp_autocast

__all__ = [
    "DISTRIBUTABLE",
    "FAIL_AT_ENV",
    "FAIL_RANK_ENV",
    "PRIVATE",
    "DistContext",
    "WorkerLostError",
    "check_distributable",
    "distributed_meta_step",
    "init_distributed",
    "pack_posterior",
    "private_meta_step",
    "sliced_noise",
    "task_slice",
    "train_distributed",
    "unpack_posterior",
    "world_size_from_env",
]

#: algorithms whose meta-gradient is a mean of per-task terms with no noise other than the inner loop's
DISTRIBUTABLE = ("gem-bml", "gem-bml+", "maml", "fomaml", "reptile", "imaml", "pretrain")
#: algorithms whose meta-gradient is a function of the posterior parameters alone (private mode)
PRIVATE = ("gem-bml", "gem-bml+")
#: tests only: the 1-based iteration at which a worker raises (fault injection); ``FAIL_RANK_ENV`` picks the rank
FAIL_AT_ENV = "HBMETA_FAIL_AT_ITERATION"
FAIL_RANK_ENV = "HBMETA_FAIL_RANK"


class WorkerLostError(RuntimeError):
    """A collective failed: another worker died or became unreachable."""


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the job: its rank, the world size, its device and the backend."""

    rank: int
    world_size: int
    device: torch.device
    backend: str
    owns_group: bool = False   # this module initialised the process group (and so destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_size_from_env() -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: str = "auto") -> DistContext:
    """Join the process group described by torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR``, ``MASTER_PORT``): gloo on the CPU, NCCL on CUDA with one GPU per local rank."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    owns = not dist.is_initialized()
    if owns:
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise RuntimeError(f"--distributed needs the environment torchrun sets ({', '.join(missing)} unset); launch "
                               f"with: torchrun --nproc-per-node N -m hbmeta.cli train ... --distributed")
        dist.init_process_group(backend, device_id=dev if dev.type == "cuda" else None)
    return DistContext(dist.get_rank(), dist.get_world_size(), dev, dist.get_backend(), owns)


def task_slice(num_tasks: int, rank: int, world_size: int) -> slice:
    """Rank ``rank`` 's contiguous share of ``num_tasks`` tasks (sizes differ by at most one, larger first)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad rank {rank} of world size {world_size}")
    if num_tasks < world_size:
        raise ValueError(f"meta-batch of {num_tasks} tasks cannot be split over {world_size} ranks: every rank needs "
                         f"at least one task; raise --meta-batch or use fewer processes")
    base, extra = divmod(num_tasks, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def sliced_noise(generator: torch.Generator, num_tasks: int, tasks: slice, dtype: torch.dtype = torch.float32
                 ) -> NoiseFn:
    """A :data:`hbmeta.inference.inner.NoiseFn` that draws the whole meta-batch's noise ``[S, T, P]`` and keeps ``tasks``.

    The generator advances exactly as in the single-process run, so each task sees the noise it would see there.
    """
    def draw(step: int, shape: torch.Size) -> Tensor:
        full = torch.randn((shape[0], num_tasks, *shape[2:]), generator=generator, device=generator.device,
                           dtype=dtype)
        return full[:, tasks]
    return draw


def check_distributable(config: TrainConfig, world_size: int) -> None:
    """Raise ``ValueError`` naming the problem if ``config`` cannot be split over ``world_size`` ranks."""
    if config.algorithm not in DISTRIBUTABLE:
        raise ValueError(f"--distributed supports {', '.join(DISTRIBUTABLE)}; {config.algorithm!r} draws noise outside "
                         f"the inner loop or couples the tasks, so its ranks would not reproduce the single run")
    if config.distributed.private and config.algorithm not in PRIVATE:
        raise ValueError(f"--private needs a meta-gradient computed from posterior parameters alone ({', '.join(PRIVATE)}); "
                         f"{config.algorithm!r}'s needs the task data or the inner loop's graph")
    if config.scheduler.name != "uniform":
        raise ValueError(f"--distributed draws tasks uniformly; the {config.scheduler.name!r} task scheduler is not supported")
    task_slice(config.meta_batch, 0, world_size)


def _collective(fn, *args, what: str, **kwargs):
    """Run a collective; a dead peer becomes a :class:`WorkerLostError` that says what to do next."""
    try:
        return fn(*args, **kwargs)
    except RuntimeError as err:
        raise WorkerLostError(f"rank {dist.get_rank()}: {what} failed ({type(err).__name__}: {str(err)[:300]}); "
                              f"another worker has died or is unreachable. Rerun the same command with --resume to "
                              f"continue from the last checkpoint") from err


# ------------------------------------------------------------------------------------------- the meta-step
def _local_gradient_sum(learner: MetaLearner, batch: TaskBatch, noise: NoiseFn, generator: torch.Generator
                        ) -> dict[str, Tensor]:
    """Sum over this rank's tasks of the per-task descent directions (what the single run averages)."""
    model, guide, cfg = learner.model, learner.guide, learner.inner
    if learner.algorithm == "gem-bml":
        per_task, _ = gem_bml_gradient(model, guide, batch, cfg, generator, learner.closed_form, noise=noise)
        return {n: -g.sum(0) for n, g in per_task.items()}
    if learner.algorithm == "gem-bml+":
        q1, q2 = gem_plus_posteriors(model, guide, batch, cfg, generator, learner.gem_plus_mode, noise=noise)
        return {n: -g.sum(0) for n, g in _gem_from_posteriors(learner, (q1, q2), generator).items()}
    # the baselines' meta-gradient is a mean over the tasks it is given: times the count is the sum
    return {n: g * batch.num_tasks for n, g in learner.meta_gradient(batch, generator).items()}


def _gem_from_posteriors(learner: MetaLearner, posteriors: tuple[Posterior, ...], generator) -> dict[str, Tensor]:
    """Per-task GEM ascent directions: ``g(q)`` for GEM-BML, ``g(q2) - g(q1)`` for GEM-BML+ (appendix A.4).

    q2 before q1, as :func:`hbmeta.inference.gem.gem_plus_gradient` does: the Monte-Carlo form then draws the same samples.
    """
    def gem(q: Posterior) -> dict[str, Tensor]:
        return gem_gradient(learner.prior, q, learner.closed_form, generator=generator)
    if len(posteriors) == 1:
        return gem(posteriors[0])
    q1, q2 = posteriors
    g2, g1 = gem(q2), gem(q1)
    return {n: g2[n] - g1[n] for n in g2}


def _gem_is_monte_carlo(learner: MetaLearner) -> bool:
    """True if the GEM gradient of the learner's prior is estimated by sampling (no closed form in use)."""
    if learner.algorithm not in PRIVATE:
        return False
    probe = learner.prior.initial_posterior(1)
    return not learner.closed_form or learner.prior.gem_gradient(probe) is None


def distributed_meta_step(learner: MetaLearner, batch: TaskBatch, noise: NoiseFn, generator: torch.Generator,
                          num_tasks: int) -> dict[str, float]:
    """One meta-iteration: local inner updates, one all-reduce of the gradient sums, the same step everywhere."""
    local = _local_gradient_sum(learner, batch, noise, generator)
    names = list(local)
    flat = torch.cat([local[n].reshape(-1) for n in names])
    _collective(dist.all_reduce, flat, op=dist.ReduceOp.SUM, what="all_reduce of the meta-gradient")
    flat = flat / num_tasks
    parts = torch.split(flat, [local[n].numel() for n in names])
    return learner.apply_meta_gradient({n: p.view_as(local[n]) for n, p in zip(names, parts)})


def _posterior_tensors(q: Posterior) -> dict[str, Tensor]:
    """The task-major tensors of a posterior (loc, scale, Cholesky or low-rank factor: each ``[T, P, ...]``)."""
    if q.kind == "particles":
        raise ValueError("particle posteriors (BMAML) are not sent in private mode")
    names = [f.name for f in dataclasses.fields(Posterior) if f.name != "particles"]
    return {n: getattr(q, n) for n in names if getattr(q, n) is not None}


def pack_posterior(posteriors: tuple[Posterior, ...]) -> Tensor:
    """Posterior parameters of ``T`` tasks as one ``[T, k P]`` tensor (each posterior's tensors side by side)."""
    return torch.cat([t.reshape(q.num_tasks, -1) for q in posteriors for t in _posterior_tensors(q).values()], 1)


def unpack_posterior(flat: Tensor, like: tuple[Posterior, ...]) -> tuple[Posterior, ...]:
    """Inverse of :func:`pack_posterior` for ``flat [T, k P]``, with the kinds and widths of ``like``."""
    out, col, num_tasks = [], 0, flat.shape[0]
    for q in like:
        parts = {}
        for name, t in _posterior_tensors(q).items():
            width = t[0].numel()
            parts[name] = flat[:, col:col + width].reshape(num_tasks, *t.shape[1:])
            col += width
        out.append(Posterior(**parts))
    return tuple(out)


def _posteriors(learner: MetaLearner, batch: TaskBatch, noise: NoiseFn, generator) -> tuple[Posterior, ...]:
    model, guide, cfg = learner.model, learner.guide, learner.inner
    if learner.algorithm == "gem-bml":
        _, post = gem_bml_gradient(model, guide, batch, cfg, generator, learner.closed_form, noise=noise)
        return (post,)
    return gem_plus_posteriors(model, guide, batch, cfg, generator, learner.gem_plus_mode, noise=noise)


def private_meta_step(learner: MetaLearner, ctx: DistContext, batch: TaskBatch, noise: NoiseFn,
                      generator: torch.Generator, num_tasks: int) -> dict[str, float]:
    """Private mode (appendix B.5): workers send posterior parameters, rank 0 steps and broadcasts ``Theta``.

    On the wire per iteration: one ``gather`` of ``[ceil(T/R), k P]`` posterior rows (padded to equal size) and
    one ``broadcast`` of the prior's parameters (``[P]`` each). Returns the logged numbers on rank 0, ``{}`` elsewhere.
    """
    mine = _posteriors(learner, batch, noise, generator)
    rows = pack_posterior(mine)
    slices = [task_slice(num_tasks, r, ctx.world_size) for r in range(ctx.world_size)]
    width = max(s.stop - s.start for s in slices)
    padded = torch.zeros((width, rows.shape[1]), dtype=rows.dtype, device=rows.device)
    padded[:rows.shape[0]] = rows
    inbox = [torch.empty_like(padded) for _ in slices] if ctx.is_main else None
    _collective(dist.gather, padded, inbox, dst=0, what="gather of the posteriors")
    info: dict[str, float] = {}
    if ctx.is_main:
        full = torch.cat([part[:s.stop - s.start] for part, s in zip(inbox, slices)])
        per_task = _gem_from_posteriors(learner, unpack_posterior(full, mine), generator)
        info = learner.apply_meta_gradient({n: -g.mean(0) for n, g in per_task.items()})
    else:
        learner.iteration += 1
    broadcast_prior(learner)
    return info


def broadcast_prior(learner: MetaLearner) -> None:
    """Copy rank 0's prior parameters ``Theta`` to every rank (one ``broadcast`` per parameter tensor)."""
    with torch.no_grad():
        for p in learner.prior.parameters():
            _collective(dist.broadcast, p.data, src=0, what="broadcast of the prior")


# ---------------------------------------------------------------------------------------------- the loop
def _injected_failure(rank: int, iteration: int) -> None:
    """Tests only: raise at 1-based ``iteration`` on rank ``$HBMETA_FAIL_RANK`` (default 1) if ``$HBMETA_FAIL_AT_ITERATION`` says so."""
    at = os.environ.get(FAIL_AT_ENV)
    if at is not None and int(at) == iteration and rank == int(os.environ.get(FAIL_RANK_ENV, "1")):
        raise RuntimeError(f"rank {rank}: injected failure at iteration {iteration} ({FAIL_AT_ENV}={at})")


def train_distributed(config: TrainConfig, run_dir: str | Path, resume: bool = False, progress: bool = True,
                      stop_after: int | None = None) -> TrainResult:
    """:func:`hbmeta.training.loop.train` across the ranks of a torchrun job; same arguments, same run folder.

    Every rank returns a :class:`~hbmeta.training.loop.TrainResult` with the same learner; ``result.rank`` tells rank 0
    (which wrote the files) from the others.
    """
    config = resolve_config(config)
    ctx = init_distributed(config.device)
    try:
        with torch_threads(config.threads if ctx.device.type == "cpu" else None):
            result = _train(ctx, config, Path(run_dir), resume, progress, stop_after)
    except Exception as err:  # torchrun's failure summary ("Root Cause") then shows this message, not "<N/A>"
        get_error_handler().record_exception(err)
        raise
    if ctx.owns_group:
        dist.destroy_process_group()
    return result


def _train(ctx: DistContext, config: TrainConfig, run_dir: Path, resume: bool, progress: bool,
           stop_after: int | None) -> TrainResult:
    check_distributable(config, ctx.world_size)
    learner = build_learner(config, ctx.device)
    if not config.distributed.private and _gem_is_monte_carlo(learner):
        raise ValueError(f"the {config.model.prior!r} prior's GEM gradient is a Monte-Carlo estimate: under --distributed each "
                         f"rank would draw its own samples and the run would not reproduce the single-process one; use "
                         f"--private (rank 0 draws them for all tasks) or a prior with a closed form")
    tasks = get_experiment(config.experiment).make_tasks(config)
    if resume:
        start = restore_run(config, run_dir, learner)
    else:
        if ctx.is_main:
            check_new_run(run_dir)
        start = 0
    broadcast_prior(learner)
    metrics_path = open_run_dir(config, run_dir, resume, start) if ctx.is_main else run_dir / "metrics.jsonl"
    end = config.iterations if stop_after is None else min(config.iterations, start + stop_after)
    mine = task_slice(config.meta_batch, ctx.rank, ctx.world_size)
    began = time.perf_counter()
    bar = tqdm(range(start, end), initial=start, total=config.iterations, disable=not (progress and ctx.is_main),
               desc=f"{config.algorithm} on {config.experiment}, {ctx.world_size} ranks", unit="it")
    metrics = metrics_path.open("a") if ctx.is_main else None
    try:
        for it in bar:
            _injected_failure(ctx.rank, it + 1)
            task_gen, noise_gen = iteration_generators(config.seed, it, ctx.device)
            batch = tasks.sample(config.meta_batch, task_gen).select(mine).to(ctx.device)
            noise = sliced_noise(noise_gen, config.meta_batch, mine, learner.prior.loc.dtype)
            try:
                with amp_autocast(config.amp, ctx.device, config.algorithm):
                    if config.distributed.private:
                        info = private_meta_step(learner, ctx, batch, noise, noise_gen, config.meta_batch)
                    else:
                        info = distributed_meta_step(learner, batch, noise, noise_gen, config.meta_batch)
            except WorkerLostError as err:
                saved = max(start, it - it % config.checkpoint_every)
                raise WorkerLostError(f"{err} (iteration {it + 1}; {run_dir / CHECKPOINT} holds iteration {saved})"
                                      ) from err.__cause__
            done = it + 1
            if ctx.is_main and (done % config.log_every == 0 or done == end):
                scale = float(learner.prior.scale.detach().mean()) if hasattr(learner.prior, "scale") else float("nan")
                record = {"iteration": done, "seconds": time.perf_counter() - began, **info, "prior_scale": scale,
                          "world_size": ctx.world_size}
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
            if ctx.is_main and (done % config.checkpoint_every == 0 or done == end):
                save_run_checkpoint(learner, config, done, run_dir)
    finally:
        if metrics is not None:
            metrics.close()
    if ctx.is_main and start == end:
        save_run_checkpoint(learner, config, end, run_dir)
    return TrainResult(learner, config, run_dir, time.perf_counter() - began, rank=ctx.rank)
