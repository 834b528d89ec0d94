r"""Pyro autoguides as the per-task guide of the inner update (Algorithm 1, subroutine VI), where they fit.

The hierarchical model samples every task's weights in one ``pyro.plate("tasks", T)``, so a guide is
"per task" only if its parameters carry the plate's batch dimension and the tasks' posteriors stay
independent (Adam acting element-wise then makes one SVI exactly ``T`` single-task SVIs):

==============================  ===========  ==================================================================
autoguide                       per task?    why
==============================  ===========  ==================================================================
``AutoNormal``                  yes          one ``Normal`` per site with the plate's shape: ``loc, scale [T, P]``
``AutoDelta``                   yes          one point per site with the plate's shape: ``[T, P]`` (MAP)
``AutoDiagonalNormal``          yes          flattens all latents to one ``[T P]`` vector, but a diagonal one:
                                             tasks stay independent; reshaped to ``[T, P]`` here
``AutoLowRankMultivariateNormal`` no         one ``[T P, r]`` factor: the ``r`` directions mix tasks, so the
                                             tasks' posteriors are correlated (use ``guide="lowrank"``)
``AutoMultivariateNormal``      no           a ``(T P) x (T P)`` covariance couples every pair of tasks (and is
                                             ``(T P)^2`` numbers: 7.8 GB for 25 sinusoid tasks)
``AutoIAFNormal``, flows        no           one flow over the flattened ``[T P]`` vector: tasks couple
``AutoLaplaceApproximation``    no           its Hessian is over the flattened ``[T P]`` vector (as above)
==============================  ===========  ==================================================================

A model with per-task latents besides the weights (:mod:`hbmeta.models.latents`, e.g. a noise scale sampled by a
:class:`~hbmeta.models.pyro_likelihood.PyroLikelihood`) gets the autoguide's own site for each (``AutoNormal``,
``AutoDelta``; ``AutoDiagonalNormal`` would flatten them into the weights' vector and is refused for such a model).

The package's own guides (:mod:`hbmeta.models.guides`) remain the fast path: they take their noise from an explicit
generator (reproducible, resumable runs), while autoguides draw from torch's global RNG.
"""

from __future__ import annotations

import functools
from typing import Callable

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import TraceMeanField_ELBO
from pyro.infer.autoguide import AutoDelta, AutoDiagonalNormal, AutoGuide, AutoNormal, init_to_median, init_to_value
from pyro.nn import PyroParam
from torch import Tensor

from hbmeta.models.guides import Guide

from hbmeta.models.hierarchical import HierarchicalModel
from hbmeta.models.latents import INIT_SCALE, LatentSite, replace_priors
from hbmeta.models.posterior import Posterior

__all__ = ["AUTOGUIDES", "fit_autoguide", "autoguide_factory", "AutoGuidePerTask", "is_autoguide"]

#: autoguide name -> (class or None, why it does / does not fit a task plate)
AUTOGUIDES: dict[str, tuple[type | None, str]] = {
    "AutoNormal": (AutoNormal, "per task: loc and scale carry the plate's shape [T, P]"),
    "AutoDelta": (AutoDelta, "per task: a point with the plate's shape [T, P] (MAP)"),
    "AutoDiagonalNormal": (AutoDiagonalNormal, "per task: one flat [T*P] diagonal Normal, tasks independent"),
    "AutoLowRankMultivariateNormal": (None, ("couples tasks: its r low-rank directions span all T*P weights; "
                                             "use guide='lowrank' (a low-rank factor per task)")),
    "AutoMultivariateNormal": (None, "couples tasks: one (T*P) x (T*P) covariance over all tasks' weights"),
    "AutoIAFNormal": (None, "couples tasks: one normalising flow over the flattened T*P weights"),
    "AutoLaplaceApproximation": (None, "couples tasks: its Hessian is over the flattened T*P weights"),
}


