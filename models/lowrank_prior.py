r"""A low-rank-plus-diagonal Gaussian prior: weights of a task move together along ``r`` shared directions.

.. math::
    \theta \sim N(\mu, \Sigma), \qquad \Sigma = W W^\top + D, \quad D = \mathrm{diag}\, \sigma^2, \quad
    W \in \mathbb{R}^{P \times r}, \qquad \Theta = (\mu, W, \log\sigma)

Everything is ``O(P r^2)`` through the Woodbury identity and the matrix determinant lemma, with
``B = D^{-1} W`` and ``C = I_r + W^\top D^{-1} W``:

.. math::
    \Sigma^{-1} = D^{-1} - B C^{-1} B^\top, \qquad \log|\Sigma| = \sum_i \log \sigma_i^2 + \log|C| .

Closed-form GEM (GEM-BML section 3.2; the Gaussian case of appendix B.7 with a full prior covariance): for a
guide ``N(m, diag v)`` with ``d = m - mu``,

.. math::
    \mathbb{E}_q \log p(\theta) = -\tfrac12\big[P \log 2\pi + \log|\Sigma| + \mathrm{tr}(\Sigma^{-1} \mathrm{diag}\, v)
    + d^\top \Sigma^{-1} d\big],

whose gradient in ``Theta`` (taken by autograd, per task) is the GEM gradient; its Monte-Carlo form is checked
against it in the tests. The analytic ``KL(N(m, diag v) || N(mu, Sigma)) = -H(q) - E_q log p`` is registered
with torch so that the inner update keeps its analytic-KL ELBO.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from torch import Tensor, nn

from hbmeta.models.posterior import Posterior
from hbmeta.models.priors import Prior, expectation_gradient

__all__ = ["LowRankGaussianPrior", "lowrank_expected_log_prob"]

_LOG_SIGMA = math.log(0.1)


def lowrank_expected_log_prob(mu: Tensor, factor: Tensor, log_sigma: Tensor, m: Tensor, v: Tensor) -> Tensor:
    r""":math:`\mathbb{E}_{N(m, \mathrm{diag}\, v)} \log N(\theta; \mu, W W^\top + \mathrm{diag}\, \sigma^2)`.

    ``mu, log_sigma [P]``, ``factor W [P, r]``, ``m, v [..., P]`` -> ``[...]`` (``v = 0``: ``log p(m)``).
    """
    inv_d = torch.exp(-2 * log_sigma)                                    # [P]
    b = factor * inv_d.unsqueeze(-1)                                    # [P, r]
    eye = torch.eye(factor.shape[-1], dtype=factor.dtype, device=factor.device)
    chol = torch.linalg.cholesky(eye + factor.transpose(-1, -2) @ b)     # C = L L^T
    d = m - mu
    bd = (d.unsqueeze(-2) @ b).squeeze(-2)                               # [..., r] = B^T d
    solved = torch.linalg.solve_triangular(chol, bd.unsqueeze(-1), upper=False).squeeze(-1)
    quad = (d.pow(2) * inv_d).sum(-1) - solved.pow(2).sum(-1)
    bvb = b.transpose(-1, -2) @ (v.unsqueeze(-1) * b)                    # [..., r, r] = B^T diag v B
    c_inv = torch.cholesky_inverse(chol)
    trace = (v * inv_d).sum(-1) - (c_inv * bvb).sum((-1, -2))
    log_det = 2 * log_sigma.sum(-1) + 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    return -0.5 * (mu.shape[-1] * math.log(2 * math.pi) + log_det + trace + quad)


class LowRankGaussianPrior(Prior):
    r"""``theta ~ N(mu, W W^T + diag sigma^2)``; see the module docstring.

    Args:
        loc: prior mean ``mu [P]``.
        rank: number of columns ``r`` of ``W``.
        log_scale: ``log sigma`` of the diagonal part (float or ``[P]``).
        factor_scale: entries of the initial ``W`` are ``factor_scale * N(0, 1)`` (``W = 0`` is a saddle point
            of GEM: its gradient ``(Sigma^-1 (S + d d^T) Sigma^-1 - Sigma^-1) W`` vanishes there).
        generator: source of the initial ``W``.
        max_scale: optional ceiling on ``sigma`` after each meta-step.
    """

    def __init__(self, loc: Tensor, rank: int = 2, log_scale: Tensor | float = _LOG_SIGMA,
                 factor_scale: float = 0.01, generator: torch.Generator | None = None, max_scale: float | None = None):
        super().__init__()
        if loc.dim() != 1 or not torch.isfinite(loc).all():
            raise ValueError(f"prior loc must be a finite flat [P] vector; got shape {tuple(loc.shape)}")
        if rank < 1:
            raise ValueError(f"rank must be >= 1; got {rank}")
        loc = loc.detach().clone().float() if not loc.is_floating_point() else loc.detach().clone()
        self.num_params, self.rank, self.max_scale = loc.numel(), rank, max_scale
        self.mu = nn.Parameter(loc)
        self.log_sigma = nn.Parameter(torch.as_tensor(log_scale, dtype=loc.dtype).expand_as(loc).clone())
        factor = factor_scale * torch.randn((loc.numel(), rank), generator=generator, dtype=loc.dtype)
        self.factor = nn.Parameter(factor.to(loc.device))

    @property
    def loc(self) -> Tensor:
        return self.mu

    @property
    def scale(self) -> Tensor:
        """Marginal standard deviations ``sqrt(diag Sigma)``."""
        return (torch.exp(2 * self.log_sigma) + self.factor.pow(2).sum(-1)).sqrt()

    @torch.no_grad()
    def project(self) -> None:
        if self.max_scale is not None:
            self.log_sigma.clamp_(max=math.log(self.max_scale))

    def distribution(self, num_tasks: int) -> dist.TorchDistribution:
        base = dist.LowRankMultivariateNormal(self.mu, self.factor, torch.exp(2 * self.log_sigma), validate_args=False)
        return base.expand([num_tasks])

    def log_prob(self, theta: Tensor) -> Tensor:
        return lowrank_expected_log_prob(self.mu, self.factor, self.log_sigma, theta, torch.zeros_like(theta))

    def initial_posterior(self, num_tasks: int) -> Posterior:
        """A mean-field Gaussian with the prior's mean and marginal standard deviations."""
        shape = (num_tasks, self.num_params)
        return Posterior(self.mu.detach().expand(shape).clone(), self.scale.detach().expand(shape).clone())

    @staticmethod
    def expected_log_prob(params: dict[str, Tensor], m: Tensor, v: Tensor) -> Tensor:
        return lowrank_expected_log_prob(params["mu"], params["factor"], params["log_sigma"], m, v)

    def gem_gradient(self, posterior: Posterior) -> dict[str, Tensor] | None:
        """Closed form for mean-field and point-mass posteriors; ``None`` (Monte Carlo) for correlated ones."""
        if posterior.kind not in ("meanfield", "delta"):
            return None
        return expectation_gradient(self.expected_log_prob, dict(self.named_parameters()), posterior)


@torch.distributions.kl.register_kl(torch.distributions.Independent, torch.distributions.LowRankMultivariateNormal)
def _kl_diagonal_normal_lowrank(q: torch.distributions.Independent, p: torch.distributions.LowRankMultivariateNormal
                                ) -> Tensor:
    r"""Analytic ``KL(N(m, diag s^2) || N(mu, W W^T + D)) = -H(q) - E_q log p`` (Woodbury; ``O(P r^2)``)."""
    if not (isinstance(q.base_dist, torch.distributions.Normal) and q.reinterpreted_batch_ndims == 1):
        raise NotImplementedError
    m, s = q.base_dist.loc, q.base_dist.scale
    log_sigma = 0.5 * p._unbroadcasted_cov_diag.log()
    entropy = (0.5 * math.log(2 * math.pi * math.e) + s.log()).sum(-1)
    return -entropy - lowrank_expected_log_prob(p.loc, p._unbroadcasted_cov_factor, log_sigma, m, s.pow(2))
