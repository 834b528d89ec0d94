r"""ELBO-gradient meta-gradient: Amortized Bayesian Meta-Learning (Ravi & Beatson 2019; GEM-BML eq. 4).

.. math::
    \nabla_\Theta L(\Theta; D) \simeq \nabla_\Theta \mathrm{ELBO}(\lambda(D; \Theta); \Theta)
    = \partial_\lambda \mathrm{ELBO} \cdot \nabla_\Theta \lambda(D;\Theta) + \partial_\Theta \mathrm{ELBO}

The inner SVI is unrolled with SGD and ``create_graph=True`` starting from the prior, so autograd follows
``lambda`` back to ``Theta``: memory grows linearly with the inner steps (the cost GEM removes).
"""

from __future__ import annotations

import torch
from torch import Tensor

from hbmeta.inference.algorithm import Algorithm, LearnerState, register_algorithm
from hbmeta.inference.batch import TaskBatch
from hbmeta.inference.inner import InnerConfig, negative_elbo
from hbmeta.models.guides import Guide
from hbmeta.models.hierarchical import HierarchicalModel
from hbmeta.models.latents import LatentGuide
from hbmeta.models.priors import DiagonalGaussianPrior

__all__ = ["unrolled_guide_params", "elbo_gradient", "abml_gradient", "ABMLAlgorithm", "ABML"]


def unrolled_guide_params(model: HierarchicalModel, guide: Guide, x: Tensor, y: Tensor, config: InnerConfig,
                          generator: torch.Generator | None = None, steps: int | None = None,
                          latents: LatentGuide | None = None) -> dict[str, Tensor]:
    """``lambda_K(Theta)``: K differentiable SGD steps on the negative ELBO, starting at the prior.

    Steps are taken in the guide's own parametrisation (whitened for the default mean-field guide) with the
    inner config's per-task gradient clipping, so ABML sees the same inner update as GEM, only unrolled.
    With ``latents`` (the guide of a model's per-task latents besides the weights) their parameters are unrolled
    beside the weights' and returned under :class:`~hbmeta.models.latents.LatentGuide`'s names (``"s.loc"`` ...).
    """
    prior = model.prior
    if not isinstance(prior, DiagonalGaussianPrior) or guide.name not in ("meanfield", "delta"):
        raise ValueError("the ELBO-gradient (ABML) baseline needs a DiagonalGaussianPrior and a meanfield or delta guide")
    steps = config.steps if steps is None else steps
    num_tasks, shape = x.shape[0], (x.shape[0], prior.num_params)
    mu, log_sigma = prior.mu.expand(shape), prior.log_sigma.expand(shape)
    if guide.name == "delta":
        params = {"loc": mu}
    elif getattr(guide, "whiten", False):  # unroll in the guide's own coordinates: theta = mu + sigma (z + e^rho eps)
        zeros = torch.zeros(shape, dtype=mu.dtype, device=mu.device)
        params = {"z": zeros.clone().requires_grad_(), "rho": zeros.clone().requires_grad_(),
                  "ref_loc": mu, "ref_scale": log_sigma.exp()}
    else:
        params = {"loc": mu, "log_scale": log_sigma}
    if latents is not None:
        params.update(latents.init_params(num_tasks))
    trainable = [n for n in params if not n.startswith("ref_")]
    prior_dist = prior.distribution(num_tasks)
    for _ in range(steps):
        eps = (torch.randn((config.num_samples, *shape), generator=generator, device=x.device, dtype=x.dtype)
               if guide.stochastic else None)
        loss = _negative_elbo(model, guide, params, x, y, prior_dist, eps, config, latents, generator)
        grads = torch.autograd.grad(loss, [params[n] for n in trainable], create_graph=True)
        if config.clip_norm is not None:  # per-task clipping as in the inner loop (location and scale apart)
            grads = list(grads)
            location = [i for i, n in enumerate(trainable) if n in ("loc", "z") or n.endswith(".loc")]
            for group in (location, [i for i in range(len(trainable)) if i not in location]):
                if group:
                    norms = torch.sqrt(sum(grads[i].pow(2).flatten(1).sum(1) for i in group))
                    factor = (config.clip_norm / (norms + 1e-12)).clamp(max=1.0).unsqueeze(-1)
                    for i in group:
                        grads[i] = grads[i] * factor
        params = {**params, **{n: params[n] - config.lr * g for n, g in zip(trainable, grads)}}
    return params


