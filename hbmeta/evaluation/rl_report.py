"""Side-by-side report of RL runs: return vs adaptation steps as a Markdown table and a PNG (GEM-BML Fig. 3).

    python -m hbmeta.evaluation.rl_report runs/rl/nav2d-gem-bml+ runs/rl/nav2d-maml --out docs/img/rl_nav2d_returns.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

__all__ = ["load_evaluations", "main", "plot_returns", "plot_training", "returns_table"]


def load_evaluations(run_dirs: list[str | Path]) -> dict[str, dict]:
    """``{label: {"config": ..., "evaluation": {step: {...}}, "iterations": n}}`` from run folders' JSON files."""
    out = {}
    for run in map(Path, run_dirs):
        config = json.loads((run / "config.json").read_text())
        evaluation = {int(k): v for k, v in json.loads((run / "evaluation.json").read_text()).items()}
        lines = (run / "metrics.jsonl").read_text().splitlines()
        last = json.loads(lines[-1]) if lines else {"iteration": 0, "seconds": 0.0}
        out[config["algorithm"]] = {"config": config, "evaluation": evaluation, "iterations": last["iteration"],
                                    "seconds": last["seconds"], "metrics": [json.loads(ln) for ln in lines]}
    return out


def returns_table(runs: dict[str, dict]) -> str:
    steps = sorted({k for r in runs.values() for k in r["evaluation"]})
    head = "| algorithm | meta-iterations | train time (s) | " + " | ".join(f"{k} steps" for k in steps) + " |"
    rows = [head, "|---|---:|---:|" + "---:|" * len(steps)]
    for name, r in runs.items():
        cells = [f"{r['evaluation'][k]['return']:.2f} ± {r['evaluation'][k]['ci95']:.2f}" for k in steps]
        rows.append(f"| {name} | {r['iterations']} | {r['seconds']:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot_returns(runs: dict[str, dict], path: str | Path, title: str = "") -> Path:
    from hbmeta.evaluation.plots import save_figure  # first: it selects the Agg backend before pyplot loads

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, r in runs.items():
        steps = sorted(r["evaluation"])
        ax.errorbar(steps, [r["evaluation"][k]["return"] for k in steps], [r["evaluation"][k]["ci95"] for k in steps],
                    marker="o", capsize=3, label=name)
    ax.set_xlabel("adaptation steps")
    ax.set_ylabel("average return")
    ax.set_xticks(sorted({k for r in runs.values() for k in r["evaluation"]}))
    ax.set_title(title)
    ax.legend()
    return save_figure(fig, path)


def plot_training(runs: dict[str, dict], path: str | Path, title: str = "") -> Path:
    """Meta-training curves: mean return of the train rollouts before and after the inner update, per iteration."""
    from hbmeta.evaluation.plots import save_figure  # first: it selects the Agg backend before pyplot loads

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for i, (name, r) in enumerate(runs.items()):
        its = [m["iteration"] for m in r["metrics"]]
        ax.plot(its, [m["return_after"] for m in r["metrics"]], color=f"C{i}", label=f"{name} (after 1 step)")
        ax.plot(its, [m["return_before"] for m in r["metrics"]], color=f"C{i}", ls=":", alpha=0.7)
    ax.set_xlabel("meta-iteration")
    ax.set_ylabel("return of training rollouts")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--out", required=True, help="PNG path")
    parser.add_argument("--title", default="")
    parser.add_argument("--training-out", default=None, help="PNG path for the meta-training curves")
    args = parser.parse_args(argv)
    runs = load_evaluations(args.runs)
    print(returns_table(runs))
    print(f"wrote {plot_returns(runs, args.out, args.title)}")
    if args.training_out:
        print(f"wrote {plot_training(runs, args.training_out, args.title)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
