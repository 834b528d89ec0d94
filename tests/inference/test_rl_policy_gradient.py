"""Policy-gradient likelihood, TRPO steps and the Gaussian policy: checks against hand-derived answers."""

import math

import pytest
import torch

from hbmeta.inference.policy_data import PolicyData
from hbmeta.inference.policy_gradient import (
    PolicyGradientLikelihood,
    conjugate_gradient,
    maml_trpo_step,
    pg_posterior,
    pg_step,
    surrogate,
    trpo_posterior,
)
from hbmeta.models.functional import BatchedNet
from hbmeta.models.guides import MeanFieldGuide
from hbmeta.models.hierarchical import HierarchicalModel
from hbmeta.models.policy import GaussianMLPPolicy, gaussian_kl, gaussian_log_prob
from hbmeta.models.posterior import Posterior
from hbmeta.models.priors import DiagonalGaussianPrior


def _bandit_policy(mean: float, log_std: float) -> BatchedNet:
    """A one-step bandit: observation 1, policy N(a; w + b, s^2) with w + b = mean."""
    policy = GaussianMLPPolicy(1, 1, hidden=())
    with torch.no_grad():
        policy.mean_net[0].weight.fill_(mean / 2)
        policy.mean_net[0].bias.fill_(mean / 2)
        policy.log_std.fill_(log_std)
    return BatchedNet(policy)


def test_surrogate_gradient_is_the_policy_gradient_estimate_on_a_one_step_bandit():
    # reward r(a) = -(a - c)^2, a ~ N(m, s^2): J = -((m - c)^2 + s^2), dJ/dm = -2 (m - c), dJ/dlog s = -2 s^2
    m, log_s, c, n = 0.3, math.log(0.5), 1.0, 200_000
    net = _bandit_policy(m, log_s)
    theta = net.initial_vector().unsqueeze(0).requires_grad_()
    s = math.exp(log_s)
    actions = m + s * torch.randn(1, n, 1, generator=torch.Generator().manual_seed(0))
    rewards = -(actions[..., 0] - c) ** 2
    data = PolicyData(torch.ones(1, n, 1), actions, rewards, torch.ones(1, n))
    (grad,) = torch.autograd.grad(surrogate(net, theta, data).sum(), theta)
    # the REINFORCE estimate mean_n r_n grad log pi(a_n), written out by hand
    z = (actions[0, :, 0] - m) / s
    d_mean = (rewards[0] * z / s).mean()
    d_log_s = (rewards[0] * (z ** 2 - 1)).mean()
    log_std_grad, w_grad, b_grad = grad[0]          # parameter order: log_std, weight, bias
    assert torch.allclose(torch.stack([w_grad, b_grad, log_std_grad]), torch.stack([d_mean, d_mean, d_log_s]),
                          rtol=1e-4, atol=1e-6)
    # ... and the estimate is the known answer (Monte-Carlo tolerance: ~4 standard errors)
    assert d_mean.item() == pytest.approx(-2 * (m - c), abs=0.02)
    assert d_log_s.item() == pytest.approx(-2 * s ** 2, abs=0.02)
    # the likelihood of appendix B.1 is N times the surrogate
    pred = net(theta.detach(), data.obs)
    assert PolicyGradientLikelihood().log_prob(pred, data.targets()).item() == pytest.approx(
        n * surrogate(net, theta.detach(), data).item(), rel=1e-5)


def _random_data(num_tasks=3, n=64, obs_dim=2, act_dim=2, seed=0) -> PolicyData:
    gen = torch.Generator().manual_seed(seed)
    adv = torch.randn(num_tasks, n, generator=gen)
    return PolicyData(torch.randn(num_tasks, n, obs_dim, generator=gen), torch.randn(num_tasks, n, act_dim, generator=gen),
                      (adv - adv.mean(1, keepdim=True)) / adv.std(1, keepdim=True), torch.ones(num_tasks, n))


