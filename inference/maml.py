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

from hbmeta.inference.batch import TaskBatch
from hbmeta.inference.inner import InnerConfig
from hbmeta.models.hierarchical import HierarchicalModel

__all__ = ["sgd_adapt", "maml_gradient", "fomaml_gradient"]


def sgd_adapt(model: HierarchicalModel, theta: Tensor, x: Tensor, y: Tensor, steps: int, lr: float,
              create_graph: bool = False, callback=None) -> Tensor:
    """``steps`` plain SGD steps on each task's loss, all tasks at once; ``theta [T, P]``."""
    if not create_graph:
        theta = theta.detach().requires_grad_()
    if callback is not None:
        callback(0, theta.detach())
    for step in range(1, steps + 1):
        loss = model.point_loss(theta, x, y).sum()
        (grad,) = torch.autograd.grad(loss, theta, create_graph=create_graph)
        theta = theta - lr * grad
        if not create_graph:
            theta = theta.detach().requires_grad_()
        if callback is not None:
            callback(step, theta.detach())
    return theta


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
