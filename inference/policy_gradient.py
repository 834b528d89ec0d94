r"""Policy gradient as a likelihood, and the RL inner / meta updates (GEM-BML section 5.3, appendix B.1).

**Likelihood.** Appendix B.1 turns a policy-gradient loss into a generative model of the task's rollouts,
``log p(D | theta) = -L(D, f_theta)``. With the REINFORCE surrogate (Williams 1992) and advantages
``A_n`` (baseline-corrected, normalised; fixed numbers of the data)

.. math:: \log p(D \mid \theta) = \sum_{n} A_n \log \pi(a_n \mid x_n; \theta),

whose gradient at the behaviour policy is the policy-gradient estimate. :class:`PolicyGradientLikelihood`
plugs it into :class:`~hbmeta.models.hierarchical.HierarchicalModel`, so the inner VI update is the package's
:func:`~hbmeta.inference.inner.fit_posterior` on the ELBO ``E_q log p(D | theta) - KL(q || p)``.

**Inner updates** (both act on the per-task guide, all tasks at once):

- :func:`pg_posterior`: SGD on ``ELBO / N`` (``N`` = steps in the data), i.e. REINFORCE on the mean surrogate
  with MAML's learning rate (0.1), with reparameterised draws ``theta ~ q`` and the KL to the prior.
- :func:`trpo_posterior`: TRPO (Schulman et al. 2015) on the guide's mean: natural-gradient direction by
  conjugate gradient on the Fisher matrix of the mean policy KL, step to ``KL = max_kl``, backtracking line
  search that keeps ``KL <= max_kl`` and improves ``E[ratio A]``. The guide's scale is kept.

**Point baselines:** :func:`pg_step` (MAML's inner SGD step) and :func:`maml_trpo_step`, MAML's meta-update:
TRPO on ``mu`` through the inner step (second and third derivatives), as in MAML's RL code.

References:
    [1] Zou & Lu, Gradient-EM Bayesian Meta-learning, NeurIPS 2020. [2] Finn et al., Model-Agnostic
    Meta-Learning, ICML 2017. [3] Schulman et al., Trust Region Policy Optimization, ICML 2015.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pyro.distributions as dist
import torch
from torch import Tensor

from hbmeta.inference.inner import InnerConfig, fit_posterior
from hbmeta.inference.policy_data import PolicyData
from hbmeta.models.functional import BatchedNet
from hbmeta.models.guides import Guide
from hbmeta.models.hierarchical import HierarchicalModel
from hbmeta.models.likelihoods import Likelihood
from hbmeta.models.policy import gaussian_kl, gaussian_log_prob
from hbmeta.models.posterior import Posterior

__all__ = [
    "PolicyGradientLikelihood",
    "conjugate_gradient",
    "maml_trpo_step",
    "pg_posterior",
    "pg_step",
    "surrogate",
    "trpo_posterior",
]


class PolicyGradientLikelihood(Likelihood):
    r"""``log p(D | theta) = sum_n A_n log pi(a_n | x_n; theta)`` (appendix B.1).

    ``pred [*S, T, N, 2A]`` is the policy output ``[mean, log_std]``; the targets ``y [T, N, A + 1]`` hold the
    actions and the advantage weights (:meth:`PolicyData.targets`). ``point_loss`` is MAML's loss: minus the
    mean surrogate over the ``N`` steps.
    """

    def log_prob(self, pred: Tensor, y: Tensor) -> Tensor:
        return (y[..., -1] * gaussian_log_prob(pred, y[..., :-1])).sum(-1)

    def point_loss(self, pred: Tensor, y: Tensor) -> Tensor:
        return -self.log_prob(pred, y) / y.shape[-2]

    def distribution(self, pred: Tensor) -> dist.TorchDistribution:
        raise NotImplementedError("the policy-gradient surrogate is an unnormalised likelihood: use log_prob "
                                  "(the inner update's analytic ELBO path does)")

    def __repr__(self) -> str:
        return "PolicyGradientLikelihood()"


def surrogate(net: BatchedNet, theta: Tensor, data: PolicyData, old_log_prob: Tensor | None = None) -> Tensor:
    r"""Mean surrogate per task ``[*S, T]``: ``(1/N) sum_n A_n log pi(a_n|x_n)`` or, with ``old_log_prob``,
    the importance-ratio form ``(1/N) sum_n A_n pi(a_n|x_n) / pi_old(a_n|x_n)`` (same gradient at ``pi_old``)."""
    log_prob = gaussian_log_prob(net(theta, data.obs), data.actions)
    weights = data.advantages * data.mask
    if old_log_prob is not None:
        return (weights * torch.exp(log_prob - old_log_prob)).sum(-1) / data.obs.shape[1]
    return (weights * log_prob).sum(-1) / data.obs.shape[1]


def pg_step(net: BatchedNet, theta: Tensor, data: PolicyData, lr: float, create_graph: bool = False) -> Tensor:
    r"""One REINFORCE step per task, ``theta + lr grad_theta S(theta)`` for ``theta [T, P]`` (MAML's inner update)."""
    if not theta.requires_grad:
        theta = theta.detach().requires_grad_()
    (grad,) = torch.autograd.grad(surrogate(net, theta, data).sum(), theta, create_graph=create_graph)
    return theta + lr * grad


def pg_posterior(model: HierarchicalModel, guide: Guide, data: PolicyData, start: Posterior,
                 prior: dist.TorchDistribution | None, lr: float, steps: int = 1, num_samples: int = 1,
                 generator: torch.Generator | None = None) -> Posterior:
    r"""VI by vanilla policy gradient: ``steps`` SGD steps of size ``lr`` on ``ELBO / N`` from ``start``.

    .. math:: \lambda \leftarrow \lambda + \frac{lr}{N} \nabla_\lambda \Big[\mathbb{E}_{q_\lambda} \sum_n A_n
              \log \pi(a_n|x_n;\theta) - \mathrm{KL}(q_\lambda \| p)\Big]

    ``prior`` is the prior inside the ELBO (``None``: the model's ``p(theta; Theta)``).
    """
    config = InnerConfig(steps=steps, lr=lr / data.obs.shape[1], optimizer="sgd", num_samples=num_samples)
    return fit_posterior(model, guide, data.obs, data.targets(), start, prior=prior, config=config,
                         generator=generator)


def conjugate_gradient(matvec: Callable[[Tensor], Tensor], b: Tensor, iters: int = 10) -> Tensor:
    """Solve ``A x = b`` row by row (``b [T, P]``, ``A`` symmetric positive definite per row) by CG."""
    x = torch.zeros_like(b)
    r, p = b.clone(), b.clone()
    rr = (r * r).sum(-1, keepdim=True)
    for _ in range(iters):
        ap = matvec(p)
        alpha = rr / ((p * ap).sum(-1, keepdim=True) + 1e-20)
        x = x + alpha * p
        r = r - alpha * ap
        rr_new = (r * r).sum(-1, keepdim=True)
        p = r + rr_new / (rr + 1e-20) * p
        rr = rr_new
    return x


def _mean_policy_kl(net: BatchedNet, old_out: Tensor, theta: Tensor, data: PolicyData) -> Tensor:
    """``mean_n KL(pi_old(.|x_n) || pi_theta(.|x_n))`` per task ``[T]`` over valid steps."""
    kl = gaussian_kl(old_out, net(theta, data.obs))
    return (kl * data.mask).sum(-1) / data.mask.sum(-1)


def trpo_posterior(model: HierarchicalModel, data: PolicyData, start: Posterior, max_kl: float = 0.01,
                   cg_iters: int = 10, damping: float = 1e-5, backtracks: int = 10) -> Posterior:
    r"""VI update by TRPO on the guide's mean ``m`` (all tasks at once, each task its own trust region).

    Maximises :math:`f(m) = \frac1N \sum_n A_n \pi_m(a_n|x_n) / \pi_{m_0}(a_n|x_n)` subject to
    :math:`\bar{KL}(\pi_{m_0} \| \pi_m) \le \delta`: direction :math:`s = F^{-1} \nabla f` by CG (``F`` = Hessian of
    the mean KL at ``m_0``, plus ``damping I``), full step :math:`\sqrt{2\delta / s^\top F s}\, s`, halved until
    the KL bound holds and ``f`` improves (else the task keeps ``m_0``). The update starts at the guide
    (the prior, or ``q_tr``), where the gradient of ``KL(q || p)`` vanishes, so - like one PG step of VI - the
    step itself sees the data term only; the trust region plays the prior's part of keeping ``m`` near ``m_0``.
    The guide's scale is kept.
    """
    if not max_kl > 0:
        raise ValueError(f"max_kl must be positive; got {max_kl}")
    net, m0 = model.net, start.loc.detach()
    with torch.no_grad():
        old_out = net(m0, data.obs)
        old_log_prob = gaussian_log_prob(old_out, data.actions)

    def objective(m: Tensor) -> Tensor:
        return surrogate(net, m, data, old_log_prob)

    m_kl = m0.clone().requires_grad_()  # the KL's gradient graph is built once and reused by every product
    (kl_grad,) = torch.autograd.grad(_mean_policy_kl(net, old_out, m_kl, data).sum(), m_kl, create_graph=True)

    def fisher_vector(v: Tensor) -> Tensor:
        (hv,) = torch.autograd.grad((kl_grad * v).sum(), m_kl, retain_graph=True)
        return hv + damping * v

    m = m0.clone().requires_grad_()
    f0 = objective(m)
    (grad,) = torch.autograd.grad(f0.sum(), m)
    direction = conjugate_gradient(fisher_vector, grad, cg_iters)
    shs = (direction * fisher_vector(direction)).sum(-1, keepdim=True).clamp_min(1e-20)
    full_step = direction * torch.sqrt(2 * max_kl / shs)
    new, accepted = m0.clone(), torch.zeros(m0.shape[0], dtype=torch.bool, device=m0.device)
    with torch.no_grad():
        f0 = f0.detach()
        for j in range(backtracks):
            candidate = m0 + 0.5 ** j * full_step
            ok = (~accepted) & (_mean_policy_kl(net, old_out, candidate, data) <= max_kl) & (objective(candidate) > f0)
            new[ok] = candidate[ok]
            accepted |= ok
            if accepted.all():
                break
    return Posterior(new, None if start.scale is None else start.scale.detach())


def maml_trpo_step(net: BatchedNet, mu: Tensor, train: PolicyData, val: PolicyData, adapted_old: Tensor, lr: float,
                   max_kl: float = 0.01, cg_iters: int = 10, damping: float = 1e-5, backtrack_ratio: float = 0.8,
                   backtracks: int = 15) -> dict[str, float]:
    r"""MAML's meta-update with TRPO (Finn et al. 2017, sec. 5.3; their rllab code), in place on ``mu [P]``.

    With :math:`\theta'_\tau(\mu) = \mu + lr \nabla_\mu S_\tau^{tr}(\mu)` (graph kept), maximise
    :math:`J(\mu) = \frac1T \sum_\tau \frac1N \sum_n A_n \pi_{\theta'_\tau(\mu)}(a_n|x_n) / \pi_{old}(a_n|x_n)` on the
    validation rollouts subject to :math:`\frac1T\sum_\tau \bar{KL}(\pi_{old} \| \pi_{\theta'_\tau(\mu)}) \le \delta`;
    ``pi_old`` is the adapted policy that collected them (``adapted_old [T, P]``). Fisher-vector products
    differentiate through the inner step. Returns the accepted step's KL and improvement.
    """
    num_tasks = adapted_old.shape[0]
    with torch.no_grad():
        old_out = net(adapted_old, val.obs)
        old_log_prob = gaussian_log_prob(old_out, val.actions)

    def adapted(m: Tensor, create_graph: bool = True) -> Tensor:
        theta = m.unsqueeze(0).expand(num_tasks, -1)
        if not theta.requires_grad:
            theta = theta.detach().requires_grad_()
        (g,) = torch.autograd.grad(surrogate(net, theta, train).sum(), theta, create_graph=create_graph)
        return theta + lr * g

    m = mu.detach().clone().requires_grad_()
    theta = adapted(m)
    before = surrogate(net, theta, val, old_log_prob).mean()
    (grad,) = torch.autograd.grad(before, m, retain_graph=True)
    # KL's gradient through the inner step, built once; each Fisher-vector product is one more backward pass
    (kl_grad,) = torch.autograd.grad(_mean_policy_kl(net, old_out, theta, val).mean(), m, create_graph=True)

    def fisher_vector(v: Tensor) -> Tensor:
        (hv,) = torch.autograd.grad((kl_grad * v[0]).sum(), m, retain_graph=True)
        return (hv + damping * v[0]).unsqueeze(0)

    direction = conjugate_gradient(fisher_vector, grad.unsqueeze(0), cg_iters)
    shs = (direction * fisher_vector(direction)).sum().clamp_min(1e-20)
    full_step = (direction * torch.sqrt(2 * max_kl / shs))[0].detach()
    before = before.detach()
    for j in range(backtracks):
        candidate = mu.detach() + backtrack_ratio ** j * full_step
        theta = adapted(candidate, create_graph=False).detach()
        with torch.no_grad():
            value = surrogate(net, theta, val, old_log_prob).mean()
            kl = _mean_policy_kl(net, old_out, theta, val).mean()
        if kl <= max_kl and value > before:
            with torch.no_grad():
                mu.copy_(candidate.detach())
            return {"meta_kl": float(kl), "improvement": float(value - before), "grad_norm": float(grad.norm())}
    return {"meta_kl": 0.0, "improvement": 0.0, "grad_norm": float(grad.norm()) if math.isfinite(grad.norm()) else 0.0}