@pytest.mark.parametrize("max_kl", [1e-3, 1e-2])
def test_trpo_step_keeps_the_mean_policy_kl_within_its_bound_and_improves_the_surrogate(max_kl):
    net = BatchedNet(GaussianMLPPolicy(2, 2, hidden=(16, 16)))
    prior = DiagonalGaussianPrior(net.initial_vector(), math.log(0.05))
    model = HierarchicalModel(net, prior, PolicyGradientLikelihood())
    data = _random_data()
    start = prior.initial_posterior(3)
    new = trpo_posterior(model, data, start, max_kl=max_kl)
    kl = (gaussian_kl(net(start.loc, data.obs), net(new.loc, data.obs))).mean(-1)
    assert (kl <= max_kl * (1 + 1e-4)).all() and (kl > 0.1 * max_kl).all()
    old_log_prob = gaussian_log_prob(net(start.loc, data.obs), data.actions)
    assert (surrogate(net, new.loc, data, old_log_prob) > surrogate(net, start.loc, data, old_log_prob)).all()
    assert torch.equal(new.scale, start.scale)   # TRPO moves the guide's mean only


def test_pg_posterior_with_a_near_point_prior_takes_mamls_policy_gradient_step():
    net = BatchedNet(GaussianMLPPolicy(2, 2, hidden=(16,)))
    prior = DiagonalGaussianPrior(net.initial_vector(), math.log(1e-6))
    model = HierarchicalModel(net, prior, PolicyGradientLikelihood())
    data = _random_data()
    post = pg_posterior(model, MeanFieldGuide(whiten=False), data, prior.initial_posterior(3), None, lr=0.1,
                        generator=torch.Generator().manual_seed(0))
    point = pg_step(net, prior.mu.detach().expand(3, -1), data, lr=0.1)
    assert torch.allclose(post.loc, point, atol=1e-5)
    assert not torch.allclose(post.loc, prior.mu.detach().expand(3, -1), atol=1e-4)


def test_conjugate_gradient_solves_a_batch_of_spd_systems():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4, 6, 6, generator=gen, dtype=torch.float64)
    spd = a @ a.transpose(1, 2) + 0.5 * torch.eye(6, dtype=torch.float64)
    b = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    x = conjugate_gradient(lambda v: (spd @ v.unsqueeze(-1)).squeeze(-1), b, iters=30)
    assert torch.allclose(x, torch.linalg.solve(spd, b), atol=1e-8)


def test_maml_trpo_meta_step_moves_mu_within_the_kl_bound():
    net = BatchedNet(GaussianMLPPolicy(2, 2, hidden=(8,)))
    mu = net.initial_vector().clone()
    train, val = _random_data(2, 32, seed=1), _random_data(2, 32, seed=2)
    adapted = pg_step(net, mu.expand(2, -1), train, lr=0.1).detach()
    before = mu.clone()
    info = maml_trpo_step(net, mu, train, val, adapted, lr=0.1, max_kl=0.01)
    assert 0 < info["meta_kl"] <= 0.01 and info["improvement"] > 0
    assert not torch.equal(mu, before)
    # the KL it reports is the one of the adapted policies, through the inner step
    new_adapted = pg_step(net, mu.expand(2, -1), train, lr=0.1).detach()
    kl = gaussian_kl(net(adapted, val.obs), net(new_adapted, val.obs)).mean()
    assert kl.item() == pytest.approx(info["meta_kl"], rel=1e-4)


def test_policy_runs_many_weight_vectors_like_the_module_itself():
    policy = GaussianMLPPolicy(3, 2)
    net = BatchedNet(policy)
    x = torch.randn(4, 5, 3)
    out = net(net.initial_vector().expand(2, 4, -1), x)
    assert out.shape == (2, 4, 5, 4)
    assert torch.allclose(out[1, 2], policy(x[2]), atol=1e-6)
    with pytest.raises(ValueError, match="bad policy sizes"):
        GaussianMLPPolicy(0, 2)
    with pytest.raises(ValueError, match="disagrees"):
        PolicyData(torch.zeros(2, 3, 1), torch.zeros(2, 4, 1), torch.zeros(2, 3), torch.ones(2, 3))
    assert isinstance(Posterior(torch.zeros(1, 2)), Posterior)


def test_policy_docstring_example_runs():
    import doctest

    import hbmeta.models.policy

    result = doctest.testmod(hbmeta.models.policy)
    assert result.attempted > 0 and result.failed == 0
