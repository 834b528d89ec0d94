r"""One API for every meta-learner (GEM-BML Algorithm 1: Meta-train and Meta-test).

.. code-block:: python

    learner = MetaLearner(mlp(), GaussianLikelihood(0.1), algorithm="gem-bml+")
    for batch in task_batches:
        learner.meta_step(batch)                 # Theta <- Theta + beta * mean_tau grad L_tau
    posterior = learner.adapt(x_support, y_support, steps=10)   # Meta-test: VI from the learned Theta
    pred = learner.predict(posterior, x_query)                  # posterior predictive: pred.mean, pred.std,
    band = pred.quantiles((0.05, 0.95))                         # draws of f and of y (pred.sites), bands of y

The algorithm is chosen by name from the registry (:data:`ALGORITHMS`, :mod:`hbmeta.inference.algorithm`): the
learner dispatches its meta-gradient, meta-test adaptation, defaults and checks to that
:class:`~hbmeta.inference.algorithm.Algorithm`, and the meta-step hands the averaged meta-gradient to a torch
optimizer (Adam by default) as the gradient of the meta-loss ``-L``. The built-in algorithms are defined (and
register) beside their meta-gradients; importing this module imports them all.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

# The built-in algorithms register themselves on import, in the registry's order (gem-bml, gem-bml+, abml, maml,
# fomaml, reptile, pretrain, imaml, bmaml, ibaml; hbmeta.inference.__init__ imports them first, in this order).
from hbmeta.inference.algorithm import ALGORITHMS, Algorithm, PriorDefaults, get_algorithm, register_algorithm
from hbmeta.inference.autoguide import AUTOGUIDES, AutoGuidePerTask, is_autoguide
from hbmeta.inference.batch import TaskBatch, check_task_data
import hbmeta.inference.bmaml  # noqa: F401  (bmaml)
import hbmeta.inference.elbo_gradient  # noqa: F401  (abml)
import hbmeta.inference.gem  # noqa: F401  (registers gem-bml, gem-bml+)
from hbmeta.inference.gem import GEM_PLUS_MODES, HIDDEN_GRADIENTS, LIKELIHOOD_PREFIX, SHARED_PREFIX
import hbmeta.inference.ibaml  # noqa: F401  (ibaml)
import hbmeta.inference.imaml  # noqa: F401  (imaml)
from hbmeta.inference.inner import InnerConfig, make_optimizer
from hbmeta.inference.metrics import batch_adaptation_metrics, prior_scale_statistics
import hbmeta.inference.maml  # noqa: F401  (maml, fomaml)
from hbmeta.inference.predictive import PosteriorPredictive
import hbmeta.inference.reptile  # noqa: F401  (reptile, pretrain)
from hbmeta.models.functional import BatchedNet
from hbmeta.models.guides import Guide, make_guide
from hbmeta.models.hierarchical import HierarchicalModel
from hbmeta.models.jacobian import output_jacobian
from hbmeta.models.likelihoods import GaussianLikelihood, Likelihood
from hbmeta.models.posterior import Posterior
from hbmeta.models.prior_factory import make_prior
from hbmeta.models.priors import DiagonalGaussianPrior, Prior

__all__ = ["Algorithm", "ALGORITHMS", "MetaLearner", "PosteriorPredictive", "get_algorithm", "register_algorithm",
           "default_inner", "step_prior", "PriorDefaults", "prior_defaults", "GAUSS_NEWTON_DEFAULT",
           "GAUSS_NEWTON_GUIDES"]


#: algorithms whose inner update defaults to Gauss-Newton VI (with a diagonal Gaussian prior and one of
#: the guides it fits)
GAUSS_NEWTON_DEFAULT = ("gem-bml", "gem-bml+")
GAUSS_NEWTON_GUIDES = ("meanfield", "delta", "fullcov")


def default_inner(algorithm: str, gauss_newton: bool = True) -> InnerConfig:
    """Inner-update defaults per family, measured on sinusoid validation tasks (README, "Defaults").

    The registered algorithm's :meth:`~hbmeta.inference.algorithm.Algorithm.default_inner`. GEM-BML / GEM-BML+:
    2 steps of Gauss-Newton mean-field VI (:mod:`hbmeta.inference.gauss_newton`; no step size, no Monte-Carlo noise).
    With ``gauss_newton=False`` (other priors, likelihoods without a curvature) and for ABML, which unrolls SVI:
    plain SGD on the whitened mean-field guide (``z``, ``rho`` at one rate), 2 Monte-Carlo samples, per-task
    clipping at norm 5. Point-estimate baselines: SGD at MAML's 0.01 on the mean loss. iMAML: 20 SGD steps at
    0.005 on the proximal problem with lambda = 10 (about 1 / (K lr): the K steps then nearly solve it, which the
    implicit gradient assumes), 5 CG steps, per-task clipping at norm 50 as a guard (its meta-gradient cannot see
    the inner loop diverge, as MAML's can); memory does not grow with K. BMAML: 5 particles (``num_samples``), 5
    plain SVGD steps of 1e-3 on the summed log-likelihood (whose gradient is ~N / noise^2 times the MSE's, hence
    the small step).
    """
    return get_algorithm(algorithm).default_inner(gauss_newton)


def prior_defaults(algorithm: str, inner_method: str) -> PriorDefaults:
    """The :class:`PriorDefaults` of ``algorithm`` with inner update ``inner_method``."""
    return get_algorithm(algorithm).prior_defaults(inner_method)


def step_prior(prior: Prior, optimizer: torch.optim.Optimizer, grads: dict[str, Tensor], context: str,
               likelihood: Likelihood | None = None, shared: dict[str, Tensor] | None = None) -> float:
    """Hand ``grads`` (descent direction of the meta-loss) to the meta-optimizer, project the prior; the grad norm.

    Keys are the prior's parameter names, ``"likelihood.<name>"`` for the likelihood's learned parameters and
    ``"net.<name>"`` for the network's hidden (``shared``) ones.
    A NaN / inf gradient raises a ``FloatingPointError`` that names the parameters and ``context``.
    """
    if not torch.isfinite(sum(g.sum() for g in grads.values())):
        bad = [n for n, g in grads.items() if not torch.isfinite(g).all()]
        raise FloatingPointError(f"meta-gradient of {bad} has NaN/inf {context}; lower the inner learning rate")
    optimizer.zero_grad(set_to_none=True)
    params = dict(prior.named_parameters())
    if likelihood is not None:
        params.update({LIKELIHOOD_PREFIX + n: p for n, p in likelihood.named_parameters()})
    params.update({SHARED_PREFIX + n: p for n, p in (shared or {}).items()})
    for name, g in grads.items():
        params[name].grad = g.detach()
    optimizer.step()
    prior.project()
    return float(torch.sqrt(sum(g.pow(2).sum() for g in grads.values())))


#: weights beyond which a full-covariance guide's P x P factor per task is worth a warning before it starts
FULL_COVARIANCE_WARN_PARAMS = 2000


def _check_inputs(t, what: str, features: bool = True, dtype: torch.dtype | None = None) -> None:
    """A tensor of task data: ``[tasks, points, features...]`` for inputs (a 2-d array would be read as one-point
    tasks), ``[tasks, points, ...]`` for targets; inputs in the weights' floating-point ``dtype`` if given (the
    network's matrix products would otherwise fail deep inside with "expected scalar type ...")."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor; got {type(t).__name__} (convert it with torch.as_tensor)")
    if features and t.dim() < 3:
        raise ValueError(f"{what} must be [tasks, points, features...] (3 or more dims); got shape {tuple(t.shape)}: "
                         f"for one task add a leading dimension, x[None]")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{what} is {t.dtype} but the learner's weights are {dtype}: convert the data with "
                        f"x.to({dtype})")


