r"""Gauss-Newton VI for a model with per-task latents beyond the weights (a noise scale, an offset).

A Pyro-program likelihood (:class:`~hbmeta.models.pyro_likelihood.PyroLikelihood`) may sample latents ``z_tau`` in
the tasks plate; the guide factorises, :math:`q_\tau(\theta, z) = q(\theta; \lambda_\tau)\, q(z; \nu_\tau)`
(:mod:`hbmeta.models.latents`). The ELBO is maximised by coordinate ascent, one block at a time, every step:

1. **the latents**, ``latent_steps`` Adam steps on the ELBO's terms in ``nu`` with the weights at their posterior
   mean ``m``: :math:`\mathbb{E}_{q(z)} \log p(D \mid f(x; m), z) - \mathrm{KL}(q(z) \,\|\, p(z))`, by Pyro's ELBO with
   reparameterised draws (``q(z)`` is AutoNormal's family in the unconstrained space; ``p(z)`` is the program's);
2. **the weights**, one Gauss-Newton VI step (:func:`hbmeta.inference.gauss_newton.gauss_newton_fit`) on the likelihood
   with the latents fixed at their posterior medians, :math:`\log p(D \mid \theta, \hat z)`, whose curvature in the
   outputs comes by autograd (:meth:`hbmeta.models.likelihoods.Likelihood.curvature`).

Step 2 plugs in ``z``'s median rather than averaging over ``q(z)`` (for a noise scale this is the usual
variational-EM simplification; the weights' step keeps its line search and exact solve). The weights' step is
deterministic; the latents' draws come from ``generator``.
"""

from __future__ import annotations

from typing import Callable

import pyro.distributions as dist
import torch
from torch import Tensor

from hbmeta.inference.gauss_newton import gauss_newton_fit
from hbmeta.models.guides import DeltaGuide
from hbmeta.models.hierarchical import HierarchicalModel
from hbmeta.models.latents import LatentGuide, LatentSite
from hbmeta.models.posterior import Posterior

__all__ = ["gauss_newton_latent_fit", "LATENT_STEPS", "LATENT_LR"]

#: Adam steps on ``q(z)`` per Gauss-Newton step of the weights
LATENT_STEPS = 5
#: Adam's learning rate for ``q(z)`` when the inner config gives none (Gauss-Newton has no learning rate of its own)
LATENT_LR = 0.1


def gauss_newton_latent_fit(
    model: HierarchicalModel,
    x: Tensor,
    y: Tensor,
    start: Posterior,
    prior_loc: Tensor,
    prior_var: Tensor,
    steps: int,
    sites: dict[str, LatentSite],
    negative_elbo: Callable[..., Tensor],
    kind: str = "meanfield",
    latent_prior: dict[str, dist.TorchDistribution] | None = None,
    latent_lr: float | None = None,
    latent_steps: int = LATENT_STEPS,
    num_samples: int = 1,
    generator: torch.Generator | None = None,
    callback: Callable[[int, Posterior], None] | None = None,
    **gauss_newton: object,
) -> Posterior:
    """``steps`` alternating updates (module docstring) for every task at once; the detached posterior of the
    weights with the latents' in ``latents``.

    Args:
        sites: the model's per-task latents (:meth:`HierarchicalModel.latent_sites`).
        negative_elbo: :func:`hbmeta.inference.inner.negative_elbo` (passed in: this module sits below ``inner``).
        latent_prior: replaces the program's distribution of a latent (GEM-BML+'s sequential update: q1's).
        latent_lr, latent_steps, num_samples: Adam's rate and steps for ``q(z)`` per step, and its draws per step.
        **gauss_newton: the weights' :func:`gauss_newton_fit` settings (``halvings``, ``curvature``, ...).
    """
    num_tasks = x.shape[0]
    latents = LatentGuide(sites)
    params = latents.init_params(num_tasks, start.latents)
    optimizer = torch.optim.Adam(list(params.values()), lr=LATENT_LR if latent_lr is None else latent_lr)
    prior = dist.Normal(prior_loc.expand_as(start.loc), prior_var.sqrt().expand_as(start.loc)).to_event(1)
    weights = start.detach().with_latents(None)
    shapes = latents.noise_shapes(num_samples, num_tasks)

    def current(posterior: Posterior) -> Posterior:
        return posterior.with_latents({n: p.detach().clone() for n, p in latents.posteriors(params).items()})

    if callback is not None:
        callback(0, current(weights))
    for step in range(1, steps + 1):
        point = {"loc": weights.loc.detach()}
        still = torch.zeros(num_samples, num_tasks, weights.loc.shape[-1], dtype=weights.loc.dtype,
                            device=weights.loc.device)
        for _ in range(latent_steps):
            optimizer.zero_grad(set_to_none=True)
            noise = {name: torch.randn(shape, generator=generator, dtype=weights.loc.dtype, device=weights.loc.device)
                     for name, shape in shapes.items()}
            loss = negative_elbo(model, DeltaGuide(), point, x, y, prior, still, True, "pyro", latents, params, noise,
                                 latent_prior)
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            medians = {name: sites[name].constrain(params[f"{name}.loc"]) for name in sites}
        given = HierarchicalModel(model.net, model.prior, model.likelihood.condition_tasks(medians))
        weights = gauss_newton_fit(given, x, y, weights, prior_loc, prior_var, 1, kind, **gauss_newton)
        if callback is not None:
            callback(step, current(weights))
    return current(weights)
