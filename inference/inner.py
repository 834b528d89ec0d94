r"""The inner update: SVI on per-task guides (Algorithm 1, subroutine VI; GEM-BML section 3.1).

.. math::
    \lambda_\tau \leftarrow \lambda_\tau + \alpha \nabla_\lambda \Big[\log p(D_\tau \mid g(\lambda_\tau, \epsilon))
    - \mathrm{KL}\big(q(\theta; \lambda_\tau) \,\|\, p(\theta; \Theta)\big)\Big]

All ``T`` tasks of a meta-batch run in ONE SVI over ``pyro.plate("tasks", T)``: the loss is the sum of the
per-task negative ELBOs, whose parameters are disjoint, and Adam / SGD act element-wise, so one batched
SVI is exactly ``T`` independent per-task SVIs at the cost of one. The ELBO is Pyro's
``TraceMeanField_ELBO`` (analytic KL for Gaussian pairs) or ``Trace_ELBO``; parameters live in plain tensors
driven by a torch optimizer, never in Pyro's global parameter store.

Fast path: when the guide is mean-field or Delta, the prior inside the ELBO is a diagonal Normal and
``analytic_kl`` is on, :func:`negative_elbo` computes the same quantity as ``TraceMeanField_ELBO`` directly
in torch (reparameterised likelihood + closed-form KL), skipping Pyro's per-step tracing (~1 ms a step on
the sinusoid net). ``InnerConfig(elbo="pyro")`` forces the traced ELBO; the two agree to float precision
(``tests/test_inner.py``).

Other priors take the traced path automatically: ``TraceMeanField_ELBO`` uses an analytic KL wherever torch
has one registered (Laplace; the low-rank Gaussian, ``models/lowrank_prior.py``) and, where none exists
(mixture of Gaussians, Student-t), estimates the KL term by ``log p(theta) - log q(theta)`` at the guide's
reparameterised draw - i.e. exactly ``Trace_ELBO`` for that site (``tests/test_priors_guides.py``).
"""

from __future__ import annotations

import functools

import math
from dataclasses import dataclass
from typing import Callable

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from torch import Tensor

from hbmeta.inference.errors import InnerLoopDivergedError
from hbmeta.inference.gauss_newton import gauss_newton_fit, gauss_newton_fit_pair
from hbmeta.inference.gauss_newton_latents import gauss_newton_latent_fit
from hbmeta.models.guides import Guide
from hbmeta.inference.autoguide import AutoGuidePerTask
from hbmeta.models.hierarchical import HierarchicalModel
from hbmeta.models.latents import LatentGuide, replace_priors
from hbmeta.models.local_reparam import local_forward, supports_local_noise
from hbmeta.models.posterior import Posterior

__all__ = ["InnerConfig", "InnerLoopDivergedError", "INNER_METHODS", "fit_posterior", "fit_posterior_pair", "negative_elbo",
           "make_optimizer", "NoiseFn", "clip_per_task", "CommonNoise", "standard_normal", "sgd_adapt", "optimizer_adapt", "overrides_model"]

#: inner-update methods (:class:`InnerConfig` ``method``)
INNER_METHODS = ("gauss-newton", "svi")

#: ``noise(step, shape) -> standard-normal tensor``: where the guide's reparameterisation noise comes from
NoiseFn = Callable[[int, torch.Size], Tensor]


