r"""Gradient-EM meta-gradients: GEM-BML and GEM-BML+ (GEM-BML section 3.2, Theorem 1, appendix A.4, B.7).

By Theorem 1 (Fisher's identity) the gradient of the log marginal likelihood of a task is

.. math::
    \nabla_\Theta L(\Theta; D) = \mathbb{E}_{\theta \sim p(\theta \mid D; \Theta)} \nabla_\Theta \log p(\theta; \Theta)
    \approx \mathbb{E}_{\theta \sim q(\theta; \lambda(D, \Theta))} \nabla_\Theta \log p(\theta; \Theta) ,

which needs only the inner update's result ``lambda`` - no graph of the inner loop and no data. GEM-BML
estimates :math:`\nabla L^{[1]}` with the posterior on :math:`D^{tr} \cup D^{val}`; GEM-BML+ estimates
:math:`\nabla L^{[2]} = \nabla L(\Theta; D^{tr} \cup D^{val}) - \nabla L(\Theta; D^{tr})` (appendix A.4).

All functions return per-task gradients ``{name: [T, *param_shape]}`` of the log-likelihood (an ascent
direction); the registered algorithms :data:`GEM_BML` and :data:`GEM_BML_PLUS` average and negate them for a
torch optimizer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hbmeta.inference.algorithm import LearnerState, PosteriorAlgorithm, register_algorithm
from hbmeta.inference.batch import TaskBatch
from hbmeta.inference.implicit import LIKELIHOOD_PREFIX, SHARED_PREFIX, implicit_shared_gradient
from hbmeta.inference.inner import CommonNoise, InnerConfig, NoiseFn, fit_posterior, fit_posterior_pair, standard_normal
from hbmeta.models.guides import Guide
from hbmeta.models.hierarchical import HierarchicalModel
from hbmeta.models.posterior import Posterior
from hbmeta.models.priors import Prior
from hbmeta.models.saved_tensors import untracked

__all__ = ["gem_gradient", "mc_gem_gradient", "gem_bml_gradient", "gem_plus_gradient", "gem_plus_posteriors",
           "likelihood_gem_gradient", "shared_gem_gradient", "GEM_PLUS_MODES", "HIDDEN_GRADIENTS", "LIKELIHOOD_PREFIX", "SHARED_PREFIX", "GEMAlgorithm", "GEMBML", "GEMBMLPlus",
           "GEM_BML", "GEM_BML_PLUS"]


#: how GEM-BML+ fits q2 on D_tr u D_val (:func:`gem_plus_posteriors`)
GEM_PLUS_MODES = ("sequential", "joint", "restart")
#: how GEM-BML+ meta-learns the network's hidden (shared) weights (:func:`gem_plus_gradient`)
HIDDEN_GRADIENTS = ("fisher", "implicit", "implicit-predictive")


@untracked()
def mc_gem_gradient(prior: Prior, posterior: Posterior, num_samples: int = 64,
                    generator: torch.Generator | None = None) -> dict[str, Tensor]:
    r"""Monte-Carlo GEM for ANY prior and ANY guide one can sample from.

    .. math:: \hat g_\tau = \frac1S \sum_s \nabla_\Theta \log p(\theta_s; \Theta), \quad \theta_s \sim q_\tau

    Per-task gradients come from ``torch.func.grad`` vmapped over tasks.
    """
    theta = posterior.sample(num_samples, generator).detach()  # [S, T, P]
    params = {n: p.detach() for n, p in prior.named_parameters()}
    buffers = dict(prior.named_buffers())

    def mean_log_prob(params: dict[str, Tensor], theta_task: Tensor) -> Tensor:
        return torch.func.functional_call(prior, (params, buffers), (theta_task,)).mean()

    per_task = torch.func.vmap(torch.func.grad(mean_log_prob), in_dims=(None, 1))
    return per_task(params, theta)


def gem_gradient(prior: Prior, posterior: Posterior, closed_form: bool = True, num_samples: int = 64,
                 generator: torch.Generator | None = None) -> dict[str, Tensor]:
    r"""``E_q grad_Theta log p(theta; Theta)`` per task: the prior's closed form if it has one, else Monte Carlo."""
    if closed_form:
        grads = prior.gem_gradient(posterior)
        if grads is not None:
            return grads
    return mc_gem_gradient(prior, posterior, num_samples, generator)


