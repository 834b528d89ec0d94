"""iMAML's implicit gradient against closed forms, and BMAML's SVGD / chaser loss against known answers."""

import copy
import math

import pytest
import torch

from hbmeta.bench.step import peak_saved_bytes
from hbmeta.inference.batch import TaskBatch
from hbmeta.inference.bmaml import bmaml_gradient, median_bandwidth, svgd, svgd_direction
from hbmeta.inference.imaml import conjugate_gradient, imaml_gradient, implicit_meta_gradient, proximal_adapt
from hbmeta.inference.inner import InnerConfig
from hbmeta.inference.learner import MetaLearner
from hbmeta.models import DiagonalGaussianPrior, GaussianLikelihood, HierarchicalModel, ParticlePrior, Posterior, mlp
from hbmeta.models.linear import linear_network
from hbmeta.tasks.sinusoid import SinusoidTasks

TASKS = SinusoidTasks(k_shot=5, k_query=5)


def _sinusoid_model(prior=None):
    net = mlp(1, (8, 8), 1)
    prior = prior or DiagonalGaussianPrior.from_module(net, 0.1)
    return HierarchicalModel(net, prior, GaussianLikelihood(0.5))


def _sinusoid_batch(num_tasks=3, seed=0):
    b = TASKS.sample(num_tasks, torch.Generator().manual_seed(seed))
    dtype = torch.get_default_dtype()
    return TaskBatch(*(t.to(dtype) for t in (b.x_train, b.y_train, b.x_val, b.y_val)))


# ------------------------------------------------------------------------------------------------ iMAML
def test_imaml_gradient_equals_exact_implicit_gradient_linear_regression(float64):
    """MSE of a linear model is 0.5 theta'A theta - b'theta + c: theta*(mu) = (A + lam I)^-1 (b + lam mu) exactly."""
    d, lam, num_tasks = 3, 2.0, 4
    gen = torch.Generator().manual_seed(0)
    x_tr, x_val = torch.randn(num_tasks, 6, d, generator=gen), torch.randn(num_tasks, 5, d, generator=gen)
    y_tr, y_val = torch.randn(num_tasks, 6, 1, generator=gen), torch.randn(num_tasks, 5, 1, generator=gen)
    mu = torch.randn(d, generator=gen)
    model = HierarchicalModel(linear_network(d), DiagonalGaussianPrior(mu), GaussianLikelihood(1.0))

    a = 2 * x_tr.transpose(-1, -2) @ x_tr / x_tr.shape[1]
    b = 2 * (x_tr.transpose(-1, -2) @ y_tr).squeeze(-1) / x_tr.shape[1]
    eye = torch.eye(d)
    mu_exact = mu.clone().requires_grad_()
    theta_exact = torch.linalg.solve(a + lam * eye, b + lam * mu_exact)  # [T, d]
    val_loss = ((x_val @ theta_exact.unsqueeze(-1) - y_val).pow(2).mean((1, 2))).mean()
    (exact,) = torch.autograd.grad(val_loss, mu_exact)

    lr = 1.0 / float(torch.linalg.eigvalsh(a).max() + lam)  # the inner problem converges at rate < 1 - lr * lam
    config = InnerConfig(steps=400, lr=lr, optimizer="sgd", imaml_lambda=lam, cg_steps=d)
    theta = proximal_adapt(model, mu, x_tr, y_tr, lam, config.steps, lr)
    torch.testing.assert_close(theta, theta_exact.detach(), rtol=1e-11, atol=1e-11)
    grads = imaml_gradient(model, TaskBatch(x_tr, y_tr, x_val, y_val), config)
    torch.testing.assert_close(grads["mu"], exact, rtol=1e-10, atol=1e-11)


def test_conjugate_gradient_with_p_steps_solves_spd_systems_exactly(float64):
    gen = torch.Generator().manual_seed(1)
    m = torch.randn(4, 6, 6, generator=gen)
    a = m @ m.transpose(-1, -2) + 0.5 * torch.eye(6)
    b = torch.randn(4, 6, generator=gen)
    x = conjugate_gradient(lambda v: (a @ v.unsqueeze(-1)).squeeze(-1), b, steps=6)
    torch.testing.assert_close(x, torch.linalg.solve(a, b), rtol=1e-8, atol=1e-9)


def test_batched_conjugate_gradient_equals_per_task_runs(float64):
    gen = torch.Generator().manual_seed(2)
    m = torch.randn(3, 8, 8, generator=gen)
    a = m @ m.transpose(-1, -2) + torch.eye(8)
    b = torch.randn(3, 8, generator=gen)
    batched = conjugate_gradient(lambda v: (a @ v.unsqueeze(-1)).squeeze(-1), b, steps=3)  # not yet converged
    for t in range(3):
        alone = conjugate_gradient(lambda v, a_t=a[t]: v @ a_t.T, b[t:t + 1], steps=3)
        torch.testing.assert_close(batched[t:t + 1], alone, rtol=1e-12, atol=1e-12)
    assert (batched - torch.linalg.solve(a, b)).abs().max() > 1e-3  # the check above was not trivial