@dataclass
class InnerConfig:
    """Settings of the inner update.

    Attributes:
        method: ``"gauss-newton"`` (:mod:`hbmeta.inference.gauss_newton`: exact Gauss-Newton solve of the mean,
            mean-field variances at their fixed point, backtracking line search; deterministic, no step size;
            needs a diagonal Gaussian prior inside the ELBO and a likelihood with
            :meth:`~hbmeta.models.likelihoods.Likelihood.curvature`) or ``"svi"`` (reparameterised stochastic
            gradients of the ELBO with a torch optimizer: every prior, guide and likelihood). ``lr``,
            ``optimizer``, ``num_samples``, ``scale_lr`` and ``clip_norm`` are SVI's settings.
        steps: optimisation steps of VI (and of the baselines' inner SGD).
        lr: inner learning rate.
        optimizer: ``"adam"``, ``"sgd"`` or the name of any ``torch.optim`` class.
        num_samples: Monte-Carlo samples of theta per step (vectorised particles).
        analytic_kl: use ``TraceMeanField_ELBO`` (closed-form KL where it exists) instead of ``Trace_ELBO``.
        val_steps: steps of the second update VI(lambda_tr, D_val) in GEM-BML+; ``None`` means ``steps``.
        elbo: ``"auto"`` (analytic torch fast path where it applies, else Pyro) or ``"pyro"`` (always traced).
        scale_lr: learning rate of the guide's scale parameters (``rho`` / ``log_scale``, Cholesky factors);
            ``None`` means ``lr``.
        clip_norm: clip each task's gradient to this norm before the step, the location parameters and the scale
            parameters separately (so that noisy scale gradients do not shrink the mean's step); ``None`` = no
            clipping. Per task, so the batched update stays T independent updates. Guards SGD against the rare
            task whose likelihood curvature exceeds the step size's stability bound.
        estimator: how SVI estimates the likelihood term of a mean-field guide: ``"local"`` (the paper's
            appendix B.7: local reparameterisation for MLPs, Flipout for modules with ``forward_flipout`` such as
            :class:`~hbmeta.models.conv.Conv4`; :mod:`hbmeta.models.local_reparam`) or ``"reparam"`` (one weight sample per
            Monte-Carlo sample and task). ``local`` falls back to ``reparam`` where it does not apply.
        imaml_lambda: iMAML's proximal regularisation ``lambda`` of the inner problem (Rajeswaran et al. 2019).
            10 suits the sinusoid with 20 SGD steps at 0.005 (``lambda ~ 1 / (K lr)``); their Omniglot runs use 2.0.
        cg_steps: conjugate-gradient iterations: iMAML's implicit meta-gradient (their default 5), and the Gauss-Newton
            ``cg`` solver's.
        line_search: Gauss-Newton's backtracking candidates ``1, 1/2, ..., 2^-line_search``.
        solver: how Gauss-Newton solves for its step: ``"woodbury"`` (exact, through the Jacobian; small outputs x
            points), ``"cg"`` (matrix-free conjugate gradients with ``cg_steps`` iterations and a Hutchinson
            diagonal from ``probes`` probes; :mod:`hbmeta.inference.gauss_newton_cg`) or ``"auto"``: ``woodbury`` for plain
            MLPs and for networks with at most :data:`WOODBURY_MAX_PARAMS` weights under the prior (conv4's head when
            its body is hidden), ``cg`` for other networks (a fully Bayesian conv4, whose batch norm makes every
            Jacobian row a full backward).
        probes: Rademacher probes of the ``cg`` solver's Hutchinson diagonal.
        variance: Gauss-Newton's mean-field variances: ``"meanfield"`` (the KL-optimal ``1 / diag(precision)``) or
            ``"marginal"`` (the linearised posterior's exact marginals; measured worse for GEM-BML+, README).
        tolerance: Gauss-Newton stops before ``steps`` once every task has converged: its objective fell by at most
            ``tolerance * max(1, |objective|)`` in the last step (a task whose step was rejected: in the last two).
            The later steps would leave the posterior where it is, so their callbacks see the same posterior. On a
            meta-trained sinusoid prior Gauss-Newton converges in 3-4 steps, so adapting for 10 costs about 4.
            ``0`` runs every step.
        safeguard: SVI with a mean-field or Delta guide and a diagonal Gaussian prior: a step is kept for a task only
            if it lowers the task's deterministic objective ``-log p(D | m) + KL(q || p)`` (the ELBO with the
            likelihood at the guide's mean); otherwise it is halved, up to ``line_search`` times, and dropped if none
            helps. Off by default: on Omniglot it rejects whitened Adam's first step (moving 112k weights by half a
            prior sd costs ~10^4 nats of KL for a few nats of likelihood), and meta-training then learns nothing
            (20% after 150 iterations, README "Omniglot"); it stops the later steps' overshoot only by stopping all.
        curvature: Gauss-Newton VI with a mean-field guide: the likelihood's gradient and Hessian in the outputs
            averaged over the posterior's spread (``"expected"``, ``curvature_draws`` quasi-Monte-Carlo draws per point:
            Gaussian VI by the Bayesian learning rule) or taken at its mean (``"mean"``: the Laplace step). The same for
            a Gaussian likelihood; for a softmax ``"mean"`` leaves the posterior of a confidently fitted support set as
            wide as the prior (:func:`hbmeta.inference.gauss_newton.gauss_newton_fit`).
        curvature_draws: draws per point of ``curvature="expected"``.
        latent_lr: Adam's learning rate for the guide of per-task latents besides the weights
            (:mod:`hbmeta.models.latents`, e.g. a noise scale). That guide is always fitted with Adam: it is not
            whitened, so the weights' (whitened SGD) step size does not suit it. ``None`` means ``lr`` with SVI and
            :data:`hbmeta.inference.gauss_newton_latents.LATENT_LR` with Gauss-Newton VI (which has no ``lr``).
    """

    steps: int = 5
    lr: float = 0.01
    optimizer: str = "adam"
    num_samples: int = 1
    analytic_kl: bool = True
    val_steps: int | None = None
    elbo: str = "auto"
    scale_lr: float | None = None
    clip_norm: float | None = None
    imaml_lambda: float = 10.0
    cg_steps: int = 5
    method: str = "svi"
    line_search: int = 4
    estimator: str = "local"
    solver: str = "auto"
    probes: int = 1
    safeguard: bool = False
    variance: str = "meanfield"
    tolerance: float = 1e-5
    latent_lr: float | None = None
    curvature: str = "expected"
    curvature_draws: int = 64

    def __post_init__(self) -> None:
        if self.method not in INNER_METHODS:
            raise ValueError(f"unknown inner method {self.method!r}; choose one of {', '.join(INNER_METHODS)}")
        if self.solver not in ("auto", "woodbury", "cg") or self.probes < 1:
            raise ValueError(f"bad Gauss-Newton solver settings: solver={self.solver!r} (auto, woodbury or cg), "
                             f"probes={self.probes} (>= 1)")
        if self.curvature not in ("expected", "mean"):
            raise ValueError(f"unknown curvature {self.curvature!r}; choose 'expected' or 'mean'")
        if self.variance not in ("meanfield", "marginal"):
            raise ValueError(f"unknown variance {self.variance!r}; choose 'meanfield' or 'marginal'")
        if self.estimator not in ("local", "reparam"):
            raise ValueError(f"unknown estimator {self.estimator!r}; choose 'local' or 'reparam'")
        if self.val_steps is not None and not (isinstance(self.val_steps, int) and self.val_steps >= 0):
            raise ValueError(f"val_steps={self.val_steps!r} must be an integer >= 0 (or None for steps)")
        if self.scale_lr is not None and not (isinstance(self.scale_lr, (int, float)) and math.isfinite(self.scale_lr)
                                              and self.scale_lr > 0):
            raise ValueError(f"scale_lr={self.scale_lr!r} must be a finite number > 0 (or None for lr)")
        for name in ("steps", "num_samples", "cg_steps", "line_search", "probes", "curvature_draws"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name}={value!r} must be an integer")
        for name in ("lr", "imaml_lambda", "tolerance"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"{name}={value!r} must be a finite number")
        if self.latent_lr is not None and not self.latent_lr > 0:
            raise ValueError(f"latent_lr={self.latent_lr} must be > 0 (or None for lr)")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"clip_norm={self.clip_norm} must be > 0 (or None for no clipping)")
        if not self.tolerance >= 0:
            raise ValueError(f"tolerance={self.tolerance} must be >= 0 (0: run every Gauss-Newton step)")
        if self.line_search < 0:
            raise ValueError(f"line_search={self.line_search} must be >= 0 (the number of step halvings)")
        if self.elbo not in ("auto", "pyro"):
            raise ValueError(f"unknown elbo {self.elbo!r}; choose 'auto' or 'pyro'")
        if self.curvature_draws < 1:
            raise ValueError(f"curvature_draws={self.curvature_draws} must be >= 1")
        if self.steps < 0 or self.num_samples < 1 or not self.lr > 0:
            raise ValueError(f"bad inner config: steps={self.steps}, num_samples={self.num_samples}, lr={self.lr}")
        if not self.imaml_lambda > 0 or self.cg_steps < 1:
            raise ValueError(f"bad iMAML settings: imaml_lambda={self.imaml_lambda} (must be > 0), "
                             f"cg_steps={self.cg_steps} (must be >= 1)")
        make_optimizer(self.optimizer, [torch.zeros(1, requires_grad=True)], self.lr)  # validates the name


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    """A torch optimizer by (case-insensitive) name: ``adam``, ``sgd``, ``adamw``, ``rmsprop`` ..."""
    table = {n.lower(): getattr(torch.optim, n) for n in dir(torch.optim)
             if isinstance(getattr(torch.optim, n), type) and issubclass(getattr(torch.optim, n), torch.optim.Optimizer)}
    try:
        cls = table[name.lower()]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}; choose e.g. 'adam' or 'sgd' (any torch.optim class)") from None
    return cls(params, lr=lr)


