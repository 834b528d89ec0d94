"""Swappable priors and guides: closed-form GEM vs Monte Carlo, mixture responsibilities, automatic ELBO
choice, the low-rank guide, autoguides in a task plate, and one-line swaps in Python and on the CLI."""

import doctest
import math

import pytest
import torch

from hbmeta.cli import build_parser, train_settings
from hbmeta.experiments import TrainConfig, make_config
from hbmeta.inference.autoguide import fit_autoguide
from hbmeta.inference.batch import TaskBatch
from hbmeta.inference.gem import mc_gem_gradient
from hbmeta.inference.inner import InnerConfig, fit_posterior, negative_elbo
from hbmeta.inference.learner import MetaLearner
from hbmeta.models.functional import mlp
from hbmeta.models.guides import LowRankGuide, MeanFieldGuide, make_guide
from hbmeta.models.heavy_tailed import LaplacePrior, StudentTPrior
from hbmeta.models.hierarchical import HierarchicalModel
from hbmeta.models.likelihoods import GaussianLikelihood
from hbmeta.models.lowrank_prior import LowRankGaussianPrior
from hbmeta.models.mixture_prior import MixtureGaussianPrior
from hbmeta.models.posterior import Posterior
from hbmeta.models.prior_factory import PRIORS, make_prior
from hbmeta.models.priors import DiagonalGaussianPrior
from hbmeta.training.runs import build_learner


def _posterior_near(loc: torch.Tensor, num_tasks: int, spread: float, sd: float, seed: int) -> Posterior:
    g = torch.Generator().manual_seed(seed)
    shape = (num_tasks, loc.shape[-1])
    return Posterior(loc + spread * torch.randn(shape, generator=g), sd * (0.5 + torch.rand(shape, generator=g)))


@pytest.mark.parametrize("name", ["diagonal", "lowrank", "laplace", "mixture"])
def test_closed_form_gem_equals_monte_carlo_form(name, float64):
    net = mlp(1, (5,), 1)
    prior = make_prior(name, net, scale=0.3, components=2, seed=1)
    post = _posterior_near(prior.loc.detach(), 3, 0.2, 0.05, seed=2)
    closed = prior.gem_gradient(post)
    mc = mc_gem_gradient(prior, post, 40_000, torch.Generator().manual_seed(3))
    assert closed is not None and set(closed) == set(mc)
    for n in closed:
        assert closed[n].shape == mc[n].shape == (3, *dict(prior.named_parameters())[n].shape)
        scale = mc[n].abs().max()
        assert torch.allclose(closed[n], mc[n], atol=0.01 * scale + 1e-6), (name, n, (closed[n] - mc[n]).abs().max())


def test_student_t_prior_has_no_closed_form_and_gem_falls_back_to_monte_carlo():
    from hbmeta.inference.gem import gem_gradient

    prior = StudentTPrior(torch.zeros(4), math.log(0.5))
    post = Posterior(torch.ones(2, 4), 0.1 * torch.ones(2, 4))
    assert prior.gem_gradient(post) is None
    grads = gem_gradient(prior, post, num_samples=4000, generator=torch.Generator().manual_seed(0))
    # E_q d/dmu log t(theta) > 0 when the posterior sits above the prior mean
    assert (grads["mu"] > 0).all() and grads["log_b"].shape == (2, 4)


def test_mixture_em_form_equals_monte_carlo_for_point_masses(float64):
    prior = MixtureGaussianPrior(torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, -1.0]]), math.log(0.7))
    post = Posterior(torch.tensor([[0.3, 0.8, -0.2], [0.6, 1.1, -0.9]]))  # between the components: r not one-hot
    closed = prior.gem_gradient(post)
    mc = mc_gem_gradient(prior, post, 3)
    assert 0.05 < prior.responsibilities(post)[0, 0] < 0.95
    for n in closed:
        assert torch.allclose(closed[n], mc[n], atol=1e-10), n


def test_mixture_em_form_is_gradient_of_a_lower_bound_on_expected_log_prior(float64):
    prior = MixtureGaussianPrior(torch.tensor([[0.0, 0.0], [1.0, 1.0]]), math.log(0.8))
    post = Posterior(torch.tensor([[0.4, 0.6]]), torch.tensor([[0.3, 0.5]]))
    params = {n: p.detach() for n, p in prior.named_parameters()}
    bound = prior.bound(params, post.loc[0], post.variance[0])
    mc = prior.log_prob(post.sample(200_000, torch.Generator().manual_seed(0))).mean()
    assert bound <= mc + 1e-3 and mc - bound < 0.2  # Jensen: a bound, and a close one here