def fit_autoguide(model: HierarchicalModel, x: Tensor, y: Tensor, autoguide: str | Callable = "AutoNormal",
                  steps: int = 100, lr: float = 0.01, start: Posterior | None = None, num_particles: int = 1,
                  prior: dist.TorchDistribution | None = None, sites: dict[str, LatentSite] | None = None,
                  latent_prior: dict[str, dist.TorchDistribution] | None = None,
                  latent_lr: float | None = None) -> Posterior:
    r"""VI for every task of ``(x, y)`` with a Pyro autoguide in the task plate; returns detached posteriors.

    Maximises :math:`\sum_\tau \mathrm{ELBO}_\tau` with Pyro's ``TraceMeanField_ELBO`` and Adam, parameters kept
    on the autoguide module (``module_local_params``: nothing in Pyro's global parameter store). The guide's
    means start at ``start`` (default: where the model's prior starts each task).

    Per-task latents besides the weights (``sites``, :meth:`HierarchicalModel.latent_sites`) get the autoguide's own
    posterior per site, started at ``start.latents`` where given (else at the prior's median), fitted at ``latent_lr``
    (``None``: ``lr``), and come back in the posterior's ``latents``; ``latent_prior`` replaces their distributions
    in the model (GEM-BML+'s second update).

    Raises:
        ValueError: for an autoguide that does not factorise over tasks (see :data:`AUTOGUIDES`), naming why.
    """
    factory, cls = autoguide_factory(autoguide)
    start = model.initial_posterior(x, y) if start is None else start
    num_tasks = x.shape[0]
    sites = model.latent_sites(x, y, prior) if sites is None else sites
    if sites and cls is AutoDiagonalNormal:
        raise ValueError(f"AutoDiagonalNormal flattens the per-task latent(s) {sorted(sites)} and the weights into one "
                         f"vector; use AutoNormal (one posterior per site) for a model with latents")
    program = replace_priors(model.model, latent_prior or {})

    def pyro_model(x: Tensor, y: Tensor) -> Tensor:
        return program(x, y, prior)

    values = {"theta": start.loc.detach().clone()}
    for name, site in sites.items():
        if start.latents and name in start.latents:
            values[name] = site.constrain(start.latents[name].loc.detach())
    with pyro.settings.context(module_local_params=True):
        init = init_to_value(values=values, fallback=init_to_median)
        kwargs = {"init_loc_fn": init}
        if cls is not AutoDelta and not _sets(factory, "init_scale"):
            kwargs["init_scale"] = float(start.variance.sqrt().mean().clamp_min(1e-4))
        guide = factory(pyro_model, **kwargs)
        loss_fn = TraceMeanField_ELBO(num_particles=num_particles, vectorize_particles=num_particles > 1,
                                      max_plate_nesting=1)(pyro_model, guide)
        loss_fn(x, y)  # creates the guide's parameters
        if cls is AutoNormal and not _sets(factory, "init_scale"):  # the weights' scale is not the latents'
            for name in sites:
                scale = getattr(guide.scales, name).detach()
                setattr(guide.scales, name, PyroParam(torch.full_like(scale, INIT_SCALE), guide.scale_constraint,
                                                      guide._event_dims[name]))
        latent, weights = [], []
        for name, param in loss_fn.named_parameters():  # e.g. "guide.locs.s_unconstrained"
            site = name.rsplit(".", 1)[-1].removesuffix("_unconstrained")
            (latent if site in sites else weights).append(param)
        groups = [{"params": weights, "lr": lr}]
        if latent:
            groups.append({"params": latent, "lr": lr if latent_lr is None else latent_lr})
        optimizer = torch.optim.Adam(groups, lr=lr)
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(x, y)
            loss.backward()
            optimizer.step()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{cls.__name__} diverged: ELBO {loss.item()}; lower lr (now {lr})")
        with torch.no_grad():
            if cls is AutoNormal:
                def flat(t: Tensor) -> Tensor:
                    return t.detach().reshape(num_tasks, -1).clone()
                return Posterior(flat(guide.locs.theta), flat(guide.scales.theta)).with_latents(
                    {n: Posterior(flat(getattr(guide.locs, n)), flat(getattr(guide.scales, n))) for n in sites})
            if cls is AutoDelta:
                median = guide.median()
                return Posterior(median["theta"].detach().clone()).with_latents(
                    {n: Posterior(site.unconstrain(median[n].detach())) for n, site in sites.items()})
            return Posterior(guide.loc.detach().reshape(num_tasks, -1).clone(),
                             guide.scale.detach().reshape(num_tasks, -1).clone())


