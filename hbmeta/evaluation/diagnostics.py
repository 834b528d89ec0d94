r"""Posterior and posterior-predictive diagnostics of meta-test posteriors with ArviZ [2].

After meta-training, a learner adapts to a new task by VI from the learned prior (GEM-BML Algorithm 1,
Meta-test). This module checks what comes out:

- :func:`posterior_to_arviz`: the adapted posteriors of a few tasks as an ``arviz.InferenceData`` with groups
  ``posterior`` (``theta``: a handful of chosen weights; ``f``: the network's outputs at the query inputs),
  ``posterior_predictive`` (``y``: query targets drawn from the likelihood), ``observed_data`` (``y``, the
  query targets) and ``constant_data`` (the support set; the inputs when they are small).
- :func:`diagnostic_plots`: posterior predictive checks (regression: ``az.plot_ppc`` per task and the PIT of
  each query point, ``az.plot_bpv(kind="u_value")``; classification: a PPC of class counts and the
  reliability diagram of GEM-BML section 5.2, Table 3, from :mod:`hbmeta.evaluation.calibration`), ``az.plot_forest``
  of the chosen weights and ``az.summary`` as CSV.
- :func:`diagnose` / :func:`diagnose_run`: adapt on a batch of test tasks, write the plots, the summary and
  ``diagnostics.json`` with calibration numbers over all tasks (classification: ECE / MCE / accuracy;
  regression: PIT uniformity and interval coverage), all computed by :mod:`hbmeta.evaluation.calibration`.

Why not ``az.plot_loo_pit``: the query points are held out (the posterior is fitted on the support set only),
so the plain PIT of each query point under the posterior predictive is already out of sample; LOO's
importance reweighting would treat the query points as if they had been conditioned on.

Pseudo-chains: the posterior is variational, so there is no Markov chain to diagnose. ``num_samples``
independent guide draws are split into ``chains`` (default 4) pseudo-chains because ArviZ expects a ``chain``
dimension; ``r_hat`` and ESS of i.i.d. draws are ~1 and ~``num_samples`` by construction and say nothing about VI,
so ``summary.csv`` holds only the posterior statistics (``az.summary(kind="stats")``).

Groups: ``posterior``, ``prior`` (draws of the learned prior, for prior-vs-posterior comparisons),
``posterior_predictive``, ``observed_data``, ``log_likelihood`` (pointwise ``log p(y_m | theta_s)`` of every query
point, which :func:`compare_runs` hands to ``az.compare``) and ``constant_data``; weights are labelled by layer
(``"0.weight[3,0]"``) and, for 1-D inputs, query points carry their ``x`` as a ``(task, point)`` coordinate.

ArviZ version: written against ArviZ 0.23 (``az.from_dict``, ``az.summary``, ``az.plot_ppc``,
``az.plot_bpv``, ``az.plot_forest``, ``InferenceData.to_netcdf``). ArviZ 1.x replaces ``InferenceData`` with
``xarray.DataTree`` (``az.from_dict`` then takes one dict of groups), and the plots move to
``arviz_plots`` (``plot_ppc_dist`` for ``plot_ppc``, ``plot_ppc_pit`` for ``plot_bpv(kind="u_value")``,
``plot_ppc_pava`` for calibration of discrete outcomes); ``az.summary`` and ``plot_forest`` keep their names.
ArviZ is optional: ``pip install hbmeta[diagnostics]``.

References:
    [1] Zou, Y. & Lu, X. Gradient-EM Bayesian Meta-learning. NeurIPS 2020, Algorithm 1 and section 5.2.
    [2] Kumar, R., Carroll, C., Hartikainen, A. & Martin, O. ArviZ a unified library for exploratory analysis
        of Bayesian models in Python. JOSS 2019.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from hbmeta.evaluation.calibration import (NUM_BINS, accuracy_ci95, calibration_errors, gaussian_mixture_pit,  # noqa: E402
                                pit_uniformity, predictive_probabilities, reliability_diagram)
from hbmeta.evaluation.stats import mean_ci95  # noqa: E402
from hbmeta.inference.batch import TaskBatch  # noqa: E402
from hbmeta.inference.learner import MetaLearner  # noqa: E402
from hbmeta.models.functional import BatchedNet  # noqa: E402
from hbmeta.models.likelihoods import CategoricalLikelihood, GaussianLikelihood, Likelihood  # noqa: E402
from hbmeta.models.posterior import Posterior  # noqa: E402
from hbmeta.models.pyro_likelihood import PyroLikelihood  # noqa: E402

__all__ = ["posterior_to_arviz", "diagnostic_plots", "diagnose", "diagnose_run", "weight_indices", "likelihood_kind",
           "compare_runs", "pointwise_log_likelihood", "plot_prior_vs_posterior"]

WeightSpec = int | str | tuple[str, object]
#: posterior draws pushed through the network at once (bounds memory for conv nets on image tasks)
_SAMPLE_CHUNK = 25


def _arviz():
    """Import ArviZ lazily (it is the optional ``diagnostics`` extra), hiding its import-time FutureWarning."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # arviz 0.23's daily notice about the 1.x refactor
            import arviz
    except ImportError as err:
        raise ImportError("hbmeta.evaluation.diagnostics needs ArviZ: pip install hbmeta[diagnostics]") from err
    return arviz


