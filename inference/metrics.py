r"""What one meta-step's own adaptation says: :meth:`hbmeta.inference.learner.MetaLearner.meta_step`'s numbers.

A Bayesian algorithm's meta-gradient fits each task's posterior on its support set (GEM-BML+'s :math:`q_1`,
GEM-BML's posterior of the joint data); these numbers read that posterior at its mean, on the meta-batch the
gradient came from, before the prior moves. They cost one forward pass of the support and query sets and draw no
random numbers, so logging them leaves a run's parameters (and its resume) unchanged. Per task, averaged:

- ``batch_support_nll`` / ``batch_query_nll``: :math:`-\frac1N \log p(D \mid m)` per point at the posterior mean
  ``m`` (per-task latents besides the weights at their posterior medians);
- ``batch_kl``: :math:`\mathrm{KL}(q \,\|\, p(\theta; \Theta))` (diagonal Gaussian prior, mean-field or Delta
  posterior), and ``batch_inner_elbo = -(N_support \cdot batch\_support\_nll + batch\_kl)``, the inner ELBO on the
  support set with the likelihood at the mean;
- ``batch_query_loss``: the likelihood's point loss (MSE, cross-entropy) of the query set at the mean, and
  ``batch_query_accuracy`` for classification.

The training loop's monitor (:mod:`hbmeta.training.monitor`) reports the same quantities under the unprefixed names on
a separate monitoring batch, as expectations over the posterior.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hbmeta.inference.batch import TaskBatch
from hbmeta.inference.inner import diagonal_kl
from hbmeta.models.hierarchical import HierarchicalModel
from hbmeta.models.likelihoods import CategoricalLikelihood
from hbmeta.models.posterior import Posterior
from hbmeta.models.priors import DiagonalGaussianPrior, Prior

__all__ = ["batch_adaptation_metrics", "prior_scale_statistics"]


def _log_likelihood_at_mean(model: HierarchicalModel, posterior: Posterior, x: Tensor, y: Tensor,
                            f: Tensor | None = None) -> Tensor:
    """``log p(D | m)`` per task ``[T]``; latents besides the weights at their posterior medians. ``f``: the
    outputs ``f(x; m)`` ``[T, N, ...]`` if already computed."""
    likelihood = model.likelihood
    if posterior.latents:
        sites = model.latent_sites(x, y)
        likelihood = likelihood.condition({n: sites[n].constrain(p.loc) for n, p in posterior.latents.items()})
    f = model.net(posterior.loc.unsqueeze(0), x)[0] if f is None else f
    return likelihood.log_prob(f.unsqueeze(0), y)[0]


@torch.no_grad()
def batch_adaptation_metrics(model: HierarchicalModel, posterior: Posterior, batch: TaskBatch) -> dict[str, float]:
    """The module docstring's numbers for ``posterior`` (fitted to ``batch``'s support sets) under ``model``'s prior."""
    points = batch.x_train.shape[1]
    support = -_log_likelihood_at_mean(model, posterior, batch.x_train, batch.y_train) / points
    f = model.net(posterior.loc.unsqueeze(0), batch.x_val)[0]  # one forward pass for every query number
    query = -_log_likelihood_at_mean(model, posterior, batch.x_val, batch.y_val, f) / batch.x_val.shape[1]
    out = {"batch_support_nll": float(support.mean()), "batch_query_nll": float(query.mean())}
    # a Pyro program's point loss is its negative log-likelihood per point, which needs the latents: query_nll
    loss = query if model.likelihood.is_program else model.likelihood.point_loss(f, batch.y_val)
    out["batch_query_loss"] = float(loss.mean())
    if isinstance(model.likelihood, CategoricalLikelihood):
        out["batch_query_accuracy"] = float((f.argmax(-1) == batch.y_val).float().mean())
    prior = model.prior
    if isinstance(prior, DiagonalGaussianPrior) and posterior.kind in ("meanfield", "delta"):
        log_s = None if posterior.kind == "delta" else posterior.scale.log()
        kl = diagonal_kl(posterior.loc, log_s, prior.loc.detach(), prior.scale.detach())
        out["batch_kl"] = float(kl.mean())
        out["batch_inner_elbo"] = float((-(support * points) - kl).mean())
    return out


@torch.no_grad()
def prior_scale_statistics(prior: Prior) -> dict[str, float]:
    """``prior_scale`` (the mean of the prior's scale over the weights) and its min / median / max; nothing for a
    prior without a scale (particles)."""
    if not hasattr(prior, "scale"):
        return {}
    scale = prior.scale.detach().flatten().float()
    return {"prior_scale": float(scale.mean()), "prior_scale_min": float(scale.min()),
            "prior_scale_median": float(scale.median()), "prior_scale_max": float(scale.max())}
