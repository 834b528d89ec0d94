r"""Meta-RL learners: GEM-BML, GEM-BML+, MAML (TRPO meta-update) and Reptile on a Gaussian policy (section 5.3).

One meta-iteration for ``T`` tasks (GEM-BML appendix B.1, C.4.3; MAML's RL recipe):

1. ``D_tr``: ``K`` rollouts per task with the current policy (Bayesian: one ``theta_tau ~ q_tau`` per task,
   ``q`` = the prior at first; point methods: ``mu``).
2. inner update on ``D_tr`` -> ``lambda_tr`` (VI by PG or TRPO; MAML / Reptile: one PG step).
3. ``D_val``: ``K`` rollouts per task with the adapted policy.
4. meta-update:
   - GEM-BML+ (``L[2]``): ``q2 = VI(lambda_tr, D_val)`` (the paper's sequential form, as
     :func:`hbmeta.inference.gem.gem_plus_posteriors`: start and prior ``q1``); gradient ``g(q2) - g(q1)`` with
     ``g(q) = E_q grad_Theta log p(theta; Theta)`` (:func:`hbmeta.inference.gem.gem_gradient`) - data-free;
   - GEM-BML (``L[1]``): one posterior on ``D_tr u D_val`` from the prior; gradient ``g(q)``;
   - MAML: TRPO on ``mu`` through the inner step (:func:`hbmeta.inference.policy_gradient.maml_trpo_step`);
   - Reptile: ``mu - theta`` after a PG step on ``D_tr`` and one on ``D_val``.
   GEM and Reptile hand the averaged gradient to Adam (``meta_lr``, paper: 1e-3).

Data come from a callback ``sample(theta [T, P]) -> (PolicyData, mean return)`` so that this module never
touches an environment (imports flow hbmeta -> inference -> models).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from hbmeta.inference.gem import gem_gradient
from hbmeta.inference.inner import make_optimizer
from hbmeta.inference.learner import get_algorithm, step_prior
from hbmeta.inference.policy_data import PolicyData
from hbmeta.inference.policy_gradient import (
    PolicyGradientLikelihood,
    maml_trpo_step,
    pg_posterior,
    pg_step,
    trpo_posterior,
)
from hbmeta.models.functional import BatchedNet
from hbmeta.models.guides import MeanFieldGuide
from hbmeta.models.hierarchical import HierarchicalModel
from hbmeta.models.posterior import Posterior
from hbmeta.models.priors import DiagonalGaussianPrior

__all__ = ["RL_ALGORITHMS", "PolicyMetaLearner", "SampleFn"]

#: the algorithms meta-RL supports
RL_ALGORITHMS = ("gem-bml", "gem-bml+", "maml", "reptile")
#: ``sample(theta [T, P]) -> (data, mean return)``: roll out K episodes per task with the given weights
SampleFn = Callable[[Tensor], tuple[PolicyData, float]]


class PolicyMetaLearner:
    """Meta-learner of a Gaussian policy's weights.

    Args:
        policy: the policy ``nn.Module`` (e.g. :class:`hbmeta.models.policy.GaussianMLPPolicy`); its weights are the prior mean.
        algorithm: one of :data:`RL_ALGORITHMS`.
        inner_update: ``"pg"`` (vanilla policy gradient) or ``"trpo"`` for the Bayesian algorithms' VI update.
        inner_lr: PG step on the mean surrogate (paper: 0.1).
        inner_steps: VI steps per update on one data set (paper: 1).
        meta_lr: Adam's learning rate for GEM and Reptile (paper: 1e-3).
        prior_scale, max_prior_scale: initial prior sd and its ceiling (Bayesian algorithms learn it).
        max_kl: TRPO's KL bound (the inner TRPO update; MAML's meta-update).
        num_samples: Monte-Carlo draws of ``theta`` per VI step.
        gem_plus_mode: ``"sequential"`` (VI(lambda_tr, D_val), the paper's) or ``"joint"``.
    """

    def __init__(self, policy: nn.Module, algorithm: str = "gem-bml+", inner_update: str = "pg", inner_lr: float = 0.1,
                 inner_steps: int = 1, meta_lr: float = 1e-3, prior_scale: float = 0.02,
                 max_prior_scale: float | None = 0.1, max_kl: float = 0.01, num_samples: int = 1,
                 gem_plus_mode: str = "sequential"):
        self.algorithm = get_algorithm(algorithm).name
        if self.algorithm not in RL_ALGORITHMS:
            raise ValueError(f"algorithm {self.algorithm!r} is not available for RL; choose one of {', '.join(RL_ALGORITHMS)}")
        if inner_update not in ("pg", "trpo"):
            raise ValueError(f"unknown inner update {inner_update!r}; choose 'pg' or 'trpo'")
        if gem_plus_mode not in ("sequential", "joint"):
            raise ValueError(f"unknown gem_plus_mode {gem_plus_mode!r}; choose 'sequential' or 'joint'")
        if not inner_lr > 0 or inner_steps < 1 or not max_kl > 0 or not prior_scale > 0:
            raise ValueError(f"bad RL settings: inner_lr={inner_lr}, inner_steps={inner_steps}, max_kl={max_kl}, "
                             f"prior_scale={prior_scale}")
        self.bayesian = get_algorithm(self.algorithm).bayesian
        self.inner_update, self.inner_lr, self.inner_steps = inner_update, inner_lr, inner_steps
        self.max_kl, self.num_samples, self.gem_plus_mode = max_kl, num_samples, gem_plus_mode
        net = BatchedNet(policy)
        prior = DiagonalGaussianPrior(net.initial_vector(), math.log(prior_scale), learn_scale=self.bayesian,
                                      max_scale=max_prior_scale if self.bayesian else None)
        self.model = HierarchicalModel(net, prior, PolicyGradientLikelihood())
        self.guide = MeanFieldGuide(whiten=False)  # SGD on (m, log s): the step on m is MAML's PG step
        self.optimizer = make_optimizer("adam", prior.parameters(), meta_lr)
        self.iteration = 0

    @property
    def prior(self) -> DiagonalGaussianPrior:
        return self.model.prior

    @property
    def device(self) -> torch.device:
        return self.prior.mu.device

    # ------------------------------------------------------------------------------------------ policies
    def initial(self, num_tasks: int) -> Posterior:
        """Where every task starts: the prior (Bayesian) or a point mass at ``mu``."""
        if self.bayesian:
            return self.prior.initial_posterior(num_tasks)
        return Posterior(self.prior.mu.detach().expand(num_tasks, -1).clone())

    def behaviour(self, posterior: Posterior, generator: torch.Generator | None = None) -> Tensor:
        """The policy weights a task acts with, ``[T, P]``: one draw ``theta_tau ~ q_tau`` per task (the generative
        model's one ``theta`` per task; a point mass gives its location). All K episodes of a task share it."""
        return posterior.sample(1, generator)[0]

    def adapt_step(self, posterior: Posterior, data: PolicyData, prior=None,
                   generator: torch.Generator | None = None) -> Posterior:
        """One inner update on ``data`` from ``posterior``.

        Bayesian: VI (PG or TRPO) with ``prior`` inside the ELBO (``None``: ``posterior`` itself, the sequential
        update used at meta-test and for ``VI(lambda_tr, D_val)``). Point methods: one PG step of ``inner_lr``.
        """
        data = data.to(self.device)
        if not self.bayesian:
            return Posterior(pg_step(self.model.net, posterior.loc, data, self.inner_lr).detach())
        prior = posterior.distribution() if prior is None else prior
        if self.inner_update == "trpo":
            return trpo_posterior(self.model, data, posterior, self.max_kl)
        return pg_posterior(self.model, self.guide, data, posterior, prior, self.inner_lr, self.inner_steps,
                            self.num_samples, generator)

    # ---------------------------------------------------------------------------------------- meta-train
    def meta_step(self, sample: SampleFn, num_tasks: int, generator: torch.Generator | None = None) -> dict[str, float]:
        """One meta-iteration (module docstring). Returns the pre- / post-adaptation returns and the gradient norm."""
        q0 = self.initial(num_tasks)
        train, return_before = sample(self.behaviour(q0, generator))
        with torch.no_grad():  # the prior inside the ELBO is a constant of the inner update
            theta_prior = self.prior.distribution(num_tasks) if self.bayesian else None
        q1 = self.adapt_step(q0, train, prior=theta_prior, generator=generator)
        val, return_after = sample(self.behaviour(q1, generator))
        info = {"return_before": return_before, "return_after": return_after}
        if self.algorithm == "maml":
            info.update(maml_trpo_step(self.model.net, self.prior.mu, train.to(self.device), val.to(self.device),
                                       q1.loc, self.inner_lr, self.max_kl))
        else:
            self._apply(self._descent_direction(q0, q1, train, val, theta_prior, generator), info)
        self.iteration += 1
        return info

    def _descent_direction(self, q0: Posterior, q1: Posterior, train: PolicyData, val: PolicyData, theta_prior,
                           generator) -> dict[str, Tensor]:
        if self.algorithm == "reptile":
            theta = pg_step(self.model.net, q1.loc, val.to(self.device), self.inner_lr).detach()
            return {"mu": (self.prior.mu.detach() - theta).mean(0)}
        if self.algorithm == "gem-bml":
            q = self.adapt_step(q0, PolicyData.cat([train, val]), prior=theta_prior, generator=generator)
            return {n: -g.mean(0) for n, g in gem_gradient(self.prior, q).items()}
        if self.gem_plus_mode == "sequential":
            q2 = self.adapt_step(q1, val, prior=q1.distribution(), generator=generator)
        else:
            q2 = self.adapt_step(q1, PolicyData.cat([train, val]), prior=theta_prior, generator=generator)
        g2, g1 = gem_gradient(self.prior, q2), gem_gradient(self.prior, q1)
        return {n: -(g2[n] - g1[n]).mean(0) for n in g2}

    def _apply(self, grads: dict[str, Tensor], info: dict[str, float]) -> None:
        info["grad_norm"] = step_prior(self.prior, self.optimizer, grads,
                                       f"at iteration {self.iteration} ({self.algorithm}, inner lr {self.inner_lr})")

    # --------------------------------------------------------------------------------------- persistence
    def state_dict(self) -> dict:
        return {"prior": self.prior.state_dict(), "optimizer": self.optimizer.state_dict(), "iteration": self.iteration}

    def load_state_dict(self, state: dict) -> None:
        self.prior.load_state_dict(state["prior"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.iteration = int(state["iteration"])
