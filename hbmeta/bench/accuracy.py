r"""``hbmeta bench accuracy``: every algorithm on the same tasks, seeds and budget, with 95% intervals.

Benchmarks (:data:`BENCHMARKS`): ``sinusoid`` and ``sinusoid-challenging`` (GEM-BML section 5.1), ``omniglot-5w1s``
and ``omniglot-5w5s`` (section 5.2). Budgets (:data:`BUDGETS`): ``small`` fits a 2-core CPU (sinusoid 4000 x 25
tasks, Omniglot 5w1s 1500 x 8, 5w5s 300 x 8); ``paper`` is the paper's (40000 x 25 on sinusoid, appendix C.4;
Omniglot 60000 x 32 / x 16 as in MAML's code), for a GPU; ``gpu`` is what one short GPU lease holds
(``scripts/gpu_check.sh``); ``smoke`` checks the wiring.

Omniglot meta-trains with 5 query images per class (the CPU budget) and is evaluated with 15 (the paper's).
Every ``(benchmark, algorithm, seed)`` is an ordinary run folder, ``OUT/runs/<benchmark>/<algorithm>/seed<k>``
(``config.json``, ``metrics.jsonl``, a checkpoint every ``checkpoint_every`` iterations), and its own result,
``result.json``: the meta-test metric after 0, 1, ..., 10 adaptation steps on the *same* held-out tasks for every
algorithm and seed (100 sinusoid tasks with 100 query points each; 600 Omniglot tasks), ECE/MCE for
classification, the training seconds. A finished run is reused, an interrupted one resumes from its checkpoint,
and the table is assembled from whatever results exist, so the grid can be built over several sittings and
slices (``--benchmarks``, ``--algos``, ``--seeds``) can run side by side in separate processes.

Each algorithm runs at its own defaults (``hbmeta train``'s: one set per family, nothing tuned per benchmark).
The table gives, per benchmark and algorithm, the mean over seeds and the 95% t-interval over seeds
(:func:`seed_interval`) after 0, 1, 5 and 10 steps, and the largest loss between consecutive steps
(:func:`largest_step_loss`: more adaptation should never hurt); ``result.json`` also keeps each seed's interval over
tasks.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hbmeta.experiments import TrainConfig, resolve_config
from hbmeta.training.runtime import torch_threads

__all__ = ["BENCHMARKS", "BUDGETS", "ALGORITHMS", "AccuracyBenchConfig", "run_accuracy_benchmark", "seed_interval",
           "summarize", "format_accuracy_table", "write_accuracy_benchmark", "largest_step_loss"]

#: benchmark name -> (experiment, fixed run settings)
BENCHMARKS: dict[str, tuple[str, dict]] = {
    "sinusoid": ("sinusoid", {}),
    "sinusoid-challenging": ("sinusoid-challenging", {}),
    "omniglot-5w1s": ("omniglot", {"ways": 5, "k_shot": 1, "k_query": 5}),
    "omniglot-5w5s": ("omniglot", {"ways": 5, "k_shot": 5, "k_query": 5}),
}
#: query points per class (classification) or per task at meta-test, for every run alike
TEST_QUERIES = {"accuracy": 15}
#: budget -> benchmark -> (meta-iterations, meta-batch)
BUDGETS: dict[str, dict[str, tuple[int, int]]] = {
    "small": {"sinusoid": (4000, 25), "sinusoid-challenging": (4000, 25), "omniglot-5w1s": (1500, 8),
              "omniglot-5w5s": (300, 8)},
    "paper": {"sinusoid": (40000, 25), "sinusoid-challenging": (40000, 25), "omniglot-5w1s": (60000, 32),
              "omniglot-5w5s": (60000, 16)},
    "gpu": {"sinusoid": (20000, 25), "sinusoid-challenging": (20000, 25), "omniglot-5w1s": (3000, 32),
            "omniglot-5w5s": (3000, 16)},
    "smoke": {"sinusoid": (3, 4), "sinusoid-challenging": (3, 4), "omniglot-5w1s": (2, 2), "omniglot-5w5s": (2, 2)},
}
ALGORITHMS = ("gem-bml+", "gem-bml", "ibaml", "maml", "fomaml", "reptile")
#: adaptation steps evaluated (every one, so that a drop between consecutive steps shows); the table shows TABLE_STEPS
STEPS = tuple(range(11))
TABLE_STEPS = ("0", "1", "5", "10")
#: held-out tasks per benchmark (the same for every run): 100 sinusoids, 600 Omniglot tasks
TEST_TASKS = {"mse": 100, "accuracy": 600}
TEST_SEED = 12345


@dataclass
class AccuracyBenchConfig:
    """What to run: benchmarks x algorithms x seeds at one budget, into ``out``."""

    benchmarks: tuple[str, ...] = tuple(BENCHMARKS)
    algorithms: tuple[str, ...] = ALGORITHMS
    seeds: tuple[int, ...] = (0, 1, 2)
    budget: str = "small"
    out: str = "runs/accuracy"
    device: str = "cpu"
    threads: int | None = 1
    test_tasks: dict[str, int] = field(default_factory=lambda: dict(TEST_TASKS))
    data_root: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.budget not in BUDGETS:
            raise ValueError(f"unknown budget {self.budget!r}; choose one of {', '.join(BUDGETS)}")
        unknown = [b for b in self.benchmarks if b not in BENCHMARKS]
        if unknown:
            raise ValueError(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
        if not self.seeds:
            raise ValueError("give at least one seed")
        if self.budget == "smoke":  # a few held-out tasks: the smoke budget checks the wiring, not the numbers
            self.test_tasks = {"mse": 5, "accuracy": 4}

    def run_config(self, benchmark: str, algorithm: str, seed: int) -> TrainConfig:
        """The run's :class:`TrainConfig`: the experiment at the algorithm's defaults, with the budget's size."""
        experiment, fixed = BENCHMARKS[benchmark]
        iterations, meta_batch = BUDGETS[self.budget][benchmark]
        return resolve_config(TrainConfig.from_flat(
            experiment=experiment, algorithm=algorithm, iterations=iterations, meta_batch=meta_batch, seed=seed,
            device=self.device, threads=self.threads, data_root=self.data_root,
            checkpoint_every=max(1, min(500, iterations)), **fixed))


