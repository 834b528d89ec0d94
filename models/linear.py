r"""The exact oracle: Bayesian linear regression (GEM-BML appendix C.1; DESIGN.md).

.. math::
    y = X\theta + \epsilon,\quad \epsilon \sim N(0, s^2 I),\quad \theta \sim N(\mu, \mathrm{diag}\,\sigma^2)

    \log p(D; \Theta) = \log N(y;\ X\mu,\ X \Sigma X^\top + s^2 I)

    S = (\Sigma^{-1} + X^\top X / s^2)^{-1}, \qquad m = S(\Sigma^{-1}\mu + X^\top y / s^2)

The marginal likelihood is differentiable in ``(mu, log sigma)`` by autograd, which gives the true
meta-gradient that GEM and the ELBO gradient estimate. The network is an ordinary bias-free
``nn.Linear(d, 1)``, so the oracle runs through the same hierarchical model as everything else.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hbmeta.models.posterior import Posterior

__all__ = ["linear_network", "exact_log_marginal", "exact_posterior"]


def linear_network(num_features: int) -> nn.Module:
    """``f(x; theta) = x^T theta`` as a bias-free ``nn.Linear`` (its weights are ``theta``)."""
    return nn.Linear(num_features, 1, bias=False)


def _check(x: Tensor, y: Tensor, mu: Tensor) -> None:
    if x.dim() != 3 or y.shape != (*x.shape[:2], 1) or mu.shape != x.shape[-1:]:
        raise ValueError(f"expected x [T, N, d], y [T, N, 1], mu [d]; got {tuple(x.shape)}, {tuple(y.shape)}, {tuple(mu.shape)}")


def exact_log_marginal(x: Tensor, y: Tensor, mu: Tensor, log_sigma: Tensor, noise_scale: float) -> Tensor:
    """``log p(D_tau; mu, sigma)`` per task, ``[T]``; differentiable in ``mu`` and ``log_sigma``."""
    _check(x, y, mu)
    cov_prior = torch.diag_embed(torch.exp(2 * log_sigma).expand(x.shape[0], -1))
    cov = x @ cov_prior @ x.transpose(-1, -2) + noise_scale**2 * torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    mean = x @ mu
    return torch.distributions.MultivariateNormal(mean, covariance_matrix=cov).log_prob(y.squeeze(-1))


def exact_posterior(x: Tensor, y: Tensor, mu: Tensor, log_sigma: Tensor, noise_scale: float) -> Posterior:
    """The exact Gaussian posterior ``N(m_tau, S_tau)`` of every task, as a full-covariance :class:`Posterior`."""
    _check(x, y, mu)
    prec_prior = torch.exp(-2 * log_sigma)
    precision = torch.diag_embed(prec_prior).expand(x.shape[0], -1, -1) + x.transpose(-1, -2) @ x / noise_scale**2
    rhs = prec_prior * mu + (x.transpose(-1, -2) @ y).squeeze(-1) / noise_scale**2
    chol_prec = torch.linalg.cholesky(precision)
    m = torch.cholesky_solve(rhs.unsqueeze(-1), chol_prec).squeeze(-1)
    cov = torch.cholesky_inverse(chol_prec)
    return Posterior(m, scale_tril=torch.linalg.cholesky(cov))
