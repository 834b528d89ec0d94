r"""Per-task latents beyond the weights: sites a task model samples in ``pyro.plate("tasks")`` besides ``theta``.

An unknown noise scale per task, a per-task offset, a mixture weight: GEM-BML's hierarchical model (section 2.2)
with a latent ``z_tau`` added to each task, and a guide that factorises over the two,

.. math::
    p(D_\tau, \theta_\tau, z_\tau; \Theta) = p(\theta_\tau; \Theta)\, p(z_\tau)\, p(D_\tau \mid \theta_\tau, z_\tau),
    \qquad q_\tau(\theta, z) = q(\theta; \lambda_\tau)\, q(z; \nu_\tau).

The inner update fits ``q(z; nu_tau)`` beside ``q(theta; lambda_tau)`` on the same ELBO. ``p(z)`` is the user's
distribution and is not meta-learned; GEM's meta-gradient (section 4) differentiates only ``log p(theta; Theta)``,
so ``q(z)`` shapes the meta-update through the weights' posterior alone.

``q(z; nu)`` is AutoNormal's family: a Normal in the unconstrained space of ``z``'s support, pushed through
``biject_to(support)``. Its parameters per task are a mean-field :class:`~hbmeta.models.posterior.Posterior` over
the flattened unconstrained values, ``loc, scale [T, k]``, carried in ``Posterior.latents[name]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.distributions.transforms import biject_to
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch import Tensor

from hbmeta.models.guides import NoiseNormal
from hbmeta.models.posterior import Posterior

__all__ = ["OnSupport", "LatentSite", "LatentGuide", "find_latent_sites", "replace_priors", "TASKS_PLATE", "INIT_SCALE"]

TASKS_PLATE = "tasks"

#: initial unconstrained scale of q(z) (AutoNormal's default ``init_scale``)
INIT_SCALE = 0.1


@dataclass(frozen=True)
class LatentSite:
    """One per-task latent site: its support, its shape per task and where its guide starts.

    Attributes:
        name: the site's name in the Pyro program.
        support: the constraint of its values (``positive`` for a noise scale).
        event_shape: the shape of one task's value.
        unconstrained_shape: the shape of one task's value in the unconstrained space of ``support``.
        init_loc: ``[k]`` where each task's ``q(z)`` starts, unconstrained: the prior's mean where it is finite,
            else the support's origin (``biject_to(support)(0)``).
    """

    name: str
    support: constraints.Constraint
    event_shape: torch.Size
    unconstrained_shape: torch.Size
    init_loc: Tensor

    @property
    def size(self) -> int:
        """``k``: the number of unconstrained values per task."""
        return math.prod(self.unconstrained_shape)

    @property
    def transform(self):
        return biject_to(self.support)

    def constrain(self, flat: Tensor) -> Tensor:
        """``[..., T, k]`` unconstrained values -> ``[..., T, *event_shape]`` values of the site."""
        return self.transform(flat.reshape(*flat.shape[:-1], *self.unconstrained_shape))

    def unconstrain(self, value: Tensor) -> Tensor:
        """``[..., T, *event_shape]`` values -> ``[..., T, k]`` unconstrained ones."""
        raw = self.transform.inv(value)
        return raw.reshape(*raw.shape[:raw.dim() - len(self.unconstrained_shape)], self.size)

    def distribution(self, posterior: Posterior, noise: Tensor | None = None) -> dist.TorchDistribution:
        """``q(z)`` with batch ``[T]`` (``[S, T]`` when ``noise [S, T, k]`` drives its draws) and the site's event; a
        point mass (``scale`` None, from ``AutoDelta``) at its value."""
        loc, scale = posterior.loc, posterior.scale
        if scale is None:
            return dist.Delta(self.constrain(loc), event_dim=len(self.event_shape))

        def shaped(t: Tensor) -> Tensor:  # [..., T, k] -> [..., T, *unconstrained_shape]
            return t.reshape(*t.shape[:-1], *self.unconstrained_shape)

        if noise is not None:
            loc, scale = loc.expand(noise.shape), scale.expand(noise.shape)
            base = NoiseNormal(shaped(loc), shaped(scale), shaped(noise))
        else:
            base = dist.Normal(shaped(loc), shaped(scale))
        return OnSupport(base.to_event(len(self.unconstrained_shape)), [self.transform], self.support)

    def sample(self, posterior: Posterior, num_samples: int, generator: torch.Generator | None = None) -> Tensor:
        """``[num_samples, T, *event_shape]`` draws of the site from its per-task posterior."""
        return self.constrain(posterior.sample(num_samples, generator))


class OnSupport(dist.TransformedDistribution):
    """A transformed distribution that states its support: ``biject_to(greater_than(0))`` is ``exp`` then an affine
    map, whose codomain reads as ``real``, so without this an autoguide would leave the values unconstrained."""

    def __init__(self, base: dist.TorchDistribution, transforms: list, support: constraints.Constraint,
                 validate_args=None):
        self._support = support
        super().__init__(base, transforms, validate_args=validate_args)

    @property
    def support(self) -> constraints.Constraint:
        return self._support

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(OnSupport, _instance)
        new._support = self._support
        return super().expand(batch_shape, _instance=new)


def find_latent_sites(trace, exclude: tuple[str, ...] = ("theta", "obs"), num_tasks: int | None = None
                      ) -> dict[str, LatentSite]:
    """The per-task latent sites of a traced task model (every unobserved sample site but ``exclude``).

    Raises:
        ValueError: for a latent that is not one value per task of ``pyro.plate("tasks")``: one outside the plate
            is shared by all tasks and would couple their posteriors; one under a further plate is not supported.
    """
    sites = {}
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"] or name in exclude or site_is_subsample(site):
            continue
        frames = [frame.name for frame in site["cond_indep_stack"] if frame.vectorized]
        fn = site["fn"]
        if TASKS_PLATE not in frames:
            raise ValueError(f"latent site {name!r} is sampled outside pyro.plate('tasks'): one value shared by all "
                             f"tasks would couple their posteriors; sample it inside the plate (one per task) or make "
                             f"it a learned parameter")
        if len(frames) > 1 or (num_tasks is not None and tuple(fn.batch_shape) != (num_tasks,)):
            raise ValueError(f"latent site {name!r} has batch shape {tuple(fn.batch_shape)} under plates {frames}: "
                             f"a per-task latent is one value per task, batch shape ({num_tasks},); put any further "
                             f"dimensions in its event (.to_event)")
        transform = biject_to(fn.support)
        raw_value = transform.inv(site["value"].detach())                    # [T, *unconstrained]
        try:
            mean = fn.mean.detach()
        except NotImplementedError:
            mean = None
        raw = transform.inv(mean) if mean is not None and torch.isfinite(mean).all() else torch.zeros_like(raw_value)
        unconstrained = raw_value.shape[1:]
        init = raw.expand_as(raw_value).reshape(raw_value.shape[0], -1)[0].clone()
        sites[name] = LatentSite(name, fn.support, torch.Size(fn.event_shape), torch.Size(unconstrained), init)
    return sites


class LatentGuide:
    """``q(z; nu_tau)`` for every latent site, as the functional guides of :mod:`hbmeta.models.guides` are: a dict of
    per-task tensors ``{name}.loc`` and ``{name}.log_scale`` (``[T, k]``) that the inner update optimises.

    Draws are reparameterised with noise the caller hands in (``sample``), so they come from the run's generators.
    """

    def __init__(self, sites: dict[str, LatentSite]):
        self.sites = sites

    def init_params(self, num_tasks: int, start: dict[str, Posterior] | None = None) -> dict[str, Tensor]:
        """Parameters at ``start`` (an earlier fit's latent posteriors, GEM-BML+'s second update) or at each site's
        :attr:`LatentSite.init_loc` with scale :data:`INIT_SCALE`."""
        params = {}
        for name, site in self.sites.items():
            if start is not None and name in start:
                loc, scale = start[name].loc, start[name].scale
            else:
                loc = site.init_loc.expand(num_tasks, site.size)
                scale = torch.full_like(loc, INIT_SCALE)
            params[f"{name}.loc"] = loc.detach().clone().requires_grad_()
            params[f"{name}.log_scale"] = scale.detach().log().clone().requires_grad_()
        return params

    def owns(self, name: str) -> bool:
        """Whether ``name`` is one of this guide's parameters (``"{site}.loc"``, ``"{site}.log_scale"``)."""
        site, _, part = name.rpartition(".")
        return site in self.sites and part in ("loc", "log_scale")

    def noise_shapes(self, num_samples: int, num_tasks: int) -> dict[str, torch.Size]:
        return {name: torch.Size((num_samples, num_tasks, site.size)) for name, site in self.sites.items()}

    def posteriors(self, params: dict[str, Tensor]) -> dict[str, Posterior]:
        return {name: Posterior(params[f"{name}.loc"], params[f"{name}.log_scale"].exp()) for name in self.sites}

    def sample(self, params: dict[str, Tensor], noise: dict[str, Tensor] | None = None) -> None:
        """The guide's Pyro statements for the latent sites (call inside ``pyro.plate("tasks")``)."""
        for name, posterior in self.posteriors(params).items():
            pyro.sample(name, self.sites[name].distribution(posterior, None if noise is None else noise[name]))


class _ReplacePriors(Messenger):
    def __init__(self, priors: dict[str, dist.TorchDistribution]):
        super().__init__()
        self.priors = priors

    def _pyro_sample(self, msg) -> None:
        if msg["name"] in self.priors and not msg["is_observed"]:
            msg["fn"] = self.priors[msg["name"]]


def replace_priors(fn: Callable, priors: dict[str, dist.TorchDistribution]) -> Callable:
    """``fn`` with the distributions of the named latent sites replaced (GEM-BML+'s update VI(q1, D_val) takes
    ``q1(z)`` as the prior of ``z`` just as it takes ``q1(theta)`` as the weights')."""
    if not priors:
        return fn
    return _ReplacePriors(priors)(fn)