def diagonal_kl(loc: Tensor, log_s: Tensor | None, mu: Tensor, sigma: Tensor) -> Tensor:
    r"""Per task ``[..., T]``: :math:`\mathrm{KL}(N(m, s^2) \| N(\mu, \sigma^2))` summed over the weights, or for a
    Delta guide (``log_s`` None) ``-log N(m; mu, sigma^2)``, as in Pyro's ``kl(Delta, .)``."""
    if log_s is None:
        return -torch.distributions.Normal(mu, sigma, validate_args=False).log_prob(loc).sum(-1)
    return (sigma.log() - log_s + (torch.exp(2 * log_s) + (loc - mu).pow(2)) / (2 * sigma.pow(2)) - 0.5).sum(-1)


def negative_elbo(
    model: HierarchicalModel,
    guide: Guide,
    params: dict[str, Tensor],
    x: Tensor,
    y: Tensor,
    prior: dist.TorchDistribution | None,
    noise: Tensor | None,
    analytic_kl: bool = True,
    backend: str = "auto",
    latents: LatentGuide | None = None,
    latent_params: dict[str, Tensor] | None = None,
    latent_noise: dict[str, Tensor] | None = None,
    latent_prior: dict[str, dist.TorchDistribution] | None = None,
) -> Tensor:
    r"""``-sum_tau ELBO_tau(lambda_tau; prior)``, averaged over the ``S`` particles of ``noise [S, T, P]``.

    Differentiable in ``params`` (and in the prior's tensors), so the same function serves the inner SVI and
    the unrolled ELBO-gradient baseline. ``backend="auto"`` takes the analytic fast path where it applies.

    A model with per-task latents beyond the weights (:mod:`hbmeta.models.latents`) adds their guide ``latents``
    (parameters ``latent_params``, draws driven by ``latent_noise [S, T, k]`` per site) to the weights' in the task
    plate, and always runs Pyro's ELBO; ``latent_prior`` replaces the program's distribution of those sites.
    """
    if backend == "auto" and analytic_kl and prior is not None and not overrides_model(model) and latents is None:
        fast = _analytic_negative_elbo(model, guide, params, x, y, prior, noise)
        if fast is not None:
            return fast
    if noise is not None:
        num_particles = noise.shape[0]
    else:
        num_particles = 1 if not latent_noise else next(iter(latent_noise.values())).shape[0]
    elbo_cls = TraceMeanField_ELBO if analytic_kl else Trace_ELBO
    elbo = elbo_cls(num_particles=num_particles, vectorize_particles=True, max_plate_nesting=1)
    num_tasks = x.shape[0]
    pyro_model = replace_priors(model.model, latent_prior or {})

    def pyro_guide(x, y, prior, noise):
        with pyro.plate("tasks", num_tasks, dim=-1):
            pyro.sample("theta", guide.distribution(params, noise))
            if latents is not None:
                latents.sample(latent_params, latent_noise)

    with pyro.validation_enabled(False):  # fit_posterior checks for NaN itself
        try:
            return elbo.differentiable_loss(pyro_model, pyro_guide, x, y, prior, noise)
        except KeyError as missing:  # the model samples a latent site the guide does not (Pyro's bare KeyError)
            raise ValueError(f"{type(model).__name__}.model samples latent site {missing} that the guide does not cover: "
                             f"pass the latents' guide (hbmeta.models.latents.LatentGuide of model.latent_sites(x, y)) "
                             f"as latents=, as fit_posterior does") from None


