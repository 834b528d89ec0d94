r"""iMAML (Rajeswaran et al. 2019): the implicit meta-gradient of a proximally regularised inner problem.

Each task solves (approximately, by K steps of the inner optimizer from the meta-parameters :math:`\mu`)

.. math::
    \theta^*_\tau(\mu) = \arg\min_\theta\ \ell(D^{tr}_\tau; \theta) + \frac\lambda2 \|\theta - \mu\|^2 ,

and, by the implicit function theorem at the optimum (their Lemma 1 and eq. 7),

.. math::
    g_\tau = \frac{d\,\ell(D^{val}_\tau; \theta^*_\tau(\mu))}{d\mu}
           = \Big(I + \frac1\lambda \nabla^2_\theta \ell(D^{tr}_\tau; \theta^*_\tau)\Big)^{-1}
             \nabla_\theta \ell(D^{val}_\tau; \theta^*_\tau) ,

solved with a few conjugate-gradient iterations on Hessian-vector products (their Algorithm 2). The
meta-gradient needs only :math:`\theta^*_\tau`, never the graph of the inner loop, so its memory is flat in K.
``l`` is the likelihood's conventional loss (MSE / cross entropy), as for MAML.

All ``T`` tasks run at once: the summed loss is a sum of per-task losses over disjoint rows of
``theta [T, P]``, so one Hessian-vector product of the sum gives every task's, and CG runs per task with
``[T]``-vectors of step sizes.

References:
    [1] Rajeswaran, A., Finn, C., Kakade, S. & Levine, S. Meta-Learning with Implicit Gradients. NeurIPS 2019.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from hbmeta.inference.algorithm import Algorithm, LearnerState, register_algorithm
from hbmeta.inference.batch import TaskBatch
from hbmeta.inference.implicit import conjugate_gradient
from hbmeta.inference.inner import InnerConfig, InnerLoopDivergedError, clip_per_task, make_optimizer
from hbmeta.models.hierarchical import HierarchicalModel
from hbmeta.models.posterior import Posterior

__all__ = ["proximal_adapt", "conjugate_gradient", "implicit_meta_gradient", "imaml_gradient", "imaml_adapt",
           "IMAMLAlgorithm", "IMAML"]


def proximal_adapt(model: HierarchicalModel, mu: Tensor, x: Tensor, y: Tensor, lam: float, steps: int, lr: float,
                   optimizer: str = "sgd", clip_norm: float | None = None,
                   callback: Callable[[int, Tensor], None] | None = None) -> Tensor:
    r"""K steps of ``optimizer`` on :math:`\ell(D_\tau; \theta) + \frac\lambda2\|\theta - \mu\|^2` from ``mu``.

    All tasks at once; ``mu [P]`` or ``[T, P]``; returns the detached ``theta [T, P]``. ``clip_norm`` clips
    each task's gradient (as :class:`~hbmeta.inference.inner.InnerConfig` does for VI). ``callback(step, theta)`` is
    called before the first step and after every step.

    Raises:
        InnerLoopDivergedError: when a task's weights become NaN / inf.
    """
    mu = mu.detach()
    theta = mu.expand(x.shape[0], -1).clone().requires_grad_()
    opt = make_optimizer(optimizer, [theta], lr)
    if callback is not None:
        callback(0, theta.detach())
    for step in range(1, steps + 1):
        opt.zero_grad(set_to_none=True)
        loss = model.point_loss(theta, x, y).sum() + 0.5 * lam * (theta - mu).pow(2).sum()
        loss.backward()
        if clip_norm is not None:
            clip_per_task([theta], clip_norm)
        opt.step()
        if callback is not None:
            callback(step, theta.detach())
    if not torch.isfinite(theta).all():
        bad = (~torch.isfinite(theta)).any(-1).nonzero().flatten().tolist()
        raise InnerLoopDivergedError(f"iMAML's inner problem diverged within {steps} steps for task(s) {bad}; "
                                     f"lower the inner learning rate (now {lr}) or set clip_norm")
    return theta.detach()


def implicit_meta_gradient(model: HierarchicalModel, theta: Tensor, x: Tensor, y: Tensor, v: Tensor, lam: float,
                           cg_steps: int, damping: float = 0.0) -> Tensor:
    r"""Solve :math:`\big((1 + \delta) I + \frac1\lambda \nabla^2_\theta \ell(D_\tau; \theta_\tau)\big) g_\tau = v_\tau` by CG.

    ``theta [T, P]`` the inner solutions, ``x, y`` the support sets, ``v [T, P]`` the query-loss gradients.
    ``damping`` :math:`\delta` (default 0: the paper's equation) is the reference code's ``cg_damping``-style
    stabiliser for indefinite Hessians. Returns ``g [T, P]`` (detached).
    """
    theta = theta.detach().requires_grad_()
    (grad,) = torch.autograd.grad(model.point_loss(theta, x, y).sum(), theta, create_graph=True)

    def matvec(p: Tensor) -> Tensor:
        (hvp,) = torch.autograd.grad(grad, theta, grad_outputs=p, retain_graph=True)
        return (1.0 + damping) * p + hvp / lam

    return conjugate_gradient(matvec, v.detach(), cg_steps).detach()


def imaml_gradient(model: HierarchicalModel, batch: TaskBatch, config: InnerConfig,
                   damping: float = 0.0) -> dict[str, Tensor]:
    r"""iMAML: ``{"mu": mean_tau g_tau}``, a descent direction of the mean query loss (eq. 7 of [1]).

    The inner problem runs ``config.steps`` steps of ``config.optimizer`` at ``config.lr`` with
    :math:`\lambda` = ``config.imaml_lambda``; CG takes ``config.cg_steps`` iterations.
    """
    lam = config.imaml_lambda
    theta = proximal_adapt(model, model.prior.loc, batch.x_train, batch.y_train, lam, config.steps, config.lr,
                           config.optimizer, config.clip_norm).requires_grad_()
    (v,) = torch.autograd.grad(model.point_loss(theta, batch.x_val, batch.y_val).sum(), theta)
    g = implicit_meta_gradient(model, theta, batch.x_train, batch.y_train, v, lam, config.cg_steps, damping)
    return {"mu": g.mean(0)}


def imaml_adapt(model: HierarchicalModel, x: Tensor, y: Tensor, config: InnerConfig, steps: int | None = None,
                callback: Callable[[int, Posterior], None] | None = None) -> Posterior:
    """Meta-test: the same proximal inner problem as in meta-training, from the learned ``mu``; a point mass."""
    cb = None if callback is None else (lambda k, th: callback(k, Posterior(th)))
    theta = proximal_adapt(model, model.prior.loc, x, y, config.imaml_lambda,
                           config.steps if steps is None else steps, config.lr, config.optimizer, config.clip_norm, cb)
    return Posterior(theta)


class IMAMLAlgorithm(Algorithm):
    """iMAML: a point estimate that adapts (in meta-training and at meta-test) by its proximal inner problem."""

    name = "imaml"
    meta_loss = "L[2]"
    estimator = "implicit gradient (CG on the regularised inner problem)"
    backprop_through_inner = False
    bayesian = False
    reference = "Rajeswaran et al. 2019"
    description = "implicit-function-theorem gradient of the proximal inner solution's query loss"

    def meta_gradient(self, learner: LearnerState, batch: TaskBatch,
                      generator: torch.Generator | None = None) -> dict[str, Tensor]:
        return imaml_gradient(learner.model, batch, learner.inner)

    def adapt(self, learner: LearnerState, x: Tensor, y: Tensor, inner: InnerConfig, steps: int,
              generator: torch.Generator | None = None,
              callback: Callable[[int, Posterior], None] | None = None) -> Posterior:
        return imaml_adapt(learner.model, x, y, inner, steps, callback)

    def default_inner(self, gauss_newton: bool) -> InnerConfig:
        """20 SGD steps at 0.005 on the proximal problem with lambda = 10 (about 1 / (K lr): the K steps then nearly
        solve it, which the implicit gradient assumes), 5 CG steps, per-task clipping at norm 50 as a guard (its
        meta-gradient cannot see the inner loop diverge, as MAML's can); memory does not grow with K."""
        return InnerConfig(steps=20, lr=0.005, optimizer="sgd", clip_norm=50.0, imaml_lambda=10.0, cg_steps=5)


IMAML = register_algorithm(IMAMLAlgorithm())
