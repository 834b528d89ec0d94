r"""BMAML (Yoon et al. 2018): SVGD particles from meta-learned starting points, trained by the chaser loss.

The meta-parameters are ``M`` particles :math:`\Theta_0 = \{\theta_0^m\}`. A task's posterior is what
they become after ``n`` steps of Stein variational gradient descent (Liu & Wang 2016) on its support set,

.. math::
    \theta^m \leftarrow \theta^m + \epsilon\, \phi(\theta^m), \qquad
    \phi(\theta) = \frac1M \sum_{j=1}^M \Big[k(\theta^j, \theta)\, \nabla_{\theta^j} \log p(D \mid \theta^j)
                   + \nabla_{\theta^j} k(\theta^j, \theta)\Big],

with the RBF kernel :math:`k(a, b) = \exp(-\|a - b\|^2 / h)` and the median heuristic
:math:`h = \mathrm{med}_{i<j} \|\theta^i - \theta^j\|^2 / \log(M + 1)` (per task). The chaser
:math:`\Theta^n_\tau` is ``n`` SVGD steps on :math:`D^{tr}_\tau` from :math:`\Theta_0`; the leader
:math:`\Theta^{n+s}_\tau` takes ``s`` more steps from the chaser on :math:`D^{tr}_\tau \cup D^{val}_\tau`. The
meta-loss (the "chaser loss", sec. 3.2 of [1]) pulls the chaser toward the stopped leader,

.. math::
    \mathcal{L}(\Theta_0) = \frac1T \sum_\tau \sum_m \big\|\theta^{n,m}_\tau(\Theta_0)
                            - \mathrm{sg}(\theta^{n+s,m}_\tau)\big\|^2 ,

and is backpropagated through the chaser's unrolled SVGD steps (memory linear in ``n``, as MAML's).

Choices (stated, not the paper's every detail):
  - the SVGD target is the likelihood alone, :math:`\log p(D_\tau \mid \theta)`; no weight prior. The paper
    adds a Gaussian prior with Gamma hyperpriors; here, as for MAML (Grant et al. 2018), the prior is
    implicit in the learned starting particles and the finite number of steps.
  - the bandwidth is computed without gradient (a heuristic setting, not a function to differentiate).
  - plain SVGD steps of size ``lr`` (the inner optimizer must be ``"sgd"``).

Pyro's :class:`pyro.infer.SVGD` runs one model through its parameter store, and its ``RBFSteinKernel`` is
evaluated under ``no_grad``; the chaser loss needs the kernel inside the graph and ``T`` tasks at once,
hence this small batched implementation.

References:
    [1] Yoon, J., Kim, T., Dia, O., Kim, S., Bengio, Y. & Ahn, S. Bayesian Model-Agnostic Meta-Learning.
        NeurIPS 2018.
    [2] Liu, Q. & Wang, D. Stein Variational Gradient Descent. NeurIPS 2016.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from hbmeta.inference.algorithm import Algorithm, LearnerState, PriorDefaults, register_algorithm
from hbmeta.inference.batch import TaskBatch
from hbmeta.inference.inner import InnerConfig, InnerLoopDivergedError
from hbmeta.models.functional import BatchedNet
from hbmeta.models.hierarchical import HierarchicalModel
from hbmeta.models.posterior import Posterior
from hbmeta.models.priors import ParticlePrior, Prior

__all__ = ["median_bandwidth", "svgd_direction", "svgd", "chaser_and_leader", "bmaml_gradient", "bmaml_adapt",
           "BMAMLAlgorithm", "BMAML"]


@torch.no_grad()
def median_bandwidth(sq_dist: Tensor) -> Tensor:
    r"""``h = median_{i<j} ||theta_i - theta_j||^2 / log(M + 1)`` per task from ``sq_dist [T, M, M]`` -> ``[T]``.

    One particle, or particles that coincide, get ``h = 1`` (the kernel is then constant: plain gradient ascent).
    """
    num = sq_dist.shape[-1]
    if num < 2:
        return torch.ones(sq_dist.shape[0], dtype=sq_dist.dtype, device=sq_dist.device)
    i, j = torch.triu_indices(num, num, 1, device=sq_dist.device)
    h = torch.quantile(sq_dist[:, i, j], 0.5, dim=-1) / math.log(num + 1)
    return torch.where(h > 0, h, torch.ones_like(h))


def svgd_direction(particles: Tensor, grad_log_p: Tensor) -> Tensor:
    r"""The Stein variational direction :math:`\phi` of every particle, each task's ``M`` particles apart.

    Args:
        particles: ``[M, T, P]``.
        grad_log_p: ``[M, T, P]``, :math:`\nabla \log p` at each particle.

    Returns:
        ``[M, T, P]``: :math:`\frac1M \sum_j k_{ij} \nabla \log p(\theta_j) + \frac2h \sum_j k_{ij} (\theta_i - \theta_j)`,
        differentiable in both inputs (but for the bandwidth).
    """
    if particles.shape != grad_log_p.shape or particles.dim() != 3:
        raise ValueError(f"particles {tuple(particles.shape)} and gradients {tuple(grad_log_p.shape)} must both be [M, T, P]")
    x, g = particles.transpose(0, 1), grad_log_p.transpose(0, 1)  # [T, M, P]
    sq_dist = (x.unsqueeze(2) - x.unsqueeze(1)).pow(2).sum(-1)  # [T, M, M]
    h = median_bandwidth(sq_dist).view(-1, 1, 1)
    k = torch.exp(-sq_dist / h)
    repulsion = (2.0 / h) * (x * k.sum(-1, keepdim=True) - k @ x)
    return ((k @ g + repulsion) / x.shape[1]).transpose(0, 1)


def svgd(model: HierarchicalModel, particles: Tensor, x: Tensor, y: Tensor, steps: int, lr: float,
         create_graph: bool = False, callback: Callable[[int, Tensor], None] | None = None) -> Tensor:
    r"""``steps`` SVGD steps on :math:`\log p(D_\tau \mid \theta)` for every task at once; ``particles [M, T, P]``.

    With ``create_graph`` the result stays a differentiable function of the input particles (BMAML's
    chaser); otherwise it is detached. ``callback(step, particles)`` is called before the first step and
    after every step.
    """
    if not create_graph:
        particles = particles.detach().requires_grad_()
    if callback is not None:
        callback(0, particles.detach())
    for step in range(1, steps + 1):
        log_p = model.log_likelihood(particles, x, y).sum()
        (grad,) = torch.autograd.grad(log_p, particles, create_graph=create_graph)
        particles = particles + lr * svgd_direction(particles, grad)
        if not create_graph:
            particles = particles.detach().requires_grad_()
        if callback is not None:
            callback(step, particles.detach())
    return particles if create_graph else particles.detach()


def _particle_prior(model: HierarchicalModel) -> ParticlePrior:
    if not isinstance(model.prior, ParticlePrior):
        raise TypeError(f"BMAML needs a ParticlePrior; the model has {type(model.prior).__name__}")
    return model.prior


def _check_config(config: InnerConfig) -> None:
    if config.optimizer.lower() != "sgd":
        raise ValueError(f"BMAML takes plain SVGD steps of size lr; set optimizer='sgd' (got {config.optimizer!r})")


def chaser_and_leader(model: HierarchicalModel, batch: TaskBatch, config: InnerConfig) -> tuple[Tensor, Tensor]:
    """The chaser ``[M, T, P]`` (a graph back to the prior's particles) and the detached leader (sec. 3.2 of [1]).

    Chaser: ``config.steps`` SVGD steps on ``D_tr``; leader: ``config.val_steps`` (``None``: ``config.steps``)
    more steps from the chaser on ``D_tr u D_val``; both at step size ``config.lr``.
    """
    _check_config(config)
    theta0 = _particle_prior(model).particles
    start = theta0.unsqueeze(1).expand(-1, batch.num_tasks, -1)
    chaser = svgd(model, start, batch.x_train, batch.y_train, config.steps, config.lr, create_graph=True)
    x, y = batch.joint()
    leader_steps = config.steps if config.val_steps is None else config.val_steps
    leader = svgd(model, chaser.detach(), x, y, leader_steps, config.lr)
    return chaser, leader


def bmaml_gradient(model: HierarchicalModel, batch: TaskBatch, config: InnerConfig) -> dict[str, Tensor]:
    r"""BMAML: ``{"particles": grad}`` ``[M, P]`` of the chaser loss (a descent direction)."""
    chaser, leader = chaser_and_leader(model, batch, config)
    loss = (chaser - leader).pow(2).sum((0, 2)).mean()
    (grad,) = torch.autograd.grad(loss, model.prior.particles)
    return {"particles": grad}


def bmaml_adapt(model: HierarchicalModel, x: Tensor, y: Tensor, config: InnerConfig, steps: int | None = None,
                callback: Callable[[int, Posterior], None] | None = None) -> Posterior:
    """Meta-test: SVGD on the support sets from the learned particles; a particle :class:`Posterior` ``[M, T, P]``."""
    _check_config(config)
    steps = config.steps if steps is None else steps
    start = _particle_prior(model).initial_posterior(x.shape[0]).particles
    cb = None if callback is None else (lambda k, p: callback(k, Posterior.from_particles(p)))
    particles = svgd(model, start, x, y, steps, config.lr, callback=cb)
    if not torch.isfinite(particles).all():
        bad = (~torch.isfinite(particles)).any(0).any(-1).nonzero().flatten().tolist()
        raise InnerLoopDivergedError(f"SVGD diverged within {steps} steps for task(s) {bad}; "
                                     f"lower the inner learning rate (now {config.lr})")
    return Posterior.from_particles(particles)


class BMAMLAlgorithm(Algorithm):
    """BMAML: meta-learns ``M`` SVGD starting particles (a :class:`~hbmeta.models.priors.ParticlePrior`)."""

    name = "bmaml"
    meta_loss = "L[2]"
    estimator = "SVGD particles + chaser loss (unrolled)"
    backprop_through_inner = True
    bayesian = True
    reference = "Yoon et al. 2018"
    description = "chaser loss through the unrolled SVGD steps of the particles"

    def meta_gradient(self, learner: LearnerState, batch: TaskBatch,
                      generator: torch.Generator | None = None) -> dict[str, Tensor]:
        return bmaml_gradient(learner.model, batch, learner.inner)

    def adapt(self, learner: LearnerState, x: Tensor, y: Tensor, inner: InnerConfig, steps: int,
              generator: torch.Generator | None = None,
              callback: Callable[[int, Posterior], None] | None = None) -> Posterior:
        return bmaml_adapt(learner.model, x, y, inner, steps, callback)

    def default_inner(self, gauss_newton: bool) -> InnerConfig:
        """5 particles (``num_samples``), 5 plain SVGD steps of 1e-3 on the summed log-likelihood (whose gradient
        is ~N / noise^2 times the MSE's, hence the small step)."""
        return InnerConfig(steps=5, lr=1e-3, optimizer="sgd", num_samples=5)

    def prior_defaults(self, inner_method: str) -> PriorDefaults:
        """The particles start at a 0.1 spread (with SVI's other defaults)."""
        if inner_method == "gauss-newton":
            return super().prior_defaults(inner_method)
        return PriorDefaults(0.1, 0.1, 0.5, "sequential")

    def default_prior(self, learner: LearnerState, net: BatchedNet) -> Prior:
        """``M = inner.num_samples`` particles around the net's weights at spread ``learner.prior_scale``."""
        return ParticlePrior.around(net.initial_vector(), learner.inner.num_samples, learner.prior_scale,
                                    torch.Generator().manual_seed(0))

    def check(self, learner: LearnerState) -> None:
        if not isinstance(learner.prior, ParticlePrior):
            raise ValueError(f"algorithm {self.name!r} cannot use a {type(learner.prior).__name__}: BMAML needs a "
                             f"ParticlePrior and a ParticlePrior is only for BMAML")


BMAML = register_algorithm(BMAMLAlgorithm())
