r"""What a meta-learning algorithm is: one small interface and a registry of them by name.

An algorithm is an :class:`Algorithm` - a few descriptive fields (for the registry, the CLI help and the README's
table) and the methods :class:`hbmeta.inference.learner.MetaLearner` dispatches to. Each built-in one is defined
beside its meta-gradient (``gem.py``, ``elbo_gradient.py``, ``maml.py``, ``reptile.py``, ``imaml.py``, ``bmaml.py``,
``ibaml.py``) and registers itself there; adding one - in the package or from a notebook - is one subclass and one
call:

.. code-block:: python

    class MyAlgorithm(Algorithm):
        name, meta_loss, estimator = "my-algo", "L[2]", "first-order, one SGD step"

        def meta_gradient(self, learner, batch, generator=None):
            ...                                 # {prior parameter name: descent direction}, averaged over tasks

    register_algorithm(MyAlgorithm())
    learner = MetaLearner(net, likelihood, algorithm="my-algo")

The base class supplies the rest: a Bayesian algorithm (``bayesian = True``) adapts at meta-test by VI from the
prior (:func:`hbmeta.inference.inner.fit_posterior`), a point-estimate one by its inner SGD / optimizer from the
prior mean; the inner-update and prior defaults are those of its family (:meth:`Algorithm.default_inner`,
:meth:`Algorithm.prior_defaults`); the prior is a diagonal Gaussian around the network's weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
from torch import Tensor

from hbmeta.inference.batch import TaskBatch
from hbmeta.inference.inner import InnerConfig, fit_posterior, optimizer_adapt, sgd_adapt
from hbmeta.models.functional import BatchedNet
from hbmeta.models.guides import Guide
from hbmeta.models.hierarchical import HierarchicalModel
from hbmeta.models.likelihoods import Likelihood
from hbmeta.models.posterior import Posterior
from hbmeta.models.priors import DiagonalGaussianPrior, ParticlePrior, Prior

__all__ = ["Algorithm", "PosteriorAlgorithm", "ALGORITHMS", "PriorDefaults", "LearnerState", "register_algorithm", "get_algorithm",
           "DESCRIPTIVE_FIELDS"]

#: the descriptive fields of an :class:`Algorithm` (class attributes; keyword arguments of its constructor)
DESCRIPTIVE_FIELDS = ("name", "meta_loss", "estimator", "backprop_through_inner", "bayesian", "reference",
                      "description", "learns_likelihood", "learns_hidden")

#: a registered name: lowercase letters, digits and ``-+._``, starting with a letter or digit
_NAME = re.compile(r"[a-z0-9][a-z0-9+._-]*")


class LearnerState(Protocol):
    """What an :class:`Algorithm` reads of the learner it serves (:class:`hbmeta.inference.learner.MetaLearner`)."""

    model: HierarchicalModel       # net, prior, likelihood
    prior: Prior
    likelihood: Likelihood
    guide: Guide
    inner: InnerConfig
    closed_form: bool
    gem_plus_mode: str
    hidden_gradient: str           # how GEM-BML+ learns hidden (shared) weights
    prior_scale: float
    max_prior_scale: float | None


@dataclass(frozen=True)
class PriorDefaults:
    """Defaults that go with an algorithm's inner update (README, "Defaults").

    Gauss-Newton VI moves each task's posterior as far as its data ask, so the prior can start wide (0.2) and
    needs no ceiling; the likelihood noise 0.25 (regression) was the better of 0.1 / 0.25 / 0.5 on sinusoid
    validation tasks. SVI's whitened step moves a weight by ``lr sigma^2 grad``: it starts tight (0.02), with a
    ceiling of 0.1 against the Monte-Carlo feedback loop of dead units, at noise 0.5. BMAML's particles start at
    a 0.1 spread.
    """

    prior_scale: float
    max_prior_scale: float | None
    noise_scale: float
    gem_plus_mode: str


class Algorithm:
    """A meta-learning algorithm: descriptive fields and the methods a ``MetaLearner`` dispatches to.

    Subclass it, set the fields as class attributes (or pass them to the constructor as keywords) and override
    :meth:`meta_gradient`; the other methods have the defaults of the algorithm's family.

    Attributes:
        name: the registry key (lowercase, e.g. ``"gem-bml+"``).
        meta_loss: ``"L[1]"`` (marginal likelihood of a task's joint data) or ``"L[2]"`` (of its query set given
            its support set).
        estimator: how the meta-gradient is estimated (``"GEM"``, ``"unrolled SGD, second order"``, ...).
        backprop_through_inner: whether the meta-gradient differentiates through the inner loop (then bf16
            autocast is refused, :func:`hbmeta.training.runtime.check_amp`).
        bayesian: adapts to a posterior with spread (VI; SVGD particles for BMAML) rather than to a point.
        reference: where it comes from.
        description: one line for listings (optional).
        learns_likelihood: meta-learns the likelihood's learnable parameters (a noise scale) along with the prior.
        learns_hidden: meta-learns the network's hidden parameters (``hide=``: kept out of the prior, shared by the
            tasks) as point estimates along with the prior.
    """

    name: str = ""
    meta_loss: str = ""
    estimator: str = ""
    backprop_through_inner: bool = False
    bayesian: bool = False
    reference: str = ""
    description: str = ""
    learns_likelihood: bool = False
    learns_hidden: bool = False

    def __init__(self, **fields: Any) -> None:
        unknown = sorted(set(fields) - set(DESCRIPTIVE_FIELDS))
        if unknown:
            raise TypeError(f"{type(self).__name__}() got unknown field(s) {', '.join(unknown)}; "
                            f"the fields are {', '.join(DESCRIPTIVE_FIELDS)}")
        for key, value in fields.items():
            setattr(self, key, value)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, meta_loss={self.meta_loss!r}, bayesian={self.bayesian})"

    # ------------------------------------------------------------------------------------ meta-training
    def meta_gradient(self, learner: LearnerState, batch: TaskBatch,
                      generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """``{name: grad}``: the descent direction of the meta-loss, averaged over the batch's tasks.

        Keys are the prior's parameter names (``learner.prior.named_parameters()``), or ``"likelihood.<name>"`` for
        the likelihood's learned ones; each value has its parameter's shape. ``MetaLearner.meta_step`` hands it to
        the meta-optimizer as the gradient of the meta-loss.
        """
        raise NotImplementedError(f"{type(self).__name__} (algorithm {self.name!r}) must define meta_gradient")

    def meta_gradient_and_posterior(self, learner: LearnerState, batch: TaskBatch,
                                    generator: torch.Generator | None = None
                                    ) -> tuple[dict[str, Tensor], Posterior | None]:
        """:meth:`meta_gradient` and the support-set posteriors it fitted on the way (``None`` where it fits none),
        from which ``MetaLearner.meta_step`` reports the meta-batch's adaptation (:mod:`hbmeta.inference.metrics`).
        The default fits none; subclasses of :class:`PosteriorAlgorithm` (GEM, iBaML) return theirs."""
        return self.meta_gradient(learner, batch, generator), None

    # ---------------------------------------------------------------------------------------- meta-test
    def adapt(self, learner: LearnerState, x: Tensor, y: Tensor, inner: InnerConfig, steps: int,
              generator: torch.Generator | None = None,
              callback: Callable[[int, Posterior], None] | None = None) -> Posterior:
        """Each task's posterior from the learned prior on its support set ``x [T, K, ...]``, ``y``.

        Bayesian: VI with the learner's guide (Gauss-Newton VI also keeps the linearised posterior for the
        predictive). Point estimate: ``steps`` steps of the inner SGD from the prior mean, or of the inner optimizer
        the algorithm meta-trained with if it is not SGD (Reptile: Adam); a point-mass posterior.
        """
        model = learner.model
        if self.bayesian:
            return fit_posterior(model, learner.guide, x, y, model.initial_posterior(x, y), config=inner,
                                 steps=steps, generator=generator, callback=callback, laplace=True)
        theta0 = learner.prior.loc.detach().expand(x.shape[0], -1)
        cb = None if callback is None else (lambda k, th: callback(k, Posterior(th)))
        if inner.optimizer.lower() != "sgd":
            return Posterior(optimizer_adapt(model, theta0, x, y, inner, steps, callback=cb))
        return Posterior(sgd_adapt(model, theta0, x, y, steps, inner.lr, callback=cb).detach())

    # ------------------------------------------------------------------------------------------ defaults
    def default_inner(self, gauss_newton: bool) -> InnerConfig:
        """The inner update's defaults (README, "Defaults"); ``gauss_newton``: the prior, guide and likelihood
        allow Gauss-Newton VI (only GEM-BML(+) take it).

        Bayesian: plain SGD on the whitened mean-field guide (``z``, ``rho`` at one rate), 2 Monte-Carlo samples,
        per-task clipping at norm 5. Point estimate: SGD at MAML's 0.01 on the mean loss.
        """
        if self.bayesian:
            return InnerConfig(steps=5, lr=0.3, optimizer="sgd", num_samples=2, clip_norm=5.0)
        return InnerConfig(steps=5, lr=0.01, optimizer="sgd")

    def prior_defaults(self, inner_method: str) -> PriorDefaults:
        """The :class:`PriorDefaults` that go with the inner update ``inner_method``."""
        if inner_method == "gauss-newton":
            return PriorDefaults(0.2, None, 0.25, "restart")
        return PriorDefaults(0.02, 0.1, 0.5, "sequential")

    def default_prior(self, learner: LearnerState, net: BatchedNet) -> Prior:
        """The prior when none is given: a diagonal Gaussian around the net's weights at ``learner.prior_scale``."""
        return DiagonalGaussianPrior(net.initial_vector(), torch.tensor(learner.prior_scale).log(),
                                     max_scale=learner.max_prior_scale)

    def check(self, learner: LearnerState) -> None:
        """Raise a ``ValueError`` if this algorithm cannot run with ``learner.prior`` (called once it exists)."""
        if isinstance(learner.prior, ParticlePrior):
            raise ValueError(f"algorithm {self.name!r} cannot use a {type(learner.prior).__name__}: BMAML needs a "
                             f"ParticlePrior and a ParticlePrior is only for BMAML")