@untracked()
def likelihood_gem_gradient(model: HierarchicalModel, posterior: Posterior, x: Tensor, y: Tensor
                            ) -> dict[str, Tensor]:
    r"""Per-task GEM gradient of the likelihood's learnable parameters ``phi`` (a noise scale, a temperature).

    Fisher's identity holds for every parameter of the marginal likelihood, so as for the prior (Theorem 1)

    .. math:: \nabla_\phi \log p(D; \Theta, \phi) = \mathbb{E}_{p(\theta \mid D)} \nabla_\phi \log p(D \mid \theta; \phi)
              \approx \nabla_\phi\, \mathbb{E}_{f \sim N(f(x; m),\, J \Sigma J^\top)} \log p(D \mid f; \phi),

    the expectation over the posterior pushed through the network linearised at its mean ``m``
    (:meth:`~hbmeta.models.likelihoods.Likelihood.expected_log_prob`; exact for a linear-Gaussian model, where it is the
    gradient of the exact log marginal likelihood in ``phi`` - ``tests/test_likelihood_scale.py``). ``Sigma`` is the
    posterior's covariance (mean-field, low-rank, full, or the linearised Laplace one). Returns
    ``{"likelihood.<name>": [T, *shape]}``; empty if nothing is learnable.
    """
    params = {n: p for n, p in model.likelihood.named_parameters() if p.requires_grad}
    if not params:
        return {}
    from hbmeta.models.jacobian import output_jacobian

    f, jac = output_jacobian(model.net, posterior.loc.detach(), x)
    cov = posterior.detach().function_covariance(jac)
    buffers = dict(model.likelihood.named_buffers())

    def per_task(values: dict[str, Tensor]) -> Tensor:
        return torch.func.functional_call(model.likelihood, ({**values}, buffers), (f, cov, y))

    grads = torch.func.jacrev(per_task)({n: p.detach() for n, p in params.items()})
    return {LIKELIHOOD_PREFIX + n: g for n, g in grads.items()}


