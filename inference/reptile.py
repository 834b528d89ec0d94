r"""Reptile (Nichol et al. 2018) and pre-training: the delta corners of ``L[1]`` (GEM-BML section 4).

Reptile is GEM-BML with a Delta guide and a fixed prior scale: the meta-gradient of the mean is
:math:`\mu - \theta_\tau` with :math:`\theta_\tau` the weights after K inner steps on
:math:`D^{tr}_\tau \cup D^{val}_\tau` from :math:`\mu`. Letting the prior scale go to 0 instead gives
pre-training: :math:`\nabla_\mu \ell(D_\tau; \mu)`, one model fitted to all tasks' data.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hbmeta.inference.batch import TaskBatch
from hbmeta.inference.inner import InnerConfig, make_optimizer
from hbmeta.models.hierarchical import HierarchicalModel

__all__ = ["optimizer_adapt", "reptile_gradient", "pretrain_gradient"]


def optimizer_adapt(model: HierarchicalModel, theta: Tensor, x: Tensor, y: Tensor, config: InnerConfig,
                    steps: int | None = None, callback=None) -> Tensor:
    """K steps of the configured torch optimizer on each task's loss, all tasks at once; ``theta [T, P]``.

    ``callback(step, theta)`` is called before the first step and after every step (for evaluation)."""
    theta = theta.detach().clone().requires_grad_()
    opt = make_optimizer(config.optimizer, [theta], config.lr)
    if callback is not None:
        callback(0, theta.detach())
    for step in range(1, (config.steps if steps is None else steps) + 1):
        opt.zero_grad(set_to_none=True)
        model.point_loss(theta, x, y).sum().backward()
        opt.step()
        if callback is not None:
            callback(step, theta.detach().clone())
    return theta.detach()


def reptile_gradient(model: HierarchicalModel, batch: TaskBatch, config: InnerConfig) -> dict[str, Tensor]:
    """Reptile: ``mean_tau (mu - theta_tau)`` (a descent direction for the mean)."""
    mu = model.prior.loc.detach()
    x, y = batch.joint()
    theta = optimizer_adapt(model, mu.expand(batch.num_tasks, -1), x, y, config)
    return {"mu": (mu - theta).mean(0)}


def pretrain_gradient(model: HierarchicalModel, batch: TaskBatch, config: InnerConfig) -> dict[str, Tensor]:
    """Pre-training: ``grad_mu mean_tau l(D_tr u D_val; mu)``."""
    mu = model.prior.loc
    x, y = batch.joint()
    loss = model.point_loss(mu.expand(batch.num_tasks, -1), x, y).mean()
    (grad,) = torch.autograd.grad(loss, mu)
    return {"mu": grad}
