r"""``hbmeta bench scaling``: compute and memory of a meta-iteration vs inner steps with conv4 (GEM-BML Fig. 2b).

Every algorithm meta-trains the miniImageNet conv4 body (:meth:`hbmeta.models.conv.Conv4.miniimagenet`: 4 x [3x3
conv, 32 filters, batch norm, ReLU, 2x2 max-pool], 84 x 84 RGB inputs) on 5-way 1-shot meta-batches of
4 tasks, at inner steps 1, 2, 5, 10, 20, side by side in ONE run (the same protocol as ``bench step``:
rotated order, the same batch for every pair, median time, and the peak of live bytes saved for backward
from :func:`hbmeta.models.saved_tensors.peak_saved_bytes`). Inputs are random tensors: timing does not depend on pixels.

Each algorithm uses its miniImageNet recipe (:func:`hbmeta.experiments.registry.classification_defaults`) with the
inner-step count overridden (GEM-BML+ and iBaML: conv body shared and hidden, Bayesian head by Gauss-Newton VI). The paper's claim to check: GEM-BML+'s memory is flat in the inner steps and
its time is close to FOMAML / Reptile, while MAML and ABML grow in both.
"""

from __future__ import annotations

import functools
import json
import platform
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from hbmeta.bench.step import peak_saved_bytes, rotated_timings
from hbmeta.inference.batch import TaskBatch
from hbmeta.inference.learner import MetaLearner

__all__ = ["ScalingBenchConfig", "run_scaling_benchmark", "format_scaling_table", "write_scaling_benchmark",
           "random_image_batch"]


@dataclass
class ScalingBenchConfig:
    """Settings of the scaling benchmark. ``queries`` per class in the query set (15 in the paper's setup;
    the CPU default is smaller so that the whole run takes minutes)."""

    steps: tuple[int, ...] = (1, 2, 5, 10, 20)
    algorithms: tuple[str, ...] = ("maml", "fomaml", "reptile", "imaml", "abml", "bmaml", "gem-bml+", "ibaml")
    ways: int = 5
    shots: int = 1
    queries: int = 5
    meta_batch: int = 4
    image_size: int = 84
    repeats: int = 2
    warmup: int = 1
    device: str = "cpu"
    seed: int = 0
    threads: int | None = None