def test_mixture_responsibilities_on_hand_made_points(float64):
    prior = MixtureGaussianPrior(torch.tensor([[0.0, 0.0], [4.0, 4.0]]), 0.0)  # unit variances
    with torch.no_grad():
        prior.logits.copy_(torch.tensor([math.log(0.25), math.log(0.75)]))
    points = torch.tensor([[0.0, 0.0], [4.0, 4.0], [2.0, 2.0], [2.0, 2.0]])
    variances = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [3.0, 1.0]])
    r = prior.responsibilities(Posterior(points, variances.sqrt()))
    # log N_1 - log N_0 at (0, 0) is -16: r_0 = 0.25 / (0.25 + 0.75 e^-16)
    assert r[0, 0] == pytest.approx(0.25 / (0.25 + 0.75 * math.exp(-16.0)), rel=1e-12)
    assert r[1, 1] == pytest.approx(0.75 / (0.75 + 0.25 * math.exp(-16.0)), rel=1e-12)
    # equidistant from both components: the responsibilities are the mixing weights, whatever the variance
    assert torch.allclose(r[2], torch.tensor([0.25, 0.75])) and torch.allclose(r[3], torch.tensor([0.25, 0.75]))
    assert torch.allclose(r.sum(1), torch.ones(4))
    # and the EM gradient moves only the responsible component's mean
    grads = prior.gem_gradient(Posterior(torch.tensor([[0.5, -0.5]]), torch.full((1, 2), 0.1)))
    assert torch.allclose(grads["mu"][0, 0], torch.tensor([0.5, -0.5]), atol=1e-6)
    assert grads["mu"][0, 1].abs().max() < 1e-4  # r_1 ~ e^-16 x 3


def test_mixture_starts_each_task_at_the_component_that_fits_its_data():
    net = torch.nn.Linear(1, 1, bias=False)
    prior = MixtureGaussianPrior(torch.tensor([[-2.0], [3.0]]), math.log(0.1))
    model = HierarchicalModel(net, prior, GaussianLikelihood(0.1))
    x = torch.ones(2, 4, 1)
    y = torch.cat([-2 * x[:1], 3 * x[1:]])  # task 0: slope -2, task 1: slope 3
    start = model.initial_posterior(x, y)
    assert start.loc.flatten().tolist() == [-2.0, 3.0]
    assert prior.initial_posterior(2).loc.flatten().tolist() == [-2.0, -2.0]  # no data: the heaviest (first)


def test_lowrank_prior_log_prob_and_kl_match_torch(float64):
    prior = LowRankGaussianPrior(torch.randn(6), rank=2, log_scale=math.log(0.5), factor_scale=0.4,
                                 generator=torch.Generator().manual_seed(0))
    theta = torch.randn(3, 6)
    ref = torch.distributions.LowRankMultivariateNormal(prior.mu, prior.factor, torch.exp(2 * prior.log_sigma))
    assert torch.allclose(prior.log_prob(theta), ref.log_prob(theta))
    q = torch.distributions.Normal(torch.randn(3, 6), torch.rand(3, 6) + 0.1)
    full = torch.distributions.MultivariateNormal(q.loc, scale_tril=torch.diag_embed(q.scale))
    kl = torch.distributions.kl_divergence(torch.distributions.Independent(q, 1), prior.distribution(3))
    assert torch.allclose(kl, torch.distributions.kl_divergence(full, ref.expand([3])))


@pytest.mark.parametrize("prior_name", ["mixture", "studentt"])
def test_inner_update_estimates_the_kl_by_sampling_when_it_has_no_closed_form(prior_name):
    """The analytic-KL setting silently equals Trace_ELBO where no KL is registered (same noise, same value)."""
    net = mlp(1, (6,), 1)
    model = HierarchicalModel(net, make_prior(prior_name, net, scale=0.2), GaussianLikelihood(0.5))
    x, y = torch.randn(3, 5, 1), torch.randn(3, 5, 1)
    guide = MeanFieldGuide()
    params = guide.init_params(model.prior.initial_posterior(3), None)
    noise = torch.randn(2, 3, model.prior.num_params)
    prior = model.prior.distribution(3)
    auto = negative_elbo(model, guide, params, x, y, prior, noise, analytic_kl=True)
    traced = negative_elbo(model, guide, params, x, y, prior, noise, analytic_kl=False)
    assert torch.isfinite(auto) and torch.allclose(auto, traced, rtol=1e-5)
    post = fit_posterior(model, guide, x, y, model.initial_posterior(x, y), config=InnerConfig(steps=3, lr=0.05),
                         generator=torch.Generator().manual_seed(0))
    assert post.kind == "meanfield" and torch.isfinite(post.loc).all()