def overrides_model(model: HierarchicalModel) -> bool:
    """Whether ``model`` is a subclass with its own :meth:`~hbmeta.models.hierarchical.HierarchicalModel.model`
    program: then the inner update runs that program through Pyro's ELBO, never the torch fast path."""
    return type(model).model is not HierarchicalModel.model


def _diagonal_normal(prior: dist.TorchDistribution) -> tuple[Tensor, Tensor] | None:
    if (isinstance(prior, torch.distributions.Independent) and prior.reinterpreted_batch_ndims == 1
            and type(prior.base_dist) in (torch.distributions.Normal, dist.Normal)):
        return prior.base_dist.loc, prior.base_dist.scale
    return None


def _whitening_reference(prior: dist.TorchDistribution, start: Posterior) -> tuple[Tensor, Tensor] | None:
    """What a whitened guide is parametrised against: the prior if it is a diagonal Normal, else (mixture,
    low-rank, heavy-tailed priors; a low-rank q1 as the prior of VI(q1, D_val)) the marginal Gaussian the guide
    starts from, whose scale sets the KL's curvature near the start just as the prior's does."""
    reference = _diagonal_normal(prior)
    if reference is None and start.kind in ("meanfield", "lowrank"):
        reference = (start.loc, start.variance.sqrt())
    return reference


def _analytic_negative_elbo(model, guide, params, x, y, prior, noise) -> Tensor | None:
    r"""The mean-field ELBO in plain torch, or ``None`` where it does not apply.

    .. math::
        -\mathrm{ELBO} = \sum_\tau \Big[\mathrm{KL}(q_\tau \| p) - \frac1S \sum_s \log p(D_\tau \mid m_\tau + s_\tau \epsilon_s)\Big],
        \quad \mathrm{KL} = \sum_i \log\frac{\sigma_i}{s_i} + \frac{s_i^2 + (m_i - \mu_i)^2}{2\sigma_i^2} - \frac12

    (for a Delta guide, ``KL = -log p(m)`` as in Pyro's ``kl(Delta, .)``).
    """
    moments = _diagonal_normal(prior)
    if moments is None or guide.name not in ("meanfield", "delta"):
        return None
    mu, sigma = moments
    if guide.name == "meanfield":
        loc, log_s = guide.moments(params)
        theta = loc if noise is None else loc + log_s.exp() * noise
        kl = diagonal_kl(loc, log_s, mu, sigma).sum()
    else:
        loc = params["loc"]
        theta = loc.unsqueeze(0) if noise is None else loc.expand(noise.shape)
        kl = diagonal_kl(loc, None, mu, sigma).sum()
    if theta.dim() == 2:
        theta = theta.unsqueeze(0)
    return kl - model.log_likelihood(theta, x, y).mean(0).sum()


class CommonNoise:
    """Common random numbers for two inner fits (GEM-BML+'s q1 and q2): the second fit replays the first's draws.

    ``first`` and ``second`` are :data:`NoiseFn` s. Every draw of ``first`` is recorded in order; ``second``'s
    ``k``-th draw is ``first``'s ``k``-th where the shapes match (the leading dims where only the last differs in
    size, e.g. more query points), and a fresh draw from the underlying stream otherwise. With the same noise in
    both fits, the Monte-Carlo errors of ``g(q2)`` and ``g(q1)`` are correlated and largely cancel in the
    difference.
    """

    def __init__(self, draw: NoiseFn):
        self.draw, self.recorded, self.index = draw, [], 0

    def first(self, step: int, shape: torch.Size) -> Tensor:
        eps = self.draw(step, shape)
        self.recorded.append(eps)
        return eps

    def second(self, step: int, shape: torch.Size) -> Tensor:
        old = self.recorded[self.index] if self.index < len(self.recorded) else None
        self.index += 1
        if old is not None and old.shape == shape:
            return old
        eps = self.draw(step, shape)
        if old is not None and old.dim() == eps.dim() and old.shape[:-2] == shape[:-2] and old.shape[-1] == shape[-1]:
            rows = min(old.shape[-2], shape[-2])  # e.g. [S, T, N, units]: the support points keep their noise
            eps[..., :rows, :] = old[..., :rows, :]
        return eps


