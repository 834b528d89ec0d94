r"""``hbmeta bench throughput``: tasks adapted per second versus meta-batch size, GEM-BML+ and MAML.

A meta-iteration adapts ``T`` tasks (the inner update) and takes one meta-step, so its throughput is
``T / (seconds per meta-iteration)``. The batched inner loop runs every task and Monte-Carlo sample of the
meta-batch in one kernel launch per layer (:class:`hbmeta.models.functional.BatchedNet`: batched matmuls for the MLP,
grouped convolutions for conv4), so on a GPU the throughput should grow with ``T`` until the device is full;
on a CPU it saturates early. Two workloads, each algorithm at its defaults for that workload
(:class:`hbmeta.experiments.config.TrainConfig`):

- ``sinusoid``: the 2 x 40 ReLU MLP, K = 10 support and 10 query points (GEM-BML section 5.1);
- ``conv4``: the Omniglot conv4 body (64 filters, 1 x 28 x 28), 5-way 1-shot, ``queries`` per class, with
  random images (timing does not depend on pixels) and the Omniglot recipe of appendix C.4.2.

Each (workload, algorithm, T) is timed over ``repeats`` meta-steps after ``warmup`` untimed ones on the same
batch (``time.perf_counter``, CUDA synchronised); the median is reported. ``--amp`` runs the network's
forward passes under bf16 autocast (:mod:`hbmeta.training.runtime`); MAML, which backpropagates through the inner
loop, is then skipped.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from hbmeta.experiments import TrainConfig, resolve_config
from hbmeta.inference.batch import TaskBatch
from hbmeta.training.runtime import resolve_device, torch_threads
from hbmeta.training.runtime import amp_autocast, check_amp

__all__ = [
    "WORKLOADS",
    "ThroughputConfig",
    "format_throughput_table",
    "run_from_args",
    "run_throughput_benchmark",
    "write_throughput_benchmark",
]

WORKLOADS = ("sinusoid", "conv4")


@dataclass
class ThroughputConfig:
    """Settings of the throughput benchmark."""

    meta_batches: tuple[int, ...] = (4, 8, 16, 32, 64, 128)
    workloads: tuple[str, ...] = WORKLOADS
    algorithms: tuple[str, ...] = ("gem-bml+", "maml")
    queries: int = 15
    repeats: int = 3
    warmup: int = 1
    device: str = "cpu"
    amp: bool = False
    seed: int = 0
    threads: int | None = 1

    def __post_init__(self) -> None:
        unknown = set(self.workloads) - set(WORKLOADS)
        if unknown:
            raise ValueError(f"unknown throughput workload(s) {sorted(unknown)}; choose from {', '.join(WORKLOADS)}")
        if not self.meta_batches or min(self.meta_batches) < 1 or self.repeats < 1 or self.warmup < 0:
            raise ValueError(f"bad throughput settings: meta_batches={self.meta_batches}, repeats={self.repeats}, "
                             f"warmup={self.warmup}")


def _train_config(workload: str, algorithm: str, meta_batch: int, config: ThroughputConfig) -> TrainConfig:
    if workload == "sinusoid":
        return resolve_config(TrainConfig(experiment="sinusoid", algorithm=algorithm, meta_batch=meta_batch,
                                          seed=config.seed, device=config.device))
    return resolve_config(TrainConfig(experiment="omniglot", algorithm=algorithm, ways=5, k_shot=1,
                                      k_query=config.queries, meta_batch=meta_batch, seed=config.seed,
                                      device=config.device))


def _batch(workload: str, c: TrainConfig, generator: torch.Generator) -> TaskBatch:
    """A meta-batch of ``c.meta_batch`` tasks: sinusoid tasks, or Omniglot-shaped random images."""
    if workload == "sinusoid":
        from hbmeta.tasks.sinusoid import SinusoidTasks

        return SinusoidTasks("default", c.k_shot, c.k_query).sample(c.meta_batch, generator)

    def part(per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.rand((c.meta_batch, c.ways * per_class, 1, 28, 28), generator=generator)
        y = torch.arange(c.ways).repeat_interleave(per_class).expand(c.meta_batch, -1).contiguous()
        return x, y
    return TaskBatch(*part(c.k_shot), *part(c.k_query))


def _time_one(workload: str, algorithm: str, meta_batch: int, config: ThroughputConfig,
              device: torch.device) -> dict:
    from hbmeta.training.runs import build_learner

    c = _train_config(workload, algorithm, meta_batch, config)
    learner = build_learner(c, device)
    batch = _batch(workload, c, torch.Generator().manual_seed(config.seed)).to(device)
    noise = torch.Generator(device=device).manual_seed(config.seed + 1)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for rep in range(config.warmup + config.repeats):
        sync()
        began = time.perf_counter()
        with amp_autocast(config.amp, device, algorithm):
            learner.meta_step(batch, noise, metrics=False)  # as bench step
        sync()
        if rep >= config.warmup:
            times.append(time.perf_counter() - began)
    seconds = statistics.median(times)
    row = {"workload": workload, "algorithm": algorithm, "meta_batch": meta_batch, "inner_steps": c.inner.steps,
           "num_samples": c.inner.num_samples, "seconds_per_iter": seconds, "seconds_all": times,
           "tasks_per_second": meta_batch / seconds}
    if device.type == "cuda":
        row["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return row


def run_throughput_benchmark(config: ThroughputConfig | None = None, progress: bool = False) -> dict:
    """Run the benchmark; returns a JSON-ready dict (``rows``, ``skipped``, ``env``, ``config``)."""
    config = ThroughputConfig() if config is None else config
    device = resolve_device(config.device)
    rows, skipped = [], []
    with torch_threads(config.threads if device.type == "cpu" else None):
        for workload in config.workloads:
            for algorithm in config.algorithms:
                if config.amp:
                    try:
                        check_amp(algorithm)
                    except ValueError as err:
                        skipped.append({"workload": workload, "algorithm": algorithm, "reason": str(err)})
                        continue
                for meta_batch in config.meta_batches:
                    rows.append(_time_one(workload, algorithm, meta_batch, config, device))
                    if progress:
                        r = rows[-1]
                        print(f"{workload:>8} {algorithm:>8} T={meta_batch:>3}: {r['seconds_per_iter']:.3f} s/iter, "
                              f"{r['tasks_per_second']:.1f} tasks/s", flush=True)
        threads = torch.get_num_threads()
    env = {"torch": torch.__version__, "python": platform.python_version(), "threads": threads,
           "device": str(device), "machine": platform.machine(), "processor": platform.processor()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return {"config": asdict(config), "rows": rows, "skipped": skipped, "env": env}


def format_throughput_table(result: dict) -> str:
    """Markdown: tasks adapted per second, (workload, algorithm) x meta-batch size."""
    sizes = result["config"]["meta_batches"]
    lines = ["| workload | algorithm | " + " | ".join(f"T={t}" for t in sizes) + " |",
             "|---|---" + "|---:" * len(sizes) + "|"]
    table: dict[tuple[str, str], dict[int, dict]] = {}
    for r in result["rows"]:
        table.setdefault((r["workload"], r["algorithm"]), {})[r["meta_batch"]] = r
    for (workload, algorithm), row in table.items():
        cells = [f"{row[t]['tasks_per_second']:.1f}" if t in row else "-" for t in sizes]
        lines.append(f"| {workload} | {algorithm} | " + " | ".join(cells) + " |")
    c, env = result["config"], result["env"]
    amp = ", bf16 autocast" if c["amp"] else ""
    note = (f"tasks adapted per second (meta-batch / median seconds per meta-iteration over {c['repeats']} after "
            f"{c['warmup']} warm-up{amp}); {env.get('gpu', env['device'])}, {env['threads']} threads, torch {env['torch']}")
    lines += ["", note]
    lines += [f"skipped {s['algorithm']} on {s['workload']}: {s['reason']}" for s in result["skipped"]]
    return "\n".join(lines)


def write_throughput_benchmark(result: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write ``throughput.json`` and ``throughput.md`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "throughput.json", "md": out / "throughput.md"}
    paths["json"].write_text(json.dumps(result, indent=2))
    paths["md"].write_text(format_throughput_table(result) + "\n")
    return paths


def run_from_args(args) -> int:
    """The ``hbmeta bench throughput`` command: print the table, write JSON and Markdown into ``--out``."""
    config = ThroughputConfig(device=args.device, amp=args.amp)
    if args.meta_batches:
        config.meta_batches = tuple(int(t) for t in args.meta_batches.split(","))
    if args.benchmarks:
        config.workloads = tuple(w.strip() for w in args.benchmarks.split(","))
    for name in ("repeats", "warmup", "queries"):
        if getattr(args, name, None) is not None:
            setattr(config, name, getattr(args, name))
    config.__post_init__()
    result = run_throughput_benchmark(config, progress=True)
    print(format_throughput_table(result))
    paths = write_throughput_benchmark(result, args.out)
    print(f"\nwrote {paths['json']} and {paths['md']}")
    return 0
