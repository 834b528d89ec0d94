r"""Your own task likelihood as a Pyro program over the network's output (GEM-BML section 2.2).

.. code-block:: python

    def student_t(pred, y):                       # pred [*S, T, N, O] network output, y [T, N, O] (None: predict)
        pyro.sample("obs", dist.StudentT(3.0, pred, 0.1).to_event(2), obs=y)

    learner = MetaLearner(net, PyroLikelihood(student_t), algorithm="gem-bml+")

**The contract.** The function samples one observed site named ``"obs"`` whose event covers a task's points
(``.to_event(2)`` for ``[N, O]`` outputs), so its batch shape is the leading ``[*S, T]`` of ``pred``; hbmeta calls it
inside ``pyro.plate("tasks")`` of :meth:`hbmeta.models.hierarchical.HierarchicalModel.model`. It may use anything
Pyro offers (a heteroscedastic head, a mixture of noise models, deterministic transforms), and it may sample
**per-task latents** besides the weights, one value per task, e.g. an unknown noise scale:

.. code-block:: python

    def noisy(pred, y):
        s = pyro.sample("s", dist.LogNormal(-1.0, 0.5))          # [*S, T]: one scale per task
        pyro.sample("obs", dist.Normal(pred, s[..., None, None]).to_event(2), obs=y)

The inner update then fits a posterior ``q(s)`` per task beside the weights' (:mod:`hbmeta.models.latents`), and
the adapted :class:`~hbmeta.models.posterior.Posterior` carries it in ``latents["s"]``.

**What hbmeta does with it.** ``log_prob(pred, y)`` is the traced program's log-density of ``"obs"`` (and of any other
observed site), so the torch fast path of the inner ELBO, :math:`\mathrm{KL}(q \| p) - E_q \log p(D \mid \theta)`, is
the same number Pyro's ``TraceMeanField_ELBO`` computes from the model (tested equal); its gradient and Hessian in
``pred`` by autograd (:meth:`Likelihood.curvature <hbmeta.models.likelihoods.Likelihood.curvature>`) give GEM-BML and
GEM-BML+ the Gauss-Newton inner update (their default, as for the built-in likelihoods; ABML unrolls SVI), and
``predict`` draws
observations by running the program with ``y=None``. A program with latents has no ``log p(y | pred)`` without their
values: the inner update runs it through Pyro's ELBO, and :meth:`PyroLikelihood.condition` fixes the latents at
posterior draws (``MetaLearner.predict`` does, so ``PosteriorPredictive.likelihood`` scores ``y`` given both).
"""

from __future__ import annotations

from typing import Callable

import pyro
import torch
from pyro import poutine
from torch import Tensor

from hbmeta.models.likelihoods import Likelihood

__all__ = ["PyroLikelihood"]

OBS = "obs"


class PyroLikelihood(Likelihood):
    """A likelihood given as a Pyro program ``fn(pred, y)`` that samples the observed site ``"obs"``.

    Args:
        fn: the program (see the module docstring for the contract).
        name: a label for ``repr`` and logs (default: the function's name).
    """

    is_program = True

    def __init__(self, fn: Callable[[Tensor, Tensor | None], object], name: str | None = None):
        super().__init__()
        if not callable(fn):
            raise TypeError(f"PyroLikelihood takes a Pyro program fn(pred, y); got {type(fn).__name__}")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "pyro likelihood")
        self.conditioned: tuple[str, ...] = ()
        self._per_task: tuple[Callable, dict[str, Tensor]] | None = None  # (program, {site: [T, *event]})

    def condition(self, values: dict[str, Tensor]) -> "PyroLikelihood":
        """This likelihood with the latent sites in ``values`` fixed (each ``[*S, T, *event]``, broadcasting against
        ``pred``'s leading dims): ``log_prob`` is then ``log p(y | pred, z)``, without ``log p(z)``."""
        if not values:
            return self
        conditioned = PyroLikelihood(poutine.condition(self.fn, data=values), self.name)
        conditioned.conditioned = self.conditioned + tuple(values)
        return conditioned

    def condition_tasks(self, values: dict[str, Tensor]) -> "PyroLikelihood":
        """:meth:`condition` on one value per task, ``values[name] [T, *event]``, remembering them by task so that
        :meth:`select` and :meth:`tiled` follow subsets and stacks of the batch's tasks (the Gauss-Newton inner update
        with per-task latents fixes them at their posterior medians this way)."""
        conditioned = self.condition(values)
        conditioned._per_task = (self.fn, values)
        return conditioned

    def select(self, index: Tensor | slice) -> "PyroLikelihood":
        if self._per_task is None:
            return self
        fn, values = self._per_task
        return PyroLikelihood(fn, self.name).condition_tasks({n: v[index] for n, v in values.items()})

    def tiled(self, times: int) -> "PyroLikelihood":
        if self._per_task is None or times == 1:
            return self
        fn, values = self._per_task
        return PyroLikelihood(fn, self.name).condition_tasks(
            {n: v.repeat(times, *[1] * (v.dim() - 1)) for n, v in values.items()})

    def _trace(self, pred: Tensor, y: Tensor | None):
        with pyro.validation_enabled(False):
            trace = poutine.trace(self.fn).get_trace(pred, y)
        sites = {n: s for n, s in trace.nodes.items() if s["type"] == "sample"}
        if OBS not in sites:
            raise ValueError(f"likelihood {self.name!r} samples no site named 'obs'; write "
                             f"pyro.sample('obs', <distribution over a task's points>, obs=y)")
        latent = [n for n, s in sites.items() if not s["is_observed"] and n != OBS]
        if latent:
            raise ValueError(f"likelihood {self.name!r} has per-task latent site(s) {latent}: p(y | pred) needs their "
                             f"values: the Bayesian inner update (SVI) fits their posterior, point-estimate baselines cannot "
                             f"use this likelihood; score y with PyroLikelihood.condition(draws) "
                             f"(MetaLearner.predict(...).likelihood is conditioned on posterior draws)")
        return trace, sites

    def pyro_model(self, pred: Tensor, y: Tensor | None) -> None:
        self.fn(pred, y)

    def log_prob(self, pred: Tensor, y: Tensor) -> Tensor:
        """``log p(y | pred)`` per ``[*S, T]``: the log-density of every observed site of the traced program."""
        _, sites = self._trace(pred, y)
        total = 0.0
        for site in sites.values():
            if site["is_observed"] and site["name"] not in self.conditioned:
                lp = site["fn"].log_prob(site["value"])
                lead = pred.shape[:-2]  # [*S, T]; latents fixed at [S', T] draws may add leading draws
                if lp.shape != lead and not (self.conditioned and lp.dim() >= 1 and lp.shape[-1:] == lead[-1:]
                                             and torch.broadcast_shapes(lp.shape, lead) == lp.shape):
                    raise ValueError(f"likelihood {self.name!r}: site {site['name']!r} has batch shape "
                                     f"{tuple(lp.shape)}; its event must cover a task's points (e.g. .to_event(2)) so "
                                     f"that the batch shape is pred's leading {tuple(pred.shape[:-2])}")
                total = total + lp
        return total

    def point_loss(self, pred: Tensor, y: Tensor) -> Tensor:
        """The negative log-likelihood per point (the baselines' loss for this observation model)."""
        return -self.log_prob(pred, y) / y.shape[-2]

    def sample(self, pred: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Observations drawn by running the program with ``y=None`` (torch's global random stream)."""
        trace, _ = self._trace(pred, None)
        return trace.nodes[OBS]["value"].detach()

    def __repr__(self) -> str:
        return f"PyroLikelihood({self.name})"
