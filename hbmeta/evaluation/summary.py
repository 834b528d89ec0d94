"""``hbmeta summary RUN...``: finished runs side by side, a table of where they ended and their learning curves.

Reads each run folder's ``config.json``, ``metrics.jsonl`` and (if there) ``evaluation.json``; nothing is recomputed.
"""

from __future__ import annotations

import json
from pathlib import Path

from hbmeta.evaluation.plots import save_figure
from hbmeta.experiments import TrainConfig

__all__ = ["load_runs", "summary_table", "plot_learning_curves", "CURVES"]

#: the logged series drawn, one panel each, if any run logged them (hbmeta.training.monitor)
CURVES = (("query_loss", "query loss after adaptation"), ("inner_elbo", "inner ELBO (support set)"),
          ("grad_norm", "meta-gradient norm"), ("prior_scale", "mean prior sd"))


def load_runs(run_dirs: list[str | Path]) -> dict[str, dict]:
    """``{name: {"config", "metrics", "evaluation"}}`` for each run folder (name: the folder's name)."""
    runs = {}
    for folder in map(Path, run_dirs):
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder} is not a run folder (no config.json)")
        lines = (folder / "metrics.jsonl").read_text().splitlines() if (folder / "metrics.jsonl").exists() else []
        evaluation = folder / "evaluation.json"
        runs[folder.name if folder.name not in runs else str(folder)] = {
            "config": TrainConfig.from_dict(json.loads((folder / "config.json").read_text())),
            "metrics": [json.loads(line) for line in lines if line],
            "evaluation": json.loads(evaluation.read_text()) if evaluation.exists() else {},
        }
    return runs


def _final_evaluation(evaluation: dict) -> str:
    if not evaluation:
        return "–"
    step = max(evaluation, key=int)
    v = evaluation[step]
    for key, fmt in (("mse", "MSE {:.4f}"), ("accuracy", "acc {:.2%}"), ("r2_mean", "R² {:.3f}"), ("return", "return {:.2f}")):
        if key in v:
            return fmt.format(v[key]) + (f" ± {v['ci95']:.2g}" if "ci95" in v else "") + f" ({step} steps)"
    return "–"


def summary_table(runs: dict[str, dict]) -> str:
    """A Markdown table: experiment, algorithm, iterations done, training time, last logged numbers, evaluation."""
    rows = ["| run | experiment | algorithm | iterations | train time (s) | query loss | prior sd | meta-test |",
            "|---|---|---|---:|---:|---:|---:|---|"]
    for name, run in runs.items():
        last = run["metrics"][-1] if run["metrics"] else {}
        c = run["config"]
        cells = [name, c.experiment, c.algorithm, f"{last.get('iteration', 0)} / {c.iterations}",
                 f"{last.get('seconds', float('nan')):.1f}",
                 f"{last['query_loss']:.4g}" if "query_loss" in last else "–",
                 f"{last['prior_scale']:.4g}" if "prior_scale" in last else "–", _final_evaluation(run["evaluation"])]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot_learning_curves(runs: dict[str, dict], path: str | Path) -> Path:
    """One panel per logged series of :data:`CURVES` (x: meta-iteration), one line per run."""
    from matplotlib.figure import Figure

    curves = [(key, label) for key, label in CURVES if any(key in m for r in runs.values() for m in r["metrics"])]
    fig = Figure(figsize=(4.2 * max(len(curves), 1), 3.4))
    axes = fig.subplots(1, max(len(curves), 1), squeeze=False)[0]
    for ax, (key, label) in zip(axes, curves):
        for name, run in runs.items():
            points = [(m["iteration"], m[key]) for m in run["metrics"] if key in m]
            if points:
                ax.plot(*zip(*points), label=name, lw=1.4)
        ax.set_xlabel("meta-iteration")
        ax.set_ylabel(label)
        ax.set_title(label)
        if key in ("grad_norm", "query_loss"):
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    return save_figure(fig, path)
