"""The sweep that chose the image defaults: GEM-BML+ variants on Omniglot, scored on VALIDATION characters.

Each variant meta-trains on the paper split's ``subtrain`` characters (the first 1100 of its 1200 training ones) and
is scored on 200 tasks of its ``val`` characters (the other 100, never trained on; the test characters are not
touched), after 0..10 adaptation steps: accuracy, ECE and NLL of the predictive the package evaluates with
(:func:`hbmeta.evaluation.calibration.predictive_probabilities`). One JSON line per variant and seed goes to
``--out`` (results of earlier sittings are kept and reused), then a table of everything in it is printed.

    python scripts/omniglot_sweep.py --variants all --iterations 300 --out runs/omniglot-sweep.jsonl --threads 1
    python scripts/omniglot_sweep.py --table-only --out runs/omniglot-sweep.jsonl

Variants (one change at a time from the chosen default, ``head-vi``):

- ``head-vi``: the conv body hidden (shared, meta-learned by GEM's Fisher identity), the head Bayesian with prior
  sd 1.0, Gauss-Newton VI with the curvature averaged over the posterior (``curvature="expected"``), 2 steps;
- ``head-laplace``: the same with the curvature at the mean (the Laplace step);
- ``head-vi-prior0.3`` / ``head-vi-prior3``: a tighter / wider initial head prior;
- ``head-vi-3steps``: 3 inner steps;
- ``full-gn``: every conv4 weight Bayesian (prior sd 0.05), Gauss-Newton VI by matrix-free CG;
- ``full-svi``: the previous default (every weight Bayesian, prior sd 0.02, one whitened-Adam step of 0.5);
- ``maml``: MAML at its defaults (one SGD step of 0.4), the reference.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from hbmeta.evaluation.calibration import calibration_errors, predictive_probabilities
from hbmeta.evaluation.stats import mean_ci95
from hbmeta.inference import InnerConfig, MetaLearner
from hbmeta.models import CategoricalLikelihood
from hbmeta.models.conv import Conv4
from hbmeta.tasks.fewshot import omniglot_tasks

BODY = "features"
HEAD_GN = dict(method="gauss-newton", steps=2)
VARIANTS = {
    "head-vi": dict(hide=(BODY,), prior_scale=1.0, inner=dict(HEAD_GN, curvature="expected")),
    "head-laplace": dict(hide=(BODY,), prior_scale=1.0, inner=dict(HEAD_GN, curvature="mean")),
    "head-vi-prior0.3": dict(hide=(BODY,), prior_scale=0.3, inner=dict(HEAD_GN, curvature="expected")),
    "head-vi-prior3": dict(hide=(BODY,), prior_scale=3.0, inner=dict(HEAD_GN, curvature="expected")),
    "head-vi-3steps": dict(hide=(BODY,), prior_scale=1.0, inner=dict(HEAD_GN, steps=3, curvature="expected")),
    "full-gn": dict(hide=(), prior_scale=0.05, inner=dict(method="gauss-newton", steps=2, solver="cg")),
    "full-svi": dict(hide=(), prior_scale=0.02, max_prior_scale=0.1,
                     inner=dict(method="svi", steps=1, lr=0.5, scale_lr=0.01, optimizer="adam", num_samples=2)),
    "maml": dict(algorithm="maml", inner=dict(method="svi", steps=1, lr=0.4, optimizer="sgd")),
}
STEPS = tuple(range(11))


def build(name: str, ways: int) -> MetaLearner:
    spec = VARIANTS[name]
    inner = InnerConfig(**spec["inner"])
    algorithm = spec.get("algorithm", "gem-bml+")
    if algorithm == "maml":
        return MetaLearner(Conv4.omniglot(ways), CategoricalLikelihood(), algorithm="maml", inner=inner)
    return MetaLearner(Conv4.omniglot(ways), CategoricalLikelihood(), algorithm=algorithm, inner=inner,
                       hide=spec["hide"], prior_scale=spec["prior_scale"],
                       max_prior_scale=spec.get("max_prior_scale"))


def run(name: str, seed: int, iterations: int, shots: int, val_tasks: int) -> dict:
    torch.manual_seed(seed)
    learner = build(name, 5)
    gen = torch.Generator().manual_seed(seed)
    train = omniglot_tasks(5, shots, 5, part="subtrain")
    val = omniglot_tasks(5, shots, 15, part="val")
    began = time.perf_counter()
    for _ in range(iterations):
        learner.meta_step(train.sample(8, gen), gen)
    seconds = time.perf_counter() - began
    batch = val.sample(val_tasks, torch.Generator().manual_seed(999))
    probs: dict[int, list] = {}
    for start in range(0, val_tasks, 50):  # 50 tasks at a time: the predictive's Jacobians stay small
        part = batch.select(slice(start, start + 50))

        def record(step: int, posterior, part=part) -> None:
            probs.setdefault(step, []).append(
                predictive_probabilities(learner, posterior, part.x_val, 16, torch.Generator().manual_seed(1)))

        learner.adapt(part.x_train, part.y_train, steps=max(STEPS), generator=torch.Generator().manual_seed(2),
                      callback=record)
    result, labels = {}, batch.y_val
    for step, parts in sorted(probs.items()):
        p = torch.cat(parts)
        accuracy, ci95 = mean_ci95((p.argmax(-1) == labels).float().mean(1))
        nll = -p.clamp_min(1e-12).log().gather(-1, labels.unsqueeze(-1)).mean()
        result[str(step)] = {"accuracy": accuracy, "ci95": ci95, "ece": float(calibration_errors(p, labels)["ece"]),
                             "nll": float(nll)}
    scale = getattr(learner.prior, "scale", None)
    return {"variant": name, "seed": seed, "iterations": iterations, "shots": shots, "val_tasks": val_tasks,
            "train_seconds": seconds, "prior_scale_median": None if scale is None else float(scale.median()),
            "evaluation": result}


def table(rows: list[dict]) -> str:
    lines = ["| variant | seed | its | val acc % after 0 / 1 / 2 / 5 / 10 | ECE after 1 / 10 | NLL after 1 / 10 | "
             "largest loss k→k+1 | prior sd | train s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        e = r["evaluation"]
        acc = " / ".join(f"{100 * e[k]['accuracy']:.1f}" for k in ("0", "1", "2", "5", "10"))
        drop = max(100 * (e[str(k)]["accuracy"] - e[str(k + 1)]["accuracy"]) for k in range(10))
        scale = "-" if r["prior_scale_median"] is None else f"{r['prior_scale_median']:.3g}"
        lines.append(f"| {r['variant']} | {r['seed']} | {r['iterations']} | {acc} (± {100 * e['10']['ci95']:.1f}) | "
                     f"{e['1']['ece']:.3f} / {e['10']['ece']:.3f} | {e['1']['nll']:.3f} / {e['10']['nll']:.3f} | "
                     f"{drop:.1f} | {scale} | {r['train_seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", default="all", help=f"comma-separated, or all: {', '.join(VARIANTS)}")
    p.add_argument("--seeds", default="0")
    p.add_argument("--iterations", type=int, default=300)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--val-tasks", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/omniglot-sweep.jsonl")
    p.add_argument("--table-only", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    if not args.table_only:
        names = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
        for name in names:
            for seed in map(int, args.seeds.split(",")):
                key = (name, seed, args.iterations, args.shots, args.val_tasks)
                if any((r["variant"], r["seed"], r["iterations"], r["shots"], r["val_tasks"]) == key for r in done):
                    continue
                row = run(name, seed, args.iterations, args.shots, args.val_tasks)
                with out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                done.append(row)
                print(table([row]).splitlines()[-1], flush=True)
    print(table(done))
    return 0


if __name__ == "__main__":
    sys.exit(main())