def run_dir(config: AccuracyBenchConfig, benchmark: str, algorithm: str, seed: int) -> Path:
    return Path(config.out) / "runs" / benchmark / algorithm / f"seed{seed}"


def _evaluate(learner, train_config: TrainConfig, metric: str, num_tasks: int) -> dict:
    from dataclasses import replace

    from hbmeta.evaluation.meta_test import evaluate_experiment

    config = replace(train_config, k_query=TEST_QUERIES[metric]) if metric in TEST_QUERIES else train_config
    return {str(k): v for k, v in evaluate_experiment(learner, config, STEPS, num_tasks, seed=TEST_SEED).items()}


def run_one(config: AccuracyBenchConfig, benchmark: str, algorithm: str, seed: int) -> dict:
    """Train (or resume, or reuse) one run and return its result (also written to ``result.json``)."""
    from hbmeta.experiments.registry import get_experiment
    from hbmeta.training.loop import train
    from hbmeta.training.runs import CHECKPOINT, atomic_write_text

    folder = run_dir(config, benchmark, algorithm, seed)
    train_config = config.run_config(benchmark, algorithm, seed)
    metric = get_experiment(train_config.experiment).metric
    settings = {"config": train_config.to_flat(), "test_tasks": config.test_tasks[metric], "test_seed": TEST_SEED,
                "steps": list(STEPS)}
    result_path = folder / "result.json"
    if result_path.exists():
        saved = json.loads(result_path.read_text())
        if {k: saved.get(k) for k in settings} == _comparable(settings):
            return saved
        raise FileExistsError(f"{result_path} was made with other settings; remove {folder} or choose another --out")
    began = time.perf_counter()
    resume = (folder / CHECKPOINT).exists()
    trained = train(train_config, folder, resume=resume, progress=config.progress)
    seconds = _train_seconds(folder) if resume else trained.seconds
    evaluation = _evaluate(trained.learner, train_config, metric, config.test_tasks[metric])
    result = {**_comparable(settings), "benchmark": benchmark, "algorithm": algorithm, "seed": seed, "metric": metric,
              "train_seconds": seconds, "wall_seconds": time.perf_counter() - began, "evaluation": evaluation,
              "prior_scale_median": _median_scale(trained.learner)}
    atomic_write_text(result_path, json.dumps(result, indent=2))
    return result


def _comparable(settings: dict) -> dict:
    """``settings`` as they read back from JSON (tuples become lists)."""
    return json.loads(json.dumps(settings))