@contextmanager
def _quiet_plotting():
    """Silence the one known deprecation ArviZ 0.23 triggers in matplotlib >= 3.11 (``normalize_kwargs``)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*alias_mapping.*", category=matplotlib.MatplotlibDeprecationWarning)
        yield


def likelihood_kind(likelihood: Likelihood) -> str:
    """``"classification"`` for a :class:`CategoricalLikelihood`; ``"regression"`` for a :class:`GaussianLikelihood`
    or a real-valued Pyro program (:class:`~hbmeta.models.pyro_likelihood.PyroLikelihood`)."""
    if isinstance(likelihood, CategoricalLikelihood):
        return "classification"
    if isinstance(likelihood, (GaussianLikelihood, PyroLikelihood)):
        return "regression"
    raise TypeError(f"diagnostics support GaussianLikelihood, CategoricalLikelihood and PyroLikelihood (real-valued "
                    f"observations); got {likelihood!r}")


# ------------------------------------------------------------------------------------------------ weights
def _weight_label(net: BatchedNet, flat: int) -> str:
    offset = 0
    for name, shape, size in zip(net.names, net.shapes, net.sizes):
        if flat < offset + size:
            pos = np.unravel_index(flat - offset, tuple(shape)) if len(shape) else ()
            return f"{name}[{','.join(str(int(i)) for i in pos)}]"
        offset += size
    raise ValueError(f"weight index {flat} is out of range for a network with {net.num_params} weights")


def _spec_indices(net: BatchedNet, index: dict[str, Tensor], item: WeightSpec) -> list[int]:
    """The flat indices one item of :func:`weight_indices`'s ``weights`` selects."""
    if isinstance(item, (int, np.integer)) and not isinstance(item, bool):
        if not 0 <= int(item) < net.num_params:
            raise ValueError(f"weight index {item} is out of range for a network with {net.num_params} weights")
        return [int(item)]
    name, sel = item if isinstance(item, tuple) else (item, None)
    match = re.fullmatch(r"(.+)\[([\d,\s]*)\]", name) if isinstance(name, str) and sel is None else None
    if match and match.group(1) in index:  # "0.weight[3,0]"
        name, sel = match.group(1), tuple(int(i) for i in match.group(2).split(",") if i.strip())
    if name not in index:
        raise ValueError(f"unknown parameter {name!r}; the network has {', '.join(net.names)}")
    chosen = index[name] if sel is None else index[name][sel]
    return [int(i) for i in torch.as_tensor(chosen).reshape(-1)]


def weight_indices(net: BatchedNet, weights: Sequence[WeightSpec] | None = None) -> tuple[list[int], list[str]]:
    """Flat indices into ``theta`` and readable labels (``"0.weight[3,0]"``) of the weights to diagnose.

    Args:
        net: the learner's :class:`BatchedNet` (``learner.model.net``).
        weights: a list whose items are a flat index (``int``), a parameter name (all its entries), a name
            with an index (``"0.weight[3,0]"``) or ``(name, index)`` with any tensor index of that parameter
            (``("2.weight", (slice(0, 2), 0))``). ``None``: the first 4 entries of the first parameter
            (first layer's weights) and of the last parameter with two or more dims (last layer's weights).
    """
    index = net.unflatten(torch.arange(net.num_params))
    if weights is None:
        last = [n for n, s in zip(net.names, net.shapes) if len(s) >= 2] or net.names
        flat = [int(i) for n in (net.names[0], last[-1]) for i in index[n].reshape(-1)[:4]]
    else:
        flat = [i for item in weights for i in _spec_indices(net, index, item)]
    flat = list(dict.fromkeys(flat))  # drop repeats, keep order
    if not flat:
        raise ValueError(f"weights {weights!r} select no weights")
    return flat, [_weight_label(net, i) for i in flat]