class PosteriorAlgorithm(Algorithm):
    """An algorithm whose meta-gradient is read off the support posteriors it fits (GEM-BML, GEM-BML+, iBaML): it
    defines :meth:`meta_gradient_and_posterior` only, and :meth:`meta_gradient` drops the posteriors."""

    def meta_gradient(self, learner: LearnerState, batch: TaskBatch,
                      generator: torch.Generator | None = None) -> dict[str, Tensor]:
        return self.meta_gradient_and_posterior(learner, batch, generator)[0]

    def meta_gradient_and_posterior(self, learner: LearnerState, batch: TaskBatch,
                                    generator: torch.Generator | None = None) -> tuple[dict[str, Tensor], Posterior]:
        raise NotImplementedError(f"{type(self).__name__} (algorithm {self.name!r}) must define "
                                  f"meta_gradient_and_posterior")

#: every registered algorithm by name, in registration order (the built-ins first, as the CLI help lists them)
ALGORITHMS: dict[str, Algorithm] = {}


def register_algorithm(algorithm: Algorithm, *, replace: bool = False) -> Algorithm:
    """Add ``algorithm`` to :data:`ALGORITHMS` under ``algorithm.name`` (``replace=True``: over an existing one).

    Returns it, so a module can write ``MAML = register_algorithm(MAMLAlgorithm())``.
    """
    if not isinstance(algorithm, Algorithm):
        raise ValueError(f"register_algorithm: algorithm must be an Algorithm instance; got {algorithm!r}")
    name = algorithm.name
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"register_algorithm: name {name!r} is not allowed; use lowercase letters, digits and "
                         f"'-+._', starting with a letter or digit (e.g. 'my-algo')")
    if name in ALGORITHMS and not replace:
        raise ValueError(f"register_algorithm: name {name!r} is already registered; pass replace=True to replace it "
                         f"or choose a name not in {', '.join(ALGORITHMS)}")
    ALGORITHMS[name] = algorithm
    return algorithm


def get_algorithm(name: str) -> Algorithm:
    """The registered :class:`Algorithm` called ``name`` (case-insensitive)."""
    try:
        return ALGORITHMS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; choose one of {', '.join(ALGORITHMS)}") from None