@torch.no_grad()
def _task_objective(model: HierarchicalModel, guide: Guide, params: dict[str, Tensor], x: Tensor, y: Tensor,
                    prior: dist.TorchDistribution) -> Tensor:
    """Per task ``-log p(D | m) + KL(q || p)`` ``[T]`` (Delta guide: ``-log p(D | m) - log p(m)``), the safeguard's merit."""
    mu, sigma = _diagonal_normal(prior)
    loc, log_s = guide.moments(params) if guide.name == "meanfield" else (params["loc"], None)
    return diagonal_kl(loc, log_s, mu, sigma) - model.log_likelihood(loc.unsqueeze(0), x, y)[0]


@torch.no_grad()
def _safeguard(model, guide, params, before, merit, x, y, prior, halvings: int) -> Tensor:
    """Keep each task's optimizer step only if it lowers :func:`_task_objective`; else halve it (``halvings`` times)
    and drop it if none helps. Edits ``params`` in place; returns the tasks' objectives."""
    after = {n: params[n].detach().clone() for n in before}
    current = _task_objective(model, guide, params, x, y, prior)
    worse = ~(current <= merit)  # NaN counts as worse
    fraction = 1.0
    for _ in range(halvings):
        if not worse.any():
            break
        fraction /= 2
        for n in before:
            blend = before[n] + fraction * (after[n] - before[n])
            params[n].data[worse] = blend[worse]
        trial = _task_objective(model, guide, params, x, y, prior)
        current = torch.where(worse, trial, current)
        worse = worse & ~(trial <= merit)
    if worse.any():  # no shorter step helped: the task stays where it was
        for n in before:
            params[n].data[worse] = before[n][worse]
        current = torch.where(worse, merit, current)
    return current


def _local_negative_elbo(model: HierarchicalModel, guide: Guide, params: dict[str, Tensor], x: Tensor, y: Tensor,
                         prior: dist.TorchDistribution, num_samples: int, draw) -> Tensor:
    """The mean-field negative ELBO with the likelihood term by local reparameterisation / Flipout
    (:mod:`hbmeta.models.local_reparam`) and the KL in closed form (as :func:`_analytic_negative_elbo`)."""
    mu, sigma = _diagonal_normal(prior)
    loc, log_s = guide.moments(params)
    kl = diagonal_kl(loc, log_s, mu, sigma).sum()
    pred = local_forward(model.net, loc, log_s.exp(), x, num_samples, draw)
    return kl - model.likelihood.log_prob(pred, y).mean(0).sum()


def standard_normal(generator: torch.Generator | None, like: Tensor) -> NoiseFn:
    def draw(step: int, shape: torch.Size) -> Tensor:
        return torch.randn(shape, generator=generator, device=like.device, dtype=like.dtype)
    return draw


def _diverged_tasks(model: HierarchicalModel, guide: Guide, params: dict[str, Tensor], x: Tensor, y: Tensor
                    ) -> list[int]:
    """Tasks whose parameters, gradients or log-likelihood at the guide's mean are NaN / inf."""
    post = guide.posterior(params).detach()
    with torch.no_grad():
        try:
            bad = ~torch.isfinite(model.log_likelihood(post.loc.unsqueeze(0), x, y)[0])
        except ValueError:  # a likelihood with per-task latents has no log p(y | theta) alone
            bad = torch.zeros(post.num_tasks, dtype=torch.bool, device=post.loc.device)
        if post.kind != "delta":
            bad |= ~(post.variance > 0).all(1)
    for p in params.values():
        for t in (p, p.grad):
            if t is not None:
                bad |= ~torch.isfinite(t.detach()).flatten(1).all(1)
    return bad.nonzero().flatten().tolist()


def clip_per_task(params: list[Tensor], max_norm: float) -> None:
    """Scale each task's gradient (row ``t`` of every parameter) to norm at most ``max_norm``, in place."""
    norms = torch.sqrt(sum(p.grad.pow(2).flatten(1).sum(1) for p in params))
    factor = (max_norm / (norms + 1e-12)).clamp(max=1.0)
    for p in params:
        p.grad.mul_(factor.view(-1, *[1] * (p.grad.dim() - 1)))


_GAUSS_NEWTON_KINDS = {"meanfield": "meanfield", "delta": "delta", "fullcov": "full"}
#: ``solver="auto"`` solves exactly (Woodbury, through the Jacobian) for plain MLPs and for networks with at most this
#: many weights under the prior (a Bayesian head on a shared body: ``hide=``), else by matrix-free CG
WOODBURY_MAX_PARAMS = 20_000


