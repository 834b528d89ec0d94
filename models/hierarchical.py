r"""The hierarchical model of GEM-BML (section 2.2, Figure 1b), written as a Pyro model.

.. math::
    \theta_\tau \sim p(\theta; \Theta), \qquad D_\tau \mid \theta_\tau \sim p(D \mid \theta_\tau)
    \quad (\tau = 1..T \text{ in one } \texttt{pyro.plate("tasks")})

Built from three swappable parts around an untouched ``nn.Module`` (as TyXe's BNNs are): a
:class:`~hbmeta.models.priors.Prior`, a :class:`~hbmeta.models.likelihoods.Likelihood` and the network's functional view
:class:`~hbmeta.models.functional.BatchedNet`. The prior used inside the model can be overridden by any
distribution with batch shape ``[T]`` (the sequential update VI(lambda_tr, D_val) uses q_tr as the prior).
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import Tensor, nn

from hbmeta.models.functional import BatchedNet
from hbmeta.models.latents import LatentSite, find_latent_sites
from hbmeta.models.likelihoods import Likelihood
from hbmeta.models.posterior import Posterior
from hbmeta.models.priors import Prior

__all__ = ["HierarchicalModel"]


class HierarchicalModel:
    """``p(D_1..T, theta_1..T; Theta)`` for a meta-batch of ``T`` tasks.

    Args:
        net: the user's network (an ``nn.Module`` or a :class:`BatchedNet` around one).
        prior: ``p(theta; Theta)`` over the network's ``P`` flat weights.
        likelihood: ``p(D | theta)``.
    """

    def __init__(self, net: nn.Module | BatchedNet, prior: Prior, likelihood: Likelihood):
        self.net = net if isinstance(net, BatchedNet) else BatchedNet(net)
        if prior.num_params != self.net.num_params:
            raise ValueError(f"prior is over {prior.num_params} weights; the network has {self.net.num_params}")
        self.prior = prior
        self.likelihood = likelihood

    def model(self, x: Tensor, y: Tensor, prior: dist.TorchDistribution | None = None, noise: Tensor | None = None) -> Tensor:
        """The Pyro model. ``x [T, N, ...]``, ``y [T, N, ...]``; ``noise`` is used by the guide only."""
        num_tasks = x.shape[0]
        prior = self.prior.distribution(num_tasks) if prior is None else prior
        with pyro.plate("tasks", num_tasks, dim=-1):
            theta = pyro.sample("theta", prior)
            pred = self.net(theta, x)
            self.likelihood.pyro_model(pred, y)
        return theta

    @property
    def runs_user_code(self) -> bool:
        """Whether the model runs user-written Pyro code (an overridden :meth:`model` or a Pyro-program likelihood)
        that may sample latent sites beyond ``theta``."""
        return self.likelihood.is_program or type(self).model is not HierarchicalModel.model

    def latent_sites(self, x: Tensor, y: Tensor | None, prior: dist.TorchDistribution | None = None
                     ) -> dict[str, LatentSite]:
        """The per-task latents besides ``theta`` that :meth:`model` samples on data ``(x, y)``
        (:mod:`hbmeta.models.latents`; one trace of the model, none for the built-in likelihoods)."""
        if not self.runs_user_code:
            return {}
        with torch.no_grad(), pyro.validation_enabled(False):
            trace = poutine.trace(self.model).get_trace(x, y, prior)
        return find_latent_sites(trace, num_tasks=x.shape[0])

    def initial_posterior(self, x: Tensor, y: Tensor) -> Posterior:
        """Where the inner update on data ``(x, y)`` starts: the prior's :meth:`~hbmeta.models.priors.Prior.start_posterior`
        (the prior itself for most priors; the best-fitting component for a mixture)."""
        return self.prior.start_posterior(x.shape[0], lambda theta: self.log_likelihood(theta, x, y))

    def log_likelihood(self, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """``log p(D_tau | theta)`` for ``theta [*S, T, P]`` -> ``[*S, T]``."""
        return self.likelihood.log_prob(self.net(theta, x), y)

    def point_loss(self, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """The baselines' per-task loss (MSE / cross entropy) at ``theta [*S, T, P]`` -> ``[*S, T]``."""
        return self.likelihood.point_loss(self.net(theta, x), y)

    def to(self, device: torch.device | str) -> "HierarchicalModel":
        self.net.to(device)
        self.prior.to(device)
        self.likelihood.to(device)
        return self
