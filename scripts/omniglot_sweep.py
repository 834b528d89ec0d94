"""The sweep that chose the image defaults: GEM-BML+ variants on Omniglot, scored on VALIDATION characters.

Each variant meta-trains on the paper split's ``subtrain`` characters (the first 1100 of its 1200 training ones) and
is scored on 200 tasks of its ``val`` characters (the other 100, never trained on; the test characters are not
touched), after 0..10 adaptation steps: accuracy, ECE and NLL of the predictive the package evaluates with
(:func:`hbmeta.evaluation.calibration.predictive_probabilities`). One JSON line per variant and seed goes to
``--out`` (results of earlier sittings are kept and reused), then a table of everything in it is printed.

    python scripts/omniglot_sweep.py --variants all --iterations 300 --out runs/omniglot-sweep.jsonl --threads 1
    python scripts/omniglot_sweep.py --table-only --out runs/omniglot-sweep.jsonl

Variants (one change at a time from ``head-vi``):

- ``head-vi``: the conv body hidden (shared, meta-learned by GEM's Fisher identity), the head Bayesian with prior
  sd 1.0 (learned), Gauss-Newton VI with the curvature averaged over the posterior (``curvature="expected"``), 2 steps;
- ``head-laplace`` (``-prior3``): the curvature at the mean (the Laplace step) (and a wider initial prior);
- ``head-vi-implicit`` (``head-laplace-implicit``): the body by the implicit gradient of the query log-likelihood
  at q1's mean instead of Fisher's identity (:func:`hbmeta.inference.implicit.implicit_shared_gradient`);
- ``head-vi-gem-bml``: GEM-BML's meta-loss L[1] instead of GEM-BML+'s L[2];
- ``head-vi-fixed-prior``: the head's prior sd kept at its initial value (the body and the prior mean learned);
- ``head-vi-prior3``, ``head-vi-3steps``: a wider initial prior; 3 inner steps;
- ``head-ibaml``: iBaML's implicit gradient with the same inner update;
- ``full-gn``: every conv4 weight Bayesian (prior sd 0.05), Gauss-Newton VI by matrix-free CG;
- ``full-svi``: the previous default (every weight Bayesian, prior sd 0.02, one whitened-Adam step of 0.5);
- ``maml``: MAML at its defaults (one SGD step of 0.4), the reference.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from hbmeta.evaluation.calibration import calibration_errors, predictive_probabilities
from hbmeta.evaluation.stats import mean_ci95
from hbmeta.inference import InnerConfig, MetaLearner
from hbmeta.models import BatchedNet, CategoricalLikelihood, DiagonalGaussianPrior
from hbmeta.models.conv import Conv4
from hbmeta.tasks.fewshot import omniglot_tasks

BODY = "features"
HEAD = dict(hide=(BODY,), prior_scale=1.0, inner=dict(method="gauss-newton", steps=2, curvature="expected"))


def _head(**changes) -> dict:
    inner = {**HEAD["inner"], **changes.pop("inner", {})}
    return {**HEAD, **changes, "inner": inner}


VARIANTS = {
    "head-vi": _head(),
    "head-laplace": _head(inner=dict(curvature="mean")),
    "head-laplace-prior3": _head(prior_scale=3.0, inner=dict(curvature="mean")),
    "head-vi-implicit": _head(hidden_gradient="implicit"),
    "head-vi-implicit-predictive": _head(hidden_gradient="implicit-predictive"),
    "head-vi-implicit-1step": _head(hidden_gradient="implicit", inner=dict(steps=1)),
    "head-vi-implicit-prior3": _head(hidden_gradient="implicit", prior_scale=3.0),
    "head-vi-implicit-prior10": _head(hidden_gradient="implicit", prior_scale=10.0),
    "head-vi-gem-bml": _head(algorithm="gem-bml"),
    "head-vi-fixed-prior": _head(learn_scale=False),
    "head-vi-prior3": _head(prior_scale=3.0),
    "head-vi-3steps": _head(inner=dict(steps=3)),
    "head-ibaml": _head(algorithm="ibaml"),
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
    net = BatchedNet(Conv4.omniglot(ways), hide=spec["hide"])
    prior = DiagonalGaussianPrior(net.initial_vector(), math.log(spec["prior_scale"]),
                                  learn_scale=spec.get("learn_scale", True), max_scale=spec.get("max_prior_scale"))
    return MetaLearner(net, CategoricalLikelihood(), algorithm=algorithm, inner=inner, prior=prior,
                       hidden_gradient=spec.get("hidden_gradient", "fisher"))


def run(name: str, seed: int, iterations: int, shots: int, val_tasks: int, save: str | None = None) -> dict:
    torch.manual_seed(seed)
    learner = build(name, 5)
    gen = torch.Generator().manual_seed(seed)
    train = omniglot_tasks(5, shots, 5, part="subtrain")
    val = omniglot_tasks(5, shots, 15, part="val")
    began = time.perf_counter()
    for _ in range(iterations):
        learner.meta_step(train.sample(8, gen), gen)
    seconds = time.perf_counter() - began
    if save:
        Path(save).mkdir(parents=True, exist_ok=True)
        torch.save(learner.state_dict(), Path(save) / f"{name}-seed{seed}-{iterations}.pt")
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
            "train_seconds": seconds, "prior_scale_median": None if scale is None else float(scale.detach().median()),
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
    p.add_argument("--save", default=None, help="also save each trained learner's state_dict into this folder")
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
                row = run(name, seed, args.iterations, args.shots, args.val_tasks, args.save)
                with out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                done.append(row)
                print(table([row]).splitlines()[-1], flush=True)
    print(table(done))
    return 0


if __name__ == "__main__":
    sys.exit(main())