def _gauss_newton(model, guide, x, y, start, prior, config, steps, callback, laplace, generator, sites=None,
                  latent_prior=None, leading: int | None = None, all_steps: int | None = None):
    """:func:`hbmeta.inference.gauss_newton.gauss_newton_fit` for a diagonal Gaussian prior and a supported guide
    (:func:`hbmeta.inference.gauss_newton_latents.gauss_newton_latent_fit` for a model with per-task latents).
    With ``leading``: the pair of fits on the first ``leading`` points and on all (``steps`` / ``all_steps``),
    :func:`hbmeta.inference.gauss_newton.gauss_newton_fit_pair`."""
    moments = _diagonal_normal(prior)
    if moments is None:
        raise ValueError(f"the Gauss-Newton inner update needs a diagonal Gaussian prior inside the ELBO; got "
                         f"{type(prior).__name__}: use InnerConfig(method='svi') for this prior")
    if guide.name not in _GAUSS_NEWTON_KINDS:
        raise ValueError(f"the Gauss-Newton inner update fits a meanfield, delta or fullcov guide; got {guide.name!r}: "
                         f"use InnerConfig(method='svi') for it")
    loc, scale = moments
    solver = config.solver if config.solver != "auto" else (
        "woodbury" if model.net.is_plain_mlp or model.net.num_params <= WOODBURY_MAX_PARAMS else "cg")
    settings = dict(halvings=config.line_search, laplace=laplace and solver == "woodbury", solver=solver,
                    cg_steps=config.cg_steps, probes=config.probes, generator=generator, variance=config.variance,
                    curvature=config.curvature, num_draws=config.curvature_draws)
    if sites:
        return gauss_newton_latent_fit(model, x, y, start, loc, scale.pow(2), steps, sites, negative_elbo,
                                       _GAUSS_NEWTON_KINDS[guide.name], latent_prior, config.latent_lr,
                                       num_samples=config.num_samples, callback=callback, **settings)
    if leading is not None:
        del settings["laplace"]
        return gauss_newton_fit_pair(model, x, y, leading, start, loc, scale.pow(2), steps, all_steps,
                                     _GAUSS_NEWTON_KINDS[guide.name], leading_laplace=laplace and solver == "woodbury",
                                     tolerance=config.tolerance, **settings)
    return gauss_newton_fit(model, x, y, start, loc, scale.pow(2), steps, _GAUSS_NEWTON_KINDS[guide.name],
                            callback=callback, tolerance=config.tolerance, **settings)