def shared_gem_gradient(model: HierarchicalModel, posterior: Posterior, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    r"""GEM gradient of the network's hidden parameters ``phi`` (kept out of the prior, shared by the tasks).

    Fisher's identity again: :math:`\nabla_\phi \log p(D; \Theta, \phi) = \mathbb{E}_{p(\theta \mid D)}
    \nabla_\phi \log p(D \mid \theta, \phi)`, with the expectation as for the likelihood's parameters: under the
    network linearised at the posterior mean, :math:`\nabla_\phi\, \mathbb{E}_{f \sim N(f(x; m, \phi),\, J \Sigma
    J^\top)} \log p(D \mid f)` (the covariance held fixed), or at the posterior mean for a likelihood without a
    Gauss-Newton curvature. Exact for a model linear in ``theta`` with ``phi`` an output offset (tested against the
    exact marginal likelihood). Returns ``{"net.<name>": [T, *shape]}``: ``T`` equal rows, the batch's gradient over
    ``T``, so that their mean (what the meta-step takes, as for the prior's per-task rows) is the per-task average;
    empty when nothing is hidden.
    """
    hidden = model.net.hidden
    if not hidden:
        return {}
    loc = posterior.loc.detach()
    with torch.enable_grad():
        if model.likelihood.has_curvature:
            from hbmeta.models.jacobian import output_jacobian

            with torch.no_grad():
                _, jac = output_jacobian(model.net, loc, x)
                cov = posterior.detach().function_covariance(jac)
            objective = model.likelihood.expected_log_prob(model.net(loc.unsqueeze(0), x)[0], cov, y).sum()
        else:
            objective = model.log_likelihood(loc.unsqueeze(0), x, y).sum()
        grads = torch.autograd.grad(objective, list(hidden.values()))
    num_tasks = loc.shape[0]
    return {SHARED_PREFIX + n: (g / num_tasks).expand(num_tasks, *g.shape) for n, g in zip(hidden, grads)}


def gem_bml_gradient(model: HierarchicalModel, guide: Guide, batch: TaskBatch, config: InnerConfig,
                     generator: torch.Generator | None = None, closed_form: bool = True, noise: NoiseFn | None = None
                     ) -> tuple[dict[str, Tensor], Posterior]:
    r"""GEM-BML: :math:`\nabla_\Theta L^{[1]}_\tau` from the posterior on :math:`D^{tr}_\tau \cup D^{val}_\tau`.

    The inner update is VI from the prior on the joint data (which with a Delta guide and a fixed prior
    scale makes the mean update Reptile's, section 4). Returns the per-task gradients and the posterior.
    ``noise`` (optional) replaces ``generator`` as the inner loop's noise (:func:`hbmeta.inference.inner.fit_posterior`).
    """
    x, y = batch.joint()
    post = fit_posterior(model, guide, x, y, model.initial_posterior(x, y), config=config,
                         generator=generator, noise=noise)
    grads = gem_gradient(model.prior, post, closed_form, generator=generator)
    return {**grads, **likelihood_gem_gradient(model, post, x, y), **shared_gem_gradient(model, post, x, y)}, post


def gem_plus_posteriors(model: HierarchicalModel, guide: Guide, batch: TaskBatch, config: InnerConfig,
                        generator: torch.Generator | None = None, mode: str = "sequential",
                        noise: NoiseFn | None = None, laplace: bool = False) -> tuple[Posterior, Posterior]:
    r"""The two posteriors of GEM-BML+: ``q1 = VI(Theta, D_tr)`` and ``q2`` on ``D_tr u D_val``.

    ``mode="sequential"`` (the paper's VI(lambda_tr, D_val)): start at q1, use q1 as the prior, data D_val.
    ``mode="joint"``: start at q1, prior Theta, data D_tr u D_val.
    ``mode="restart"``: start at the prior, prior Theta, data D_tr u D_val - q2 is fitted exactly as q1 is, so
    the two estimates in ``g(q2) - g(q1)`` share the inner update's error (the Gauss-Newton default: with a
    warm start q2 gets more optimisation than q1 and the difference picks that up; README, "Defaults").
    ``noise`` (optional) replaces ``generator`` as both fits' reparameterisation noise. q2 replays q1's draws
    (common random numbers, :class:`hbmeta.inference.inner.CommonNoise`). ``laplace``: q1 also keeps the linearised
    posterior (Gauss-Newton; :func:`hbmeta.inference.inner.fit_posterior`).
    """
    if mode not in GEM_PLUS_MODES:
        raise ValueError(f"unknown GEM-BML+ mode {mode!r}; choose one of {', '.join(GEM_PLUS_MODES)}")
    common = CommonNoise(noise or standard_normal(generator, batch.x_train))  # q2 replays q1's draws
    noise1, noise2 = common.first, common.second
    val_steps = config.val_steps if config.val_steps is not None else config.steps
    if mode == "restart":  # both from the prior: the Gauss-Newton fits share their first linearisation
        x, y = batch.joint()
        return fit_posterior_pair(model, guide, x, y, batch.x_train.shape[1], config, config.steps, val_steps,
                                  generator, (noise1, noise2), laplace)
    q1 = fit_posterior(model, guide, batch.x_train, batch.y_train, model.initial_posterior(batch.x_train, batch.y_train),
                       config=config, generator=generator, noise=noise1, laplace=laplace)
    if mode == "sequential":
        if q1.kind == "delta":
            raise ValueError("sequential GEM-BML+ needs a posterior with a density as the prior of VI(lambda_tr, D_val); "
                             "a Delta guide has none: use mode='joint'")
        q2 = fit_posterior(model, guide, batch.x_val, batch.y_val, q1, prior=q1.distribution(), config=config,
                           steps=val_steps, generator=generator, noise=noise2, sequential=True)
    else:
        x, y = batch.joint()
        start = q1 if mode == "joint" else model.initial_posterior(x, y)
        q2 = fit_posterior(model, guide, x, y, start, config=config, steps=val_steps, generator=generator, noise=noise2)
    return q1, q2


def gem_plus_gradient(model: HierarchicalModel, guide: Guide, batch: TaskBatch, config: InnerConfig,
                      generator: torch.Generator | None = None, closed_form: bool = True, mode: str = "sequential",
                      noise: NoiseFn | None = None, hidden_gradient: str = "fisher"
                      ) -> tuple[dict[str, Tensor], Posterior]:
    r"""GEM-BML+: :math:`\nabla L^{[2]}_\tau = \hat g(q_2) - \hat g(q_1)` (Subroutine GEM-BML+, appendix A.4, eq. 21).

    For the diagonal Gaussian prior this is, per weight,
    :math:`\partial_\mu = (m_2 - m_1)/\sigma^2` and
    :math:`\partial_{\log\sigma} = (s_2^2 + (m_2-\mu)^2 - s_1^2 - (m_1-\mu)^2)/\sigma^2`.
    The network's hidden (shared) weights take ``hidden_gradient`` (:data:`HIDDEN_GRADIENTS`): ``"fisher"``, the same
    difference of Fisher's identity on q2 and q1 (:func:`shared_gem_gradient`), or ``"implicit"``, the gradient of
    the query log-likelihood at q1's mean through the support VI's optimality condition
    (:func:`hbmeta.inference.implicit.implicit_shared_gradient`).

    Returns the per-task gradients and q1 (the posterior on the support set).
    """
    if hidden_gradient not in HIDDEN_GRADIENTS:
        raise ValueError(f"hidden_gradient={hidden_gradient!r}: choose one of {', '.join(HIDDEN_GRADIENTS)}")
    q1, q2 = gem_plus_posteriors(model, guide, batch, config, generator, mode, noise,
                                 laplace=hidden_gradient == "implicit-predictive")
    g2 = gem_gradient(model.prior, q2, closed_form, generator=generator)
    g1 = gem_gradient(model.prior, q1, closed_form, generator=generator)
    if model.likelihood.learnable:  # the same difference for the likelihood's parameters
        g2.update(likelihood_gem_gradient(model, q2, *batch.joint()))
        g1.update(likelihood_gem_gradient(model, q1, batch.x_train, batch.y_train))
    grads = {n: g2[n] - g1[n] for n in g2}
    if model.net.hidden and hidden_gradient == "fisher":  # and for the network's hidden (shared) parameters
        g2 = shared_gem_gradient(model, q2, *batch.joint())
        g1 = shared_gem_gradient(model, q1, batch.x_train, batch.y_train)
        grads.update({n: g2[n] - g1[n] for n in g2})
    elif model.net.hidden:
        grads.update(implicit_shared_gradient(model, q1, batch, config.cg_steps,
                                              predictive=hidden_gradient == "implicit-predictive"))
    return grads, q1


class GEMAlgorithm(PosteriorAlgorithm):
    """The GEM family: Bayesian, meta-learns the likelihood's learned scale, Gauss-Newton VI by default."""

    backprop_through_inner = False
    bayesian = True
    learns_likelihood = True
    learns_hidden = True

    def default_inner(self, gauss_newton: bool) -> InnerConfig:
        """2 steps of Gauss-Newton mean-field VI (:mod:`hbmeta.inference.gauss_newton`; no step size, no Monte-Carlo
        noise); with ``gauss_newton=False`` (other priors, likelihoods without a curvature) SVI's defaults."""
        if gauss_newton:
            return InnerConfig(method="gauss-newton", steps=2)
        return super().default_inner(gauss_newton)


class GEMBML(GEMAlgorithm):
    name = "gem-bml"
    meta_loss = "L[1]"
    estimator = "GEM (closed form or Monte Carlo)"
    reference = "Zou & Lu 2020, sec. 3.2"
    description = "Gradient-EM on the posterior of each task's joint data"

    def meta_gradient_and_posterior(self, learner: LearnerState, batch: TaskBatch,
                                    generator: torch.Generator | None = None) -> tuple[dict[str, Tensor], Posterior]:
        per_task, posterior = gem_bml_gradient(learner.model, learner.guide, batch, learner.inner, generator,
                                               learner.closed_form)
        return {n: -g.mean(0) for n, g in per_task.items()}, posterior


class GEMBMLPlus(GEMAlgorithm):
    name = "gem-bml+"
    meta_loss = "L[2]"
    estimator = "GEM, difference of two L[1] terms"
    reference = "Zou & Lu 2020, sec. 3.2, A.4"
    description = "Gradient-EM, GEM(q2) - GEM(q1) of the joint and the support posteriors"

    def meta_gradient_and_posterior(self, learner: LearnerState, batch: TaskBatch,
                                    generator: torch.Generator | None = None) -> tuple[dict[str, Tensor], Posterior]:
        per_task, q1 = gem_plus_gradient(learner.model, learner.guide, batch, learner.inner, generator,
                                         learner.closed_form, learner.gem_plus_mode,
                                         hidden_gradient=learner.hidden_gradient)
        return {n: -g.mean(0) for n, g in per_task.items()}, q1


GEM_BML = register_algorithm(GEMBML())
GEM_BML_PLUS = register_algorithm(GEMBMLPlus())
