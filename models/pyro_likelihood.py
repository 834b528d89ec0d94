r"""Your own task likelihood as a Pyro program over the network's output (GEM-BML section 2.2).

.. code-block:: python

    def student_t(pred, y):                       # pred [*S, T, N, O] network output, y [T, N, O] (None: predict)
        pyro.sample("obs", dist.StudentT(3.0, pred, 0.1).to_event(2), obs=y)

    learner = MetaLearner(net, PyroLikelihood(student_t), algorithm="gem-bml+")

**The contract.** The function samples one observed site named ``"obs"`` whose event covers a task's points
(``.to_event(2)`` for ``[N, O]`` outputs), so its batch shape is the leading ``[*S, T]`` of ``pred``; hbmeta calls it
inside ``pyro.plate("tasks")`` of :meth:`hbmeta.models.hierarchical.HierarchicalModel.model`. It may use anything
Pyro offers (a heteroscedastic head, a mixture of noise models, deterministic transforms) as long as every sample
site but ``"obs"`` is observed: a per-task latent beyond the weights would need its own variational posterior in
the inner update, which hbmeta does not fit, and is refused with that reason rather than left out.

**What hbmeta does with it.** ``log_prob(pred, y)`` is the traced program's log-density of ``"obs"`` (and of any other
observed site), so the torch fast path of the inner ELBO, :math:`\mathrm{KL}(q \| p) - E_q \log p(D \mid \theta)`, is
the same number Pyro's ``TraceMeanField_ELBO`` computes from the model (tested equal); GEM-BML, GEM-BML+ and ABML
meta-train through it with the SVI inner update (it has no Gauss-Newton curvature), and ``predict`` draws
observations by running the program with ``y=None``.
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

    def __init__(self, fn: Callable[[Tensor, Tensor | None], object], name: str | None = None):
        super().__init__()
        if not callable(fn):
            raise TypeError(f"PyroLikelihood takes a Pyro program fn(pred, y); got {type(fn).__name__}")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "pyro likelihood")

    def _trace(self, pred: Tensor, y: Tensor | None):
        with pyro.validation_enabled(False):
            trace = poutine.trace(self.fn).get_trace(pred, y)
        sites = {n: s for n, s in trace.nodes.items() if s["type"] == "sample"}
        if OBS not in sites:
            raise ValueError(f"likelihood {self.name!r} samples no site named 'obs'; write "
                             f"pyro.sample('obs', <distribution over a task's points>, obs=y)")
        latent = [n for n, s in sites.items() if not s["is_observed"] and n != OBS]
        if latent:
            raise ValueError(f"likelihood {self.name!r} has latent site(s) {latent}: a per-task latent beyond the "
                             f"weights needs its own posterior in the inner update, which hbmeta does not fit; make it "
                             f"a function of the network's output or a learned parameter instead")
        return trace, sites

    def pyro_model(self, pred: Tensor, y: Tensor | None) -> None:
        self.fn(pred, y)

    def log_prob(self, pred: Tensor, y: Tensor) -> Tensor:
        """``log p(y | pred)`` per ``[*S, T]``: the log-density of every observed site of the traced program."""
        _, sites = self._trace(pred, y)
        total = 0.0
        for site in sites.values():
            if site["is_observed"]:
                lp = site["fn"].log_prob(site["value"])
                if lp.shape != pred.shape[:lp.dim()] or lp.dim() != pred.dim() - 2:
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
