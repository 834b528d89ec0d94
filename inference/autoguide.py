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

The package's own guides (:mod:`hbmeta.models.guides`) remain the fast path: they take their noise from an explicit
generator (reproducible, resumable runs), while autoguides draw from torch's global RNG.
"""

from __future__ import annotations

import pyro
import torch
from pyro.infer import TraceMeanField_ELBO
from pyro.infer.autoguide import AutoDelta, AutoDiagonalNormal, AutoNormal, init_to_value
from torch import Tensor

from hbmeta.models.hierarchical import HierarchicalModel
from hbmeta.models.posterior import Posterior

__all__ = ["AUTOGUIDES", "fit_autoguide"]

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


def fit_autoguide(model: HierarchicalModel, x: Tensor, y: Tensor, autoguide: str = "AutoNormal", steps: int = 100,
                  lr: float = 0.01, start: Posterior | None = None, num_particles: int = 1) -> Posterior:
    r"""VI for every task of ``(x, y)`` with a Pyro autoguide in the task plate; returns detached posteriors.

    Maximises :math:`\sum_\tau \mathrm{ELBO}_\tau` with Pyro's ``TraceMeanField_ELBO`` and Adam, parameters kept
    on the autoguide module (``module_local_params``: nothing in Pyro's global parameter store). The guide's
    means start at ``start`` (default: where the model's prior starts each task).

    Raises:
        ValueError: for an autoguide that does not factorise over tasks (see :data:`AUTOGUIDES`), naming why.
    """
    if autoguide not in AUTOGUIDES:
        raise ValueError(f"unknown autoguide {autoguide!r}; choose one of {', '.join(AUTOGUIDES)}")
    cls, why = AUTOGUIDES[autoguide]
    if cls is None:
        raise ValueError(f"{autoguide} does not work per task inside pyro.plate('tasks'): {why}")
    start = model.initial_posterior(x, y) if start is None else start
    num_tasks = x.shape[0]

    def pyro_model(x: Tensor, y: Tensor) -> Tensor:
        return model.model(x, y)

    with pyro.settings.context(module_local_params=True):
        init = init_to_value(values={"theta": start.loc.detach().clone()})
        kwargs = {} if cls is AutoDelta else {"init_scale": float(start.variance.sqrt().mean().clamp_min(1e-4))}
        guide = cls(pyro_model, init_loc_fn=init, **kwargs)
        loss_fn = TraceMeanField_ELBO(num_particles=num_particles, vectorize_particles=num_particles > 1,
                                      max_plate_nesting=1)(pyro_model, guide)
        loss_fn(x, y)  # creates the guide's parameters
        optimizer = torch.optim.Adam(loss_fn.parameters(), lr=lr)
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(x, y)
            loss.backward()
            optimizer.step()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{autoguide} diverged: ELBO {loss.item()}; lower lr (now {lr})")
        with torch.no_grad():
            if cls is AutoNormal:
                return Posterior(guide.locs.theta.detach().clone(), guide.scales.theta.detach().clone())
            if cls is AutoDelta:
                return Posterior(guide.median()["theta"].detach().clone())
            return Posterior(guide.loc.detach().reshape(num_tasks, -1).clone(),
                             guide.scale.detach().reshape(num_tasks, -1).clone())