def test_laplace_prior_keeps_an_analytic_kl_in_the_inner_update():
    net = mlp(1, (6,), 1)
    model = HierarchicalModel(net, make_prior("laplace", net, scale=0.2), GaussianLikelihood(0.5))
    x, y = torch.randn(2, 5, 1), torch.randn(2, 5, 1)
    guide = MeanFieldGuide(whiten=False)
    params = guide.init_params(model.prior.initial_posterior(2))
    noise = torch.zeros(1, 2, model.prior.num_params)  # at the mean: MC KL would be log q(m) - log p(m), not KL
    prior = model.prior.distribution(2)
    analytic = negative_elbo(model, guide, params, x, y, prior, noise, analytic_kl=True)
    traced = negative_elbo(model, guide, params, x, y, prior, noise, analytic_kl=False)
    q = guide.distribution(params, None)
    m = params["loc"].detach()
    kl = torch.distributions.kl_divergence(q, prior).sum()
    # analytic: -(log lik - KL); traced at theta = m: -(log lik + log p(m) - log q(m))
    expected = kl + prior.log_prob(m).sum() - q.log_prob(m).sum()
    assert torch.allclose(analytic - traced, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(analytic, traced)


def test_lowrank_guide_samples_its_covariance_and_fits(float64):
    guide = LowRankGuide(rank=2, init_scale=0.5)
    start = Posterior(torch.zeros(2, 4), torch.full((2, 4), 0.3))
    params = guide.init_params(start, (torch.zeros(4), torch.ones(4)))
    post = guide.posterior(params).detach()
    assert post.kind == "lowrank" and post.cov_factor.shape == (2, 4, 2)
    draws = guide.distribution(params, torch.randn(100_000, 2, 6, generator=torch.Generator().manual_seed(0))).rsample()
    emp = torch.einsum("stp,stq->tpq", draws - post.loc, draws - post.loc) / draws.shape[0]
    assert torch.allclose(emp, post.covariance, atol=0.02)
    samples = post.sample(100_000, torch.Generator().manual_seed(1))
    assert torch.allclose(samples.var(0), post.variance, rtol=0.03)
    net = mlp(1, (6,), 1)
    learner = MetaLearner(net, GaussianLikelihood(0.5), guide="lowrank", gem_plus_mode="joint")
    x, y = torch.randn(2, 5, 1), torch.randn(2, 5, 1)
    before = learner.model.log_likelihood(learner.prior.loc.detach().expand(1, 2, -1), x, y).sum()
    fitted = learner.adapt(x, y, steps=20, generator=torch.Generator().manual_seed(0))
    after = learner.model.log_likelihood(fitted.loc.unsqueeze(0), x, y).sum()
    assert fitted.kind == "lowrank" and after > before


def test_lowrank_guide_sequential_update_is_whitened_like_the_joint_one():
    """VI(q1, D_val) has the low-rank q1 as its prior: the guide must be whitened against it, or plain SGD at
    the default rate overshoots (measured before the fix: a meta-gradient ~10x the joint update's)."""
    from hbmeta.tasks.sinusoid import SinusoidTasks

    batch = SinusoidTasks().sample(10, torch.Generator().manual_seed(0))
    norms = {}
    for mode in ("sequential", "joint"):
        torch.manual_seed(0)
        learner = MetaLearner(mlp(), GaussianLikelihood(0.5), guide="lowrank", gem_plus_mode=mode)
        grads = learner.meta_gradient(batch, torch.Generator().manual_seed(1))
        norms[mode] = float(torch.sqrt(sum(g.pow(2).sum() for g in grads.values())))
    assert norms["sequential"] < 2 * norms["joint"], norms


def test_autoguides_fit_per_task_in_the_plate_and_coupling_ones_are_refused():
    net = mlp(1, (6,), 1)
    model = HierarchicalModel(net, DiagonalGaussianPrior.from_module(net, 0.3), GaussianLikelihood(0.5))
    x = torch.randn(3, 5, 1)
    y = torch.tensor([2.0, -1.0, 3.0]).view(3, 1, 1) * x  # lines the initial network does not fit
    before = model.log_likelihood(model.prior.loc.detach().expand(1, 3, -1), x, y)
    for name, kind in (("AutoNormal", "meanfield"), ("AutoDelta", "delta"), ("AutoDiagonalNormal", "meanfield")):
        post = fit_autoguide(model, x, y, name, steps=60, lr=0.03)
        assert post.kind == kind and post.loc.shape == (3, model.prior.num_params)
        assert (model.log_likelihood(post.loc.unsqueeze(0), x, y) > before).all(), name
    with pytest.raises(ValueError, match="couples tasks"):
        fit_autoguide(model, x, y, "AutoMultivariateNormal")


@pytest.mark.parametrize("name", ["lowrank", "mixture", "laplace", "studentt"])
def test_gem_bml_plus_meta_step_moves_every_prior(name):
    net = mlp(1, (6,), 1)
    prior = make_prior(name, net, scale=0.05, components=2)
    learner = MetaLearner(net, GaussianLikelihood(0.5), algorithm="gem-bml+", prior=prior,
                          inner=InnerConfig(steps=2, lr=0.1, optimizer="sgd", num_samples=2))
    before = {n: p.detach().clone() for n, p in prior.named_parameters()}
    g = torch.Generator().manual_seed(0)
    batch = TaskBatch(torch.randn(4, 5, 1, generator=g), torch.randn(4, 5, 1, generator=g),
                      torch.randn(4, 5, 1, generator=g), torch.randn(4, 5, 1, generator=g))
    info = learner.meta_step(batch, g)
    assert math.isfinite(info["grad_norm"])
    assert all(not torch.equal(before[n], p) for n, p in prior.named_parameters() if n in ("mu",))


def test_make_prior_docstring_example_runs():
    import hbmeta.models.prior_factory

    result = doctest.testmod(hbmeta.models.prior_factory)
    assert result.attempted > 0 and result.failed == 0


def test_make_prior_and_make_guide_reject_bad_names_and_values():
    net = mlp(1, (4,), 1)
    with pytest.raises(ValueError, match="unknown prior 'gauss'"):
        make_prior("gauss", net)
    with pytest.raises(ValueError, match="scale must be > 0"):
        make_prior("laplace", net, scale=0.0)
    with pytest.raises(ValueError, match="df > 2"):
        StudentTPrior(torch.zeros(3), df=1.5)
    with pytest.raises(ValueError, match="unknown guide"):
        make_guide("autonormal")
    with pytest.raises(ValueError, match="abml"):
        MetaLearner(net, algorithm="abml", prior=make_prior("laplace", net))
    assert set(PRIORS) == {"diagonal", "lowrank", "mixture", "laplace", "studentt"}
    assert isinstance(make_prior("laplace", net), LaplacePrior)
    by_name = MetaLearner(net, prior="laplace", prior_scale=0.05)  # the one-line swap by name
    assert isinstance(by_name.prior, LaplacePrior)
    assert torch.allclose(by_name.prior.scale * math.sqrt(2), torch.tensor(0.05))  # same sd as the Gaussian's


def test_swapping_prior_or_guide_changes_nothing_else_in_a_runs_config():
    args = ["train", "multimodal", "--out", "unused"]
    parse = build_parser().parse_args
    def config(extra):
        return make_config(**train_settings(parse(args + extra)))
    base = config(["--inner-method", "svi"]).to_flat()
    for extra, changed in ((["--prior", "mixture", "--prior-components", "3"], {"prior", "prior_components"}),
                           (["--guide", "lowrank"], {"guide"}), (["--prior", "laplace"], {"prior"})):
        swapped = config(extra + ["--inner-method", "svi"]).to_flat()
        assert {k for k in base if base[k] != swapped[k]} == changed, extra
        # left to its default, the inner update becomes SVI (Gauss-Newton needs a diagonal prior and a
        # meanfield / delta / fullcov guide): the swap then equals the SVI run's config, not a silent hybrid
        assert config(extra).to_flat() == swapped, extra
    learner = build_learner(make_config(experiment="multimodal", prior="mixture", prior_components=3, guide="lowrank",
                                        device="cpu"))
    assert isinstance(learner.prior, MixtureGaussianPrior) and learner.prior.num_components == 3
    assert isinstance(learner.guide, LowRankGuide)
    default = build_learner(TrainConfig(experiment="multimodal", device="cpu"))
    assert type(default.prior) is DiagonalGaussianPrior and torch.equal(default.prior.mu, learner.prior.mu[0])
    with pytest.raises(ValueError, match="unknown prior"):
        make_config(prior="cauchy")