def test_conjugate_gradient_stops_at_non_positive_curvature(float64):
    """Task 0 meets negative curvature at once (returns b, the first-order answer); task 1 is solved."""
    a = torch.stack([torch.diag(torch.tensor([1.0, -1.0])), torch.diag(torch.tensor([2.0, 4.0]))])
    b = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    x = conjugate_gradient(lambda v: (a @ v.unsqueeze(-1)).squeeze(-1), b, steps=5)
    torch.testing.assert_close(x, torch.tensor([[0.0, 1.0], [0.5, 0.25]]))


def test_implicit_gradient_batched_over_tasks_equals_per_task(float64):
    model, batch = _sinusoid_model(), _sinusoid_batch(3)
    theta = proximal_adapt(model, model.prior.loc, batch.x_train, batch.y_train, 2.0, 3, 0.01)
    v = torch.randn(theta.shape, generator=torch.Generator().manual_seed(3))
    batched = implicit_meta_gradient(model, theta, batch.x_train, batch.y_train, v, 2.0, cg_steps=4)
    for t in range(3):
        alone = implicit_meta_gradient(model, theta[t:t + 1], batch.x_train[t:t + 1], batch.y_train[t:t + 1],
                                       v[t:t + 1], 2.0, cg_steps=4)
        torch.testing.assert_close(batched[t:t + 1], alone, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(batched, v)  # the Hessian term did act


def test_imaml_memory_does_not_grow_with_inner_steps():
    batch, saved = _sinusoid_batch(4), {}
    for steps in (1, 4):
        learner = MetaLearner(mlp(1, (16, 16), 1), GaussianLikelihood(0.5), algorithm="imaml",
                              inner=InnerConfig(steps=steps, lr=0.01, optimizer="sgd"))
        saved[steps] = peak_saved_bytes(learner.meta_step, batch)
    assert saved[4] == saved[1]


# ------------------------------------------------------------------------------------------------ BMAML
def test_median_bandwidth_known_value():
    x = torch.tensor([0.0, 1.0, 3.0]).view(1, 3, 1)
    sq = (x.unsqueeze(2) - x.unsqueeze(1)).pow(2).sum(-1)  # pairs: 1, 9, 4 -> median 4
    torch.testing.assert_close(median_bandwidth(sq), torch.tensor([4.0 / math.log(4)]))
    assert median_bandwidth(sq[:, :1, :1]).item() == 1.0  # one particle: constant kernel


def test_svgd_with_one_particle_is_gradient_ascent_on_log_likelihood(float64):
    model, batch = _sinusoid_model(), _sinusoid_batch(2)
    start = model.prior.loc.detach().expand(1, 2, -1)
    out = svgd(model, start, batch.x_train, batch.y_train, steps=3, lr=1e-3)
    theta = start.clone()
    for _ in range(3):
        theta = theta.requires_grad_()
        (g,) = torch.autograd.grad(model.log_likelihood(theta, batch.x_train, batch.y_train).sum(), theta)
        theta = (theta + 1e-3 * g).detach()
    torch.testing.assert_close(out, theta, rtol=1e-12, atol=1e-12)


def test_svgd_recovers_mean_and_sd_of_a_gaussian_target(float64):
    """SVGD's fixed point for N(m, s^2) in 1-D: particle mean ~ m and spread ~ s (Liu & Wang 2016)."""
    m, s, num = 2.0, 0.5, 100
    x = 0.1 * torch.randn(num, 1, 1, generator=torch.Generator().manual_seed(4))  # far too narrow, off-centre
    for _ in range(2000):
        x = x + 0.05 * svgd_direction(x, -(x - m) / s**2)
    assert abs(x.mean().item() - m) < 0.005
    assert abs(x.std().item() / s - 1) < 0.05


def test_batched_svgd_equals_per_task_loop(float64):
    model, batch = _sinusoid_model(), _sinusoid_batch(3)
    start = ParticlePrior.around(model.prior.loc, 4, 0.1, torch.Generator().manual_seed(5)).initial_posterior(3).particles
    batched = svgd(model, start, batch.x_train, batch.y_train, steps=3, lr=1e-3)
    for t in range(3):
        alone = svgd(model, start[:, t:t + 1], batch.x_train[t:t + 1], batch.y_train[t:t + 1], steps=3, lr=1e-3)
        torch.testing.assert_close(batched[:, t:t + 1], alone, rtol=1e-10, atol=1e-12)
    assert (batched - start).abs().max() > 1e-4


def test_bmaml_meta_gradient_is_the_mean_of_per_task_chaser_gradients(float64):
    net = mlp(1, (8, 8), 1)
    prior = ParticlePrior.around(torch.cat([p.detach().flatten() for p in net.parameters()]), 3, 0.1,
                                 torch.Generator().manual_seed(6))
    model, batch = HierarchicalModel(net, prior, GaussianLikelihood(0.5)), _sinusoid_batch(3)
    config = InnerConfig(steps=2, lr=1e-3, optimizer="sgd", val_steps=1)
    grad = bmaml_gradient(model, batch, config)["particles"]
    assert grad.shape == prior.particles.shape and torch.isfinite(grad).all() and grad.abs().sum() > 0
    per_task = [bmaml_gradient(model, batch.select(slice(t, t + 1)), config)["particles"] for t in range(3)]
    torch.testing.assert_close(grad, torch.stack(per_task).mean(0), rtol=1e-10, atol=1e-12)


def test_bmaml_memory_grows_with_chaser_steps():
    batch, saved = _sinusoid_batch(4), {}
    for steps in (1, 4):
        learner = MetaLearner(mlp(1, (16, 16), 1), GaussianLikelihood(0.5), algorithm="bmaml",
                              inner=InnerConfig(steps=steps, lr=1e-3, optimizer="sgd", num_samples=3, val_steps=1))
        saved[steps] = peak_saved_bytes(learner.meta_step, batch)
    assert saved[4] > 2 * saved[1]


def test_bmaml_learner_adapts_particles_and_predicts_with_each_particle():
    learner = MetaLearner(mlp(1, (16, 16), 1), GaussianLikelihood(0.5), algorithm="bmaml")
    assert isinstance(learner.prior, ParticlePrior) and learner.prior.num_particles == learner.inner.num_samples
    batch = _sinusoid_batch(2)
    post = learner.adapt(batch.x_train, batch.y_train, steps=2)
    assert post.kind == "particles" and post.particles.shape == (5, 2, learner.prior.num_params)
    pred = learner.predict(post, batch.x_val, num_samples=7)
    outputs = learner.model.net(post.particles, batch.x_val)
    torch.testing.assert_close(pred.mean, outputs.mean(0))
    assert pred.samples.shape[0] == 5 and (pred.std > 0).all()


def test_particle_posterior_select_cat_sample_and_moments():
    particles = torch.randn(3, 4, 2, generator=torch.Generator().manual_seed(7))
    post = Posterior.from_particles(particles)
    assert post.kind == "particles" and post.num_tasks == 4
    torch.testing.assert_close(post.loc, particles.mean(0))
    torch.testing.assert_close(post.variance, particles.var(0, unbiased=False))
    torch.testing.assert_close(post.covariance.diagonal(dim1=-2, dim2=-1), post.variance)
    assert torch.equal(post.sample(3), particles) and torch.equal(post.sample(5)[3:], particles[:2])
    part = post.select(slice(1, 3))
    assert torch.equal(part.particles, particles[:, 1:3]) and torch.equal(part.loc, post.loc[1:3])
    joined = Posterior.cat([post.select(0), post.select(slice(1, 4))])
    assert torch.equal(joined.particles, particles) and joined.detach().kind == "particles"
    with pytest.raises(NotImplementedError, match="no density"):
        post.distribution()
    with pytest.raises(ValueError, match=r"must be \[M, T, P\]"):
        Posterior(post.loc, particles=particles[:, :2])


@pytest.mark.parametrize("kwargs, match", [
    (dict(algorithm="bmaml", prior=DiagonalGaussianPrior(torch.zeros(321))), "needs a ParticlePrior"),
    (dict(algorithm="maml", prior=ParticlePrior(torch.zeros(2, 321))), "only for BMAML"),
    (dict(algorithm="bmaml", inner=InnerConfig(optimizer="adam")), "optimizer='sgd'"),
])
def test_bmaml_setup_errors_name_the_problem(kwargs, match):
    with pytest.raises(ValueError, match=match):
        learner = MetaLearner(mlp(1, (16, 16), 1), GaussianLikelihood(0.5), **kwargs)
        learner.meta_step(_sinusoid_batch(2))


@pytest.mark.parametrize("algorithm", ["imaml", "bmaml"])
def test_state_dict_round_trip_resumes_identically(algorithm):
    def learner():
        torch.manual_seed(0)
        return MetaLearner(mlp(1, (16, 16), 1), GaussianLikelihood(0.5), algorithm=algorithm, prior_scale=0.1,
                           inner=InnerConfig(steps=2, lr=1e-3, optimizer="sgd", num_samples=3))
    first, batches = learner(), [_sinusoid_batch(2, seed) for seed in range(2)]
    first.meta_step(batches[0])
    second = learner()
    second.load_state_dict(copy.deepcopy(first.state_dict()))  # as a checkpoint would: no shared optimizer state
    for run in (first, second):
        run.meta_step(batches[1])
    for (name, a), b in zip(first.prior.named_parameters(), second.prior.parameters()):
        assert torch.equal(a, b), name
    assert second.iteration == 2
