r"""Priors ``p(theta; Theta)`` over a network's flat weights, as swappable modules.

A prior owns its hyperparameters ``Theta`` as ``nn.Parameter`` s (no global parameter store). Each prior
gives the distribution used inside the Pyro model, the posterior the inner update starts from
(Algorithm 1, subroutine VI: "initialize lambda at Theta"), and where one exists the closed-form GEM
gradient

.. math::
    \hat g_\tau = \mathbb{E}_{\theta \sim q_\tau} \nabla_\Theta \log p(\theta; \Theta)

(GEM-BML section 3.2, Theorem 1; Gaussian case in appendix B.7). Priors without a closed form return
``None`` and the Monte-Carlo form :func:`hbmeta.inference.gem.mc_gem_gradient` is used instead.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from torch import Tensor, nn

from hbmeta.models.posterior import Posterior
from hbmeta.models.saved_tensors import untracked

__all__ = ["Prior", "DiagonalGaussianPrior", "ParticlePrior", "expectation_gradient"]


@untracked()
def expectation_gradient(expected_log_prob, params: dict[str, Tensor], posterior: Posterior) -> dict[str, Tensor]:
    r"""Per-task ``grad_Theta E_q log p(theta; Theta)`` from a closed-form expectation, by autograd.

    ``expected_log_prob(params, m [P], v [P]) -> scalar`` is :math:`\mathbb{E}_{N(m, \mathrm{diag}\, v)}
    \log p(\theta; \Theta)` written analytically; its gradient, vmapped over the ``T`` tasks of ``posterior``
    (mean-field or point mass: only ``loc`` and the marginal variances enter), is the closed-form GEM gradient.
    """
    per_task = torch.func.vmap(torch.func.grad(expected_log_prob), in_dims=(None, 0, 0))
    return per_task({n: p.detach() for n, p in params.items()}, posterior.loc.detach(), posterior.variance.detach())


class Prior(nn.Module):
    """Interface every prior follows. ``forward(theta)`` is ``log p(theta; Theta)`` summed over weights."""

    num_params: int

    def distribution(self, num_tasks: int) -> dist.TorchDistribution:
        """``p(theta; Theta)`` with batch shape ``[num_tasks]`` and event shape ``[P]``."""
        raise NotImplementedError

    def forward(self, theta: Tensor) -> Tensor:
        return self.log_prob(theta)

    def log_prob(self, theta: Tensor) -> Tensor:
        """``log p(theta; Theta)`` for ``theta [..., P]`` -> ``[...]``."""
        raise NotImplementedError

    def initial_posterior(self, num_tasks: int) -> Posterior:
        """The per-task guide's starting point: a Gaussian matched to the prior."""
        raise NotImplementedError

    def start_posterior(self, num_tasks: int, log_likelihood=None) -> Posterior:
        """Where each task's inner update starts, given ``log_likelihood(theta [*S, T, P]) -> [*S, T]`` of its data.

        Default: :meth:`initial_posterior` (the data are not looked at). A mixture prior overrides this to
        start each task at the component that explains its data best (a hard E-step).
        """
        return self.initial_posterior(num_tasks)

    @property
    def loc(self) -> Tensor:
        """The point the MAML-family baselines adapt from (the prior mean)."""
        raise NotImplementedError

    def gem_gradient(self, posterior: Posterior) -> dict[str, Tensor] | None:
        """Closed-form per-task GEM gradients ``{name: [T, *param_shape]}``, or ``None`` if there is none."""
        return None

    def project(self) -> None:
        """Bring the hyper-parameters back into their allowed set after a meta-step (default: no constraint)."""


