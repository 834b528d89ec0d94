"""The Gauss-Newton inner update (inference/gauss_newton.py) and the Jacobians it uses (models/jacobian.py).

On the exact oracle (Bayesian linear regression, DESIGN.md) one Gauss-Newton step IS the exact posterior mean,
the full-covariance variant IS the exact posterior, so GEM / GEM-BML+ with it equal autograd of the exact log
marginal likelihood; the mean-field variant has the exact mean and the KL(q || p)-optimal variances
``1 / diag(precision)``. Everything float64 and seeded.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hbmeta.inference.batch import TaskBatch
from hbmeta.inference.gauss_newton import gauss_newton_direction, gauss_newton_fit, map_objective, prior_term_along
from hbmeta.inference.gem import gem_gradient, gem_plus_posteriors
from hbmeta.inference.inner import InnerConfig, InnerLoopDivergedError, fit_posterior
from hbmeta.models import CategoricalLikelihood, DiagonalGaussianPrior, GaussianLikelihood, HierarchicalModel, MeanFieldGuide
from hbmeta.models.conv import Conv4
from hbmeta.models.functional import BatchedNet, mlp
from hbmeta.models.guides import DeltaGuide, FullCovarianceGuide, LowRankGuide
from hbmeta.models.jacobian import mlp_jacobian, output_jacobian, vjp_jacobian
from hbmeta.models.linear import exact_log_marginal, exact_posterior
from tests.inference.test_oracle import assert_rel_close_per_task, autograd_gradients, model_for, problem

D = torch.float64
GN = InnerConfig(method="gauss-newton", steps=1)


def jacrev_reference(net: BatchedNet, theta, x):
    return torch.func.vmap(torch.func.jacrev(lambda t, xx: net._single(t, xx).reshape(-1)))(theta, x)


@pytest.mark.parametrize("activation,outputs,bias", [(nn.ReLU, 1, True), (nn.Tanh, 3, True), (nn.ReLU, 2, False)])
def test_mlp_closed_form_jacobian_equals_jacrev(activation, outputs, bias):
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(2, 7, bias=bias), activation(), nn.Linear(7, 5), activation(),
                           nn.Linear(5, outputs, bias=bias)).double()
    net = BatchedNet(module)
    theta = net.initial_vector() + 0.3 * torch.randn(4, net.num_params, dtype=D)
    x = torch.randn(4, 6, 2, dtype=D)
    f, jac = mlp_jacobian(net, theta, x)
    torch.testing.assert_close(f, net(theta, x))
    torch.testing.assert_close(jac.reshape(4, -1, net.num_params), jacrev_reference(net, theta, x), rtol=1e-12, atol=1e-12)
    f2, jac2 = vjp_jacobian(net, theta, x)  # the generic path agrees too
    torch.testing.assert_close(jac2, jac, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(f2, f)


def test_vjp_jacobian_of_conv4_equals_jacrev_per_task():
    """The generic path on a module with its own ``forward_batched`` (grouped convolutions)."""
    torch.manual_seed(0)
    module = Conv4(in_channels=1, num_classes=3, filters=4, image_size=8).double()
    net = BatchedNet(module)
    theta = net.initial_vector() + 0.05 * torch.randn(2, net.num_params, dtype=D)
    x = torch.randn(2, 3, 1, 8, 8, dtype=D)
    f, jac = output_jacobian(net, theta, x)
    assert f.shape == (2, 3, 3) and jac.shape == (2, 3, 3, net.num_params)
    torch.testing.assert_close(jac.reshape(2, 9, -1), jacrev_reference(net, theta, x), rtol=1e-10, atol=1e-10)


def test_one_gauss_newton_step_is_the_exact_posterior_linear_gaussian():
    """Linear model: the fullcov kind is N(m, S) exactly, the meanfield kind has m and 1 / diag(S^-1)."""
    s = 0.7
    x, y, prior = problem(0, correlated=True)
    model, truth = model_for(prior, s), exact_posterior(x, y, prior.mu.detach(), prior.log_sigma.detach(), s)
    full = fit_posterior(model, FullCovarianceGuide(), x, y, prior.initial_posterior(3), config=GN)
    torch.testing.assert_close(full.loc, truth.loc, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(full.covariance, truth.covariance, rtol=1e-10, atol=1e-10)
    mf = fit_posterior(model, MeanFieldGuide(), x, y, prior.initial_posterior(3), config=GN)
    torch.testing.assert_close(mf.loc, truth.loc, rtol=1e-10, atol=1e-10)
    precision_diag = torch.diagonal(torch.linalg.inv(truth.covariance), dim1=-2, dim2=-1)
    torch.testing.assert_close(mf.variance, 1 / precision_diag, rtol=1e-10, atol=1e-12)
    assert (mf.variance < truth.variance - 1e-3).any()  # mean-field under-disperses: it is not the marginal
    marginal = fit_posterior(model, MeanFieldGuide(), x, y, prior.initial_posterior(3),
                             config=InnerConfig(method="gauss-newton", steps=1, variance="marginal"))
    torch.testing.assert_close(marginal.variance, truth.variance, rtol=1e-9, atol=1e-12)
    delta = fit_posterior(model, DeltaGuide(), x, y, prior.initial_posterior(3), config=GN)
    assert delta.kind == "delta"
    torch.testing.assert_close(delta.loc, truth.loc, rtol=1e-10, atol=1e-10)
    # more steps stay at the optimum (the line search accepts nothing that is worse)
    again = fit_posterior(model, MeanFieldGuide(), x, y, prior.initial_posterior(3), config=InnerConfig(method="gauss-newton", steps=4))
    torch.testing.assert_close(again.loc, truth.loc, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("seed,noise_scale", [(0, 0.5), (1, 2.0)])
def test_gem_plus_with_gauss_newton_equals_exact_l2_gradient(seed, noise_scale):
    """GEM-BML+ (joint mode) with the fullcov Gauss-Newton posteriors is autograd of the exact L[2]."""
    k = 5
    x, y, prior = problem(seed, points=12)
    l2 = (exact_log_marginal(x, y, prior.mu, prior.log_sigma, noise_scale)
          - exact_log_marginal(x[:, :k], y[:, :k], prior.mu, prior.log_sigma, noise_scale))
    truth = autograd_gradients(prior, l2)
    batch = TaskBatch(x[:, :k], y[:, :k], x[:, k:], y[:, k:])
    q1, q2 = gem_plus_posteriors(model_for(prior, noise_scale), FullCovarianceGuide(), batch, GN, mode="joint")
    g2, g1 = gem_gradient(prior, q2), gem_gradient(prior, q1)
    assert_rel_close_per_task({n: g2[n] - g1[n] for n in g2}, truth, 1e-8)


def overshooting_problem():
    """A ReLU net with a wide prior (sd e) and a sharp likelihood (0.1) on 6 tasks of 10 points of ``5 sin 3x``: the full
    Gauss-Newton step overshoots for some tasks. ``(model, prior, x, y)``."""
    torch.manual_seed(0)
    net = BatchedNet(mlp(1, (40, 40), 1).double())
    prior = DiagonalGaussianPrior(net.initial_vector(), torch.tensor(1.0, dtype=D).log())
    model = HierarchicalModel(net, prior, GaussianLikelihood(0.1))
    g = torch.Generator().manual_seed(0)
    x = 10 * torch.rand(6, 10, 1, generator=g, dtype=D) - 5
    return model, prior, x, 5 * torch.sin(3 * x)


def test_line_search_lowers_the_map_objective_every_step_on_a_nonlinear_net():
    """On a ReLU net with a wide prior and a sharp likelihood the full step overshoots for some tasks: the MAP
    objective never rises, and every task - including those whose first candidates were all rejected, which
    then try smaller steps - has lowered it after 8 steps."""
    model, prior, x, y = overshooting_problem()
    values = []

    def record(step, post):
        theta = post.loc
        values.append(-model.log_likelihood(theta, x, y) + 0.5 * ((theta - prior.mu.detach()) / prior.scale.detach()).pow(2).sum(-1))

    fit_posterior(model, MeanFieldGuide(), x, y, prior.initial_posterior(6), config=InnerConfig(method="gauss-newton", steps=8),
                  callback=record)
    values = torch.stack(values)
    assert (values[1:] <= values[:-1] + 1e-9).all()
    assert (values[-1] < values[0] - 1.0).all()


def test_line_search_prior_term_along_the_direction_equals_the_objective_evaluated_at_each_candidate():
    """The line search scores its candidates with the prior term as a quadratic in the step (three reductions over
    ``[T, P]``); the reference is :func:`map_objective` evaluated at every candidate ``m + t d`` (``[H, T, P]``)."""
    torch.manual_seed(0)
    net = BatchedNet(mlp(1, (40, 40), 1).double())
    model = HierarchicalModel(net, DiagonalGaussianPrior(net.initial_vector(), torch.tensor(0.0, dtype=D)), GaussianLikelihood(0.3))
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 10, 1, generator=g, dtype=D) * 10 - 5
    y = torch.sin(x)
    m, d = torch.randn(2, 4, net.num_params, generator=g, dtype=D)
    loc, var = torch.randn(net.num_params, generator=g, dtype=D), torch.rand(4, net.num_params, generator=g, dtype=D) + 0.1
    steps = torch.rand(5, 4, generator=g, dtype=D) * 2
    trial = m + steps.unsqueeze(-1) * d
    reference = map_objective(model, trial, x, y, loc, var)
    fast = map_objective(model, trial, x, y, loc, var, prior_term=prior_term_along(m, d, loc, var, steps))
    torch.testing.assert_close(fast, reference, rtol=1e-12, atol=0)


def test_line_search_takes_what_scoring_every_candidate_at_once_takes():
    """The line search (analytic prior term, one batched pass) against the reference: every candidate of every task
    scored by :func:`map_objective`, keeping per task the largest step that lowers the objective.
    A wide prior and a sharp likelihood make some tasks reject the full step and take a shorter one (checked)."""
    model, prior, x, y = overshooting_problem()
    start = prior.initial_posterior(6)
    loc, var = prior.mu.detach(), prior.scale.detach().square().expand(6, -1)
    m = start.loc.detach()
    direction = gauss_newton_direction(model, m, x, y, loc, var)[0]
    steps = (0.5 ** torch.arange(5, dtype=D)).unsqueeze(1).expand(5, 6)
    scores = map_objective(model, m + steps.unsqueeze(-1) * direction, x, y, loc, var)
    better = scores < map_objective(model, m, x, y, loc, var)
    assert bool((better.any(0) & ~better[0]).any())  # some task rejects its full step and takes a shorter one
    chosen = steps[better.to(torch.int8).argmax(0), 0] * better.any(0)  # a task no candidate helps stays
    expected = m + chosen.unsqueeze(-1) * direction
    fitted = gauss_newton_fit(model, x, y, start, loc, var, steps=1, kind="delta")
    torch.testing.assert_close(fitted.loc, expected, rtol=1e-10, atol=1e-12)


def test_gauss_newton_stops_once_every_task_converged_with_the_posterior_of_running_every_step(monkeypatch):
    """``tolerance``: 10 steps on a smooth net with small residuals stop after a few Jacobians, every callback still runs, and the
    posterior equals the one of all 10 steps (``tolerance=0``) to the tolerance's order."""
    import hbmeta.inference.gauss_newton as gn

    torch.manual_seed(0)
    net = BatchedNet(nn.Sequential(nn.Linear(1, 20), nn.Tanh(), nn.Linear(20, 20), nn.Tanh(), nn.Linear(20, 1)).double())
    prior = DiagonalGaussianPrior(net.initial_vector(), torch.tensor(0.2, dtype=D).log())
    model = HierarchicalModel(net, prior, GaussianLikelihood(0.25))
    g = torch.Generator().manual_seed(1)
    x = 10 * torch.rand(5, 10, 1, generator=g, dtype=D) - 5
    truth = prior.mu.detach() + 0.05 * torch.randn(5, net.num_params, generator=g, dtype=D)
    y = net(truth, x)  # small residuals, as on a meta-trained prior: Gauss-Newton converges fast
    calls, seen = [], []
    direction = gn.gauss_newton_direction
    monkeypatch.setattr(gn, "gauss_newton_direction", lambda *a: calls.append(1) or direction(*a))
    posts = {}
    for tol in (0.0, 1e-8):
        calls.clear()
        seen.clear()
        config = InnerConfig(method="gauss-newton", steps=10, tolerance=tol)
        posts[tol] = fit_posterior(model, MeanFieldGuide(), x, y, prior.initial_posterior(5), config=config,
                                   callback=lambda step, post: seen.append(step))
        assert seen == list(range(11))
        if tol == 0:
            assert len(calls) == 10
        else:
            assert len(calls) < 10
    assert torch.allclose(posts[1e-8].loc, posts[0.0].loc, rtol=0, atol=1e-4)
    assert torch.allclose(posts[1e-8].scale, posts[0.0].scale, rtol=1e-3)
    with pytest.raises(ValueError, match="tolerance"):
        InnerConfig(method="gauss-newton", tolerance=-1.0)


