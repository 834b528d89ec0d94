r"""Calibration of meta-test predictives: ECE, MCE, reliability diagrams (GEM-BML section 5.2, Table 3) and PIT.

GEM-BML reports the expected and maximum calibration errors of the meta-test posterior predictive on
few-shot image classification (section 5.2, Table 3), following Guo et al. [2] and Naeini et al. [3].
Implemented here:

- :func:`predictive_probabilities`: the posterior predictive
  :math:`p(y \mid x, D_{tr}) \approx \frac1S \sum_s \mathrm{softmax} f(x; \theta_s)`, :math:`\theta_s \sim q`
  (Bayesian model averaging; a point-mass posterior gives the softmax of its single prediction).
- :func:`calibration_errors`: with :math:`B` equal-width confidence bins :math:`I_b = ((b-1)/B, b/B]`,

  .. math::
      \mathrm{ECE} = \sum_{b=1}^B \frac{n_b}{n} \left|\mathrm{acc}(b) - \mathrm{conf}(b)\right|, \qquad
      \mathrm{MCE} = \max_{b:\, n_b > 0} \left|\mathrm{acc}(b) - \mathrm{conf}(b)\right|,

  where a prediction's confidence is its largest class probability, :math:`\mathrm{acc}(b)` the fraction of
  bin :math:`b`'s predictions that are right and :math:`\mathrm{conf}(b)` their mean confidence.
- :func:`reliability_diagram`: accuracy per bin against the diagonal, one panel per method ([2], Fig. 1).
- :func:`accuracy_ci95`: mean accuracy over tasks with a normal 95% confidence interval.
- Regression, by the probability integral transform (PIT) [4]: :func:`gaussian_mixture_pit` gives
  :math:`u = P(Y \le y)` under the Monte-Carlo predictive; :func:`pit_uniformity` measures how far the ``u``
  are from ``U(0, 1)`` (Kolmogorov-Smirnov, :func:`ks_uniform`) and the coverage of central predictive
  intervals (a calibrated 90% interval holds 90% of held-out points).

References:
    [1] Zou, Y. & Lu, X. Gradient-EM Bayesian Meta-learning. NeurIPS 2020, section 5.2.
    [2] Guo, C., Pleiss, G., Sun, Y. & Weinberger, K. Q. On Calibration of Modern Neural Networks. ICML 2017.
    [3] Naeini, M. P., Cooper, G. F. & Hauskrecht, M. Obtaining Well Calibrated Probabilities Using Bayesian
        Binning. AAAI 2015.
    [4] Gneiting, T., Balabdaoui, F. & Raftery, A. E. Probabilistic forecasts, calibration and sharpness.
        JRSS B 2007.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from hbmeta.evaluation.plots import save_figure  # noqa: E402
from hbmeta.evaluation.stats import mean_ci95  # noqa: E402
from hbmeta.inference.learner import MetaLearner  # noqa: E402
from hbmeta.inference.predictive import PosteriorPredictive  # noqa: E402
from hbmeta.models.posterior import Posterior  # noqa: E402
from hbmeta.models.likelihoods import EXPECTATION_DRAWS, gaussian_draws  # noqa: E402

__all__ = ["predictive_probabilities", "class_probabilities", "PREDICTIVES", "calibration_errors", "reliability_diagram", "accuracy_ci95", "NUM_BINS",
           "gaussian_mixture_pit", "pit_uniformity", "ks_uniform"]

#: bins of Guo et al. (2017), the usual choice for ECE / MCE tables
NUM_BINS = 15


#: how class probabilities are read off a posterior (:func:`predictive_probabilities`)
PREDICTIVES = ("bma", "mean")


@torch.no_grad()
def predictive_probabilities(learner: MetaLearner, posterior: Posterior, x: Tensor, num_samples: int = 32,
                             generator: torch.Generator | None = None, predictive: str = "bma") -> Tensor:
    """Class probabilities of the posterior predictive, ``[T, N, classes]``.

    The Monte-Carlo average of ``softmax(f(x; theta_s) / T)`` over ``num_samples`` guide samples (Bayesian model
    averaging, not the softmax of averaged logits); where the predictive is Gaussian in function space (the
    linearised one after Gauss-Newton VI) the average over :data:`~hbmeta.models.likelihoods.EXPECTATION_DRAWS` fixed
    quasi-Monte-Carlo draws of it instead (deterministic, and cheap: no network passes). A point-mass posterior
    (MAML, Reptile, a Delta guide) gives the softmax of its one prediction. ``predictive="mean"``: the softmax of the
    predictive's mean output (for a Gauss-Newton posterior, the network at the posterior mean) instead of the average.

    Args:
        learner: a meta-learner whose network outputs class logits.
        posterior: the tasks' posteriors, from ``learner.adapt``.
        x: ``[T, N, *in]`` query inputs.
    """
    if predictive not in PREDICTIVES:
        raise ValueError(f"predictive={predictive!r}: choose 'bma' (model averaging) or 'mean' (the posterior mean's)")
    return class_probabilities(learner, learner.predict(posterior, x, num_samples, generator), predictive)


def class_probabilities(learner: MetaLearner, pred: PosteriorPredictive, predictive: str = "bma") -> Tensor:
    """``[T, N, C]`` class probabilities of a predictive ``pred`` from ``learner.predict`` (one predictive serves both
    readings: ``"bma"``, model averaging, and ``"mean"``, the softmax of its mean; :func:`predictive_probabilities`)."""
    probs = getattr(learner.likelihood, "probs", lambda f: torch.softmax(f, dim=-1))
    if predictive == "mean":
        return probs(pred.mean)
    if pred.cov is not None:  # Gaussian in function space: a deterministic quasi-Monte-Carlo average
        draws = pred.mean.unsqueeze(0) + gaussian_draws(pred.cov, EXPECTATION_DRAWS).reshape(-1, *pred.mean.shape)
        return probs(draws).mean(0)
    return probs(pred.samples).mean(0)                                 # [S, T, N, C] -> [T, N, C]


def _check_probs_labels(probs: Tensor, labels: Tensor, num_bins: int) -> None:
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1; got {num_bins}")
    if probs.dim() < 1 or probs.shape[:-1] != labels.shape:
        raise ValueError(f"probs {tuple(probs.shape)} must be labels' shape {tuple(labels.shape)} + [classes]")
    if labels.numel() == 0:
        raise ValueError("no predictions to calibrate (0 labels)")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices; got {labels.dtype}")
    if not torch.isfinite(probs).all():
        raise ValueError("probs contain NaN or inf")
    if probs.min() < 0 or probs.max() > 1 + 1e-5:  # tolerate rounding in a Monte-Carlo average
        raise ValueError(f"probs must lie in [0, 1]; got values in [{probs.min():.3g}, {probs.max():.3g}]")


def calibration_errors(probs: Tensor, labels: Tensor, num_bins: int = NUM_BINS) -> dict:
    """Expected and maximum calibration error of class probabilities with equal-width confidence bins.

    Binning convention: ``num_bins`` (default 15, as Guo et al. 2017) equal-width bins on ``(0, 1]``,
    right-closed: bin ``b`` (0-based) holds confidences in ``(b/B, (b+1)/B]``, so a confidence of exactly
    ``1.0`` lands in the last bin and one exactly on an inner edge ``b/B`` in the bin below it. Edges are
    ``arange(B + 1) / B`` in the dtype of ``probs``, compared with the confidences in that dtype.

    Args:
        probs: ``[..., C]`` class probabilities (e.g. :func:`predictive_probabilities`).
        labels: ``[...]`` integer labels.
        num_bins: ``B``.

    Returns:
        ``ece``, ``mce``, ``accuracy`` (floats); ``num_bins``, ``count`` (ints, ``count`` = predictions);
        ``bin_edges [B+1]``, ``bin_confidence [B]``, ``bin_accuracy [B]`` (float64, NaN for empty bins) and
        ``bin_count [B]`` (int64) as CPU tensors. ``mce`` is the largest gap over non-empty bins.

    Example:
        >>> probs = torch.tensor([[0.9, 0.1], [0.9, 0.1]])
        >>> round(calibration_errors(probs, torch.tensor([0, 1]))["ece"], 6)   # 90% sure, 50% right
        0.4
    """
    _check_probs_labels(probs, labels, num_bins)
    probs, labels = probs.detach().cpu(), labels.detach().cpu()
    confidence, predicted = probs.max(-1)
    confidence, correct = confidence.reshape(-1), (predicted == labels).reshape(-1).double()
    edges = torch.arange(num_bins + 1, dtype=confidence.dtype) / num_bins
    # right-closed bins: index = number of inner edges strictly below the confidence
    index = torch.bucketize(confidence, edges[1:-1], right=False)
    count = torch.bincount(index, minlength=num_bins)
    conf_sum = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, index, confidence.double())
    acc_sum = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, index, correct)
    filled = count > 0
    nan = torch.full((num_bins,), math.nan, dtype=torch.float64)
    bin_conf = torch.where(filled, conf_sum / count.clamp(min=1), nan)
    bin_acc = torch.where(filled, acc_sum / count.clamp(min=1), nan)
    gap = (bin_acc - bin_conf).abs()
    n = confidence.numel()
    ece = float((count[filled].double() / n * gap[filled]).sum())
    return {"ece": ece, "mce": float(gap[filled].max()), "accuracy": float(correct.mean()), "num_bins": num_bins,
            "count": n, "bin_edges": edges.double(), "bin_confidence": bin_conf, "bin_accuracy": bin_acc,
            "bin_count": count}


def reliability_diagram(results: dict[str, dict], path: str | Path) -> Path:
    """Reliability diagrams side by side, one panel per method (Guo et al. 2017, Fig. 1), as a PNG.

    Each panel: the accuracy of every confidence bin as a bar, the diagonal of perfect calibration, the gap
    between accuracy and mean confidence shaded, and ECE / MCE in the title.

    Args:
        results: ``{method name: calibration_errors(...)}``.
        path: the PNG to write (parent folders are created).
    """
    if not results:
        raise ValueError("reliability_diagram needs at least one method's calibration_errors")
    fig, axes = plt.subplots(1, len(results), figsize=(3.6 * len(results), 3.8), squeeze=False)
    for ax, (name, res) in zip(axes[0], results.items()):
        edges = torch.as_tensor(res["bin_edges"]).double()
        left, width = edges[:-1].numpy(), (edges[1:] - edges[:-1]).numpy()
        acc = torch.as_tensor(res["bin_accuracy"]).double()
        conf = torch.as_tensor(res["bin_confidence"]).double()
        filled = (torch.as_tensor(res["bin_count"]) > 0).numpy()
        ax.bar(left[filled], acc.numpy()[filled], width=width[filled], align="edge", color="C0",
               edgecolor="k", lw=0.6, label="accuracy")
        low = torch.minimum(acc, conf).numpy()[filled]
        ax.bar(left[filled], (conf - acc).abs().numpy()[filled], bottom=low, width=width[filled], align="edge",
               color="C3", alpha=0.35, edgecolor="C3", hatch="//", lw=0.6, label="gap to confidence")
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_aspect("equal")
        ax.set_xlabel("confidence")
        ax.set_title(f"{name}\nECE {res['ece']:.3f}, MCE {res['mce']:.3f}", fontsize=10)
    axes[0][0].set_ylabel("accuracy")
    axes[0][0].legend(fontsize=7, loc="upper left")
    return save_figure(fig, path)


def accuracy_ci95(correct_per_task: Tensor) -> tuple[float, float]:
    """Mean accuracy over tasks and the half-width of its normal 95% interval (:func:`hbmeta.evaluation.stats.mean_ci95`).

    Args:
        correct_per_task: ``[T]`` per-task accuracies (or ``[T, N]`` correctness, averaged over points first).
    """
    values = torch.as_tensor(correct_per_task).detach().cpu().double()
    if values.dim() == 0 or values.numel() == 0:
        raise ValueError(f"correct_per_task must be [tasks] or [tasks, points]; got shape {tuple(values.shape)}")
    if values.dim() > 1:
        values = values.flatten(1).mean(1)
    return mean_ci95(values)


# ------------------------------------------------------------------------- regression: PIT and coverage
def gaussian_mixture_pit(y: Tensor, f_samples: Tensor, noise_scale: float) -> Tensor:
    r"""PIT of each ``y`` under the Monte-Carlo predictive :math:`\frac1S\sum_s N(f_s, \sigma^2)`.

    :math:`u = \frac1S \sum_s \Phi((y - f_s)/\sigma)` (Rao-Blackwellised: exact given the ``S`` draws of ``f``).
    ``y [T, M, out]``, ``f_samples [S, T, M, out]`` -> ``[T, M, out]``. ``u ~ U(0, 1)`` when ``y`` comes from
    the predictive.
    """
    z = (y.to(f_samples) - f_samples) / noise_scale
    return torch.special.ndtr(z).mean(0)


def ks_uniform(u: np.ndarray) -> tuple[float, float]:
    """Kolmogorov-Smirnov distance of ``u`` from ``U(0, 1)`` and its asymptotic p-value.

    The p-value is Kolmogorov's limit law with Stephens' small-sample correction,
    ``Q((sqrt(n) + 0.12 + 0.11 / sqrt(n)) D)`` (Press et al., Numerical Recipes, sec. 14.3): no SciPy needed.
    """
    u = np.sort(u)
    n = u.size
    i = np.arange(1, n + 1)
    d = float(max(np.max(i / n - u), np.max(u - (i - 1) / n)))
    lam = (math.sqrt(n) + 0.12 + 0.11 / math.sqrt(n)) * d
    if lam < 0.2:  # the series converges slowly here and Q is 1 to double precision
        return d, 1.0
    k = np.arange(1, 101)
    q = float(2 * np.sum((-1.0) ** (k - 1) * np.exp(-2 * (k * lam) ** 2)))
    return d, min(max(q, 0.0), 1.0)


def pit_uniformity(pit: Tensor, levels: Sequence[float] = (0.5, 0.9)) -> dict[str, float]:
    """How far PIT values are from ``U(0, 1)``: Kolmogorov-Smirnov statistic and p-value, interval coverage.

    ``coverage_50`` is the fraction of points inside the central 50% predictive interval, i.e. with
    ``|u - 0.5| <= 0.25`` (should be 0.5). The KS p-value (asymptotic, :func:`ks_uniform`) assumes independent
    points; the query points of one task share the posterior's error, so read it as a guide only.
    """
    u = pit.detach().reshape(-1).double().cpu().numpy()
    if u.size == 0:
        raise ValueError("no PIT values")
    statistic, pvalue = ks_uniform(u)
    out = {"ks_statistic": statistic, "ks_pvalue": pvalue, "num_points": int(u.size)}
    for level in levels:
        out[f"coverage_{round(100 * level)}"] = float(np.mean(np.abs(u - 0.5) <= level / 2))
    return out