def _fit_posterior(
    model: HierarchicalModel,
    guide: Guide,
    x: Tensor,
    y: Tensor,
    start: Posterior,
    prior: dist.TorchDistribution | None = None,
    config: InnerConfig | None = None,
    steps: int | None = None,
    generator: torch.Generator | None = None,
    noise: NoiseFn | None = None,
    callback: Callable[[int, Posterior], None] | None = None,
    laplace: bool = False,
    sequential: bool = False,
) -> Posterior:
    """Run the inner update for every task of a meta-batch at once and return the detached posteriors.

    ``config.method`` chooses SVI (below) or Gauss-Newton VI (:func:`hbmeta.inference.gauss_newton.gauss_newton_fit`).

    Args:
        model: the hierarchical model.
        guide: the per-task guide family.
        x, y: ``[T, N, ...]`` data of each task.
        start: where the guides start (``prior.initial_posterior(T)`` or an earlier posterior).
        prior: the prior inside the ELBO; ``None`` means the model's ``p(theta; Theta)``.
        config: optimiser, learning rate, steps, Monte-Carlo samples, analytic KL (``None``: ``InnerConfig()``).
        steps: overrides ``config.steps``.
        generator: source of the reparameterisation noise (explicit seeds; ``None`` = torch's global RNG).
        noise: a ``NoiseFn`` to use instead of ``generator`` (tests feed identical noise to two runs).
        callback: called as ``callback(step, posterior)`` before the first step and after every step.
        laplace: Gauss-Newton only: also attach the linearised model's full posterior, for the predictive.
        sequential: the update VI(q1, D_val) of GEM-BML+: ``start``'s posteriors of per-task latents beyond the
            weights (``start.latents``) are their prior, as ``prior`` (``q1(theta)``) is the weights'.

    A model that samples per-task latents besides the weights (:meth:`HierarchicalModel.latent_sites`, e.g. a noise
    scale in a :class:`~hbmeta.models.pyro_likelihood.PyroLikelihood`) gets a guide for them beside the weights'
    (:class:`~hbmeta.models.latents.LatentGuide`, or the autoguide's own sites) and Pyro's ELBO; the returned
    posterior carries theirs in ``latents``.

    Raises:
        InnerLoopDivergedError: when the ELBO becomes NaN / inf, naming the task(s) and the step.
    """
    config = InnerConfig() if config is None else config
    steps = config.steps if steps is None else steps
    if prior is None:
        with torch.no_grad():
            prior = model.prior.distribution(x.shape[0])
    sites = model.latent_sites(x, y, prior)
    latent_prior = {}
    if sequential and sites and start.latents:
        latent_prior = {n: site.distribution(start.latents[n]) for n, site in sites.items() if n in start.latents}
    if config.method == "gauss-newton":
        if overrides_model(model):
            raise ValueError(f"{type(model).__name__} overrides HierarchicalModel.model, which the Gauss-Newton inner "
                             f"update cannot run (it linearises the network under the likelihood's curvature); use "
                             f"InnerConfig(method='svi'), which runs your model through Pyro's ELBO")
        return _gauss_newton(model, guide, x, y, start, prior, config, steps, callback, laplace, generator, sites,
                             latent_prior)
    if isinstance(guide, AutoGuidePerTask):  # a Pyro autoguide, fitted by Pyro's SVI in the task plate
        posterior = guide.fit(model, x, y, start, prior, steps, config.num_samples, sites, latent_prior, config.latent_lr)
        if callback is not None:
            callback(steps, posterior)
        return posterior
    params = guide.init_params(start, _whitening_reference(prior, start))
    latents = LatentGuide(sites) if sites else None
    latent_params = latents.init_params(x.shape[0], start.latents) if latents else {}
    scale_lr = config.lr if config.scale_lr is None else config.scale_lr
    location = [p for n, p in params.items() if n in ("loc", "z")]
    others = [p for n, p in params.items() if n not in ("loc", "z") and p.requires_grad]
    groups = [{"params": location, "lr": config.lr}] + ([{"params": others, "lr": scale_lr}] if others else [])
    opt = make_optimizer(config.optimizer, groups, config.lr)
    if latents:  # Adam whatever the weights' optimizer: q(z) is not whitened, its curvature is the data's
        latent_lr = config.lr if config.latent_lr is None else config.latent_lr
        latent_opt = torch.optim.Adam(list(latent_params.values()), lr=latent_lr)
    draw = noise or standard_normal(generator, start.loc)
    shape = torch.Size((config.num_samples, *start.loc.shape[:-1], guide.noise_size(start.loc.shape[-1])))
    local = (config.estimator == "local" and guide.name == "meanfield" and config.elbo == "auto" and config.analytic_kl
             and not overrides_model(model) and not sites
             and _diagonal_normal(prior) is not None and supports_local_noise(model.net))
    guard = (config.safeguard and guide.name in ("meanfield", "delta") and _diagonal_normal(prior) is not None
             and not overrides_model(model) and not sites)

    def current() -> Posterior:
        posterior = guide.posterior(params).detach()
        return posterior.with_latents(latents.posteriors(latent_params)).detach() if latents else posterior

    def snapshot() -> Posterior:  # for the callback: the optimizer updates params in place, a detached view would follow
        return current().clone()

    if guard:
        merit = _task_objective(model, guide, params, x, y, prior)
    if callback is not None:
        callback(0, snapshot())
    for step in range(1, steps + 1):
        opt.zero_grad(set_to_none=True)
        if latents:
            latent_opt.zero_grad(set_to_none=True)
        if local:
            loss = _local_negative_elbo(model, guide, params, x, y, prior, config.num_samples,
                                        lambda size, step=step: draw(step, size))
        else:
            eps = draw(step, shape) if guide.stochastic else None
            latent_noise = None if latents is None else {
                name: draw(step, size) for name, size in latents.noise_shapes(config.num_samples, x.shape[0]).items()}
            loss = negative_elbo(model, guide, params, x, y, prior, eps, config.analytic_kl, config.elbo,
                                 latents, latent_params, latent_noise, latent_prior)
        loss.backward()
        if not torch.isfinite(loss):
            raise InnerLoopDivergedError(
                f"inner loop diverged at step {step} of {steps}: the ELBO is {loss.item()} for task(s) "
                f"{_diverged_tasks(model, guide, params, x, y) or 'unknown'}; {_divergence_advice(config)}")
        if config.clip_norm is not None:  # location and scale separately
            for group in (location, others):
                if group:
                    clip_per_task(group, config.clip_norm)
        if guard:
            before = {n: p.detach().clone() for n, p in params.items() if p.requires_grad}
        opt.step()
        if latents:
            if config.clip_norm is not None:
                clip_per_task(list(latent_params.values()), config.clip_norm)
            latent_opt.step()
        if guard:
            merit = _safeguard(model, guide, params, before, merit, x, y, prior, config.line_search)
        if callback is not None:
            callback(step, snapshot())
    posterior = current()
    variance = posterior.variance
    finite = torch.isfinite(posterior.loc.sum() + variance.sum())  # one reduction: NaN / inf propagate
    if not (finite and (posterior.kind == "delta" or variance.min() > 0)):
        raise InnerLoopDivergedError(
            f"inner loop diverged by step {steps}: the posterior of task(s) "
            f"{_diverged_tasks(model, guide, params, x, y)} has NaN/inf/zero-scale parameters; "
            f"{_divergence_advice(config)}")
    return posterior



@functools.wraps(_fit_posterior)
def fit_posterior(model: HierarchicalModel, *args, **kwargs) -> Posterior:
    # the network's hidden parameters are constants of the inner update: a shared body's features are computed
    # once per input for all its steps (BatchedNet.shared_constant)
    with model.net.shared_constant():
        return _fit_posterior(model, *args, **kwargs)