def _warn_if_costly(guide: Guide, num_params: int) -> None:
    """Say what a full-covariance guide on a big net costs before minutes go by without a word."""
    if getattr(guide, "name", None) == "fullcov" and num_params > FULL_COVARIANCE_WARN_PARAMS:
        megabytes = 4 * num_params ** 2 / 2 ** 20
        warnings.warn(f"a full-covariance guide on {num_params} weights holds a {num_params} x {num_params} Cholesky "
                      f"factor per task ({megabytes:,.0f} MiB each in float32) and costs O(P^3) = "
                      f"{num_params ** 3:.1e} flops per inner step per task; use guide='lowrank' or 'meanfield' for nets "
                      f"this size", stacklevel=4)


@dataclass
class MetaLearner:
    """A meta-learner: a hierarchical model, a guide, an algorithm and a meta-optimizer.

    Args:
        net: the user's ``nn.Module``; its current weights become the prior mean.
        likelihood: ``p(D | theta)``.
        algorithm: a name from :data:`ALGORITHMS` (the built-ins, or one added by
            :func:`~hbmeta.inference.algorithm.register_algorithm`).
        prior: a :class:`Prior`, or a name for :func:`hbmeta.models.prior_factory.make_prior` (``diagonal``, ``lowrank``,
            ``mixture``, ``laplace``, ``studentt``; scale ``prior_scale``); default the diagonal Gaussian at
            ``prior_scale``.
        guide: a :class:`Guide` or its name (``meanfield``, ``delta``, ``fullcov``, ``lowrank``).
        inner: the inner update's settings (also used at meta-test unless overridden); ``None`` takes
            :func:`default_inner` of the algorithm (Gauss-Newton VI for GEM-BML(+) with a diagonal Gaussian prior
            and a likelihood that has a curvature, else SVI).
        meta_lr, meta_optimizer: the meta-update's torch optimizer.
        gem_plus_mode: how GEM-BML+ fits q2 (:data:`hbmeta.inference.gem.GEM_PLUS_MODES`): ``"sequential"`` (the paper's
            VI(lambda_tr, D_val)), ``"joint"`` or ``"restart"``; ``None``: :func:`prior_defaults` of the inner update
            (``restart`` for Gauss-Newton, ``sequential`` for SVI).
        closed_form: GEM from the prior's closed form (``True``) or its Monte-Carlo form.
        prior_scale: initial prior standard deviation when ``prior`` is not given; ``None``:
            :func:`prior_defaults` (0.2 with Gauss-Newton VI, 0.02 with SVI, BMAML's particles 0.1).
        max_prior_scale: ceiling on the learned prior standard deviation when ``prior`` is not given; ``"auto"``:
            :func:`prior_defaults` (none with Gauss-Newton VI, 0.1 with SVI); ``None``: no ceiling.
        hide: parameters kept out of the prior, shared by the tasks and meta-learned as point estimates
            (:class:`~hbmeta.models.functional.BatchedNet`'s ``hide``).
        hidden_gradient: how GEM-BML+ meta-learns the hidden parameters (:data:`hbmeta.inference.gem.HIDDEN_GRADIENTS`):
            ``"fisher"`` (GEM's Fisher identity, q2 against q1) or ``"implicit"`` (the query log-likelihood's
            gradient through the support VI's optimality condition).
    """

    net: nn.Module | BatchedNet
    likelihood: Likelihood = field(default_factory=lambda: GaussianLikelihood(0.5))
    algorithm: str = "gem-bml+"
    prior: Prior | str | None = None
    guide: Guide | str = "meanfield"
    inner: InnerConfig | None = None
    meta_lr: float = 1e-3
    meta_optimizer: str = "adam"
    gem_plus_mode: str | None = None
    closed_form: bool = True
    prior_scale: float | None = None
    max_prior_scale: float | None | str = "auto"
    hide: tuple = ()
    hidden_gradient: str = "fisher"
    iteration: int = field(default=0, init=False)
    _inputs_taken: set = field(default_factory=set, init=False, repr=False)  # per-point input shapes the net took

    def __post_init__(self) -> None:
        if not isinstance(self.net, (nn.Module, BatchedNet)):
            raise TypeError(f"net must be a torch nn.Module (or a BatchedNet around one); got {type(self.net).__name__}")
        if not isinstance(self.algorithm, str):
            raise TypeError(f"algorithm must be a name, one of {', '.join(ALGORITHMS)}; got {self.algorithm!r}")
        if not isinstance(self.likelihood, Likelihood):
            raise TypeError(f"likelihood must be a hbmeta Likelihood (GaussianLikelihood, CategoricalLikelihood, "
                            f"PyroLikelihood(fn), ...); got {type(self.likelihood).__name__}")
        if not (isinstance(self.meta_lr, (int, float)) and not isinstance(self.meta_lr, bool)
                and math.isfinite(self.meta_lr) and self.meta_lr > 0):
            raise ValueError(f"meta_lr must be a finite number > 0; got {self.meta_lr!r}")
        if self.prior_scale is not None and not (isinstance(self.prior_scale, (int, float))
                                                 and not isinstance(self.prior_scale, bool)
                                                 and math.isfinite(self.prior_scale) and self.prior_scale > 0):
            raise ValueError(f"prior_scale must be a finite number > 0 (or None for the default); got {self.prior_scale!r}")
        if self.max_prior_scale not in (None, "auto") and not (
                isinstance(self.max_prior_scale, (int, float)) and math.isfinite(self.max_prior_scale)
                and self.max_prior_scale > 0):
            raise ValueError(f"max_prior_scale must be a finite number > 0, None (no ceiling) or 'auto'; "
                             f"got {self.max_prior_scale!r}")
        self.spec = get_algorithm(self.algorithm)
        self.algorithm = self.spec.name
        if self.inner is None:
            diagonal = self.prior is None or self.prior == "diagonal" or isinstance(self.prior, DiagonalGaussianPrior)
            guide = self.guide if isinstance(self.guide, str) else getattr(self.guide, "name", "autoguide")
            self.inner = self.spec.default_inner(diagonal and self.likelihood.has_curvature
                                                 and guide in GAUSS_NEWTON_GUIDES)
        defaults = self.spec.prior_defaults(self.inner.method)
        if self.gem_plus_mode is None:
            self.gem_plus_mode = defaults.gem_plus_mode
        if self.hidden_gradient not in HIDDEN_GRADIENTS:
            raise ValueError(f"unknown hidden_gradient {self.hidden_gradient!r}; choose one of {', '.join(HIDDEN_GRADIENTS)}")
        if self.gem_plus_mode not in GEM_PLUS_MODES:
            raise ValueError(f"unknown gem_plus_mode {self.gem_plus_mode!r}; choose one of {', '.join(GEM_PLUS_MODES)}")
        if self.hide and isinstance(self.net, BatchedNet):
            raise ValueError("give hide= to BatchedNet(module, hide=...) or to MetaLearner with a plain nn.Module, not both")
        batched = self.net if isinstance(self.net, BatchedNet) else BatchedNet(self.net, hide=self.hide)
        if batched.hidden and not self.spec.learns_hidden:
            learners = ", ".join(n for n, a in ALGORITHMS.items() if a.learns_hidden)
            raise ValueError(f"hidden parameters {list(batched.hidden)} are meta-learned as point estimates by "
                             f"{learners}; {self.algorithm!r} does not learn them: put them under the prior (hide=()) "
                             f"or use one of those algorithms")
        if self.prior_scale is None:
            self.prior_scale = defaults.prior_scale
        if self.max_prior_scale == "auto":
            self.max_prior_scale = defaults.max_prior_scale
        if isinstance(self.prior, str):  # one-line swap: MetaLearner(net, prior="laplace")
            self.prior = make_prior(self.prior, batched, self.prior_scale, max_scale=self.max_prior_scale)
        if self.prior is None:  # a diagonal Gaussian around the net (BMAML: inner.num_samples particles)
            self.prior = self.spec.default_prior(self, batched)
        self.spec.check(self)  # e.g. BMAML needs a ParticlePrior, ABML a diagonal Gaussian one
        if is_autoguide(self.guide) or (isinstance(self.guide, str) and self.guide in AUTOGUIDES):
            self.guide = AutoGuidePerTask(self.guide)  # MetaLearner(net, guide=AutoNormal), TyXe's convention
        elif isinstance(self.guide, str):
            self.guide = make_guide(self.guide)
        _warn_if_costly(self.guide, batched.num_params)
        if self.likelihood.learnable and not self.spec.learns_likelihood:
            learners = ", ".join(n for n, a in ALGORITHMS.items() if a.learns_likelihood)
            raise ValueError(f"a learned likelihood scale is meta-learned by GEM ({learners}) through Fisher's "
                             f"identity; {self.algorithm!r} does not learn it: use a fixed scale (learn_scale=False)")
        self.model = HierarchicalModel(batched, self.prior, self.likelihood)
        self.optimizer = make_optimizer(self.meta_optimizer, self.meta_parameters(), self.meta_lr)

    # ----------------------------------------------------------------------------------------- meta-train
    def meta_parameters(self) -> list[Tensor]:
        """What the meta-optimizer moves: the prior's hyperparameters, the likelihood's learned ones and the network's
        hidden (shared) parameters."""
        return (list(self.prior.parameters()) + [p for p in self.likelihood.parameters() if p.requires_grad]
                + list(self.model.net.hidden.values()))

    def meta_gradient(self, batch: TaskBatch, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """The meta-loss gradient ``{name: grad}`` (descent direction, averaged over the batch's tasks).

        The registered algorithm's :meth:`~hbmeta.inference.algorithm.Algorithm.meta_gradient`.
        """
        return self.spec.meta_gradient(self, batch, generator)

    def meta_step(self, batch: TaskBatch, generator: torch.Generator | None = None, metrics: bool = True
                  ) -> dict[str, float]:
        """One meta-update (Algorithm 1, lines 4-10). Returns numbers to log: ``grad_norm``; where the algorithm fits
        posteriors on the way (GEM-BML, GEM-BML+), how that adaptation did on this meta-batch before the prior moved
        (``batch_support_nll``, ``batch_query_nll``, ``batch_query_loss``, ``batch_query_accuracy``, ``batch_kl``,
        ``batch_inner_elbo``: :mod:`hbmeta.inference.metrics`); and the prior's scale after the step
        (``prior_scale``, ``prior_scale_min`` / ``_median`` / ``_max``) where it has one. With ``metrics=False`` only
        ``grad_norm``: the adaptation numbers cost two forward passes and a median over the weights (about a tenth
        of a sinusoid GEM-BML+ step), so the training loop asks for them only on the iterations it logs."""
        if not isinstance(batch, TaskBatch):
            raise TypeError(f"meta_step takes a TaskBatch (e.g. SinusoidTasks().sample(25)); got {type(batch).__name__}")
        _check_inputs(batch.x_train, "meta_step: x_train", dtype=self.dtype)
        _check_inputs(batch.x_val, "meta_step: x_val", dtype=self.dtype)
        self._check_network_takes(batch.x_train, "meta_step: x_train")
        self._check_network_takes(batch.x_val, "meta_step: x_val")
        batch = batch.to(self.device)
        grads, posterior = self.spec.meta_gradient_and_posterior(self, batch, generator)
        if not metrics:
            return self.apply_meta_gradient(grads)
        adapted = {} if posterior is None else batch_adaptation_metrics(self.model, posterior, batch)
        return {**self.apply_meta_gradient(grads), **adapted, **prior_scale_statistics(self.prior)}

    def apply_meta_gradient(self, grads: dict[str, Tensor]) -> dict[str, float]:
        """Hand ``grads`` (descent direction of the meta-loss, averaged over tasks) to the meta-optimizer.

        The second half of :meth:`meta_step`, apart so that a gradient computed elsewhere (e.g. summed over
        the ranks of a distributed run, :mod:`hbmeta.training.distributed`) takes exactly the same update.
        """
        norm = step_prior(self.prior, self.optimizer, grads,
                          f"at iteration {self.iteration} ({self.algorithm}, inner lr {self.inner.lr})", self.likelihood,
                          self.model.net.hidden)
        self.iteration += 1
        return {"grad_norm": norm}

    # ------------------------------------------------------------------------------------------ meta-test
    @property
    def device(self) -> torch.device:
        return self.prior.loc.device

    def _check_network_takes(self, x: Tensor, what: str) -> None:
        """A one-line ``ValueError`` if the network cannot take inputs shaped like ``x``'s points (found by one forward
        pass of the prior mean on one point, once per per-point shape), instead of a matrix-size error deep inside
        the inner update."""
        key = tuple(x.shape[2:])
        net = self.model.net
        if net.is_plain_mlp:  # its batched matmuls would broadcast extra dims instead of failing
            width = net.dense_layers[0].fan_in
            if key != (width,):
                raise ValueError(f"{what}: the MLP takes inputs [tasks, points, {width}]; got {tuple(x.shape)}")
        if key in self._inputs_taken or x.shape[0] == 0 or x.shape[1] == 0:
            return
        try:
            with torch.no_grad():
                self.model.net(self.prior.loc.detach().unsqueeze(0), x[:1, :1].to(self.device))
        except RuntimeError as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"{what}: the network cannot take inputs of shape {key} per point ({reason})") from None
        self._inputs_taken.add(key)

    @property
    def dtype(self) -> torch.dtype:
        """The floating-point type of the weights; task inputs must have it."""
        return self.prior.loc.dtype

    def adapt(self, x: Tensor, y: Tensor, steps: int | None = None, inner: InnerConfig | None = None,
              generator: torch.Generator | None = None, callback=None) -> Posterior:
        """Meta-test (Algorithm 1): fit each task's posterior from the learned prior on ``(x, y)``.

        Bayesian algorithms run VI with the guide; the point-estimate baselines run their inner SGD from
        the prior mean and return a point-mass posterior; iMAML solves its proximal inner problem (as in
        meta-training); BMAML runs SVGD from its particles and returns them. ``x [T, K, ...]``, ``y [T, K, ...]``.
        """
        _check_inputs(x, "adapt: x", dtype=self.dtype)
        _check_inputs(y, "adapt: y", features=False)
        check_task_data(x, y, "adaptation data")
        self._check_network_takes(x, "adapt: x")
        self.likelihood.check_targets(y, x)
        if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 0):
            raise ValueError(f"adapt: steps must be an integer >= 0 (or None for the inner update's); got {steps!r}")
        x, y = x.to(self.device), y.to(self.device)
        cfg = inner or self.inner
        steps = cfg.steps if steps is None else steps
        return self.spec.adapt(self, x, y, cfg, steps, generator, callback)

    @torch.no_grad()
    def predict(self, posterior: Posterior, x: Tensor, num_samples: int = 100,
                generator: torch.Generator | None = None) -> PosteriorPredictive:
        r"""Posterior predictive at query inputs ``x [T, N, ...]``: draws of ``f(x; theta)`` and of ``y`` through the
        likelihood (:class:`~hbmeta.inference.predictive.PosteriorPredictive`; ``.mean`` / ``.std`` are those of ``f``).

        - A posterior from the Gauss-Newton inner update carries the linearised model's full Gaussian posterior
          (:attr:`hbmeta.models.posterior.Posterior.has_laplace`): the predictive is that model's, the *linearised* (GLM)
          predictive :math:`f(x; m) + J (\theta - m)`, Gaussian per point with mean ``f(x; m)`` and covariance
          ``J Sigma J^T`` (Immer et al. 2021): the inner update is exact inference for the linearised model, so this
          is the predictive that matches it. Mean-field samples of theta would drop the posterior's correlations
          and spread the predictive like the prior's. ``samples`` are draws of ``f`` per point.
        - Otherwise the Monte-Carlo predictive: ``f(x; theta_s)``, ``theta_s ~ q``. A point mass is evaluated once
          and a particle posterior at each of its particles (``num_samples`` unused).
        - A posterior with per-task latents besides the weights (``posterior.latents``) adds ``num_samples`` draws of
          each as a site of the predictive; ``obs`` is drawn given them and ``.likelihood`` is conditioned on them.
        """
        if not isinstance(posterior, Posterior):
            raise TypeError(f"predict: posterior must be a Posterior (from adapt); got {type(posterior).__name__}")
        _check_inputs(x, "predict: x", dtype=self.dtype)
        if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
            raise ValueError(f"predict: num_samples must be an integer >= 1; got {num_samples!r}")
        if x.shape[0] != posterior.num_tasks:
            raise ValueError(f"predict: x has {x.shape[0]} tasks but the posterior has {posterior.num_tasks}")
        if x.is_floating_point() and not torch.isfinite(x).all():
            raise ValueError("predict: x contains NaN or inf")
        self._check_network_takes(x, "predict: x")
        x = x.to(self.device)
        if posterior.has_laplace:
            predictive = self._linearised_predictive(posterior, x, num_samples, generator)
            return predictive.with_latents(self._latent_draws(posterior, x, num_samples, generator))
        if posterior.kind == "particles":
            n = posterior.particles.shape[0]
        else:
            n = 1 if posterior.kind == "delta" else num_samples
        samples = self.model.net(posterior.sample(n, generator), x)
        latents = self._latent_draws(posterior, x, num_samples, generator)
        return PosteriorPredictive(samples.mean(0), samples.std(0, unbiased=False), samples, self.likelihood,
                                   num_samples, generator, latents)

    def _latent_draws(self, posterior: Posterior, x: Tensor, num_samples: int, generator: torch.Generator | None
                      ) -> dict[str, Tensor]:
        """Per-task latents besides the weights: draws of their posteriors (y is drawn given them)."""
        if not posterior.latents:
            return {}
        sites = self.model.latent_sites(x, None)
        return {name: sites[name].sample(part, num_samples, generator) for name, part in posterior.latents.items()}

    def _linearised_predictive(self, posterior: Posterior, x: Tensor, num_samples: int,
                               generator: torch.Generator | None, chunk: int = 8) -> PosteriorPredictive:
        """The GLM predictive, ``chunk`` tasks at a time (the query Jacobian is ``[chunk, N, O, P]``)."""
        means, stds, draws, covs = [], [], [], []
        for start in range(0, x.shape[0], chunk):
            part = slice(start, start + chunk)
            f, jac = output_jacobian(self.model.net, posterior.loc[part], x[part])
            cov = posterior.select(part).function_covariance(jac)                    # [t, N, O, O]
            eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
            chol = torch.linalg.cholesky(cov + 1e-9 * cov.diagonal(dim1=-2, dim2=-1).mean() * eye + 1e-12 * eye)
            eps = torch.randn((num_samples, *cov.shape[:-1]), generator=generator, device=cov.device, dtype=cov.dtype)
            draw = f.reshape(cov.shape[:-1]) + (chol @ eps.unsqueeze(-1)).squeeze(-1)
            means.append(f)
            stds.append(cov.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt().reshape(f.shape))
            draws.append(draw.reshape(num_samples, *f.shape))
            covs.append(cov)
        return PosteriorPredictive(torch.cat(means), torch.cat(stds), torch.cat(draws, 1), self.likelihood,
                                   num_samples, generator, cov=torch.cat(covs))

    # ---------------------------------------------------------------------------------------- persistence
    def state_dict(self) -> dict:
        state = {"prior": self.prior.state_dict(), "likelihood": self.likelihood.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "iteration": self.iteration}
        if self.model.net.hidden:
            state["shared"] = {n: p.detach().clone() for n, p in self.model.net.hidden.items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        self.prior.load_state_dict(state["prior"])
        if "likelihood" in state:  # (checkpoints from before likelihoods had state carry none)
            self.likelihood.load_state_dict(state["likelihood"])
        with torch.no_grad():
            for name, value in state.get("shared", {}).items():
                self.model.net.hidden[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.iteration = int(state["iteration"])

    def to(self, device: torch.device | str) -> "MetaLearner":
        self.model.to(device)
        self.optimizer = make_optimizer(self.meta_optimizer, self.meta_parameters(), self.meta_lr)
        return self
