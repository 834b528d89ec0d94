r"""Heavy-tailed priors over a network's flat weights: Laplace and Student-t (factorised over weights).

Heavier tails than a Gaussian let a few weights of a task move far from the prior mean at little cost
while most stay put (sparse adaptation). Both are meta-learned with GEM (GEM-BML section 3.2, Theorem 1):

.. math:: \hat g_\tau = \mathbb{E}_{\theta \sim q_\tau} \nabla_\Theta \log p(\theta; \Theta) .

- :class:`LaplacePrior` has a closed form for a Gaussian guide ``q = N(m, s^2)`` (``d = m - mu``):

  .. math::
      \mathbb{E}_q |\theta - \mu| = s\sqrt{2/\pi}\, e^{-d^2/2s^2} + d\, \mathrm{erf}\big(d / (s\sqrt2)\big), \quad
      \partial_\mu = \frac{\mathrm{erf}(d / (s\sqrt2))}{b}, \quad
      \partial_{\log b} = \frac{\mathbb{E}_q|\theta - \mu|}{b} - 1 ,

  and torch's analytic ``KL(Normal || Laplace)`` lets the inner update keep its analytic-KL ELBO.
- :class:`StudentTPrior` has no closed form: GEM uses the Monte-Carlo form
  (:func:`hbmeta.inference.gem.mc_gem_gradient`) and the inner update's KL is estimated by sampling (Pyro's
  ``TraceMeanField_ELBO`` falls back to ``log p - log q`` at the guide's draw where no KL is registered).
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from torch import Tensor, nn

from hbmeta.models.posterior import Posterior
from hbmeta.models.priors import Prior, expectation_gradient

__all__ = ["LaplacePrior", "StudentTPrior"]

_LOG_B_LAPLACE = math.log(0.1 / math.sqrt(2))  # Laplace sd b sqrt 2 = 0.1
_LOG_B_STUDENT = math.log(0.1)


def _flat_loc(loc: Tensor) -> Tensor:
    loc = loc.detach().clone().float() if not loc.is_floating_point() else loc.detach().clone()
    if loc.dim() != 1:
        raise ValueError(f"prior loc must be a flat [P] vector; got shape {tuple(loc.shape)}")
    if not torch.isfinite(loc).all():
        raise ValueError("prior loc contains NaN or inf")
    return loc


class _LocationScalePrior(Prior):
    """Shared parts of a factorised location-scale prior with ``Theta = (mu, log b)``."""

    def __init__(self, loc: Tensor, log_scale: Tensor | float, max_scale: float | None):
        super().__init__()
        loc = _flat_loc(loc)
        self.num_params = loc.numel()
        self.max_scale = max_scale
        self.mu = nn.Parameter(loc)
        self.log_b = nn.Parameter(torch.as_tensor(log_scale, dtype=loc.dtype).expand_as(loc).clone())

    @property
    def loc(self) -> Tensor:
        return self.mu

    @property
    def scale(self) -> Tensor:
        """The distribution's scale ``b`` per weight."""
        return self.log_b.exp()

    @torch.no_grad()
    def project(self) -> None:
        if self.max_scale is not None:
            self.log_b.clamp_(max=math.log(self.max_scale))

    def _base(self) -> torch.distributions.Distribution:
        raise NotImplementedError

    def distribution(self, num_tasks: int) -> dist.TorchDistribution:
        return self._base().expand([num_tasks, self.num_params]).to_event(1)

    def log_prob(self, theta: Tensor) -> Tensor:
        return self._base().log_prob(theta).sum(-1)

    def initial_posterior(self, num_tasks: int) -> Posterior:
        """A Gaussian with the prior's mean and standard deviation (when finite)."""
        shape = (num_tasks, self.num_params)
        sd = self._base().stddev.detach()
        return Posterior(self.mu.detach().expand(shape).clone(), sd.expand(shape).clone())


class LaplacePrior(_LocationScalePrior):
    r"""``theta_i ~ Laplace(mu_i, b_i)`` with ``Theta = (mu, log b)``; closed-form GEM (module docstring).

    Args:
        loc: prior mean ``mu`` ``[P]``.
        log_scale: ``log b``, a ``[P]`` tensor or a float (``b = sigma / sqrt 2`` matches a Gaussian's sd sigma).
        max_scale: optional ceiling on ``b`` after each meta-step.
    """

    def __init__(self, loc: Tensor, log_scale: Tensor | float = _LOG_B_LAPLACE,
                 max_scale: float | None = None):
        super().__init__(loc, log_scale, max_scale)

    def _base(self):
        return dist.Laplace(self.mu, self.log_b.exp(), validate_args=False)

    @staticmethod
    def expected_log_prob(params: dict[str, Tensor], m: Tensor, v: Tensor) -> Tensor:
        r""":math:`\mathbb{E}_{N(m, v)} \log \mathrm{Laplace}(\theta; \mu, b)` summed over weights."""
        mu, log_b = params["mu"], params["log_b"]
        d, s = m - mu, v.clamp_min(1e-30).sqrt()
        abs_mean = s * math.sqrt(2 / math.pi) * torch.exp(-0.5 * (d / s).pow(2)) + d * torch.erf(d / (s * math.sqrt(2)))
        return (-math.log(2.0) - log_b - abs_mean / log_b.exp()).sum()

    def gem_gradient(self, posterior: Posterior) -> dict[str, Tensor] | None:
        if posterior.kind not in ("meanfield", "delta"):
            return None  # factorised prior: the marginals would do, but keep the closed form to its checked cases
        return expectation_gradient(self.expected_log_prob, dict(self.named_parameters()), posterior)


class StudentTPrior(_LocationScalePrior):
    r"""``theta_i ~ StudentT(nu, mu_i, b_i)`` with ``Theta = (mu, log b)`` and fixed degrees of freedom ``nu``.

    No closed-form GEM gradient: :func:`hbmeta.inference.gem.gem_gradient` uses the Monte-Carlo form.

    Args:
        loc: prior mean ``mu`` ``[P]``.
        log_scale: ``log b`` (a ``[P]`` tensor or a float).
        df: degrees of freedom ``nu > 2`` (finite variance, so the guide can start at a matched Gaussian).
        max_scale: optional ceiling on ``b`` after each meta-step.
    """

    def __init__(self, loc: Tensor, log_scale: Tensor | float = _LOG_B_STUDENT, df: float = 4.0,
                 max_scale: float | None = None):
        if not df > 2:
            raise ValueError(f"StudentTPrior needs df > 2 (a finite variance to start the guide from); got {df}")
        super().__init__(loc, log_scale, max_scale)
        self.register_buffer("df", torch.tensor(float(df), dtype=self.mu.dtype))

    def _base(self):
        return dist.StudentT(self.df, self.mu, self.log_b.exp(), validate_args=False)