def _negative_elbo(model, guide, params, x, y, prior, eps, config: InnerConfig, latents: LatentGuide | None,
                   generator) -> Tensor:
    """:func:`negative_elbo` of the unrolled parameters, the latents' (if any) split off and given fresh noise."""
    if latents is None:
        return negative_elbo(model, guide, params, x, y, prior, eps, config.analytic_kl, config.elbo)
    latent_params = {n: p for n, p in params.items() if latents.owns(n)}
    noise = {n: torch.randn(size, generator=generator, device=x.device, dtype=x.dtype)
             for n, size in latents.noise_shapes(config.num_samples, x.shape[0]).items()}
    return negative_elbo(model, guide, {n: p for n, p in params.items() if not latents.owns(n)}, x, y, prior, eps,
                         config.analytic_kl, config.elbo, latents, latent_params, noise)


def elbo_gradient(model: HierarchicalModel, guide: Guide, x: Tensor, y: Tensor, config: InnerConfig,
                  generator: torch.Generator | None = None, steps: int | None = None) -> dict[str, Tensor]:
    r"""``grad_Theta ELBO(lambda_K(Theta); Theta)`` summed over tasks (ascent direction of ``L``)."""
    sites = model.latent_sites(x, y)
    latents = LatentGuide(sites) if sites else None
    params = unrolled_guide_params(model, guide, x, y, config, generator, steps, latents)
    eps = (torch.randn((config.num_samples, x.shape[0], model.prior.num_params), generator=generator, device=x.device,
                       dtype=x.dtype)
           if guide.stochastic else None)
    loss = _negative_elbo(model, guide, params, x, y, model.prior.distribution(x.shape[0]), eps, config, latents,
                          generator)
    names = [n for n, p in model.prior.named_parameters()]
    grads = torch.autograd.grad(-loss, [p for _, p in model.prior.named_parameters()])
    return dict(zip(names, grads))


def abml_gradient(model: HierarchicalModel, guide: Guide, batch: TaskBatch, config: InnerConfig,
                  generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Amortized BML: the ELBO gradient of ``L[1]`` on ``D_tr u D_val``, averaged over tasks."""
    x, y = batch.joint()
    return {n: g / batch.num_tasks for n, g in elbo_gradient(model, guide, x, y, config, generator).items()}


class ABMLAlgorithm(Algorithm):
    """ABML: Bayesian, unrolls SVI through a diagonal Gaussian prior (SVI's defaults of the base class)."""

    name = "abml"
    meta_loss = "L[1]"
    estimator = "ELBO gradient (unrolled SVI)"
    backprop_through_inner = True
    bayesian = True
    reference = "Ravi & Beatson 2019"
    description = "gradient of the ELBO through the unrolled inner SVI"

    def meta_gradient(self, learner: LearnerState, batch: TaskBatch,
                      generator: torch.Generator | None = None) -> dict[str, Tensor]:
        # an ascent direction of the ELBO, already averaged over tasks
        return {n: -g for n, g in abml_gradient(learner.model, learner.guide, batch, learner.inner, generator).items()}

    def check(self, learner: LearnerState) -> None:
        super().check(learner)
        if not isinstance(learner.prior, DiagonalGaussianPrior):
            raise ValueError(f"abml unrolls SVI through a diagonal Gaussian prior's (mu, log_sigma); got a "
                             f"{type(learner.prior).__name__}: use gem-bml or gem-bml+ for other priors")


ABML = register_algorithm(ABMLAlgorithm())
