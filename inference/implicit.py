r"""Implicit meta-gradients through the inner VI's optimality condition (iBaML [1]; GEM-BML+'s shared weights).

The inner update finds each task's variational parameters :math:`\lambda^*_\tau = \arg\min_\lambda F_\tau(\lambda,
\Theta)` (:func:`hbmeta.inference.inner.fit_posterior`). A meta-loss :math:`L_\tau(\lambda^*_\tau(\Theta), \Theta)` then
has, by the implicit function theorem at :math:`\nabla_\lambda F_\tau = 0`,

.. math::
    \frac{dL_\tau}{d\Theta} = \partial_\Theta L_\tau - \Big(\frac{\partial^2 F_\tau}{\partial\Theta\,\partial\lambda}\Big)^{\!\top}
        \big(\nabla^2_\lambda F_\tau + \delta I\big)^{-1} \nabla_\lambda L_\tau ,

solved per task by batched conjugate gradients on Hessian-vector products: nothing backpropagates through the inner
loop's steps, so memory is flat in them. :mod:`hbmeta.inference.ibaml` differentiates the query likelihood in the
prior's hyperparameters and the network's hidden ones this way; GEM-BML+ does it for the hidden (shared) weights
only (:func:`implicit_shared_gradient`), where Fisher's identity gives a weak signal (README, "Few-shot Omniglot").

[1] Zhang, Y., Li, B., Gao, S. & Giannakis, G. B. Scalable Bayesian Meta-Learning through Generalized Implicit
    Gradients. AAAI 2023.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from hbmeta.inference.batch import TaskBatch
from hbmeta.inference.inner import diagonal_kl
from hbmeta.models.hierarchical import HierarchicalModel
from hbmeta.models.jacobian import output_jacobian
from hbmeta.models.likelihoods import EXPECTATION_DRAWS, gaussian_draws
from hbmeta.models.posterior import Posterior

__all__ = ["conjugate_gradient", "vi_implicit_gradient", "implicit_shared_gradient", "support_objective", "query_nll_at_mean",
           "query_nll_predictive",
           "SHARED_PREFIX", "LIKELIHOOD_PREFIX", "IMPLICIT_DAMPING"]

#: key prefix of the network's hidden (shared, point-estimate) parameters in a meta-gradient
SHARED_PREFIX = "net."
#: per-task gradients of the likelihood's own parameters are keyed ``"likelihood.<name>"``
LIKELIHOOD_PREFIX = "likelihood."
#: ``delta`` added to the Hessian of the inner objective before the CG solve (units of its curvature, which the
#: prior's precision ``1 / sigma^2``, 25 at the default sd 0.2, sets from below): a stabiliser where the network's
#: Hessian is indefinite, small against the prior's precision
IMPLICIT_DAMPING = 1.0


def _safe_divide(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` where ``den != 0``, else 0 (CG has converged exactly for that task)."""
    nonzero = den != 0
    return torch.where(nonzero, num / torch.where(nonzero, den, torch.ones_like(den)), torch.zeros_like(num))


def conjugate_gradient(matvec: Callable[[Tensor], Tensor], b: Tensor, steps: int) -> Tensor:
    r"""``steps`` iterations of CG for :math:`A_\tau x_\tau = b_\tau`, each row ``tau`` of ``b [T, P]`` its own system.

    ``matvec(v [T, P]) -> [T, P]`` applies every task's (symmetric) matrix to its row. Starts at 0, so one
    iteration returns a multiple of ``b``; ``P`` iterations solve a positive-definite system exactly (up to
    rounding). Step sizes ``alpha`` and ``beta`` are ``[T]`` vectors, so the tasks never mix.

    A task whose search direction meets non-positive curvature :math:`p^\top A p \le 0` (an indefinite
    ``A``, or an exact solve) stops there, as truncated CG does (Steihaug 1983); if that happens on its first
    iteration, the task returns ``b`` itself (the first-order answer, ``A = I``).
    """
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rr = (r * r).sum(-1)
    active = torch.ones_like(rr, dtype=torch.bool)
    for step in range(steps):
        ap = matvec(p)
        pap = (p * ap).sum(-1)
        active = active & (pap > 0)
        if step == 0:
            at_start = ~active
        alpha = torch.where(active, _safe_divide(rr, pap), torch.zeros_like(rr))
        x = x + alpha.unsqueeze(-1) * p
        r = r - alpha.unsqueeze(-1) * ap
        rr_new = (r * r).sum(-1)
        p = r + _safe_divide(rr_new, rr).unsqueeze(-1) * p
        rr = rr_new
    return torch.where(at_start.unsqueeze(-1), b, x) if steps > 0 else x