# ------------------------------------------------------------------------------------------ InferenceData
def _draws(t: Tensor, chains: int) -> np.ndarray:
    """``[S, ...]`` -> ``[chains, S / chains, ...]`` numpy (sample ``s`` goes to chain ``s // (S / chains)``)."""
    t = t.detach().cpu()
    return t.reshape(chains, t.shape[0] // chains, *t.shape[1:]).numpy()


@torch.no_grad()
def posterior_to_arviz(learner: MetaLearner, posterior: Posterior, x_support: Tensor, y_support: Tensor,
                       x_query: Tensor, y_query: Tensor, weights: Sequence[WeightSpec] | None = None,
                       num_samples: int = 200, generator: torch.Generator | None = None, chains: int = 4,
                       include_inputs: bool | None = None):
    """The adapted posteriors of ``T`` tasks and their posterior predictive at the query set, for ArviZ.

    Groups and variables (dims after ``chain, draw``):

    - ``posterior``: ``theta (task, weight)`` -- the chosen weights (:func:`weight_indices`);
      ``f (task, point, output|class)`` -- network outputs ``f(x_query; theta)`` (class logits for classification).
    - ``posterior_predictive``: ``y (task, point, output)`` = ``f + noise_scale * eps`` (regression), or
      ``y (task, point)`` ~ ``Categorical(softmax(f))`` (classification); one draw per posterior draw.
    - ``observed_data``: ``y``, the query targets.
    - ``constant_data``: ``y_support (task, support_point, ...)``; ``x_support``, ``x_query`` flattened to
      ``(task, ..., input)`` when ``include_inputs`` (default: inputs of at most 16 features).

    The ``num_samples`` i.i.d. guide draws are split into ``chains`` pseudo-chains (see module docstring).
    Every group's ``attrs`` record ``hbmeta_algorithm``, ``hbmeta_kind`` (regression / classification),
    ``hbmeta_posterior`` (meanfield / full / delta), ``hbmeta_likelihood``, ``hbmeta_chains`` and, for
    regression, ``hbmeta_noise_scale``.

    Args:
        posterior: ``T`` tasks' posteriors (``learner.adapt(x_support, y_support)``).
        x_support, y_support: ``[T, K, ...]`` the data the posterior was fitted on.
        x_query, y_query: ``[T, M, ...]`` held-out points of the same tasks.
        generator: for the guide draws and the predictive noise, on ``learner.device``.
    """
    az = _arviz()
    kind = likelihood_kind(learner.likelihood)
    if chains < 1 or num_samples < chains or num_samples % chains:
        raise ValueError(f"num_samples ({num_samples}) must be a positive multiple of chains ({chains})")
    for what, x, y in (("support", x_support, y_support), ("query", x_query, y_query)):
        if x.shape[0] != posterior.num_tasks or y.shape[0] != posterior.num_tasks:
            raise ValueError(f"{what} set has {x.shape[0]} tasks but the posterior has {posterior.num_tasks}")
        learner.likelihood.check_targets(y, x)
    if kind == "regression" and y_query.dim() != 3:
        raise ValueError(f"regression targets must be [tasks, points, outputs]; got {tuple(y_query.shape)}")
    device = learner.device
    theta = posterior.to(device).sample(num_samples, generator)                      # [S, T, P]
    x_dev = x_query.to(device)
    f = torch.cat([learner.model.net(t, x_dev) for t in theta.split(_SAMPLE_CHUNK)])  # [S, T, M, out]
    latents = {}
    if posterior.latents:  # per-task latents besides the weights (a noise scale ...): draws beside theta's
        sites = learner.model.latent_sites(x_dev, None)
        latents = {n: sites[n].sample(part.to(device), num_samples, generator) for n, part in posterior.latents.items()}
    likelihood = learner.likelihood.condition(latents) if latents else learner.likelihood
    if kind == "regression":
        y_rep = likelihood.sample(f, generator)  # observations through the likelihood
        f_dims, y_dims = ["task", "point", "output"], ["task", "point", "output"]
    else:
        probs = torch.softmax(f, -1)
        y_rep = torch.multinomial(probs.reshape(-1, f.shape[-1]), 1, generator=generator).reshape(f.shape[:-1])
        f_dims, y_dims = ["task", "point", "class"], ["task", "point"]
    flat, labels = weight_indices(learner.model.net, weights)
    T = posterior.num_tasks
    log_lik = pointwise_log_likelihood(learner.likelihood, f, y_query.to(device), latents)  # [S, T, M]
    prior_theta = _prior_draws(learner, T, num_samples, generator)                       # [S, T, P] or None
    if include_inputs is None:
        include_inputs = math.prod(x_query.shape[2:]) <= 16
    constant = {"y_support": y_support.cpu().numpy()}
    dims = {"theta": ["task", "weight"], "f": f_dims, "y": y_dims, "y_support": ["task", "support_point", *y_dims[2:]],
            **{n: ["task", *(f"{n}_dim_{i}" for i in range(v.dim() - 2))] for n, v in latents.items()}}
    if include_inputs:
        constant["x_support"] = x_support.reshape(T, x_support.shape[1], -1).cpu().numpy()
        constant["x_query"] = x_query.reshape(T, x_query.shape[1], -1).cpu().numpy()
        dims.update(x_support=["task", "support_point", "input"], x_query=["task", "point", "input"])
    coords = {"task": np.arange(T), "weight": labels, "point": np.arange(x_query.shape[1]),
              "support_point": np.arange(x_support.shape[1])}
    attrs = {"hbmeta_algorithm": learner.algorithm, "hbmeta_kind": kind, "hbmeta_posterior": posterior.kind,
             "hbmeta_likelihood": repr(learner.likelihood),
             "hbmeta_chains": f"{chains} pseudo-chains of i.i.d. variational draws, not MCMC"}
    if kind == "regression" and hasattr(learner.likelihood, "noise_scale"):
        attrs["hbmeta_noise_scale"] = learner.likelihood.noise_scale
    with warnings.catch_warnings():  # arrays are (chain, draw, ...) by construction; few draws are fine
        warnings.filterwarnings("ignore", message="More chains .* than draws", category=UserWarning)
        groups = {"posterior": {"theta": _draws(theta[..., flat], chains), "f": _draws(f, chains),
                                **{n: _draws(v, chains) for n, v in latents.items()}},
                  "posterior_predictive": {"y": _draws(y_rep, chains)},
                  "observed_data": {"y": y_query.cpu().numpy()}}
        if prior_theta is not None:
            groups["prior"] = {"theta": _draws(prior_theta[..., flat], chains)}
        idata = az.from_dict(**groups, constant_data=constant, coords=coords, dims=dims)
        idata.extend(az.from_dict(log_likelihood={"y": _draws(log_lik.double(), chains)}, coords=coords,
                                  dims={"y": ["task", "point"]}))  # pointwise, for az.loo / az.waic / az.compare
    if x_query.shape[2:].numel() == 1:  # 1-D inputs: the query points' x as a coordinate of (task, point)
        x_values = x_query.reshape(T, -1).cpu().numpy()
        for group in ("posterior", "posterior_predictive", "observed_data", "log_likelihood"):
            idata[group].coords["x"] = (("task", "point"), x_values)
    for group in idata.groups():  # from_dict(attrs=...) reaches only the data groups in arviz 0.23
        idata[group].attrs.update(attrs)
    return idata


def pointwise_log_likelihood(likelihood: Likelihood, f: Tensor, y: Tensor,
                             latents: dict[str, Tensor] | None = None) -> Tensor:
    """``log p(y_m | f_m)`` of every query point: ``f [S, T, M, ...]``, ``y [T, M, ...]`` -> ``[S, T, M]``.

    Each point is scored on its own by the likelihood (any :class:`~hbmeta.models.likelihoods.Likelihood`, Pyro
    programs included): the ``log_likelihood`` group that ``az.loo`` / ``az.waic`` / ``az.compare`` read. A model with
    per-task latents scores ``log p(y_m | f_m, z)`` at their draws ``latents`` (site -> ``[S, T, *event]``)."""
    S, T, M = f.shape[:3]
    if latents:  # every point of a task sees its task's draw
        likelihood = likelihood.condition({n: v.unsqueeze(2).expand(v.shape[0], T, M, *v.shape[2:])
                                          .reshape(v.shape[0], T * M, *v.shape[2:]) for n, v in latents.items()})
    per_point = likelihood.log_prob(f.reshape(S, T * M, 1, *f.shape[3:]), y.reshape(T * M, 1, *y.shape[2:]))
    return per_point.reshape(-1, T, M)


def _prior_draws(learner: MetaLearner, num_tasks: int, num_samples: int,
                 generator: torch.Generator | None) -> Tensor | None:
    """``[S, T, P]`` draws of the learned prior (the ``prior`` group); ``None`` for a prior without a density."""
    try:
        start = learner.prior.initial_posterior(num_tasks)
    except (NotImplementedError, ValueError):
        return None
    if start.kind not in ("meanfield", "full", "delta"):
        return None
    return start.to(learner.device).sample(num_samples, generator)


# ------------------------------------------------------------------------------------------------- plots
def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight")  # forest plots' long weight labels
    plt.close(fig)
    return path


def _class_count_ppc(idata, path: Path) -> Path:
    """Per task: predicted class counts over posterior-predictive draws (boxes) vs the observed counts (dots)."""
    y_rep = idata.posterior_predictive["y"].values              # [chain, draw, task, point]
    y_obs = idata.observed_data["y"].values                      # [task, point]
    num_classes = idata.posterior["f"].sizes["class"]
    classes = np.arange(num_classes)
    rep = (y_rep[..., None] == classes).sum(-2).reshape(-1, y_obs.shape[0], num_classes)  # [draws, task, class]
    obs = (y_obs[..., None] == classes).sum(-2)                                           # [task, class]
    fig, axes = plt.subplots(1, y_obs.shape[0], figsize=(3.2 * y_obs.shape[0], 3.2), squeeze=False)
    for t, ax in enumerate(axes[0]):
        ax.boxplot([rep[:, t, c] for c in classes], positions=classes, widths=0.6, showfliers=False)
        ax.scatter(classes, obs[t], color="k", zorder=5, label="observed")
        ax.set_xticks(classes)
        ax.set_xlabel("class")
        ax.set_title(f"task {int(idata.observed_data['task'][t])}", fontsize=10)
    axes[0][0].set_ylabel("count in query set")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Posterior predictive check: class counts", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _pit_histogram(pit: Tensor, summary: dict, path: Path) -> Path:
    """Histogram of the PIT of every query point of every task against the ``U(0, 1)`` density."""
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.hist(pit.reshape(-1).double().numpy(), bins=20, range=(0, 1), density=True, color="C0", alpha=0.7,
            edgecolor="k", lw=0.5)
    ax.axhline(1.0, color="k", ls="--", lw=1, label="U(0, 1)")
    ax.set_xlim(0, 1)
    ax.set_xlabel("PIT  u = P(Y <= y | support set)")
    ax.set_ylabel("density")
    ax.set_title(f"{summary['num_points']} query points: KS {summary['ks_statistic']:.3f}, 50% / 90% interval "
                 f"coverage {summary['coverage_50']:.2f} / {summary['coverage_90']:.2f}", fontsize=8)
    ax.legend(fontsize=7)
    return _save(fig, path)


def diagnostic_plots(idata, out_dir: str | Path, kind: str | None = None, calibration: dict | None = None,
                     num_pp_samples: int = 50) -> list[Path]:
    """Write the diagnostic plots and the posterior summary of ``idata`` into ``out_dir``.

    Files (ArviZ function in brackets):

    - ``posterior_forest.png`` (``az.plot_forest``, combined pseudo-chains) and ``summary.csv``
      (``az.summary`` of ``theta``; ``kind="stats"`` for a point-mass posterior, whose ``r_hat`` is undefined);
    - regression: ``ppc.png`` (``az.plot_ppc``, one panel per task) and ``pit.png``
      (``az.plot_bpv(kind="u_value")``: the PIT of every query point against ``U(0, 1)``);
    - classification: ``ppc_class_counts.png`` (matplotlib from the draws) and ``reliability.png``
      (:func:`hbmeta.evaluation.calibration.reliability_diagram` of ``calibration``, by default computed from ``idata``).

    Args:
        idata: from :func:`posterior_to_arviz`.
        kind: ``"regression"`` or ``"classification"``; default: as recorded in ``idata``.
        calibration: a :func:`hbmeta.evaluation.calibration.calibration_errors` result for the reliability diagram.
    """
    az = _arviz()
    kind = kind or idata.posterior.attrs.get("hbmeta_kind")
    if kind not in ("regression", "classification"):
        raise ValueError(f"kind must be 'regression' or 'classification'; got {kind!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    name = idata.posterior.attrs.get("hbmeta_algorithm", "posterior predictive")
    with _quiet_plotting():
        if kind == "regression":
            draws = idata.posterior_predictive.sizes["chain"] * idata.posterior_predictive.sizes["draw"]
            axes = np.atleast_1d(az.plot_ppc(idata, var_names=["y"], flatten=["point", "output"],
                                             num_pp_samples=min(num_pp_samples, draws), random_seed=0))
            for ax, t in zip(axes.ravel(), idata.observed_data["task"].values):
                ax.set_title(f"task {int(t)}: posterior predictive check", fontsize=10)
                ax.set_xlabel("y at the query points")
                ax.set_ylabel("density")
            paths.append(_save(axes.ravel()[0].figure, out / "ppc.png"))
            ax = np.atleast_1d(az.plot_bpv(idata, kind="u_value", var_names=["y"])).ravel()[0]
            ax.set_title("PIT of query points (u-value) vs U(0, 1)", fontsize=10)
            ax.set_xlabel("u = P(Y <= y | support set)")
            ax.set_ylabel("density")
            paths.append(_save(ax.figure, out / "pit.png"))
        else:
            paths.append(_class_count_ppc(idata, out / "ppc_class_counts.png"))
            if calibration is None:
                probs = torch.softmax(torch.as_tensor(idata.posterior["f"].values), -1).mean((0, 1))
                calibration = calibration_errors(probs, torch.as_tensor(idata.observed_data["y"].values))
            paths.append(reliability_diagram({name: calibration}, out / "reliability.png"))
        axes = np.atleast_1d(az.plot_forest(idata, var_names=["theta"], combined=True, hdi_prob=0.9))
        axes.ravel()[0].set_title(f"{name}: chosen weights (90% HDI)", fontsize=10)
        axes.ravel()[0].set_xlabel("weight value")
        paths.append(_save(axes.ravel()[0].figure, out / "posterior_forest.png"))
    if "prior" in idata.groups():
        paths.append(plot_prior_vs_posterior(idata, out / "prior_vs_posterior.png"))
    summary = az.summary(idata, var_names=["theta"], kind="stats")  # r_hat / ESS of i.i.d. draws mean nothing
    summary.to_csv(out / "summary.csv")
    paths.append(out / "summary.csv")
    return paths


def plot_prior_vs_posterior(idata, path: str | Path) -> Path:
    """One panel per layer: each chosen weight's posterior sd against its learned prior sd (log-log; below the
    diagonal the task's data shrank the uncertainty), coloured by how far the posterior mean moved from the
    prior mean in prior sds."""
    prior = idata.prior["theta"].values.reshape(-1, *idata.prior["theta"].shape[2:])          # [draws, task, weight]
    post = idata.posterior["theta"].values.reshape(-1, *idata.posterior["theta"].shape[2:])
    labels = [str(w) for w in idata.posterior["weight"].values]
    layers = list(dict.fromkeys(label.split("[")[0] for label in labels))
    fig, axes = plt.subplots(1, len(layers), figsize=(4.0 * len(layers), 3.6), squeeze=False)
    for ax, layer in zip(axes[0], layers):
        cols = [i for i, label in enumerate(labels) if label.split("[")[0] == layer]
        prior_sd, post_sd = prior[:, :, cols].std(0), post[:, :, cols].std(0)                # [task, weights]
        shift = np.abs(post[:, :, cols].mean(0) - prior[:, :, cols].mean(0)) / np.maximum(prior_sd, 1e-12)
        points = ax.scatter(prior_sd.ravel(), np.maximum(post_sd.ravel(), 1e-12), c=shift.ravel(), cmap="viridis",
                            s=18)
        low = max(min(prior_sd.min(), post_sd.min()), 1e-6) * 0.8
        high = max(prior_sd.max(), post_sd.max()) * 1.25
        ax.plot([low, high], [low, high], "k--", lw=0.8, label="posterior sd = prior sd")
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):  # major (decade) labels only: minor ones collide on short ranges
            axis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("prior sd (learned)")
        ax.set_ylabel("posterior sd after adaptation")
        ax.set_title(f"{layer}: {len(cols)} weights x {prior_sd.shape[0]} tasks", fontsize=10)
        fig.colorbar(points, ax=ax, label="|posterior mean - prior mean| / prior sd")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{idata.posterior.attrs.get('hbmeta_algorithm', '')}: prior vs posterior per layer", fontsize=10)
    fig.tight_layout()
    return _save(fig, Path(path))


# ------------------------------------------------------------------------------------------ one-line API
def _chunk_outputs(learner: MetaLearner, posterior: Posterior, part: TaskBatch, kind: str, num_samples: int,
                   generator: torch.Generator) -> dict[str, Tensor]:
    """Per-point predictive quantities of one chunk of tasks, on the CPU, for :func:`_summarize`."""
    y = part.y_val.to(learner.device)
    if kind == "classification":
        return {"probs": predictive_probabilities(learner, posterior, part.x_val, num_samples, generator).cpu()}
    pred = learner.predict(posterior, part.x_val, num_samples, generator)
    f = pred.samples                                                                        # [S, T, M, out]
    if isinstance(learner.likelihood, GaussianLikelihood):  # the predictive's CDF in closed form
        sigma = learner.likelihood.noise_scale
        log_p = torch.distributions.Normal(f, sigma).log_prob(y)
        pit = gaussian_mixture_pit(y, f, sigma)
    else:  # any other observation model: the PIT from draws of y, the density point by point
        log_p = pointwise_log_likelihood(learner.likelihood, f, y, pred.latents)
        pit = (pred.observed <= y).double().mean(0)
    return {"pit": pit.cpu(), "squared_error": (f.mean(0) - y).pow(2).flatten(1).mean(1).cpu(),
            "log_predictive": (torch.logsumexp(log_p, 0) - math.log(f.shape[0])).cpu()}


def _summarize(outputs: dict[str, Tensor], labels: Tensor, kind: str, num_bins: int, noise_scale: float | None
               ) -> tuple[dict, dict | None]:
    """Calibration numbers over all tasks (and, for classification, the :func:`calibration_errors` result)."""
    if kind == "classification":
        probs, labels = outputs["probs"], labels.cpu()
        calib = calibration_errors(probs, labels, num_bins)
        mean, half = accuracy_ci95((probs.argmax(-1) == labels).double().mean(1))
        nll = -probs.gather(-1, labels.unsqueeze(-1)).clamp_min(1e-12).log().mean()
        bins = {k: [None if math.isnan(v) else v for v in calib[k].tolist()]
                for k in ("bin_edges", "bin_confidence", "bin_accuracy", "bin_count")}
        return {"ece": calib["ece"], "mce": calib["mce"], "accuracy": mean, "accuracy_ci95": half,
                "nll": float(nll), "num_bins": num_bins, "num_predictions": calib["count"], **bins}, calib
    mse, mse_half = mean_ci95(outputs["squared_error"])
    return {"pit": pit_uniformity(outputs["pit"]), "mse": mse, "mse_ci95": mse_half,
            "log_predictive_density": float(outputs["log_predictive"].mean()), "noise_scale": noise_scale}, None


def diagnose(learner: MetaLearner, tasks_batch: TaskBatch, out_dir: str | Path, num_samples: int = 200,
             steps: int | None = None, *, tasks_shown: int = 3, weights: Sequence[WeightSpec] | None = None,
             predictive_samples: int = 32, num_bins: int = NUM_BINS, seed: int = 0, chunk: int = 25,
             info: dict | None = None) -> dict:
    """Adapt to test tasks, then write posterior diagnostics and calibration numbers into ``out_dir``.

    1. ``learner.adapt`` on every task's support set (``steps``: default the learner's inner steps).
    2. Over all tasks, from ``predictive_samples`` posterior draws on the query sets: classification -- ECE,
       MCE (``num_bins`` equal-width bins, :func:`hbmeta.evaluation.calibration.calibration_errors`), accuracy with 95% CI,
       NLL; regression -- PIT uniformity (KS vs ``U(0, 1)``), coverage of the central 50% / 90% predictive
       intervals, MSE of the predictive mean with 95% CI, mean log predictive density.
    3. :func:`posterior_to_arviz` for the first ``tasks_shown`` tasks with ``num_samples`` draws, and
       :func:`diagnostic_plots`.

    Tasks are adapted and predicted ``chunk`` at a time, as in :mod:`hbmeta.evaluation.meta_test` (memory grows with
    ``chunk * predictive_samples * query points``); the inner update is per task, so the chunk size changes
    only which random numbers each task gets.

    Writes ``diagnostics.json``, ``summary.csv``, ``posterior_forest.png``, ``idata.nc`` (the InferenceData,
    for ``az.from_netcdf``; skipped without a netCDF backend) and ``ppc.png`` + ``pit.png`` (shown tasks) +
    ``pit_all_tasks.png`` (regression) or ``ppc_class_counts.png`` + ``reliability.png`` (all tasks;
    classification).

    Args:
        learner: a meta-learner with a Gaussian (regression) or categorical (classification) likelihood.
        tasks_batch: test tasks; ``y_val`` holds integer labels ``[T, M]`` for classification.
        num_samples: posterior draws in the InferenceData (a multiple of its 4 pseudo-chains).
        steps: adaptation steps (the CLI passes the run's ``test_steps``).
        tasks_shown: tasks put into the InferenceData and plots.
        weights: which weights to summarise (:func:`weight_indices`).
        predictive_samples: posterior draws per task for the numbers over all tasks.
        seed: seeds the adaptation, the predictive draws and the InferenceData draws (on ``learner.device``).
        info: extra entries for ``diagnostics.json`` (``diagnose_run`` records the run).

    Returns:
        ``{"kind", "out_dir", "metrics", "paths": {file name: Path}, "files": [str paths], "idata"}``.

    Example:
        >>> batch = tasks.sample(100, torch.Generator().manual_seed(0))                   # doctest: +SKIP
        >>> result = diagnose(learner, batch, "runs/gem/diagnostics")                     # doctest: +SKIP
        >>> result["metrics"]["pit"]["coverage_90"], result["paths"]["pit.png"]           # doctest: +SKIP
    """
    kind = likelihood_kind(learner.likelihood)
    if chunk < 1 or tasks_shown < 1:
        raise ValueError(f"chunk and tasks_shown must be >= 1; got {chunk}, {tasks_shown}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device=learner.device).manual_seed(seed)
    num_shown = min(tasks_shown, tasks_batch.num_tasks)
    parts: dict[str, list[Tensor]] = {}
    shown_posteriors: list[Posterior] = []
    for start in range(0, tasks_batch.num_tasks, chunk):  # bounded memory, as hbmeta.evaluation.meta_test
        part = tasks_batch.select(slice(start, start + chunk))
        posterior = learner.adapt(part.x_train, part.y_train, steps=steps, generator=gen)
        for name, value in _chunk_outputs(learner, posterior, part, kind, predictive_samples, gen).items():
            parts.setdefault(name, []).append(value)
        if start < num_shown:
            shown_posteriors.append(posterior.select(slice(0, num_shown - start)))
    noise_scale = getattr(learner.likelihood, "noise_scale", None) if kind == "regression" else None
    outputs = {k: torch.cat(v) for k, v in parts.items()}
    metrics, calib = _summarize(outputs, tasks_batch.y_val, kind, num_bins, noise_scale)
    shown = tasks_batch.select(slice(0, num_shown))
    idata = posterior_to_arviz(learner, Posterior.cat(shown_posteriors), shown.x_train, shown.y_train, shown.x_val,
                               shown.y_val, weights, num_samples, gen)
    paths = {p.name: p for p in diagnostic_plots(idata, out, kind, calibration=calib)}
    if kind == "regression":
        paths["pit_all_tasks.png"] = _pit_histogram(outputs["pit"], metrics["pit"], out / "pit_all_tasks.png")
    try:
        idata.to_netcdf(str(out / "idata.nc"))
        paths["idata.nc"] = out / "idata.nc"
    except (ImportError, ValueError):  # no netCDF engine (netCDF4 / h5netcdf / scipy) installed
        pass
    steps_used = learner.inner.steps if steps is None else steps
    record = {"kind": kind, "algorithm": learner.algorithm, "posterior": shown_posteriors[0].kind,
              "num_tasks": tasks_batch.num_tasks, "adaptation_steps": steps_used, "seed": seed,
              "predictive_samples": predictive_samples, "inference_data": {
                  "tasks": num_shown, "num_samples": num_samples, "pseudo_chains": idata.posterior.sizes["chain"],
                  "weights": list(idata.posterior["weight"].values.tolist())},
              "metrics": metrics, "files": sorted(paths) + ["diagnostics.json"], **(info or {})}
    (out / "diagnostics.json").write_text(json.dumps(record, indent=2))
    paths["diagnostics.json"] = out / "diagnostics.json"
    return {"kind": kind, "out_dir": str(out), "metrics": metrics, "paths": paths,
            "files": [str(p) for p in paths.values()], "idata": idata}


def diagnose_run(run_dir: str | Path, out_dir: str | Path | None = None, num_tasks: int = 100, seed: int = 12345,
                 device: str = "cpu", steps: int | None = None) -> dict:
    """:func:`diagnose` a run folder's checkpoint on ``num_tasks`` new tasks of its experiment.

    The tasks are the experiment's held-out tasks, ``test_tasks(config).sample(num_tasks,
    Generator().manual_seed(seed))`` with the run's support / query sizes, adapted with ``steps`` (default:
    the run's ``test_steps``) on ``device``. ``run_dir`` may also be a
    checkpoint file; ``out_dir`` defaults to ``diagnostics/`` beside the checkpoint. ``diagnostics.json`` also
    records ``run``, ``experiment``, ``iteration`` and ``task_seed``. This is ``hbmeta diagnose RUN_DIR``.
    """
    from hbmeta.experiments.registry import get_experiment
    from hbmeta.training.runs import load_learner
    from hbmeta.training.runtime import resolve_device, torch_threads

    learner, config, iteration = load_learner(run_dir, device)
    base = Path(run_dir) if Path(run_dir).is_dir() else Path(run_dir).parent
    batch = get_experiment(config.experiment).test_tasks(config).sample(num_tasks, torch.Generator().manual_seed(seed))
    info = {"run": str(run_dir), "experiment": config.experiment, "iteration": iteration, "task_seed": seed}
    threads = config.threads if resolve_device(device).type == "cpu" else None
    with torch_threads(threads):
        return diagnose(learner, batch, base / "diagnostics" if out_dir is None else out_dir,
                        steps=config.inner.test_steps if steps is None else steps, seed=seed, info=info)


def compare_runs(run_dirs: Sequence[str | Path], out_dir: str | Path, num_tasks: int = 20, seed: int = 12345,
                 device: str = "cpu", num_samples: int = 100, ic: str = "loo") -> dict:
    """``az.compare`` (LOO or WAIC) of runs on the SAME held-out tasks: ``hbmeta compare RUN_A RUN_B``.

    Each run adapts to the support sets of ``num_tasks`` test tasks of the first run's experiment (seeded by
    ``seed``) with its own ``test_steps``; the pointwise log-likelihood of every query point under ``num_samples``
    posterior draws (:func:`pointwise_log_likelihood`) goes to ``az.compare``. The query points are held out, so
    ``elpd`` is a held-out predictive score; LOO's importance weights then only correct for the draws' noise. A
    point-estimate run (MAML) has one distinct draw, so its ``p_loo`` is 0. Writes ``compare.csv`` and
    ``compare.png`` (``az.plot_compare``) into ``out_dir``.
    """
    from hbmeta.experiments.registry import get_experiment
    from hbmeta.training.runs import load_learner

    az = _arviz()
    if len(run_dirs) < 2:
        raise ValueError(f"compare needs at least two runs; got {len(run_dirs)}")
    if ic not in ("loo", "waic"):
        raise ValueError(f"ic must be 'loo' or 'waic'; got {ic!r}")
    loaded, iterations = {}, {}
    for run in run_dirs:
        learner, config, iteration = load_learner(run, device)
        name = Path(run).name if Path(run).is_dir() else Path(run).parent.name
        name = name if name not in loaded else str(run)
        loaded[name], iterations[name] = (learner, config), iteration
    configs = [c for _, c in loaded.values()]
    shape = {(c.experiment, c.ways if get_experiment(c.experiment).metric == "accuracy" else None, c.k_shot, c.k_query)
             for c in configs}
    if len(shape) > 1:
        raise ValueError(f"runs differ in experiment / ways / shots / queries {sorted(map(str, shape))}; compare runs "
                         f"of one task distribution")
    batch = get_experiment(configs[0].experiment).test_tasks(configs[0]).sample(num_tasks,
                                                                              torch.Generator().manual_seed(seed))
    datasets = {}
    for name, (learner, config) in loaded.items():
        gen = torch.Generator(device=learner.device).manual_seed(seed)
        posterior = learner.adapt(batch.x_train, batch.y_train, steps=config.inner.test_steps, generator=gen)
        datasets[name] = posterior_to_arviz(learner, posterior, batch.x_train, batch.y_train, batch.x_val, batch.y_val,
                                            num_samples=num_samples, generator=gen, include_inputs=False)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # point-estimate runs: identical draws, Pareto k undefined
        warnings.simplefilter("ignore")
        table = az.compare(datasets, ic=ic)
        table.to_csv(out / "compare.csv")
        with _quiet_plotting():
            ax = np.atleast_1d(az.plot_compare(table, insample_dev=False)).ravel()[0]
            ax.set_title(f"{ic.upper()} on {num_tasks} x {batch.x_val.shape[1]} held-out query points", fontsize=10)
            ax.set_xlabel(f"elpd ({ic}, log score; higher is better)")
            _save(ax.figure, out / "compare.png")
    return {"table": table, "files": [str(out / "compare.csv"), str(out / "compare.png")], "datasets": datasets,
            "iterations": iterations}
