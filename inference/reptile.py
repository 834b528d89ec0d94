r"""Reptile (Nichol et al. 2018) and pre-training: the delta corners of ``L[1]`` (GEM-BML section 4).

Reptile is GEM-BML with a Delta guide and a fixed prior scale: the meta-gradient of the mean is
:math:`\mu - \theta_\tau` with :math:`\theta_\tau` the weights after K inner steps on
:math:`D^{tr}_\tau \cup D^{val}_\tau` from :math:`\mu`. Letting the prior scale go to 0 instead gives
pre-training: :math:`\nabla_\mu \ell(D_\tau; \mu)`, one model fitted to all tasks' data.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hbmeta.inference.algorithm import Algorithm, LearnerState, register_algorithm
from hbmeta.inference.batch import TaskBatch
from hbmeta.inference.inner import InnerConfig, optimizer_adapt  # optimizer_adapt re-exported (its home is inner.py)
from hbmeta.models.hierarchical import HierarchicalModel

__all__ = ["optimizer_adapt", "reptile_gradient", "pretrain_gradient", "ReptileAlgorithm", "PretrainAlgorithm",
           "REPTILE", "PRETRAIN"]


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


class ReptileAlgorithm(Algorithm):
    """Reptile: a point estimate; adapts with the inner optimizer it meta-trained with (the base class's)."""

    name = "reptile"
    meta_loss = "L[1]"
    estimator = "GEM with a Delta guide, fixed scale"
    backprop_through_inner = False
    bayesian = False
    reference = "Nichol et al. 2018"
    description = "mu - theta_tau after K inner steps on each task's joint data"

    def meta_gradient(self, learner: LearnerState, batch: TaskBatch,
                      generator: torch.Generator | None = None) -> dict[str, Tensor]:
        return reptile_gradient(learner.model, batch, learner.inner)


class PretrainAlgorithm(Algorithm):
    """Pre-training: one model fitted to all tasks' data (the baseline with no inner loop in its meta-gradient)."""

    name = "pretrain"
    meta_loss = "L[1]"
    estimator = "GEM with a Delta prior (sigma -> 0)"
    backprop_through_inner = False
    bayesian = False
    reference = "GEM-BML sec. 4"
    description = "loss gradient at mu on all tasks' data"

    def meta_gradient(self, learner: LearnerState, batch: TaskBatch,
                      generator: torch.Generator | None = None) -> dict[str, Tensor]:
        return pretrain_gradient(learner.model, batch, learner.inner)


REPTILE = register_algorithm(ReptileAlgorithm())
PRETRAIN = register_algorithm(PretrainAlgorithm())
