"""Meta-learned likelihood scales (Fisher's identity for the likelihood's own parameters, inference/gem.py).

On the exact oracle the GEM gradient of the Gaussian noise scale equals autograd of the exact log marginal
likelihood in ``log s`` (and of the exact L[2]); meta-training recovers the noise of the task distribution.
"""

import math

import pytest
import torch
from torch import nn

from hbmeta.inference.batch import TaskBatch
from hbmeta.inference.gem import gem_plus_gradient, likelihood_gem_gradient
from hbmeta.inference.inner import InnerConfig
from hbmeta.inference.learner import MetaLearner
from hbmeta.models import CategoricalLikelihood, DiagonalGaussianPrior, GaussianLikelihood, HierarchicalModel
from hbmeta.models.guides import FullCovarianceGuide
from hbmeta.models.linear import exact_log_marginal, exact_posterior, linear_network
from hbmeta.models.posterior import Posterior
from tests.inference.test_oracle import problem

D = torch.float64


def learned_model(prior: DiagonalGaussianPrior, noise: float) -> HierarchicalModel:
    return HierarchicalModel(nn.Sequential(linear_network(prior.num_params)), prior,
                             GaussianLikelihood(noise, learn_scale=True).double())


def exact_noise_gradient(x, y, prior, model: HierarchicalModel) -> torch.Tensor:
    """Per-task d/dlog s of the exact log marginal likelihood at the model's (float32-rounded) noise."""
    log_s = model.likelihood.log_noise.detach().clone().requires_grad_()
    lml = exact_log_marginal(x, y, prior.mu.detach(), prior.log_sigma.detach(), log_s.exp())
    return torch.stack([torch.autograd.grad(lml[t], log_s, retain_graph=True)[0] for t in range(x.shape[0])])


@pytest.mark.parametrize("noise", [0.4, 1.7])
def test_noise_gem_gradient_equals_exact_marginal_gradient_linear_gaussian(noise):
    x, y, prior = problem(0, correlated=True)
    model = learned_model(prior, noise)
    post = exact_posterior(x, y, prior.mu.detach(), prior.log_sigma.detach(), model.likelihood.log_noise.exp())
    g = likelihood_gem_gradient(model, post, x, y)["likelihood.log_noise"]
    torch.testing.assert_close(g, exact_noise_gradient(x, y, prior, model), rtol=1e-8, atol=1e-10)
    # a mean-field posterior (same marginals, no correlations) gives a different, wrong answer: the test can fail
    mean_field = Posterior(post.loc, post.variance.sqrt())
    wrong = likelihood_gem_gradient(learned_model(prior, noise), mean_field, x, y)["likelihood.log_noise"]
    assert (wrong - g).abs().max() > 1e-3


def test_gem_plus_noise_gradient_with_gauss_newton_equals_exact_l2_gradient():
    """End to end: Gauss-Newton fullcov posteriors (exact here) and the L[2] difference, through gem_plus_gradient."""
    noise, k = 0.6, 5
    x, y, prior = problem(1, points=12)
    model = learned_model(prior, noise)
    batch = TaskBatch(x[:, :k], y[:, :k], x[:, k:], y[:, k:])
    grads, _ = gem_plus_gradient(model, FullCovarianceGuide(), batch, InnerConfig(method="gauss-newton", steps=1),
                                 mode="restart")
    exact = exact_noise_gradient(x, y, prior, model) - exact_noise_gradient(x[:, :k], y[:, :k], prior, model)
    torch.testing.assert_close(grads["likelihood.log_noise"], exact, rtol=1e-8, atol=1e-10)


def test_temperature_gradient_matches_monte_carlo_for_a_tight_posterior():
    """Second order in the posterior's spread: with a small covariance it matches E_q grad log p by Monte Carlo."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 3, generator=g, dtype=D)
    y = torch.randint(0, 4, (2, 6), generator=g)
    net = nn.Linear(3, 4).double()
    prior = DiagonalGaussianPrior(torch.cat([p.detach().reshape(-1) for p in net.parameters()]), math.log(0.05))
    model = HierarchicalModel(net, prior, CategoricalLikelihood(1.3, learn_scale=True).double())
    post = Posterior(prior.mu.detach().expand(2, -1) + 0.3 * torch.randn(2, prior.num_params, generator=g, dtype=D),
                     torch.full((2, prior.num_params), 0.05, dtype=D))
    ours = likelihood_gem_gradient(model, post, x, y)["likelihood.log_temperature"]
    theta = post.sample(40000, g)
    log_t = model.likelihood.log_temperature
    mc = torch.stack([torch.autograd.grad(model.log_likelihood(theta, x, y)[:, t].mean(), log_t, retain_graph=True)[0]
                      for t in range(2)])
    torch.testing.assert_close(ours, mc, rtol=0.02, atol=2e-3)


def test_meta_learning_the_noise_recovers_the_task_distributions_noise():
    """Linear-Gaussian tasks with true noise 0.3: GEM-BML+ with exact (Gauss-Newton) posteriors and a learned
    noise starting at 1.0 ends near 0.3; a noise that did not move, or moved the wrong way, fails."""
    torch.manual_seed(0)
    d, true_noise = 3, 0.3
    net = nn.Sequential(nn.Linear(d, 1, bias=False))
    learner = MetaLearner(net, GaussianLikelihood(1.0, learn_scale=True), algorithm="gem-bml+", prior_scale=1.0,
                          inner=InnerConfig(method="gauss-newton", steps=1), meta_lr=0.02)
    g = torch.Generator().manual_seed(1)
    for _ in range(400):
        theta = torch.randn(16, d, 1, generator=g)
        x = torch.randn(16, 12, d, generator=g)
        y = x @ theta + true_noise * torch.randn(16, 12, 1, generator=g)
        learner.meta_step(TaskBatch(x[:, :6], y[:, :6], x[:, 6:], y[:, 6:]))
    assert learner.likelihood.noise_scale == pytest.approx(true_noise, rel=0.15)
    state = learner.state_dict()
    fresh = MetaLearner(nn.Sequential(nn.Linear(d, 1, bias=False)), GaussianLikelihood(1.0, learn_scale=True),
                        algorithm="gem-bml+", inner=InnerConfig(method="gauss-newton", steps=1))
    fresh.load_state_dict(state)
    assert fresh.likelihood.noise_scale == pytest.approx(learner.likelihood.noise_scale)


def test_a_learned_scale_is_refused_by_algorithms_that_cannot_learn_it():
    with pytest.raises(ValueError, match="meta-learned by GEM"):
        MetaLearner(nn.Sequential(nn.Linear(2, 1)), GaussianLikelihood(0.5, learn_scale=True), algorithm="maml")
    with pytest.raises(ValueError, match="noise_scale must be a positive number"):
        GaussianLikelihood(-1.0)