class DiagonalGaussianPrior(Prior):
    r"""``theta ~ N(mu, diag(sigma^2))`` with ``Theta = (mu, log sigma)``.

    The closed-form GEM gradient for a Gaussian guide ``q = N(m, S)`` (GEM-BML appendix B.7, written in
    ``(mu, log sigma)`` coordinates; only the diagonal ``v = diag S`` enters)

    .. math::
        \partial_\mu = \frac{m - \mu}{\sigma^2}, \qquad
        \partial_{\log\sigma} = \frac{v + (m - \mu)^2}{\sigma^2} - 1 .

    Args:
        loc: prior mean ``mu`` ``[P]``.
        log_scale: ``log sigma``, a ``[P]`` tensor or a float broadcast to all weights.
        learn_scale: if ``False`` the scale is a fixed buffer (the Reptile / MAML limit, section 4).
        max_scale: optional ceiling on ``sigma``, enforced by :meth:`project` after each meta-step. With a
            noisy inner loop, weights of nearly dead ReLU units get Monte-Carlo noise in their posterior means,
            which biases ``(m - mu)^2`` upwards and GEM's scale update then grows ``sigma`` without bound
            (measured: a few of 1,761 sinusoid weights reached sigma ~ 1e3 by 20,000 iterations).
    """

    def __init__(self, loc: Tensor, log_scale: Tensor | float = math.log(0.1), learn_scale: bool = True,
                 max_scale: float | None = None):
        super().__init__()
        loc = loc.detach().clone().float() if not loc.is_floating_point() else loc.detach().clone()
        if loc.dim() != 1:
            raise ValueError(f"prior loc must be a flat [P] vector; got shape {tuple(loc.shape)}")
        if not torch.isfinite(loc).all():
            raise ValueError("prior loc contains NaN or inf")
        log_scale = torch.as_tensor(log_scale, dtype=loc.dtype, device=loc.device).expand_as(loc).clone()
        self.num_params = loc.numel()
        self.max_scale = max_scale
        self.mu = nn.Parameter(loc)
        if learn_scale:
            self.log_sigma = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_sigma", log_scale)

    @classmethod
    def from_module(cls, module: nn.Module, scale: float = 0.1, learn_scale: bool = True,
                    max_scale: float | None = None) -> "DiagonalGaussianPrior":
        """A prior centred at ``module`` 's current weights with scale ``scale`` on every weight."""
        if not (isinstance(scale, (int, float)) and not isinstance(scale, bool) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a finite number > 0 (the prior sd of every weight); got {scale!r}")
        loc = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
        return cls(loc, math.log(scale), learn_scale, max_scale)

    @torch.no_grad()
    def project(self) -> None:
        if self.max_scale is not None:
            self.log_sigma.clamp_(max=math.log(self.max_scale))

    @property
    def loc(self) -> Tensor:
        return self.mu

    @property
    def scale(self) -> Tensor:
        return self.log_sigma.exp()

    def distribution(self, num_tasks: int) -> dist.TorchDistribution:
        return dist.Normal(self.mu, self.scale).expand([num_tasks, self.num_params]).to_event(1)

    def log_prob(self, theta: Tensor) -> Tensor:
        z = (theta - self.mu) / self.scale
        return (-0.5 * z.pow(2) - self.log_sigma - 0.5 * math.log(2 * math.pi)).sum(-1)

    def initial_posterior(self, num_tasks: int) -> Posterior:
        shape = (num_tasks, self.num_params)
        return Posterior(self.mu.detach().expand(shape).clone(), self.scale.detach().expand(shape).clone())

    def gem_gradient(self, posterior: Posterior) -> dict[str, Tensor]:
        mu, var_prior = self.mu.detach(), torch.exp(2 * self.log_sigma.detach())
        diff = posterior.loc - mu
        grads = {"mu": diff / var_prior}
        if isinstance(self.log_sigma, nn.Parameter):
            grads["log_sigma"] = (posterior.variance + diff.pow(2)) / var_prior - 1.0
        return grads


class ParticlePrior(Prior):
    r"""A set of ``M`` weight vectors ``Theta = {theta_0^m}`` ``[M, P]``: BMAML's meta-learned initial particles.

    BMAML (Yoon et al. 2018, sec. 3) meta-learns where every task's SVGD starts; the "prior" is that set of
    particles, and a task posterior is what M particles become after SVGD on the task's data. The set has
    no density, so :meth:`distribution` and :meth:`log_prob` raise; ``loc`` is the particle mean (where the
    point-estimate baselines would start) and ``scale`` the particles' spread per weight.

    Args:
        particles: ``[M, P]`` initial particles.
    """

    def __init__(self, particles: Tensor):
        super().__init__()
        if particles.dim() != 2 or particles.shape[0] < 1:
            raise ValueError(f"particles must be [M, P] with M >= 1; got shape {tuple(particles.shape)}")
        if not torch.isfinite(particles).all():
            raise ValueError("particles contain NaN or inf")
        self.num_params = particles.shape[1]
        self.particles = nn.Parameter(particles.detach().clone())

    @classmethod
    def around(cls, loc: Tensor, num_particles: int = 5, scale: float = 0.02,
               generator: torch.Generator | None = None) -> "ParticlePrior":
        """``M`` particles ``loc + scale * eps_m`` (``eps ~ N(0, I)`` drawn from ``generator`` on the CPU)."""
        if num_particles < 1 or not scale >= 0:
            raise ValueError(f"need num_particles >= 1 and scale >= 0; got {num_particles}, {scale}")
        eps = torch.randn((num_particles, loc.numel()), generator=generator, dtype=loc.dtype)
        return cls(loc.detach().reshape(1, -1) + scale * eps.to(loc.device))

    @property
    def num_particles(self) -> int:
        return self.particles.shape[0]

    @property
    def loc(self) -> Tensor:
        return self.particles.mean(0)

    @property
    def scale(self) -> Tensor:
        return self.particles.std(0, unbiased=False)

    def _no_density(self):
        return NotImplementedError("ParticlePrior (BMAML) is a set of SVGD starting points without a density; "
                                   "use it with algorithm='bmaml'")

    def distribution(self, num_tasks: int) -> dist.TorchDistribution:
        raise self._no_density()

    def log_prob(self, theta: Tensor) -> Tensor:
        raise self._no_density()

    def initial_posterior(self, num_tasks: int) -> Posterior:
        """Every task starts at the same particles: ``[M, T, P]``."""
        return Posterior.from_particles(self.particles.detach().unsqueeze(1).expand(-1, num_tasks, -1).clone())
