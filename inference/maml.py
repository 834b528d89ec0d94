r"""MAML and first-order MAML (Finn et al. 2017): the delta-posterior corner of ``L[2]`` (GEM-BML section 4).

.. math::
    \theta_\tau = \mu - \alpha \nabla_\theta \ell(D^{tr}_\tau; \theta)\ (\text{K steps}), \qquad
    g = \nabla_\mu \ell(D^{val}_\tau; \theta_\tau(\mu))

MAML backpropagates through the K inner SGD steps (``create_graph=True``; memory linear in K); first-order
MAML drops the second-order terms and uses :math:`\nabla_\theta \ell(D^{val}; \theta_\tau)` at the adapted
weights. ``l`` is the likelihood's conventional loss (MSE / cross entropy), as in the MAML papers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hbmeta.inference.algorithm import Algorithm, LearnerState, register_algorithm
from hbmeta.inference.batch import TaskBatch
from hbmeta.inference.inner import InnerConfig, sgd_adapt  # sgd_adapt re-exported (its home is inner.py)
from hbmeta.models.hierarchical import HierarchicalModel

__all__ = ["sgd_adapt", "maml_gradient", "fomaml_gradient", "MAMLAlgorithm", "FOMAMLAlgorithm", "MAML", "FOMAML"]


def maml_gradient(model: HierarchicalModel, batch: TaskBatch, config: InnerConfig) -> dict[str, Tensor]:
    """Second-order MAML: ``grad_mu mean_tau l(D_val; theta_tau(mu))`` through the unrolled inner loop."""
    mu = model.prior.loc
    theta = sgd_adapt(model, mu.expand(batch.num_tasks, -1), batch.x_train, batch.y_train, config.steps, config.lr,
                      create_graph=True)
    loss = model.point_loss(theta, batch.x_val, batch.y_val).mean()
    (grad,) = torch.autograd.grad(loss, mu)
    return {"mu": grad}


def fomaml_gradient(model: HierarchicalModel, batch: TaskBatch, config: InnerConfig) -> dict[str, Tensor]:
    """First-order MAML: ``mean_tau grad_theta l(D_val; theta)`` at the adapted weights (no second order)."""
    mu = model.prior.loc.detach()
    theta = sgd_adapt(model, mu.expand(batch.num_tasks, -1), batch.x_train, batch.y_train, config.steps, config.lr)
    theta = theta.detach().requires_grad_()
    loss = model.point_loss(theta, batch.x_val, batch.y_val).sum()
    (grad,) = torch.autograd.grad(loss, theta)
    return {"mu": grad.mean(0)}


class MAMLAlgorithm(Algorithm):
    """MAML: a point estimate; adapts by its inner SGD (the base class's defaults: SGD at 0.01)."""

    name = "maml"
    meta_loss = "L[2]"
    estimator = "unrolled SGD, second order"
    backprop_through_inner = True
    bayesian = False
    reference = "Finn et al. 2017"
    description = "query loss after K inner SGD steps, differentiated through them"

    def meta_gradient(self, learner: LearnerState, batch: TaskBatch,
                      generator: torch.Generator | None = None) -> dict[str, Tensor]:
        return maml_gradient(learner.model, batch, learner.inner)


class FOMAMLAlgorithm(Algorithm):
    """First-order MAML: as MAML without the second-order terms."""

    name = "fomaml"
    meta_loss = "L[2]"
    estimator = "first-order approximation"
    backprop_through_inner = False
    bayesian = False
    reference = "Finn et al. 2017"
    description = "query-loss gradient at the adapted weights"

    def meta_gradient(self, learner: LearnerState, batch: TaskBatch,
                      generator: torch.Generator | None = None) -> dict[str, Tensor]:
        return fomaml_gradient(learner.model, batch, learner.inner)


MAML = register_algorithm(MAMLAlgorithm())
FOMAML = register_algorithm(FOMAMLAlgorithm())