def _train_seconds(folder: Path) -> float:
    """Training time of a resumed run: the sum over the sittings recorded in ``metrics.jsonl``."""
    total, last = 0.0, 0.0
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        seconds = json.loads(line).get("seconds", 0.0)
        if seconds < last:  # a new sitting restarted the clock
            total += last
        last = seconds
    return total + last


def _median_scale(learner) -> float | None:
    scale = getattr(learner.prior, "scale", None)
    return None if scale is None else float(scale.detach().median())


def run_accuracy_benchmark(config: AccuracyBenchConfig | None = None) -> dict:
    """Run (or reuse) every selected run, then summarise ALL results found under ``config.out``."""
    config = AccuracyBenchConfig() if config is None else config
    with torch_threads(config.threads if config.device == "cpu" else None):
        for benchmark in config.benchmarks:
            for algorithm in config.algorithms:
                for seed in config.seeds:
                    result = run_one(config, benchmark, algorithm, seed)
                    if config.progress:
                        print(f"{benchmark} {algorithm} seed {seed}: {_headline(result)}", flush=True)
    return summarize(collect_results(config.out), config.budget)


def _headline(result: dict) -> str:
    key = "mse" if result["metric"] == "mse" else "accuracy"
    cells = [f"{k}: {result['evaluation'][k][key]:.4g}" for k in result["evaluation"]]
    return ", ".join(cells) + f" ({result['train_seconds']:.0f} s)"


def collect_results(out: str | Path) -> list[dict]:
    """Every ``result.json`` under ``out/runs``."""
    return [json.loads(p.read_text()) for p in sorted(Path(out).glob("runs/*/*/seed*/result.json"))]