def vi_implicit_gradient(objective: Callable[[Tensor], Tensor], meta_loss: Callable[[Tensor], Tensor],
                         optimum: Tensor, hyper: list[Tensor], cg_steps: int, damping: float = 0.0
                         ) -> tuple[list[Tensor], Tensor]:
    r"""``dL/dTheta`` of ``L(lambda*(Theta))`` through the optimality condition of ``lambda* = argmin F(., Theta)``.

    Args:
        objective: ``F(lam) -> scalar``, the inner objective summed over tasks (it reads ``hyper`` itself);
            ``lam [T, D]`` holds each task's variational parameters in a row (tasks must not interact in ``F``).
        meta_loss: ``L(lam) -> scalar``, the meta-loss summed over tasks.
        optimum: ``lam* [T, D]`` where ``grad_lam F = 0`` (the inner VI's answer).
        hyper: the meta-parameters ``Theta`` (tensors with ``requires_grad``) that ``F`` depends on.
        cg_steps, damping: CG iterations per task and ``delta`` of :math:`(\nabla^2 F + \delta I) w = \nabla L`.

    Returns:
        ``([dL/dTheta_i], w)``: the gradient (summed over tasks, detached) and the solve ``w [T, D]``. A
        meta-parameter that ``L`` also reads directly (a hidden, shared network weight) gets its partial derivative
        added to the implicit term: :math:`dL/d\Theta = \partial_\Theta L - (\partial^2_{\Theta\lambda} F)^\top w`.
    """
    lam = optimum.detach().requires_grad_()
    dl, *direct = torch.autograd.grad(meta_loss(lam), [lam, *hyper], allow_unused=True)
    (df,) = torch.autograd.grad(objective(lam), lam, create_graph=True)

    def hvp(v: Tensor) -> Tensor:
        (hv,) = torch.autograd.grad(df, lam, grad_outputs=v, retain_graph=True)
        return hv + damping * v

    w = conjugate_gradient(hvp, dl.detach(), cg_steps).detach()
    mixed = torch.autograd.grad(df, hyper, grad_outputs=w, allow_unused=True)
    total = []
    for g, d, h in zip(mixed, direct, hyper):
        part = torch.zeros_like(h) if g is None else -g.detach()
        total.append(part if d is None else part + d.detach())
    return total, w


def support_objective(model: HierarchicalModel, prior_loc: Tensor, prior_scale: Tensor, x: Tensor, y: Tensor
                      ) -> Callable[[Tensor], Tensor]:
    """``F(lam)`` for ``lam = [m, log s] [T, 2P]``: ``KL(q || N(prior_loc, prior_scale^2)) - log p(D | m)`` summed over
    tasks (the likelihood at the mean: the objective whose stationary point the Gauss-Newton VI mean satisfies)."""

    def objective(lam: Tensor) -> Tensor:
        m, log_s = lam.chunk(2, dim=-1)
        return (diagonal_kl(m, log_s, prior_loc, prior_scale) - model.log_likelihood(m.unsqueeze(0), x, y)[0]).sum()

    return objective


def query_nll_at_mean(model: HierarchicalModel, x: Tensor, y: Tensor) -> Callable[[Tensor], Tensor]:
    """``L(lam)``: the query negative log-likelihood at the posterior mean, summed over tasks."""

    def meta_loss(lam: Tensor) -> Tensor:
        return -model.log_likelihood(lam.chunk(2, dim=-1)[0].unsqueeze(0), x, y)[0].sum()

    return meta_loss


def query_nll_predictive(model: HierarchicalModel, x: Tensor, y: Tensor, spread: Tensor) -> Callable[[Tensor], Tensor]:
    r"""``L(lam)``: the query negative log-likelihood of the posterior predictive, Bayesian model averaging per point,
    :math:`-\sum_n \log \frac1K \sum_k p(y_n \mid f(x_n; m) + \xi_{nk})`, summed over tasks, where ``spread [K, T, N, O]``
    holds fixed draws :math:`\xi` of the predictive's spread in function space (the linearised posterior's; held
    constant: the mean's outputs carry the gradient)."""

    def meta_loss(lam: Tensor) -> Tensor:
        m = lam.chunk(2, dim=-1)[0]
        f = model.net(m.unsqueeze(0), x)[0]                                                   # [T, N, *out]
        num_draws, (num_tasks, num_points) = spread.shape[0], f.shape[:2]
        draws = f.unsqueeze(0) + spread.reshape(num_draws, *f.shape)
        per_point = model.likelihood.log_prob(draws.reshape(num_draws, num_tasks * num_points, 1, *f.shape[2:]),
                                              y.reshape(num_tasks * num_points, 1, *y.shape[2:]))   # [K, T N]
        return -(torch.logsumexp(per_point, 0) - math.log(num_draws)).sum()

    return meta_loss


def implicit_shared_gradient(model: HierarchicalModel, posterior: Posterior, batch: TaskBatch, cg_steps: int,
                             damping: float = IMPLICIT_DAMPING, predictive: bool = False) -> dict[str, Tensor]:
    r"""The hidden (shared) weights' gradient of the query log-likelihood at the support posterior's mean,
    :math:`\log p(D^{val} \mid m^*(\phi), \phi)`, through the support VI's optimality condition (module docstring):
    the direct term (the query's features) and the implicit one (the support's features move the posterior). An
    ascent direction, keyed ``"net.<name>"`` with ``T`` equal rows (the batch's gradient over ``T``), as
    :func:`hbmeta.inference.gem.shared_gem_gradient` returns; empty when nothing is hidden."""
    hidden = model.net.hidden
    if not hidden:
        return {}
    prior = model.prior
    optimum = torch.cat([posterior.loc, posterior.scale.log()], dim=-1).detach()
    objective = support_objective(model, prior.loc.detach(), prior.scale.detach(), batch.x_train, batch.y_train)
    if predictive:  # the spread of the predictive the learner evaluates with (posterior.function_covariance)
        with torch.no_grad():
            _, jac = output_jacobian(model.net, posterior.loc, batch.x_val)
            spread = gaussian_draws(posterior.function_covariance(jac), EXPECTATION_DRAWS)
        meta_loss = query_nll_predictive(model, batch.x_val, batch.y_val, spread)
    else:
        meta_loss = query_nll_at_mean(model, batch.x_val, batch.y_val)
    grads, _ = vi_implicit_gradient(objective, meta_loss, optimum, list(hidden.values()), cg_steps, damping)
    num_tasks = posterior.loc.shape[0]
    return {SHARED_PREFIX + n: (-g / num_tasks).expand(num_tasks, *g.shape) for n, g in zip(hidden, grads)}