def fit_posterior_pair(model: HierarchicalModel, guide: Guide, x: Tensor, y: Tensor, leading: int,
                       config: InnerConfig, steps: int, all_steps: int, generator: torch.Generator | None = None,
                       noise: tuple[NoiseFn, NoiseFn] | None = None, laplace: bool = False) -> tuple[Posterior, Posterior]:
    """VI from the prior on the first ``leading`` points of every task and on all of them (``steps`` / ``all_steps``
    steps): GEM-BML+'s ``q1 = VI(Theta, D_tr)`` and restart-mode ``q2 = VI(Theta, D_tr u D_val)``, ``x = [x_tr, x_val]``.

    The Gauss-Newton update with a diagonal Gaussian prior, a mean-field, delta or full guide and no per-task latents
    shares the two fits' first linearisation (:func:`hbmeta.inference.gauss_newton.gauss_newton_fit_pair`); every
    other update is two :func:`fit_posterior` calls, with ``noise`` (a pair) as their noise. ``laplace``: the leading
    fit also keeps the linearised posterior."""
    x1, y1 = x[:, :leading], y[:, :leading]
    noise1, noise2 = noise if noise is not None else (None, None)
    with model.net.shared_constant():
        start = model.initial_posterior(x, y)
        with torch.no_grad():
            prior = model.prior.distribution(x.shape[0])
        if (config.method == "gauss-newton" and not overrides_model(model) and guide.name in _GAUSS_NEWTON_KINDS
                and _diagonal_normal(prior) is not None and not model.latent_sites(x, y, prior)
                and _same_start(start, model.initial_posterior(x1, y1))):
            return _gauss_newton(model, guide, x, y, start, prior, config, steps, None, laplace, generator,
                                 leading=leading, all_steps=all_steps)
        x1, y1 = x1.contiguous(), y1.contiguous()
        q1 = _fit_posterior(model, guide, x1, y1, model.initial_posterior(x1, y1), config=config, steps=steps,
                            generator=generator, noise=noise1, laplace=laplace)
        q2 = _fit_posterior(model, guide, x, y, start, config=config, steps=all_steps, generator=generator, noise=noise2)
    return q1, q2


def _same_start(a: Posterior, b: Posterior) -> bool:
    """Whether two start posteriors are the same (a prior's start may depend on the data: a mixture's component)."""
    pairs = ((a.loc, b.loc), (a.scale, b.scale), (a.scale_tril, b.scale_tril))
    return a.kind == b.kind and all(u is v or (u is not None and v is not None and torch.equal(u, v)) for u, v in pairs)


def _divergence_advice(config: InnerConfig) -> str:
    """What to change when SVI diverges: the step size, and unclipped gradients (one huge step of the log scale
    sends a weight's posterior sd to zero; ``clip_norm`` bounds every step)."""
    advice = f"lower the inner learning rate (now {config.lr})"
    if config.scale_lr is not None and config.scale_lr != config.lr:
        advice += f" or scale_lr (now {config.scale_lr})"
    return advice + (", or set clip_norm (e.g. 5.0) to bound each step" if config.clip_norm is None else "")


# ------------------------------------------------------------------------- point-estimate inner loops
# The delta-posterior inner updates of the baselines (MAML's SGD, Reptile's optimizer), here beside VI so that
# every algorithm's default meta-test adaptation (hbmeta.inference.algorithm.Algorithm.adapt) finds them.
def sgd_adapt(model: HierarchicalModel, theta: Tensor, x: Tensor, y: Tensor, steps: int, lr: float,
              create_graph: bool = False, callback=None) -> Tensor:
    """``steps`` plain SGD steps on each task's loss, all tasks at once; ``theta [T, P]``."""
    if not create_graph:
        theta = theta.detach().requires_grad_()
    if callback is not None:
        callback(0, theta.detach())
    for step in range(1, steps + 1):
        loss = model.point_loss(theta, x, y).sum()
        (grad,) = torch.autograd.grad(loss, theta, create_graph=create_graph)
        theta = theta - lr * grad
        if not create_graph:
            theta = theta.detach().requires_grad_()
        if callback is not None:
            callback(step, theta.detach())
    _check_point_estimate(theta, steps, lr, "inner SGD")
    return theta


def _check_point_estimate(theta: Tensor, steps: int, lr: float, what: str) -> None:
    """After a point-estimate inner loop: NaN / inf weights name the task(s) (one check, not one per step)."""
    if not torch.isfinite(theta.detach().sum()):
        bad = (~torch.isfinite(theta.detach())).flatten(1).any(1).nonzero().flatten().tolist()
        raise InnerLoopDivergedError(f"inner loop diverged by step {steps} ({what}): the weights of task(s) {bad} are "
                                     f"NaN/inf; lower the inner learning rate (now {lr})")


def optimizer_adapt(model: HierarchicalModel, theta: Tensor, x: Tensor, y: Tensor, config: InnerConfig,
                    steps: int | None = None, callback=None) -> Tensor:
    """K steps of the configured torch optimizer on each task's loss, all tasks at once; ``theta [T, P]``.

    ``callback(step, theta)`` is called before the first step and after every step (for evaluation)."""
    theta = theta.detach().clone().requires_grad_()
    opt = make_optimizer(config.optimizer, [theta], config.lr)
    if callback is not None:
        callback(0, theta.detach())
    for step in range(1, (config.steps if steps is None else steps) + 1):
        opt.zero_grad(set_to_none=True)
        model.point_loss(theta, x, y).sum().backward()
        opt.step()
        if callback is not None:
            callback(step, theta.detach().clone())
    _check_point_estimate(theta, steps if steps is not None else config.steps, config.lr, f"inner {config.optimizer}")
    return theta.detach()