def seed_interval(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% t-interval over seeds (NaN half-width for one seed)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, _T975[min(n - 1, len(_T975) - 1)] * sd / math.sqrt(n)


#: 97.5% quantiles of Student's t with 1..10 degrees of freedom (index = dof), then the normal's
_T975 = [float("nan"), 12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 1.96]


def summarize(results: list[dict], budget: str | None = None) -> dict:
    """Group results by (benchmark, algorithm): per step the mean and 95% interval over seeds, and the seeds used."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["benchmark"], r["algorithm"]), []).append(r)
    rows = []
    for (benchmark, algorithm), runs in sorted(groups.items(), key=lambda kv: (list(BENCHMARKS).index(kv[0][0])
                                                                                if kv[0][0] in BENCHMARKS else 99,
                                                                                _algo_order(kv[0][1]))):
        metric = runs[0]["metric"]
        key = "mse" if metric == "mse" else "accuracy"
        row = {"benchmark": benchmark, "algorithm": algorithm, "metric": metric, "seeds": sorted(r["seed"] for r in runs),
               "iterations": runs[0]["config"]["iterations"], "meta_batch": runs[0]["config"]["meta_batch"],
               "train_seconds": seed_interval([r["train_seconds"] for r in runs]), "steps": {}}
        for step in runs[0]["evaluation"]:
            cell = {key: seed_interval([r["evaluation"][step][key] for r in runs])}
            if metric == "accuracy":
                for extra in ("ece", "mce", "nll", "accuracy_mean", "ece_mean", "nll_mean"):
                    if all(extra in r["evaluation"][step] for r in runs):
                        cell[extra] = seed_interval([r["evaluation"][step][extra] for r in runs])
            row["steps"][step] = cell
        losses = [largest_step_loss({s: v[key] for s, v in r["evaluation"].items()}, metric) for r in runs]
        if all(loss is not None for loss in losses):
            row["largest_step_loss"] = seed_interval([loss[1] for loss in losses])
        rows.append(row)
    return {"budget": budget, "rows": rows, "env": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                                                     "cpus": os.cpu_count()}}


def largest_step_loss(curve: dict[str, float], metric: str) -> tuple[int, float] | None:
    """``(k, loss)``: the consecutive steps ``k -> k + 1`` where the metric got worse by the most (accuracy falls, MSE
    rises; ``loss <= 0`` if it never got worse), over the steps in ``curve`` (``{"0": value, "1": ...}``) that follow
    each other; ``None`` without two such steps."""
    steps = sorted(int(s) for s in curve)
    pairs = [(k, curve[str(k)] - curve[str(k + 1)]) for k in steps if k + 1 in steps]
    if not pairs:
        return None
    if metric == "mse":
        pairs = [(k, -loss) for k, loss in pairs]
    return max(pairs, key=lambda pair: pair[1])


def _algo_order(name: str) -> int:
    return ALGORITHMS.index(name) if name in ALGORITHMS else len(ALGORITHMS)


def _cell(value: tuple[float, float], percent: bool = False, digits: int = 3) -> str:
    mean, half = value
    scale = 100.0 if percent else 1.0
    spread = "" if math.isnan(half) else f" ± {scale * half:.{digits if not percent else 2}f}"
    return f"{scale * mean:.{digits if not percent else 2}f}{spread}"


def format_accuracy_table(summary: dict) -> str:
    """Markdown: one table per benchmark, algorithms as rows, the metric after 0/1/5/10 steps as columns, then the
    largest loss between consecutive steps (where every step was evaluated)."""
    out = []
    for benchmark in dict.fromkeys(r["benchmark"] for r in summary["rows"]):
        rows = [r for r in summary["rows"] if r["benchmark"] == benchmark]
        steps = [s for s in rows[0]["steps"] if s in TABLE_STEPS] or list(rows[0]["steps"])
        classification = rows[0]["metric"] == "accuracy"
        name = "accuracy %" if classification else "MSE"
        head = "| algorithm | seeds | " + " | ".join(f"{name} after {s}" for s in steps)
        shown = [s for s in dict.fromkeys(("1", steps[-1])) if s in steps] if classification else []
        both = classification and all("ece_mean" in r["steps"][s] for r in rows for s in shown)
        head += "".join(f" | ECE after {s}" + (" (BMA / mean)" if both else " / MCE") for s in shown) + " |"
        monotone = all("largest_step_loss" in r for r in rows)
        if monotone:
            head += f" largest loss k→k+1{' (points)' if classification else ''} |"
        head += " train s |"
        out += [f"**{benchmark}** ({rows[0]['iterations']} meta-iterations x {rows[0]['meta_batch']} tasks; "
                f"mean ± 95% interval over seeds)", "", head, "|---" * (head.count("|") - 1) + "|"]
        for r in rows:
            key = "accuracy" if classification else "mse"
            cells = [_cell(r["steps"][s][key], percent=classification) for s in steps]
            for s in shown:  # after 1 step and after the last: the posterior predictive's, and the mean prediction's
                other = "ece_mean" if both else "mce"
                cells.append(f"{_cell(r['steps'][s]['ece'], digits=3)} / {_cell(r['steps'][s][other], digits=3)}")
            if monotone:
                cells.append(_cell(r["largest_step_loss"], percent=classification))
            cells.append(f"{r['train_seconds'][0]:.0f}")
            out.append(f"| {r['algorithm']} | {len(r['seeds'])} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def write_accuracy_benchmark(summary: dict, out_dir: str | Path) -> dict[str, Path]:
    """``accuracy.json``, ``accuracy.md`` and ``accuracy.png`` (metric vs adaptation steps, one panel per benchmark)."""
    from matplotlib.figure import Figure

    from hbmeta.training.runs import atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "accuracy.json", "markdown": out / "accuracy.md", "png": out / "accuracy.png"}
    atomic_write_text(paths["json"], json.dumps(summary, indent=2))
    atomic_write_text(paths["markdown"], format_accuracy_table(summary) + "\n")
    benchmarks = list(dict.fromkeys(r["benchmark"] for r in summary["rows"]))
    fig = Figure(figsize=(4.2 * max(1, len(benchmarks)), 3.6), layout="constrained")
    axes = fig.subplots(1, max(1, len(benchmarks)), squeeze=False)[0]
    for ax, benchmark in zip(axes, benchmarks):
        for r in (r for r in summary["rows"] if r["benchmark"] == benchmark):
            key = "accuracy" if r["metric"] == "accuracy" else "mse"
            steps = [int(s) for s in r["steps"]]
            means = [r["steps"][str(s)][key][0] for s in steps]
            halves = [0.0 if math.isnan(r["steps"][str(s)][key][1]) else r["steps"][str(s)][key][1] for s in steps]
            ax.errorbar(steps, means, yerr=halves, marker="o", capsize=3, label=r["algorithm"])
        metric = next(r["metric"] for r in summary["rows"] if r["benchmark"] == benchmark)
        ax.set(xlabel="adaptation steps at meta-test", ylabel="accuracy" if metric == "accuracy" else "MSE (log scale)",
               title=benchmark)
        if metric != "accuracy":
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.savefig(paths["png"], dpi=120)
    return paths
