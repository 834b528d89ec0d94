r"""A mixture of ``K`` diagonal Gaussians as the prior over weights (GEM-BML section 2.3 / B.2, "future work").

.. math::
    p(\theta; \Theta) = \sum_{k=1}^K \pi_k\, N(\theta; \mu_k, \mathrm{diag}\, \sigma_k^2), \qquad
    \Theta = (\mu_{1..K}, \log\sigma_{1..K}, \mathrm{logits}\ \pi)

For task distributions with several modes (sinusoids, lines, quadratics) one Gaussian has to sit between
the modes; a mixture puts a component on each. Two GEM estimators:

- **Monte Carlo** (any guide): :math:`\frac1S \sum_s \nabla_\Theta \log p(\theta_s; \Theta)`,
  :math:`\theta_s \sim q_\tau` (:func:`hbmeta.inference.gem.mc_gem_gradient`).
- **EM-style closed form** (:meth:`MixtureGaussianPrior.gem_gradient`, mean-field / point-mass guides):
  responsibilities of the task's posterior under each component,

  .. math::
      r_{\tau k} = \mathrm{softmax}_k\big(\log \pi_k + \mathbb{E}_{q_\tau} \log N(\theta; \mu_k, \sigma_k^2)\big),

  then the expected sufficient statistics as in the Gaussian case (appendix B.7), weighted by ``r``:

  .. math::
      \partial_{\mu_k} = r_k \frac{m - \mu_k}{\sigma_k^2}, \quad
      \partial_{\log\sigma_k} = r_k \Big(\frac{v + (m - \mu_k)^2}{\sigma_k^2} - 1\Big), \quad
      \partial_{\mathrm{logits}_k} = r_k - \pi_k .

  This is the exact gradient of the Jensen bound :math:`\log \sum_k \pi_k \exp \mathbb{E}_q \log N_k
  \le \mathbb{E}_q \log p(\theta; \Theta)`; it equals the Monte-Carlo form when ``q`` is a point mass and when
  the responsibilities do not change over ``q`` 's support (well-separated components).

The inner update starts each task at the component that explains its support data best (a hard E-step,
:meth:`MixtureGaussianPrior.start_posterior`); the KL to the mixture has no closed form, so the inner ELBO
estimates it by sampling (Pyro's ``TraceMeanField_ELBO`` falls back to ``log p - log q`` automatically).
"""

from __future__ import annotations

import copy
import math

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hbmeta.models.posterior import Posterior
from hbmeta.models.priors import Prior, expectation_gradient

__all__ = ["MixtureGaussianPrior", "component_expected_log_prob"]

_LOG_SIGMA = math.log(0.1)


def component_expected_log_prob(mu: Tensor, log_sigma: Tensor, m: Tensor, v: Tensor) -> Tensor:
    r""":math:`\mathbb{E}_{N(m, \mathrm{diag}\, v)} \log N(\theta; \mu_k, \sigma_k^2)` per component.

    ``mu, log_sigma [K, P]``, ``m, v [..., P]`` -> ``[..., K]``.
    """
    m, v = m.unsqueeze(-2), v.unsqueeze(-2)
    quad = (v + (m - mu).pow(2)) * torch.exp(-2 * log_sigma)
    return (-0.5 * quad - log_sigma - 0.5 * math.log(2 * math.pi)).sum(-1)