def is_autoguide(guide) -> bool:
    """Whether ``guide`` is a Pyro autoguide class or a factory of one (``functools.partial(AutoNormal, ...)``)."""
    func = guide.func if isinstance(guide, functools.partial) else guide
    return isinstance(func, type) and issubclass(func, AutoGuide)


def _sets(factory, keyword: str) -> bool:
    return isinstance(factory, functools.partial) and keyword in factory.keywords


def autoguide_factory(autoguide: str | Callable) -> tuple[Callable, type]:
    """``(factory, class)`` of an autoguide given by name, class or ``functools.partial``; one that couples the tasks
    of the plate is refused with the reason (:data:`AUTOGUIDES`)."""
    if isinstance(autoguide, str):
        if autoguide not in AUTOGUIDES:
            raise ValueError(f"unknown autoguide {autoguide!r}; choose one of {', '.join(AUTOGUIDES)}")
        cls = AUTOGUIDES[autoguide][0]
        name = autoguide
        factory = cls
    elif is_autoguide(autoguide):
        factory = autoguide
        cls = autoguide.func if isinstance(autoguide, functools.partial) else autoguide
        name = cls.__name__
    else:
        raise TypeError(f"an autoguide is a name, a pyro.infer.autoguide class or a functools.partial of one; "
                        f"got {autoguide!r}")
    per_task = {c for c, _ in AUTOGUIDES.values() if c is not None}
    if cls not in per_task:
        why = AUTOGUIDES.get(name, (None, "it is not one of the autoguides known to keep tasks independent "
                                          f"({', '.join(c.__name__ for c in per_task)})"))[1]
        raise ValueError(f"{name} does not work per task inside pyro.plate('tasks'): {why}")
    return factory, cls


class AutoGuidePerTask(Guide):
    """A Pyro autoguide as a :class:`MetaLearner`'s guide: each inner update fits a fresh one in the task plate
    (:func:`fit_autoguide`, the SVI settings of the inner update: steps, learning rate, Monte-Carlo samples).

    ``MetaLearner(net, guide=AutoNormal)`` or ``guide=functools.partial(AutoNormal, init_scale=0.05)`` (TyXe's
    convention) builds one. The autoguide is fitted with Adam at ``lr`` (in weight space, unlike the whitened SGD
    of hbmeta's own guides, whose inner ``lr`` would not suit it) for the inner update's ``steps``, its per-task
    latents besides the weights at the inner update's ``latent_lr`` (``None``: ``lr``); its noise comes from torch's
    global random stream, not the run's generators.
    """

    stochastic = True

    def __init__(self, autoguide: str | Callable, lr: float = 0.01):
        self.factory, self.cls = autoguide_factory(autoguide)
        self.lr = lr
        self.name = f"auto:{self.cls.__name__}"
        self.stochastic = self.cls is not AutoDelta

    def fit(self, model: HierarchicalModel, x: Tensor, y: Tensor, start: Posterior,
            prior: dist.TorchDistribution | None, steps: int, num_samples: int,
            sites: dict[str, LatentSite] | None = None,
            latent_prior: dict[str, dist.TorchDistribution] | None = None, latent_lr: float | None = None) -> Posterior:
        return fit_autoguide(model, x, y, self.factory, steps=steps, lr=self.lr, start=start,
                             num_particles=num_samples, prior=prior, sites=sites, latent_prior=latent_prior,
                             latent_lr=latent_lr)

    def init_params(self, start, reference=None):
        raise TypeError(f"{self.name} fits its own parameters (AutoGuidePerTask.fit); it has no functional form")

    def __repr__(self) -> str:
        return f"AutoGuidePerTask({self.cls.__name__})"
