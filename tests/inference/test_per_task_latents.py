"""Per-task latents beyond the weights (hbmeta.models.latents): a site such as a noise scale or an offset that a
Pyro-program likelihood samples in the task plate gets its own posterior in the inner update."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoDiagonalNormal, AutoNormal
from torch import nn

from hbmeta.inference import InnerConfig, MetaLearner, fit_posterior, negative_elbo
from hbmeta.inference.autoguide import AutoGuidePerTask
from hbmeta.models import (BatchedNet, DiagonalGaussianPrior, HierarchicalModel, MeanFieldGuide, Posterior,
                           PyroLikelihood, mlp)
from hbmeta.models.latents import LatentGuide
from hbmeta.tasks import SinusoidTasks

SIGMA, TAU, PRIOR_W = 0.5, 0.8, 0.3


def offset(pred, y):
    """``y = f(x) + b_tau + noise`` with an unknown offset ``b_tau ~ N(0, TAU^2)`` per task."""
    b = pyro.sample("b", dist.Normal(0.0, TAU))
    pyro.sample("obs", dist.Normal(pred + b[..., None, None], SIGMA).to_event(2), obs=y)


def noisy(pred, y):
    """An unknown noise scale per task."""
    s = pyro.sample("s", dist.LogNormal(-1.0, 0.5))
    pyro.sample("obs", dist.Normal(pred, s[..., None, None]).to_event(2), obs=y)


def linear_offset_model() -> HierarchicalModel:
    return HierarchicalModel(nn.Linear(1, 1, bias=False).double(),
                             DiagonalGaussianPrior(torch.full((1,), PRIOR_W, dtype=torch.float64), 0.0),
                             PyroLikelihood(offset))


def linear_offset_data(num_tasks: int = 3, points: int = 6):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(num_tasks, points, 1, generator=g, dtype=torch.float64)
    b = torch.linspace(-1.0, 1.0, num_tasks, dtype=torch.float64)
    y = 1.5 * x + b[:, None, None] + SIGMA * torch.randn(num_tasks, points, 1, generator=g, dtype=torch.float64)
    return x, y


def exact_meanfield_optimum(x, y):
    """The joint posterior of ``(w, b)`` per task is Gaussian with precision ``Lambda``; mean-field VI's optimum has its
    exact means and variances ``1 / diag(Lambda)``."""
    X, Y, n = x[..., 0], y[..., 0], x.shape[1]
    cross = X.sum(1) / SIGMA**2
    precision = torch.stack([torch.stack([1 + (X**2).sum(1) / SIGMA**2, cross], -1),
                             torch.stack([cross, torch.full_like(cross, 1 / TAU**2 + n / SIGMA**2)], -1)], -2)
    eta = torch.stack([(X * Y).sum(1) / SIGMA**2 + PRIOR_W, Y.sum(1) / SIGMA**2], -1)
    return torch.linalg.solve(precision, eta), torch.diagonal(precision, dim1=-2, dim2=-1).rsqrt()


def test_latent_sites_are_found_with_their_support():
    net = BatchedNet(mlp())
    model = HierarchicalModel(net, DiagonalGaussianPrior(torch.zeros(net.num_params)), PyroLikelihood(noisy))
    x = torch.randn(4, 5, 1)
    sites = model.latent_sites(x, torch.randn(4, 5, 1))
    assert list(sites) == ["s"]
    site = sites["s"]
    assert site.size == 1 and site.event_shape == torch.Size()
    assert torch.allclose(site.init_loc, torch.tensor([-1.0 + 0.125]))  # log of LogNormal(-1, 0.5)'s mean
    assert list(model.latent_sites(x, None)) == ["s"]  # predicting: "obs" is not a latent


def test_elbo_with_a_latent_is_the_hand_written_one():
    torch.manual_seed(0)
    model = HierarchicalModel(nn.Linear(1, 1, bias=False).double(),
                              DiagonalGaussianPrior(torch.zeros(1, dtype=torch.float64), 0.0), PyroLikelihood(noisy))
    T, N, S = 3, 5, 4
    x, y = torch.randn(T, N, 1, dtype=torch.float64), torch.randn(T, N, 1, dtype=torch.float64)
    guide = MeanFieldGuide(whiten=False)
    params = guide.init_params(Posterior(torch.randn(T, 1, dtype=torch.float64),
                                         torch.rand(T, 1, dtype=torch.float64) + 0.1))
    latents = LatentGuide(model.latent_sites(x, y))
    latent_params = latents.init_params(T, {"s": Posterior(0.3 * torch.randn(T, 1, dtype=torch.float64),
                                                           0.1 + 0.3 * torch.rand(T, 1, dtype=torch.float64))})
    eps, eps_s = torch.randn(S, T, 1, dtype=torch.float64), {"s": torch.randn(S, T, 1, dtype=torch.float64)}
    loss = negative_elbo(model, guide, params, x, y, model.prior.distribution(T), eps, True, "auto", latents,
                         latent_params, eps_s)
    m, log_s = params["loc"], params["log_scale"]
    kl_theta = (-log_s + (torch.exp(2 * log_s) + m**2) / 2 - 0.5).sum()
    u = latent_params["s.loc"] + latent_params["s.log_scale"].exp() * eps_s["s"]
    s = u.exp()[..., 0]                                                                       # [S, T]
    f = (m + log_s.exp() * eps).unsqueeze(-2) * x                                             # [S, T, N, 1]
    log_lik = dist.Normal(f, s[..., None, None]).log_prob(y).sum((-1, -2))
    q_s = dist.LogNormal(latent_params["s.loc"][:, 0], latent_params["s.log_scale"].exp()[:, 0])
    kl_s = (q_s.log_prob(s) - dist.LogNormal(-1.0, 0.5).log_prob(s)).mean(0).sum()  # no closed form: at the draws
    assert torch.allclose(loss, kl_theta + kl_s - log_lik.mean(0).sum(), rtol=1e-10)


@pytest.mark.parametrize("guide", [MeanFieldGuide(), AutoGuidePerTask(AutoNormal, lr=0.05)], ids=["meanfield", "auto"])
def test_inner_update_finds_the_exact_meanfield_optimum_of_weights_and_latent(guide):
    pyro.set_rng_seed(0)  # the autoguide draws from torch's global stream
    model, (x, y) = linear_offset_model(), linear_offset_data()
    post = fit_posterior(model, guide, x, y, model.initial_posterior(x, y),
                         config=InnerConfig(steps=600, lr=0.05, num_samples=64), generator=torch.Generator().manual_seed(1))
    mean, sd = exact_meanfield_optimum(x, y)
    assert post.latents["b"].loc.shape == (3, 1)
    fitted_mean = torch.cat([post.loc, post.latents["b"].loc], 1)
    fitted_sd = torch.cat([post.scale, post.latents["b"].scale], 1)
    assert (fitted_mean - mean).abs().max() < 0.05, (fitted_mean, mean)          # posterior sds are about 0.2
    assert ((fitted_sd / sd) - 1).abs().max() < 0.08, (fitted_sd, sd)


def test_sequential_update_takes_the_first_posterior_of_the_latent_as_its_prior():
    model, (x, y) = linear_offset_model(), linear_offset_data()
    start = model.initial_posterior(x, y)
    q1 = Posterior(start.loc, start.scale).with_latents(
        {"b": Posterior(torch.full((3, 1), 5.0, dtype=torch.float64), torch.full((3, 1), 1e-3, dtype=torch.float64))})
    config = InnerConfig(steps=300, lr=0.05, num_samples=8)
    kept = fit_posterior(model, MeanFieldGuide(), x, y, q1, prior=q1.distribution(), config=config, sequential=True,
                         generator=torch.Generator().manual_seed(0))
    refit = fit_posterior(model, MeanFieldGuide(), x, y, q1, prior=q1.distribution(), config=config,
                          generator=torch.Generator().manual_seed(0))
    assert (kept.latents["b"].loc - 5.0).abs().max() < 0.05  # q1(b) = N(5, 1e-6) as the prior: b stays
    assert (refit.latents["b"].loc - 5.0).abs().min() > 2.0  # the program's N(0, TAU^2): the data move it


def test_fits_with_latents_repeat_bit_for_bit_from_the_same_generator():
    model, (x, y) = linear_offset_model(), linear_offset_data()
    fits = [fit_posterior(model, MeanFieldGuide(), x, y, model.initial_posterior(x, y),
                          config=InnerConfig(steps=20, lr=0.05, num_samples=2), generator=torch.Generator().manual_seed(3))
            for _ in range(2)]
    assert torch.equal(fits[0].latents["b"].loc, fits[1].latents["b"].loc)
    assert torch.equal(fits[0].latents["b"].scale, fits[1].latents["b"].scale)


def test_predictive_draws_the_latent_and_observations_given_it():
    learner = MetaLearner(nn.Linear(1, 1, bias=False), PyroLikelihood(noisy), algorithm="gem-bml+")
    T, S = 2, 4000
    x = torch.randn(T, 7, 1)
    scale = Posterior(torch.log(torch.tensor([[0.01], [2.0]])), torch.full((T, 1), 1e-4))  # s = 0.01 and 2
    post = Posterior(torch.zeros(T, 1), torch.full((T, 1), 1e-6)).with_latents({"s": scale})
    pred = learner.predict(post, x, S, torch.Generator().manual_seed(0))
    assert set(pred.sites) == {"f", "obs", "s"} and pred.sites["s"].shape == (S, T)
    spread = (pred.sites["obs"] - pred.sites["f"]).std((0, 2, 3))
    assert torch.allclose(spread, torch.tensor([0.01, 2.0]), rtol=0.05)  # obs is drawn with each task's s
    log_p = pred.likelihood.log_prob(pred.samples, torch.zeros(T, 7, 1))
    assert log_p.shape == (S, T) and log_p[:, 0].mean() > log_p[:, 1].mean()


@pytest.mark.parametrize("algorithm", ["gem-bml", "gem-bml+", "abml"])
def test_meta_training_with_a_latent_noise_scale(algorithm):
    torch.manual_seed(0)
    learner = MetaLearner(mlp(), PyroLikelihood(noisy), algorithm=algorithm)
    gen = torch.Generator().manual_seed(0)
    batch = SinusoidTasks().sample(4, generator=gen)
    before = learner.prior.loc.detach().clone()
    for _ in range(2):
        out = learner.meta_step(batch, generator=gen)
        assert torch.isfinite(torch.tensor(out["grad_norm"]))
    assert not torch.equal(before, learner.prior.loc.detach())
    post = learner.adapt(batch.x_train, batch.y_train, generator=gen)
    assert set(post.latents) == {"s"} and (post.latents["s"].scale > 0).all()


def test_arviz_holds_the_latent_and_scores_y_given_it():
    pytest.importorskip("arviz")
    from hbmeta.evaluation.diagnostics import posterior_to_arviz

    learner = MetaLearner(mlp(), PyroLikelihood(noisy), algorithm="gem-bml+")
    gen = torch.Generator().manual_seed(0)
    batch = SinusoidTasks().sample(3, generator=gen)
    post = learner.adapt(batch.x_train, batch.y_train, generator=gen)
    idata = posterior_to_arviz(learner, post, batch.x_train, batch.y_train, batch.x_val, batch.y_val, num_samples=16,
                               generator=gen)
    assert idata.posterior["s"].dims == ("chain", "draw", "task")
    assert (idata.posterior["s"].values > 0).all()
    f = torch.as_tensor(idata.posterior["f"].values)[..., 0]                  # [chain, draw, task, point]
    s = torch.as_tensor(idata.posterior["s"].values)[..., None]
    expected = dist.Normal(f.double(), s.double()).log_prob(batch.y_val[..., 0].double())
    assert torch.allclose(torch.as_tensor(idata.log_likelihood["y"].values), expected, atol=1e-5)  # y given (f, s)


def test_refusals_name_the_reason():
    gen = torch.Generator().manual_seed(0)
    batch = SinusoidTasks().sample(2, generator=gen)

    class SharedLatent(HierarchicalModel):
        def model(self, x, y, prior=None, noise=None):
            pyro.sample("g", dist.Normal(0.0, 1.0))  # one value for all tasks
            return super().model(x, y, prior, noise)

    net = BatchedNet(mlp())
    shared = SharedLatent(net, DiagonalGaussianPrior(torch.zeros(net.num_params)), PyroLikelihood(noisy))
    with pytest.raises(ValueError, match="outside pyro.plate"):
        shared.latent_sites(batch.x_train, batch.y_train)
    model = HierarchicalModel(net, DiagonalGaussianPrior(torch.zeros(net.num_params)), PyroLikelihood(noisy))
    start = model.initial_posterior(batch.x_train, batch.y_train)
    post = fit_posterior(model, MeanFieldGuide(), batch.x_train, batch.y_train, start,  # fitted, not refused
                         config=InnerConfig(method="gauss-newton", steps=2), generator=gen)
    assert set(post.latents) == {"s"} and (post.latents["s"].scale > 0).all()
    with pytest.raises(ValueError, match="AutoDiagonalNormal flattens"):
        fit_posterior(model, AutoGuidePerTask(AutoDiagonalNormal), batch.x_train, batch.y_train, start)
    with pytest.raises(ValueError, match="point-estimate baselines cannot"):
        MetaLearner(mlp(), PyroLikelihood(noisy), algorithm="maml").meta_step(batch, generator=gen)


def test_a_posterior_as_the_latents_prior_keeps_their_support():
    """GEM-BML+'s second update takes q1(s) as the prior of a positive s: the autoguide must still constrain s (the
    transform exp-then-affine of greater_than(0) reads as real unless the distribution states its support)."""
    pyro.set_rng_seed(0)
    net = BatchedNet(mlp())
    model = HierarchicalModel(net, DiagonalGaussianPrior(net.initial_vector(), torch.tensor(0.02).log()),
                              PyroLikelihood(noisy))
    batch = SinusoidTasks().sample(3, torch.Generator().manual_seed(0))
    site = model.latent_sites(batch.x_train, batch.y_train)["s"]
    q1_s = Posterior(torch.full((3, 1), 3.0), torch.full((3, 1), 0.01))  # s about e^3: far above the program's prior
    assert site.distribution(q1_s).support == dist.LogNormal(0.0, 1.0).support
    start = model.initial_posterior(batch.x_train, batch.y_train)
    q1 = Posterior(start.loc, start.scale).with_latents({"s": q1_s})
    q2 = fit_posterior(model, AutoGuidePerTask(AutoNormal), batch.x_val, batch.y_val, q1, prior=q1.distribution(),
                       config=InnerConfig(steps=5, latent_lr=0.05), sequential=True)
    assert (q2.latents["s"].loc - 3.0).abs().max() < 0.3  # fitted (a real support gave negative scales: an error)


def test_gauss_newton_with_a_latent_offset_reaches_the_exact_meanfield_optimum(float64):
    """Coordinate ascent - Adam on q(b) with the weights at their mean, a Gauss-Newton VI step on w with b at its median -
    on ``y = w x + b_tau + noise``: the mean-field optimum's means to the Adam noise of q(b), and w's variance exactly
    (it does not depend on b)."""
    model = linear_offset_model()
    x, y = linear_offset_data()
    post = fit_posterior(model, MeanFieldGuide(), x, y, model.initial_posterior(x, y),
                         config=InnerConfig(method="gauss-newton", steps=30, num_samples=8, latent_lr=0.05),
                         generator=torch.Generator().manual_seed(0))
    mean, sd = exact_meanfield_optimum(x, y)
    assert (post.loc[:, 0] - mean[:, 0]).abs().max() < 0.05 and (post.latents["b"].loc[:, 0] - mean[:, 1]).abs().max() < 0.06
    torch.testing.assert_close(post.scale[:, 0], sd[:, 0], rtol=1e-6, atol=1e-9)
    assert (post.latents["b"].scale[:, 0] - sd[:, 1]).abs().max() < 0.03