class MixtureGaussianPrior(Prior):
    r"""``p(theta) = sum_k pi_k N(theta; mu_k, diag sigma_k^2)``; see the module docstring.

    Args:
        locs: component means ``[K, P]`` (distinct, to break the symmetry between components).
        log_scale: ``log sigma`` (float, ``[P]`` or ``[K, P]``).
        learn_weights: learn the mixing weights ``pi`` (logits) or keep them uniform.
        max_scale: optional ceiling on every ``sigma_k`` after each meta-step.
    """

    def __init__(self, locs: Tensor, log_scale: Tensor | float = _LOG_SIGMA, learn_weights: bool = True,
                 max_scale: float | None = None):
        super().__init__()
        if locs.dim() != 2 or locs.shape[0] < 1:
            raise ValueError(f"mixture locs must be [K, P] with K >= 1; got shape {tuple(locs.shape)}")
        if not torch.isfinite(locs).all():
            raise ValueError("mixture locs contain NaN or inf")
        locs = locs.detach().clone().float() if not locs.is_floating_point() else locs.detach().clone()
        self.num_components, self.num_params = locs.shape
        self.max_scale = max_scale
        self.mu = nn.Parameter(locs)
        self.log_sigma = nn.Parameter(torch.as_tensor(log_scale, dtype=locs.dtype, device=locs.device)
                                      .expand_as(locs).clone())
        logits = torch.zeros(self.num_components, dtype=locs.dtype, device=locs.device)
        if learn_weights:
            self.logits = nn.Parameter(logits)
        else:
            self.register_buffer("logits", logits)

    @classmethod
    def from_module(cls, module: nn.Module, num_components: int = 2, scale: float = 0.1,
                    generator: torch.Generator | None = None, max_scale: float | None = None,
                    learn_weights: bool = True) -> MixtureGaussianPrior:
        """Component 0 at ``module`` 's weights, components 1..K-1 at fresh initialisations of a copy of it.

        Each copy is re-initialised with its layers' own ``reset_parameters`` (so the components start as
        far apart as independently initialised networks), under ``generator`` 's seed when given.
        """
        if num_components < 1:
            raise ValueError(f"num_components must be >= 1; got {num_components}")
        flat = [torch.cat([p.detach().reshape(-1) for p in module.parameters()])]
        seed = None if generator is None else int(torch.randint(2**62, (1,), generator=generator))
        for k in range(1, num_components):
            clone = copy.deepcopy(module)
            with torch.random.fork_rng(devices=[]):
                if seed is not None:
                    torch.manual_seed(seed + k)
                for layer in clone.modules():
                    if callable(getattr(layer, "reset_parameters", None)):
                        layer.reset_parameters()
            flat.append(torch.cat([p.detach().reshape(-1) for p in clone.parameters()]))
        return cls(torch.stack(flat), math.log(scale), learn_weights, max_scale)

    @torch.no_grad()
    def project(self) -> None:
        if self.max_scale is not None:
            self.log_sigma.clamp_(max=math.log(self.max_scale))

    @property
    def weights(self) -> Tensor:
        """Mixing weights ``pi [K]``."""
        return F.softmax(self.logits, -1)

    @property
    def loc(self) -> Tensor:
        """The mean of the heaviest component (where point-estimate baselines would start)."""
        return self.mu[int(self.logits.argmax())]

    @property
    def scale(self) -> Tensor:
        return self.log_sigma.exp()

    def _components(self) -> dist.TorchDistribution:
        return dist.Normal(self.mu, self.log_sigma.exp(), validate_args=False).to_event(1)

    def distribution(self, num_tasks: int) -> dist.TorchDistribution:
        mixture = dist.MixtureSameFamily(dist.Categorical(logits=self.logits), self._components(), validate_args=False)
        return mixture.expand([num_tasks])

    def log_prob(self, theta: Tensor) -> Tensor:
        per_component = self._components().log_prob(theta.unsqueeze(-2))  # [..., K]
        return torch.logsumexp(F.log_softmax(self.logits, -1) + per_component, -1)

    def _posterior_at(self, component: Tensor) -> Posterior:
        return Posterior(self.mu.detach()[component].clone(), self.scale.detach()[component].clone())

    def initial_posterior(self, num_tasks: int) -> Posterior:
        """Every task starts at the heaviest component (no data seen)."""
        return self._posterior_at(self.logits.detach().argmax().expand(num_tasks))

    @torch.no_grad()
    def start_posterior(self, num_tasks: int, log_likelihood=None) -> Posterior:
        r"""Start task ``tau`` at component :math:`k^* = \arg\max_k \log\pi_k + \log p(D_\tau \mid \mu_k)`."""
        if log_likelihood is None:
            return self.initial_posterior(num_tasks)
        theta = self.mu.detach().unsqueeze(1).expand(-1, num_tasks, -1)  # [K, T, P]
        score = F.log_softmax(self.logits.detach(), -1).unsqueeze(1) + log_likelihood(theta)  # [K, T]
        return self._posterior_at(score.argmax(0))

    @staticmethod
    def bound(params: dict[str, Tensor], m: Tensor, v: Tensor) -> Tensor:
        r"""The Jensen bound :math:`\log \sum_k \pi_k \exp \mathbb{E}_{N(m, v)} \log N_k` whose gradient is the EM form."""
        log_pi = F.log_softmax(params["logits"], -1)
        return torch.logsumexp(log_pi + component_expected_log_prob(params["mu"], params["log_sigma"], m, v), -1)

    def responsibilities(self, posterior: Posterior) -> Tensor:
        r"""``r [T, K]``: the posterior's responsibilities under each component (softmax of the bound's terms)."""
        log_pi = F.log_softmax(self.logits.detach(), -1)
        expected = component_expected_log_prob(self.mu.detach(), self.log_sigma.detach(), posterior.loc.detach(),
                                               posterior.variance.detach())
        return F.softmax(log_pi + expected, -1)

    def gem_gradient(self, posterior: Posterior) -> dict[str, Tensor] | None:
        """The EM-style closed form (mean-field or point-mass posteriors); ``None`` for others (Monte Carlo)."""
        if posterior.kind not in ("meanfield", "delta"):
            return None
        params = dict(self.named_parameters())
        if "logits" not in params:
            params_all = {**params, "logits": self.logits}
            grads = expectation_gradient(self.bound, params_all, posterior)
            return {n: g for n, g in grads.items() if n in params}
        return expectation_gradient(self.bound, params, posterior)
