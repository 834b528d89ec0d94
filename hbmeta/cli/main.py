"""The ``hbmeta`` command line: a thin layer over the Python API.

    hbmeta demo                                  # GEM-BML+ vs MAML on sinusoid, ~3 min on 2 CPU cores
    hbmeta train sinusoid --algo gem-bml+ --iterations 2000 --out runs/gem
    hbmeta train sinusoid --algo gem-bml+ --iterations 4000 --out runs/gem --resume
    hbmeta evaluate runs/gem --steps 10
    hbmeta train nav2d --algo gem-bml+ --iterations 300 --out runs/nav2d   # meta-RL (--shots = rollouts per task)
    hbmeta evaluate runs/nav2d --steps 3                                      # return after 0..3 steps
    hbmeta gradient-study --out runs/gradient-study
    hbmeta bench step --out runs/bench
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["main", "build_parser", "train_settings", "diagnosis_summary"]


def _add_train(sub) -> None:
    from hbmeta.experiments import EXPERIMENTS, TrainConfig
    from hbmeta.experiments.config import SCHEDULERS
    from hbmeta.inference import ALGORITHMS
    from hbmeta.models import PRIORS

    d = TrainConfig()
    p = sub.add_parser("train", help="meta-train an algorithm on an experiment", formatter_class=_Help,
                       description="Meta-train an algorithm on an experiment into a run folder (--out). Flags left "
                                   "unset take the experiment's and the algorithm's defaults (the papers' tables).")
    p.add_argument("experiment", nargs="?", default=None,
                   help=f"one of: {', '.join(EXPERIMENTS)} (or the one in --config)")
    p.add_argument("--config", default=None, help="a run's config.json (or any JSON with its keys, nested or flat) to "
                   "repeat: its settings are the defaults, flags given here override them")
    p.add_argument("--algo", "--algorithm", dest="algorithm", default=d.algorithm, help=f"one of: {', '.join(ALGORITHMS)}")
    p.add_argument("--iterations", type=int, default=d.iterations, help="meta-iterations (the budget)")
    p.add_argument("--meta-batch", type=int, default=None, help="tasks per meta-iteration (default: the experiment's)")
    p.add_argument("--shots", "--k-shot", dest="k_shot", type=int, default=None,
                   help="support points (regression) or images per class (classification)")
    p.add_argument("--k-query", "--queries", dest="k_query", type=int, default=None,
                   help="query points (regression) or query images per class")
    p.add_argument("--ways", type=int, default=d.ways, help="classes per task (classification)")
    p.add_argument("--data-root", default=None, help="folder with omniglot/ and miniimagenet-splits/ "
                   "(default: $HBMETA_DATA or ../shared/data)")
    p.add_argument("--split", default=d.split, choices=["paper", "vinyals"],
                   help="Omniglot character split: the paper's 1200/423 or Vinyals et al.'s")
    p.add_argument("--inner-steps", type=int, default=None, help="inner-update steps per task at meta-train (default: the algorithm's / experiment's)")
    p.add_argument("--inner-lr", type=float, default=None, help="inner learning rate (SVI and the point-estimate baselines; Gauss-Newton VI has none)")
    p.add_argument("--inner-optimizer", default=None, help="adam, sgd or any torch.optim name")
    p.add_argument("--inner-scale-lr", type=float, default=None, help="inner learning rate of the guide's scales")
    p.add_argument("--num-samples", type=int, default=None, help="Monte-Carlo samples per inner step")
    p.add_argument("--clip-norm", type=float, default=None, help="per-task gradient clipping in the inner loop")
    p.add_argument("--test-steps", type=int, default=None, help="adaptation steps at meta-test (default: the experiment's)")
    p.add_argument("--meta-lr", type=float, default=d.meta_lr, help="learning rate of the meta-optimizer (Adam) on the prior")
    p.add_argument("--prior-scale", type=float, default=None,
                   help="initial prior sd (BMAML: particle spread); default 0.2 with Gauss-Newton VI, 0.02 with SVI, BMAML 0.1")
    p.add_argument("--imaml-lambda", type=float, default=None, help="iMAML's proximal regularisation")
    p.add_argument("--cg-steps", type=int, default=None, help="iMAML's conjugate-gradient steps")
    p.add_argument("--max-prior-scale", type=float, default=None,
                   help="ceiling on the learned prior sd (guards SVI's GEM scale update against inner-loop noise); "
                        "0 = none; default none with Gauss-Newton VI, 0.1 with SVI")
    p.add_argument("--noise-scale", type=float, default=None,
                   help="Gaussian likelihood's noise sd; default 0.25 with Gauss-Newton VI, 0.5 with SVI")
    p.add_argument("--learn-likelihood", action="store_true",
                   help="meta-learn the Gaussian noise sd (regression) or the softmax temperature (classification) "
                        "by GEM's Fisher identity (gem-bml, gem-bml+)")
    p.add_argument("--inner-variance", default="meanfield", choices=["meanfield", "marginal"],
                   help="Gauss-Newton VI's guide variances: the KL-optimal mean-field ones or the exact marginals")
    p.add_argument("--inner-curvature", default=None, choices=["expected", "mean"],
                   help="Gauss-Newton VI's likelihood curvature: averaged over the posterior (expected: Gaussian VI, "
                        "the default) or at its mean (mean: the Laplace step); the same for a Gaussian likelihood")
    p.add_argument("--inner-method", default=None, choices=["gauss-newton", "svi"],
                   help="Bayesian inner update; default gauss-newton for gem-bml(+) with the diagonal prior")
    p.add_argument("--guide", default=d.model.guide, help="meanfield, delta, fullcov or lowrank")
    p.add_argument("--hide", default=None,
                   help="parameters kept out of the prior and meta-learned as shared point estimates (gem-bml, "
                        "gem-bml+, ibaml): comma-separated submodule or parameter names, or 'none'; default: the "
                        "experiment's ('features', conv4's body, on the image benchmarks for those algorithms)")
    p.add_argument("--prior", default=d.model.prior, choices=list(PRIORS),
                   help="prior over the weights (docs/priors-and-guides.md)")
    p.add_argument("--prior-components", type=int, default=d.model.prior_components,
                   help="mixture components K, or the rank of the low-rank prior")
    p.add_argument("--gem-plus-mode", default=None, choices=["sequential", "joint", "restart"],
                   help="how GEM-BML+ fits q2 (restart: from the prior on support + query; sequential: the paper's VI(q1, "
                        "query); joint: from q1 on both); default restart with Gauss-Newton VI, sequential with SVI")
    p.add_argument("--hidden-gradient", default=None, choices=["fisher", "implicit", "implicit-predictive"],
                   help="how GEM-BML+ meta-learns hidden (--hide) weights: Fisher's identity on q2 and q1, or the "
                        "query likelihood's gradient through the support VI's optimality condition (at the posterior "
                        "mean, or of the predictive); default: the experiment's")
    p.add_argument("--seed", type=int, default=d.seed, help="seeds the network's initialisation and every meta-iteration's random streams")
    p.add_argument("--device", default=d.device, help="auto, cpu or cuda")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="iterations between checkpoints (atomic; --resume continues from the last)")
    p.add_argument("--log-every", type=int, default=d.log_every, help="iterations between lines of metrics.jsonl")
    p.add_argument("--threads", type=int, default=d.threads, help="CPU threads (1 is fastest for small nets)")
    p.add_argument("--horizon", type=int, default=None, help="RL: steps per episode (nav2d 100, cheetah 200)")
    p.add_argument("--rl-inner", default=None, choices=["pg", "trpo"], help="RL: inner update of GEM-BML(+)")
    p.add_argument("--max-kl", type=float, default=None, help="RL: TRPO's KL bound (inner TRPO, MAML's meta-update)")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="start afresh in an --out that holds another run's "
                   "files (config.json, metrics.jsonl, checkpoint.pt, ...), removing them first")
    p.add_argument("--distributed", action="store_true", help="under torchrun: split each meta-batch's tasks over "
                   "the ranks, all-reduce the meta-gradient (docs/distributed.md)")
    p.add_argument("--private", action="store_true", help="distributed GEM-BML(+): ranks send only posterior "
                   "parameters to rank 0, which steps and broadcasts the prior (docs/distributed.md)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast of the inner loop's network forward passes "
                   "(GEM, FOMAML, Reptile, iMAML; not algorithms that backpropagate through the inner loop)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--tensorboard", action="store_true", help="also write the logged metrics as TensorBoard scalars "
                   "into OUT/tensorboard (the tensorboard extra)")
    p.add_argument("--eval-tasks", type=int, default=None,
                   help="new tasks for the evaluation after training (default: 100 regression, 600 classification)")
    p.add_argument("--scheduler", default=d.scheduler.name, choices=list(SCHEDULERS),
                   help="task scheduler: uniform (default), greedy (hardest first) or ats (learned; docs/ats.md)")
    p.add_argument("--pool-size", type=int, default=None, help="candidate tasks per iteration (default 2 x meta-batch)")
    p.add_argument("--temperature", type=float, default=None, help="scheduler softmax temperature (default 0.1 "
                   "with --label-noise, else 1)")
    p.add_argument("--scheduler-lr", type=float, default=d.scheduler.lr, help="ATS scheduler learning rate")
    p.add_argument("--scheduler-warmup", type=int, default=d.scheduler.warmup,
                   help="first iterations train only the ATS scheduler (meta-updates undone)")
    p.add_argument("--label-noise", type=float, default=d.label_noise,
                   help="mean symmetric label-flip ratio of meta-training support sets (per-task ratios around it)")
    p.add_argument("--class-budget", type=int, default=None, help="meta-train on this many training classes only")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Every ``--help`` shows the defaults; a help line that already says what its default is keeps its own words."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        return text if "default" in text else super()._get_help_string(action)


def _add_run_options(p, tasks: int | None, tasks_help: str, out_help: str) -> None:
    """The options every command that reads run folders shares: tasks, seed, device, threads, --out."""
    p.add_argument("--tasks", type=int, default=tasks, help=tasks_help)
    p.add_argument("--seed", type=int, default=12345, help="seed of the held-out test tasks (the same for every run)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (1 is fastest for small nets)")
    p.add_argument("--out", default=None, help=out_help)


def build_parser() -> argparse.ArgumentParser:
    from hbmeta import __version__

    parser = argparse.ArgumentParser(prog="hbmeta", description="Bayesian meta-learning with Gradient-EM (GEM-BML).",
                                     formatter_class=_Help)
    parser.add_argument("--version", action="version", version=f"hbmeta {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)

    p = sub.add_parser("evaluate", help="meta-test a checkpoint on new tasks: error vs adaptation steps",
                       formatter_class=_Help)
    p.add_argument("run", help="run folder (or checkpoint file)")
    p.add_argument("--steps", type=int, default=10, help="report steps 0..N")
    _add_run_options(p, None, "test tasks (default: 100 regression, 600 classification, all drug assays)",
                     "folder for evaluation.json (default: the run folder)")

    p = sub.add_parser("diagnose", help="posterior and calibration diagnostics of a run with ArviZ (plots + summary)",
                       formatter_class=_Help)
    p.add_argument("run", help="run folder")
    p.add_argument("--steps", type=int, default=None, help="adaptation steps (default: the run's test_steps)")
    _add_run_options(p, 100, "test tasks", "folder for diagnostics.json, idata.nc and the plots "
                     "(default: RUN/diagnostics)")

    p = sub.add_parser("calibrate", help="ECE / MCE and reliability diagrams of classification runs, side by side",
                       formatter_class=_Help)
    p.add_argument("runs", nargs="+", help="run folders (same experiment, ways, shots)")
    p.add_argument("--steps", type=int, default=None,
                   help="adaptation steps for every run (default: each run's test_steps)")
    _add_run_options(p, 600, "test tasks (the same for every run)",
                     "folder for calibration.json and reliability.png (default: calibration/ beside the first run)")

    p = sub.add_parser("compare", help="az.compare (LOO / WAIC) of runs on the same held-out tasks",
                       formatter_class=_Help)
    p.add_argument("runs", nargs="+", help="run folders of one experiment")
    p.add_argument("--ic", default="loo", choices=["loo", "waic"], help="information criterion")
    p.add_argument("--samples", type=int, default=100, help="posterior draws per run (a multiple of 4)")
    _add_run_options(p, 20, "test tasks (the same for every run)",
                     "folder for compare.csv and compare.png (default: compare/ beside the first run)")

    p = sub.add_parser("summary", help="finished runs side by side: a table of where they ended and learning curves",
                       formatter_class=_Help)
    p.add_argument("runs", nargs="+", help="run folders")
    p.add_argument("--out", default="runs/summary", help="folder for summary.md and learning_curves.png")

    p = sub.add_parser("demo", help="GEM-BML+ vs MAML on sinusoid with the same budget (~4 min on a 2-core CPU)",
                       formatter_class=_Help)
    p.add_argument("--out", default="runs/demo", help="folder for both runs, demo.json and the predictive plot")
    p.add_argument("--iterations", type=int, default=4000, help="meta-iterations per algorithm")
    p.add_argument("--meta-batch", type=int, default=25, help="tasks per meta-iteration")
    p.add_argument("--seed", type=int, default=0, help="seed of both runs")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("gradient-study", help="meta-gradient error of GEM vs ELBO gradient (appendix C.1)",
                       formatter_class=_Help)
    p.add_argument("--out", default="runs/gradient-study", help="folder for the table, JSON and plot")
    p.add_argument("--repeats", type=int, default=None, help="random problems per setting (default: the study's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random linear-regression problems")

    p = sub.add_parser("bench", help="benchmarks", formatter_class=_Help)
    p.add_argument("which", choices=["step", "scaling", "throughput", "accuracy"],
                   help="step: sinusoid net, time and memory per meta-iteration vs inner steps; "
                        "scaling: the same with conv4 on miniImageNet-shaped 5-way 1-shot tasks (paper Fig. 2b); "
                        "throughput: tasks adapted per second vs meta-batch size, sinusoid and conv4; "
                        "accuracy: every algorithm on the same tasks, seeds and budget (sinusoid, Omniglot)")
    p.add_argument("--budget", default="small", help="accuracy: small (a 2-core CPU), paper (a GPU) or smoke")
    p.add_argument("--algos", default=None, help="accuracy and scaling: comma-separated algorithms (accuracy's default "
                                                  "gem-bml+,gem-bml,ibaml,maml,fomaml,reptile; scaling's: all eight)")
    p.add_argument("--seeds", default="0,1,2", help="accuracy: comma-separated seeds")
    p.add_argument("--table-only", action="store_true", help="accuracy: only assemble the table from finished runs")
    p.add_argument("--data-root", default=None, help="accuracy: folder with omniglot/ (default $HBMETA_DATA or ../shared/data)")
    p.add_argument("--meta-batches", default=None, help="throughput: comma-separated meta-batch sizes (4,8,...,128)")
    p.add_argument("--benchmarks", default=None, help="throughput: comma-separated, from sinusoid,conv4; accuracy: "
                                                       "from sinusoid,sinusoid-challenging,omniglot-5w1s,omniglot-5w5s")
    p.add_argument("--amp", action="store_true", help="throughput: bf16 autocast of the network forward passes")
    p.add_argument("--queries", type=int, default=None, help="scaling: query images per class")
    p.add_argument("--inner-steps", default=None, help="comma-separated inner-step counts, e.g. 1,2,5,10,20")
    p.add_argument("--warmup", type=int, default=None, help="untimed repetitions first")
    p.add_argument("--out", default="runs/bench", help="folder for the table and JSON (accuracy: runs/accuracy)")
    p.add_argument("--repeats", type=int, default=None, help="timed repetitions (default: the benchmark's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=None,
                   help="step and scaling: CPU threads (default: the benchmark's; 1 for step, torch's for scaling)")
    _check_numeric_options(parser)
    return parser


def _print_evaluation(evaluation: dict) -> None:
    for k, v in evaluation.items():
        if "r2_mean" in v:
            print(f"  R^2 after {k:>2} steps: mean {v['r2_mean']:.4f} ± {v['ci95']:.4f}, median {v['r2_median']:.4f} "
                  f"({v['num_tasks']} assays)")
        elif "accuracy" in v:
            line = (f"  accuracy after {k:>2} steps: {100 * v['accuracy']:.2f} ± {100 * v['ci95']:.2f} %   "
                    f"ECE {v['ece']:.4f}  MCE {v['mce']:.4f} ({v['num_bins']} bins)")
            if "ece_mean" in v and (v["ece_mean"], v["accuracy_mean"]) != (v["ece"], v["accuracy"]):
                line += f"; posterior mean's prediction {100 * v['accuracy_mean']:.2f} %, ECE {v['ece_mean']:.4f}"
            print(line)
        else:
            print(f"  meta-test MSE after {k:>2} steps: {v['mse']:.4f} ± {v['ci95']:.4f}")


#: options of ``hbmeta train`` that are not run settings
_NOT_SETTINGS = ("command", "out", "resume", "overwrite", "no_progress", "eval_tasks", "config", "tensorboard", "debug")


def train_settings(args) -> dict:
    """The run settings of ``hbmeta train``, by flat name: ``--config``'s, overridden by the flags given here.

    A flag counts as given when its value differs from its default (argparse does not say more), so repeating a
    run with ``--config RUN/config.json --seed 1`` changes the seed and nothing else.
    """
    from hbmeta.experiments import TrainConfig

    fields = {k: v for k, v in vars(args).items() if k not in _NOT_SETTINGS}
    if args.config is None:
        if fields["experiment"] is None:
            raise ValueError("hbmeta train needs an experiment (or --config RUN/config.json)")
        return fields
    path = Path(args.config)
    try:
        saved = TrainConfig.from_dict(json.loads(path.read_text())).to_flat()
    except FileNotFoundError:
        raise FileNotFoundError(f"--config {path}: no such file") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"--config {path} is not JSON: {err}") from None
    defaults = vars(build_parser().parse_args(["train", "--out", "unused"]))  # every flag at its default
    given = {k: v for k, v in fields.items() if v != defaults[k]}
    if given.get("experiment") not in (None, saved["experiment"]):
        raise ValueError(f"experiment {given['experiment']!r} differs from --config's {saved['experiment']!r}; "
                         f"give one of them")
    return {**saved, **given}


def _cmd_train(args) -> int:
    import torch

    from hbmeta.evaluation.meta_test import evaluate_experiment
    from hbmeta.experiments import get_experiment, make_config
    from hbmeta.training import train

    config = make_config(**train_settings(args))  # every default filled in, for the report below
    if get_experiment(config.experiment).metric == "return":  # meta-RL (hbmeta.tasks.rl)
        from hbmeta.cli.rl import train_command

        return train_command(config, args.out, args.resume, not args.no_progress, args.eval_tasks, args.overwrite)
    result = train(config, args.out, resume=args.resume, progress=not args.no_progress, tensorboard=args.tensorboard,
                   overwrite=args.overwrite)
    if result.rank != 0:  # a distributed run: rank 0 evaluates and writes the files
        return 0
    steps = tuple(sorted({0, 1, 5, 10, config.inner.test_steps}))
    evaluation = evaluate_experiment(result.learner, config, steps, num_tasks=args.eval_tasks)
    _write_json(Path(args.out), "evaluation.json", evaluation)
    print(f"trained {config.algorithm} on {config.experiment} for {config.iterations} iterations in {result.seconds:.1f}s")
    _print_evaluation(evaluation)
    written = [f"{args.out}/evaluation.json"]
    if config.experiment.startswith("sinusoid"):
        from hbmeta.evaluation.plots import plot_sinusoid_predictive

        test = get_experiment(config.experiment).make_tasks(config).sample(1, torch.Generator().manual_seed(7))
        written.append(str(plot_sinusoid_predictive({config.algorithm: result.learner}, test,
                                                    Path(args.out) / "plots" / "predictive.png", steps=config.inner.test_steps)))
    print("wrote " + " and ".join(written))
    return 0


def _run_folder(run: str) -> Path:
    """The run folder of a run folder or of a checkpoint file in it."""
    path = Path(run)
    return path if path.is_dir() else path.parent


def _write_json(folder: Path, name: str, data) -> Path:
    from hbmeta.training.runs import atomic_write_text

    folder.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(folder / name, json.dumps(data, indent=2, default=str))


def _cmd_evaluate(args) -> int:
    from hbmeta.cli.rl import evaluate_command, is_rl_run
    from hbmeta.evaluation.meta_test import evaluate_experiment
    from hbmeta.training.runs import load_learner, write_evaluation

    out = Path(args.out) if args.out is not None else _run_folder(args.run)
    if is_rl_run(args.run):  # meta-RL: average return after 0..steps adaptation steps
        return evaluate_command(args.run, args.steps, args.tasks, args.seed, out)
    learner, config, iteration = load_learner(args.run, args.device)
    evaluation = evaluate_experiment(learner, config, tuple(range(args.steps + 1)), num_tasks=args.tasks, seed=args.seed)
    num_tasks = next(iter(evaluation.values())).get("num_tasks", args.tasks or 100)
    print(f"{config.algorithm} on {config.experiment}, checkpoint at iteration {iteration}, {num_tasks} new tasks")
    _print_evaluation(evaluation)
    print(f"wrote {write_evaluation(out, evaluation, tasks=num_tasks, steps=args.steps, seed=args.seed, checkpoint_iteration=iteration)}")
    return 0


def _cmd_calibrate(args) -> int:
    from hbmeta.evaluation.meta_test import compare_calibration

    out = Path(args.out) if args.out is not None else _run_folder(args.runs[0]).parent / "calibration"
    report = compare_calibration(args.runs, out, num_tasks=args.tasks, seed=args.seed, device=args.device,
                                 steps=args.steps)
    print("| run | steps | accuracy (%) | ECE | MCE |\n|---|---:|---:|---:|---:|")
    for name, r in report["runs"].items():
        print(f"| {name} | {r['steps']} | {100 * r['accuracy']:.2f} ± {100 * r['ci95']:.2f} | {r['ece']:.4f} | {r['mce']:.4f} |")
    print(f"({next(iter(report['runs'].values()))['num_bins']} equal-width confidence bins)")
    for path in report["files"]:
        print(f"wrote {path}")
    return 0


def diagnosis_summary(report: dict) -> str:
    """A few lines a person reads after ``hbmeta diagnose`` (``diagnostics.json`` holds everything)."""
    m = report["metrics"]
    lines = [f"{report.get('algorithm', '?')} on {report.get('experiment', '?')} (iteration {report.get('iteration', '?')}): "
             f"{report.get('num_tasks', '?')} test tasks after {report.get('adaptation_steps', '?')} adaptation steps, "
             f"{report.get('posterior', '?')} posterior, {report.get('predictive_samples', '?')} predictive samples"]
    if "accuracy" in m:
        lines.append(f"  accuracy {100 * m['accuracy']:.2f} ± {100 * m['accuracy_ci95']:.2f} %, ECE {m['ece']:.4f}, "
                     f"MCE {m['mce']:.4f} ({m['num_bins']} bins), NLL {m['nll']:.4f}")
    if "mse" in m:
        noise = f" (noise sd {m['noise_scale']:.3g})" if m.get("noise_scale") is not None else ""
        lines.append(f"  query MSE {m['mse']:.4f} ± {m['mse_ci95']:.4f}, log predictive density "
                     f"{m['log_predictive_density']:.3f} per point{noise}")
    if "pit" in m:
        pit = m["pit"]
        lines.append(f"  predictive intervals hold {100 * pit['coverage_50']:.0f}% of points at 50% and "
                     f"{100 * pit['coverage_90']:.0f}% at 90%; PIT uniformity KS p = {pit['ks_pvalue']:.3g} "
                     f"({pit['num_points']} points)")
    return "\n".join(lines)


def _cmd_diagnose(args) -> int:
    from hbmeta.evaluation.diagnostics import diagnose_run

    report = diagnose_run(args.run, args.out, num_tasks=args.tasks, seed=args.seed, device=args.device,
                          steps=args.steps)
    summary = [p for p in report.get("files", []) if str(p).endswith("diagnostics.json")]
    print(diagnosis_summary(json.loads(Path(summary[0]).read_text()) if summary else report))
    for path in report.get("files", []):
        print(f"wrote {path}")
    return 0


def _cmd_compare(args) -> int:
    from hbmeta.evaluation.diagnostics import compare_runs

    out = Path(args.out) if args.out is not None else _run_folder(args.runs[0]).parent / "compare"
    report = compare_runs(args.runs, out, num_tasks=args.tasks, seed=args.seed, device=args.device,
                          num_samples=args.samples, ic=args.ic)
    print("checkpoints read: " + ", ".join(f"{name} at iteration {it}" for name, it in report["iterations"].items()))
    columns = [c for c in ("rank", f"elpd_{args.ic}", f"p_{args.ic}", "elpd_diff", "dse", "weight") if c in report["table"]]
    print(report["table"][columns].to_string(float_format=lambda v: f"{v:.3f}"))
    for path in report["files"]:
        print(f"wrote {path}")
    return 0


def _cmd_summary(args) -> int:
    from hbmeta.evaluation.summary import load_runs, plot_learning_curves, summary_table
    from hbmeta.training.runs import atomic_write_text

    runs = load_runs(args.runs)
    table = summary_table(runs)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = [atomic_write_text(out / "summary.md", table + "\n"), plot_learning_curves(runs, out / "learning_curves.png")]
    print("\nwrote " + " and ".join(map(str, written)))
    return 0


def _cmd_demo(args) -> int:
    from hbmeta.bench.demo import run_demo

    out = run_demo(args.out, args.iterations, args.meta_batch, args.seed, args.device, progress=not args.no_progress)
    print(f"\nMeta-test MSE on 100 new sinusoid tasks (K=10), {args.iterations} meta-iterations x {args.meta_batch} tasks each:\n")
    print(out["table"])
    print(f"\nwrote {Path(args.out) / 'demo.json'} and {out['summary']['plot']}")
    return 0


def _report(config, run, format_table, write, out: str) -> int:
    """Run a study or benchmark, print its Markdown table and write its files into ``out``."""
    result = run(config)
    print(format_table(result))
    write(result, out)
    print(f"\nwrote {out}")
    return 0


def _cmd_gradient_study(args) -> int:
    from hbmeta.bench import gradient_study as gs

    config = gs.GradientStudyConfig(seed=args.seed)
    if args.repeats is not None:
        config.repeats = args.repeats
    return _report(config, gs.run_gradient_study, gs.format_table, gs.write_gradient_study, args.out)


def _cmd_bench(args) -> int:
    from hbmeta.bench import step as bench

    if args.which == "throughput":
        from hbmeta.bench import throughput

        return throughput.run_from_args(args)
    if args.which == "accuracy":
        from hbmeta.bench import accuracy

        config = accuracy.AccuracyBenchConfig(budget=args.budget, device=args.device, data_root=args.data_root,
                                              out=args.out if args.out != "runs/bench" else "runs/accuracy",
                                              seeds=tuple(int(k) for k in args.seeds.split(",")))
        if args.benchmarks:
            config.benchmarks = tuple(args.benchmarks.split(","))
        if args.algos:
            config.algorithms = tuple(args.algos.split(","))
        config.__post_init__()
        run = (lambda c: accuracy.summarize(accuracy.collect_results(c.out), c.budget)) if args.table_only \
            else accuracy.run_accuracy_benchmark
        return _report(config, run, accuracy.format_accuracy_table, accuracy.write_accuracy_benchmark, config.out)
    if args.which == "scaling":
        from hbmeta.bench import scaling

        config = scaling.ScalingBenchConfig(device=args.device)
        if args.repeats is not None:
            config.repeats = args.repeats
        if args.queries is not None:
            config.queries = args.queries
        if args.warmup is not None:
            config.warmup = args.warmup
        if args.inner_steps:
            config.steps = tuple(int(k) for k in args.inner_steps.split(","))
        if args.algos:
            config.algorithms = tuple(args.algos.split(","))
        if args.threads is not None:
            config.threads = args.threads
        return _report(config, lambda c: scaling.run_scaling_benchmark(c, progress=True), scaling.format_scaling_table,
                       scaling.write_scaling_benchmark, args.out)

    config = bench.StepBenchConfig(device=args.device)
    if args.repeats is not None:
        config.repeats = args.repeats
    if args.threads is not None:
        config.threads = args.threads
    return _report(config, bench.run_step_benchmark, bench.format_step_table, bench.write_step_benchmark, args.out)


#: numeric options that are not run settings (those are checked against hbmeta.experiments.config.RANGES)
_OPTION_RANGES = {"eval_tasks": (int, 1), "tasks": (int, 1), "steps": (int, 0), "samples": (int, 1), "seed": (int, 0),
                  "threads": (int, 1), "repeats": (int, 1), "queries": (int, 1), "warmup": (int, 0)}


def _checked_type(name: str, allowed):
    """An argparse ``type`` that parses a flag and checks it against ``allowed`` (a
    :class:`~hbmeta.experiments.config.Range`): bad values are refused at parse time, naming what is allowed."""
    def parse(text: str):
        try:
            value = allowed.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be {allowed.describe()}; got {text!r}") from None
        try:
            return allowed.check(name, value)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    parse.__name__ = name
    return parse


def _check_numeric_options(parser: argparse.ArgumentParser, command: str | None = None) -> None:
    """Give every numeric option of every subcommand a checked type: ``hbmeta train``'s run settings their ranges in
    :data:`~hbmeta.experiments.config.RANGES` (the one table the Python API checks too), the others
    :data:`_OPTION_RANGES`."""
    from hbmeta.experiments.config import RANGES, Range

    for action in parser._actions:  # argparse keeps the subcommands' parsers in its _SubParsersAction
        if isinstance(action, argparse._SubParsersAction):
            for name, subparser in action.choices.items():
                _check_numeric_options(subparser, name)
        elif action.type in (int, float):
            allowed = RANGES.get(action.dest) if command == "train" else None
            if allowed is None and action.dest in _OPTION_RANGES:
                kind, low = _OPTION_RANGES[action.dest]
                allowed = Range(kind, low)
            if allowed is None and command in ("demo",) and action.dest in RANGES:
                allowed = RANGES[action.dest]
            if allowed is not None:
                action.type = _checked_type(action.dest, allowed)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    """The ``hbmeta`` command. An error is one line on stderr, with exit status 2 for a bad setting or input (argparse's
    own usage errors too) and 1 for a failure while running (a missing or damaged checkpoint, a diverging inner loop,
    a locked run folder, a full disk). A missing file or folder the command was pointed at counts as a bad input.
    ``hbmeta --debug ...`` shows the traceback instead."""
    args = build_parser().parse_args(argv)
    handler = {"train": _cmd_train, "evaluate": _cmd_evaluate, "demo": _cmd_demo,
               "gradient-study": _cmd_gradient_study, "bench": _cmd_bench, "diagnose": _cmd_diagnose,
               "calibrate": _cmd_calibrate, "summary": _cmd_summary,
               "compare": _cmd_compare}[args.command]
    from hbmeta.training.runtime import keep_freed_memory, torch_threads

    keep_freed_memory()  # reuse freed CPU blocks (the Gauss-Newton step's temporaries); HBMETA_MALLOC=system skips
    try:
        with torch_threads(getattr(args, "threads", 1)):  # 1 CPU thread is fastest for the small nets
            return handler(args)
    except Exception as err:  # noqa: BLE001 - every error becomes one line (with --debug: the traceback)
        if args.debug:
            raise
        usage = isinstance(err, FileNotFoundError) or (  # a path, setting or input the command was given is wrong
            isinstance(err, (ValueError, TypeError, KeyError, FileExistsError)) and not isinstance(err, RuntimeError))
        print(f"hbmeta {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2 if usage else 1