def random_image_batch(config: ScalingBenchConfig, generator: torch.Generator) -> TaskBatch:
    """A miniImageNet-shaped meta-batch of random images with balanced labels."""
    def part(per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = config.ways * per_class
        x = torch.rand((config.meta_batch, n, 3, config.image_size, config.image_size), generator=generator)
        y = torch.arange(config.ways).repeat_interleave(per_class).expand(config.meta_batch, -1).contiguous()
        return x, y
    return TaskBatch(*part(config.shots), *part(config.queries))


def _learner(algorithm: str, steps: int, config: ScalingBenchConfig) -> MetaLearner:
    """A fresh learner with the algorithm's miniImageNet recipe, ``steps`` inner steps, conv4 at ``image_size``."""
    from hbmeta.experiments import TrainConfig, resolve_config
    from hbmeta.models.conv import Conv4
    from hbmeta.models.functional import BatchedNet
    from hbmeta.models.likelihoods import CategoricalLikelihood

    c = resolve_config(TrainConfig.from_flat(experiment="miniimagenet", algorithm=algorithm, ways=config.ways,
                                             k_shot=config.shots, k_query=config.queries, meta_batch=config.meta_batch,
                                             inner_steps=steps, seed=config.seed, device=config.device))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        net = Conv4(in_channels=3, num_classes=config.ways, filters=32, strided=False, image_size=config.image_size)
    batched = BatchedNet(net.to(config.device), hide=c.model.hide_names())  # the recipe's Bayesian part
    return MetaLearner(batched, CategoricalLikelihood(), algorithm=algorithm, guide=c.model.guide,
                       inner=c.inner_config(), meta_lr=c.meta_lr, prior_scale=c.model.prior_scale,
                       max_prior_scale=c.model.prior_scale_ceiling, hidden_gradient=c.inner.hidden_gradient or "fisher")


def run_scaling_benchmark(config: ScalingBenchConfig | None = None, progress: bool = False) -> dict:
    """Run the benchmark; returns a JSON-ready dict (``rows``, ``env``, ``config``)."""
    config = ScalingBenchConfig() if config is None else config
    before = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        return _run(config, progress)
    finally:
        torch.set_num_threads(before)


def _run(config: ScalingBenchConfig, progress: bool) -> dict:
    sync = torch.cuda.synchronize if config.device.startswith("cuda") else (lambda: None)
    pairs = [(a, k) for k in config.steps for a in config.algorithms]
    runners = {p: functools.partial(_learner(*p, config).meta_step, metrics=False) for p in pairs}  # as bench step
    data_gen = torch.Generator().manual_seed(config.seed)
    noise_gen = torch.Generator(device=config.device).manual_seed(config.seed + 1)
    batch = random_image_batch(config, data_gen).to(config.device)
    report = (lambda rep, pair, seconds: print(f"rep {rep} {pair[0]:>9} {pair[1]:>2} steps: {seconds:.2f}s", flush=True)
              ) if progress else None
    times = rotated_timings(runners, lambda rep: batch, noise_gen, config.warmup, config.repeats, sync, report)
    rows = []
    for name, k in pairs:
        saved = peak_saved_bytes(runners[(name, k)], batch, noise_gen)
        rows.append({"algorithm": name, "steps": k, "ms_per_iter": 1e3 * statistics.median(times[(name, k)]),
                     "ms_all": [1e3 * t for t in times[(name, k)]], "saved_bytes": saved, "saved_mib": saved / 2**20})
    env = {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
           "device": config.device, "machine": platform.machine()}
    if config.device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
    return {"config": asdict(config), "rows": rows, "env": env}


def _table(result: dict) -> dict[str, dict[int, dict]]:
    out: dict[str, dict[int, dict]] = {}
    for r in result["rows"]:
        out.setdefault(r["algorithm"], {})[r["steps"]] = r
    return out


def format_scaling_table(result: dict) -> str:
    """Two Markdown tables (ms per meta-iteration; MiB saved for backward), algorithms x inner steps."""
    table, steps = _table(result), result["config"]["steps"]
    head = "| algorithm | " + " | ".join(f"{k} steps" for k in steps) + " |\n|---" + "|---:" * len(steps) + "|"
    parts = []
    for title, key, fmt in (("ms per meta-iteration (median)", "ms_per_iter", "{:.0f}"),
                            ("MiB saved for backward (peak)", "saved_mib", "{:.1f}")):
        lines = [f"**{title}**", "", head]
        for name, row in table.items():
            lines.append(f"| {name} | " + " | ".join(fmt.format(row[k][key]) for k in steps) + " |")
        parts.append("\n".join(lines))
    c, env = result["config"], result["env"]
    parts.append(f"conv4 (32 filters), {c['ways']}-way {c['shots']}-shot, {c['queries']} queries per class, "
                 f"{c['image_size']}x{c['image_size']} RGB, meta-batch {c['meta_batch']}, median of {c['repeats']} "
                 f"(after {c['warmup']} warm-up), {env.get('gpu', env['device'])}, {env['threads']} threads, torch {env['torch']}")
    return "\n\n".join(parts)


def write_scaling_benchmark(result: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write ``scaling_benchmark.json``, ``.md`` and ``.png`` (time and memory vs inner steps, as Fig. 2b)."""
    from matplotlib.figure import Figure

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {s: out / f"scaling_benchmark.{s}" for s in ("json", "md", "png")}
    paths["json"].write_text(json.dumps(result, indent=2))
    paths["md"].write_text(format_scaling_table(result) + "\n")
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_time, ax_mem = fig.subplots(1, 2)
    for name, row in _table(result).items():
        ks = sorted(row)
        style = dict(lw=2.5) if name.startswith("gem") else {}
        ax_time.plot(ks, [row[k]["ms_per_iter"] / 1e3 for k in ks], marker="o", label=name, **style)
        ax_mem.plot(ks, [row[k]["saved_mib"] for k in ks], marker="o", label=name, **style)
    ax_time.set(xlabel="inner steps", ylabel="seconds per meta-iteration", title="compute")
    ax_mem.set(xlabel="inner steps", ylabel="MiB saved for backward (peak)", title="memory")
    ax_time.legend(fontsize=8)
    fig.savefig(paths["png"], dpi=120)
    return paths