def test_gauss_newton_classification_step_raises_the_support_likelihood():
    torch.manual_seed(0)
    net = BatchedNet(mlp(4, (16,), 3).double())
    prior = DiagonalGaussianPrior(net.initial_vector(), torch.tensor(0.3, dtype=D).log())
    model = HierarchicalModel(net, prior, CategoricalLikelihood())
    x = torch.randn(5, 9, 4, dtype=D)
    y = torch.randint(0, 3, (5, 9))
    post = fit_posterior(model, MeanFieldGuide(), x, y, prior.initial_posterior(5), config=InnerConfig(method="gauss-newton", steps=3))
    before = model.log_likelihood(prior.mu.detach().expand(5, -1), x, y)
    after = model.log_likelihood(post.loc, x, y)
    assert (after > before).all() and (post.scale < prior.scale.detach()).any()


def _pair_problem(likelihood, outputs: int):
    torch.manual_seed(0)
    net = BatchedNet(nn.Sequential(nn.Linear(1, 12), nn.Tanh(), nn.Linear(12, 12, bias=False), nn.ReLU(),
                                   nn.Linear(12, outputs)).double())
    prior = DiagonalGaussianPrior(net.initial_vector(), torch.full((net.num_params,), 0.4, dtype=D).log())
    x = torch.randn(4, 9, 1, dtype=D)
    y = torch.randn(4, 9, 1, dtype=D) if outputs == 1 else torch.randint(0, outputs, (4, 9))
    return HierarchicalModel(net, prior, likelihood), x, y


@pytest.mark.parametrize("likelihood,outputs,guide", [
    (GaussianLikelihood(0.3), 1, MeanFieldGuide()), (GaussianLikelihood(0.3), 1, DeltaGuide()),
    (GaussianLikelihood(0.3), 1, FullCovarianceGuide()), (CategoricalLikelihood(), 3, MeanFieldGuide()),
], ids=["gaussian-meanfield", "gaussian-delta", "gaussian-fullcov", "softmax-meanfield-expected"])
def test_restart_pair_shares_the_first_step_and_equals_two_separate_fits(likelihood, outputs, guide, monkeypatch):
    """GEM-BML+'s restart-mode q1 = VI(Theta, D_tr) and q2 = VI(Theta, D_tr u D_val) from one shared linearisation at
    the prior equal the two fits run apart (float64, 1e-10); a Gaussian likelihood computes one Jacobian fewer."""
    import hbmeta.inference.gauss_newton as gn
    model, x, y = _pair_problem(likelihood, outputs)
    config = InnerConfig(method="gauss-newton", steps=3)
    batch = TaskBatch(x[:, :4], y[:, :4], x[:, 4:], y[:, 4:])
    calls = []
    jacobian = gn.output_jacobian
    monkeypatch.setattr(gn, "output_jacobian", lambda *a: calls.append(a[2].shape[1]) or jacobian(*a))
    q1, q2 = gem_plus_posteriors(model, guide, batch, config, mode="restart")
    assert len(calls) == (5 if outputs == 1 else 6) and calls[0] == 9  # 3 + 3 steps, less q1's first
    monkeypatch.setattr(gn, "output_jacobian", jacobian)
    apart1 = fit_posterior(model, guide, batch.x_train, batch.y_train, model.prior.initial_posterior(4), config=config)
    apart2 = fit_posterior(model, guide, x, y, model.prior.initial_posterior(4), config=config)
    for shared, apart in ((q1, apart1), (q2, apart2)):
        assert shared.kind == apart.kind
        torch.testing.assert_close(shared.loc, apart.loc, rtol=1e-10, atol=1e-10)
        if apart.kind == "meanfield":
            torch.testing.assert_close(shared.scale, apart.scale, rtol=1e-10, atol=1e-12)
        if apart.kind == "full":
            torch.testing.assert_close(shared.scale_tril, apart.scale_tril, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(q1.loc, q2.loc)  # the two fits saw different data


def test_gauss_newton_refuses_what_it_cannot_fit():
    x, y, prior = problem(0)
    model = model_for(prior, 0.5)
    with pytest.raises(ValueError, match="meanfield, delta or fullcov"):
        fit_posterior(model, LowRankGuide(), x, y, prior.initial_posterior(3), config=GN)
    mixture = torch.distributions.Independent(torch.distributions.Laplace(prior.mu.detach(), prior.scale.detach()), 1)
    with pytest.raises(ValueError, match="diagonal Gaussian prior"):
        fit_posterior(model, MeanFieldGuide(), x, y, prior.initial_posterior(3), prior=mixture, config=GN)
    with pytest.raises(ValueError, match="unknown inner method"):
        InnerConfig(method="newton")
    bad_y = y.clone()
    bad_y[1, 0] = float("nan")
    with pytest.raises(InnerLoopDivergedError, match=r"task\(s\) \[1\]"):
        gauss_newton_fit(model, x, bad_y, prior.initial_posterior(3), prior.mu.detach(), prior.scale.detach() ** 2, 1)


def test_matrix_free_cg_solver_reaches_the_exact_posterior_mean_with_p_iterations():
    """Linear-Gaussian: P conjugate-gradient iterations solve the P x P Gauss-Newton system exactly (finite
    differences are exact for a linear net); the mean-field variances come from a Hutchinson diagonal, unbiased."""
    s = 0.7
    x, y, prior = problem(0, correlated=True)
    model, truth = model_for(prior, s), exact_posterior(x, y, prior.mu.detach(), prior.log_sigma.detach(), s)
    config = InnerConfig(method="gauss-newton", steps=1, solver="cg", cg_steps=prior.num_params, probes=1)
    post = fit_posterior(model, MeanFieldGuide(), x, y, prior.initial_posterior(3), config=config,
                         generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(post.loc, truth.loc, rtol=1e-6, atol=1e-8)
    precision_diag = torch.diagonal(torch.linalg.inv(truth.covariance), dim1=-2, dim2=-1)
    many = InnerConfig(method="gauss-newton", steps=1, solver="cg", cg_steps=1, probes=4000)
    estimate = fit_posterior(model, MeanFieldGuide(), x, y, prior.initial_posterior(3), config=many,
                             generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(estimate.variance, 1 / precision_diag, rtol=0.05, atol=0)


def test_cg_solver_on_conv4_raises_the_support_likelihood_and_shrinks_the_scales():
    torch.manual_seed(0)
    net = BatchedNet(Conv4(in_channels=1, num_classes=3, filters=4, image_size=8))
    prior = DiagonalGaussianPrior(net.initial_vector(), torch.tensor(0.2).log())
    model = HierarchicalModel(net, prior, CategoricalLikelihood())
    x = torch.randn(3, 6, 1, 8, 8)
    y = torch.arange(3).repeat(2).expand(3, 6)
    config = InnerConfig(method="gauss-newton", steps=3)  # auto: cg for a module that is not a plain MLP
    post = fit_posterior(model, MeanFieldGuide(), x, y, prior.initial_posterior(3), config=config,
                         generator=torch.Generator().manual_seed(0))
    before = model.log_likelihood(prior.mu.detach().expand(3, -1), x, y)
    assert (model.log_likelihood(post.loc, x, y) > before + 0.5).all()
    assert (post.scale < prior.scale.detach()).any() and not post.has_laplace


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gauss_newton_meta_step_on_cuda_matches_the_cpu():
    """The default GEM-BML+ (Gauss-Newton VI) meta-step and the linearised predictive on CUDA equal the CPU's."""
    from hbmeta.inference.learner import MetaLearner
    from hbmeta.tasks.sinusoid import SinusoidTasks

    batch = SinusoidTasks().sample(8, torch.Generator().manual_seed(0))
    learners = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        learner = MetaLearner(mlp(), GaussianLikelihood(0.25)).to(device)
        for _ in range(3):
            learner.meta_step(batch)
        learners[device] = learner
    torch.testing.assert_close(learners["cuda"].prior.mu.cpu(), learners["cpu"].prior.mu, rtol=1e-4, atol=1e-5)
    post = learners["cuda"].adapt(batch.x_train, batch.y_train, steps=2)
    pred = learners["cuda"].predict(post, batch.x_val)
    assert pred.mean.is_cuda and torch.isfinite(pred.std).all() and post.has_laplace
