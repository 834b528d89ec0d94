"""A task likelihood written as a Pyro program: the same ELBO on the fast path and through Pyro, meta-training by
GEM-BML+ / ABML, observations drawn from it, and clear errors where hbmeta cannot follow the program."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch

from hbmeta import MetaLearner, SinusoidTasks, mlp
from hbmeta.inference import InnerConfig
from hbmeta.inference.inner import negative_elbo
from hbmeta.models import DiagonalGaussianPrior, HierarchicalModel, MeanFieldGuide, PyroLikelihood
from hbmeta.models.functional import BatchedNet


def student_t(pred, y):
    pyro.sample("obs", dist.StudentT(3.0, pred, 0.3).to_event(2), obs=y)


def heteroscedastic(pred, y):  # a two-output head: mean and log-sd per point
    mean, log_sd = pred[..., :1], pred[..., 1:]
    pyro.sample("obs", dist.Normal(mean, log_sd.clamp(-4, 2).exp()).to_event(2), obs=y)


def test_fast_path_elbo_equals_pyros_traced_elbo_for_a_pyro_likelihood(float64):
    net = BatchedNet(mlp(1, (8,), 1))
    prior = DiagonalGaussianPrior(net.initial_vector(), torch.tensor(0.3).log())
    model, guide = HierarchicalModel(net, prior, PyroLikelihood(student_t)), MeanFieldGuide()
    batch = SinusoidTasks().sample(3, torch.Generator().manual_seed(0))
    params = guide.init_params(model.initial_posterior(batch.x_train, batch.y_train))
    noise = torch.randn(4, 3, net.num_params, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        p = prior.distribution(3)
    fast = negative_elbo(model, guide, params, batch.x_train, batch.y_train, p, noise, backend="auto")
    traced = negative_elbo(model, guide, params, batch.x_train, batch.y_train, p, noise, backend="pyro")
    torch.testing.assert_close(fast, traced, rtol=1e-10, atol=1e-10)
    expected = -dist.StudentT(3.0, net(params["loc"].unsqueeze(0), batch.x_train), 0.3).log_prob(batch.y_train).sum((-1, -2))
    torch.testing.assert_close(model.likelihood.log_prob(net(params["loc"].unsqueeze(0), batch.x_train), batch.y_train),
                               -expected)


@pytest.mark.parametrize("algorithm,fn,out", [("gem-bml+", student_t, 1), ("abml", heteroscedastic, 2),
                                              ("gem-bml", heteroscedastic, 2)])
def test_gem_and_abml_meta_train_a_pyro_likelihood(algorithm, fn, out):
    learner = MetaLearner(mlp(1, (16,), out), PyroLikelihood(fn), algorithm=algorithm,
                          inner=InnerConfig(method="svi", steps=2, lr=0.3, optimizer="sgd", num_samples=2))
    assert learner.inner.method == "svi"  # as asked (the default would be Gauss-Newton, by autograd's curvature)
    tasks, gen = SinusoidTasks(), torch.Generator().manual_seed(0)
    before = learner.prior.loc.clone()
    info = [learner.meta_step(tasks.sample(4, gen), gen) for _ in range(2)][-1]
    assert torch.isfinite(torch.tensor(info["grad_norm"])) and not torch.equal(before, learner.prior.loc)
    test = tasks.sample(2, gen)
    pred = learner.predict(learner.adapt(test.x_train, test.y_train), test.x_val, num_samples=16, generator=gen)
    assert pred.observed.shape == (16, 2, 10, 1)  # observations through the program, one output each


def test_default_learner_picks_gauss_newton_for_a_program_likelihood():
    assert MetaLearner(mlp(), PyroLikelihood(student_t)).inner.method == "gauss-newton"


def normal_program(pred, y):
    pyro.sample("obs", dist.Normal(pred, 0.3).to_event(2), obs=y)


@pytest.mark.parametrize("curvature", ["mean", "expected"])
def test_gauss_newton_through_a_program_equals_the_built_in_gaussian(float64, curvature):
    """A Pyro program that is a Gaussian likelihood gets, by autograd, the curvature the built-in one has in closed
    form, so the Gauss-Newton inner update gives the same posteriors (means, variances, the linearised covariance)."""
    from hbmeta.inference.inner import fit_posterior
    from hbmeta.models import GaussianLikelihood

    net = BatchedNet(mlp(1, (8,), 1).double())
    prior = DiagonalGaussianPrior(net.initial_vector(), torch.tensor(0.3).log())
    batch = SinusoidTasks().sample(3, torch.Generator().manual_seed(0))
    x, y = batch.x_train.double(), batch.y_train.double()
    config = InnerConfig(method="gauss-newton", steps=3, curvature=curvature, tolerance=0)
    posts = [fit_posterior(HierarchicalModel(net, prior, likelihood), MeanFieldGuide(), x, y,
                           HierarchicalModel(net, prior, likelihood).initial_posterior(x, y), config=config, laplace=True)
             for likelihood in (PyroLikelihood(normal_program), GaussianLikelihood(0.3))]
    for name in ("loc", "scale", "laplace_factor"):
        torch.testing.assert_close(getattr(posts[0], name), getattr(posts[1], name), rtol=1e-8, atol=1e-10)


def test_a_student_t_programs_curvature_is_its_hessian_clipped_at_zero(float64):
    """``-log StudentT(nu, f, s)`` has gradient ``-(nu + 1) r / (nu s^2 + r^2)`` and second derivative
    ``(nu + 1)(nu s^2 - r^2) / (nu s^2 + r^2)^2`` in ``f`` (``r = y - f``): negative in the tails, where the Gauss-Newton
    factor is clipped at zero (a floor of 1e-12)."""
    nu, s = 3.0, 0.3
    pred = torch.linspace(-2, 2, 12, dtype=torch.float64).reshape(2, 6, 1)
    y = torch.zeros(2, 6, 1, dtype=torch.float64)
    grad, factor = PyroLikelihood(student_t).curvature(pred, y)
    r = y - pred
    torch.testing.assert_close(grad, -(nu + 1) * r / (nu * s**2 + r**2))
    hess = (nu + 1) * (nu * s**2 - r**2) / (nu * s**2 + r**2) ** 2
    torch.testing.assert_close(factor.square().reshape(hess.shape), hess.clamp(min=1e-12))
    assert (hess < 0).any() and (hess > 0).any()  # both regimes are exercised


def test_unconditioned_latents_and_missing_obs_are_refused_with_the_reason():
    def with_latent(pred, y):
        s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
        pyro.sample("obs", dist.Normal(pred, s).to_event(2), obs=y)

    def no_obs(pred, y):
        pyro.sample("y", dist.Normal(pred, 1.0).to_event(2), obs=y)

    pred, y = torch.zeros(2, 5, 1), torch.zeros(2, 5, 1)
    with pytest.raises(ValueError, match=r"per-task latent site\(s\) \['s'\]: p\(y \| pred\) needs their values"):
        PyroLikelihood(with_latent).log_prob(pred, y)
    given = PyroLikelihood(with_latent).condition({"s": torch.full((2, 1, 1), 2.0)})  # log p(y | pred, s), no log p(s)
    assert torch.allclose(given.log_prob(pred, y), dist.Normal(0.0, 2.0).log_prob(torch.zeros(2, 5)).sum(-1))
    with pytest.raises(ValueError, match="samples no site named 'obs'"):
        PyroLikelihood(no_obs).log_prob(pred, y)
    with pytest.raises(ValueError, match=r"batch shape \(2, 5\).*to_event\(2\)"):
        PyroLikelihood(lambda p, t: pyro.sample("obs", dist.Normal(p, 1.0).to_event(1), obs=t)).log_prob(pred, y)


class NoisyModel(HierarchicalModel):
    """A user's own model program with an extra per-task latent noise scale."""

    def model(self, x, y, prior=None, noise=None):
        num_tasks = x.shape[0]
        prior = self.prior.distribution(num_tasks) if prior is None else prior
        with pyro.plate("tasks", num_tasks, dim=-1):
            theta = pyro.sample("theta", prior)
            s = pyro.sample("s", dist.LogNormal(-1.0, 0.5))
            pyro.sample("obs", dist.Normal(self.net(theta, x), s[..., None, None]).to_event(2), obs=y)
        return theta


def test_an_overridden_model_is_run_through_pyro_or_refused_never_skipped():
    from hbmeta.inference.inner import fit_posterior
    from hbmeta.models import GaussianLikelihood

    net = BatchedNet(mlp(1, (4,), 1))
    model = NoisyModel(net, DiagonalGaussianPrior(net.initial_vector(), torch.tensor(0.1).log()), GaussianLikelihood(0.3))
    batch = SinusoidTasks().sample(2, torch.Generator().manual_seed(0))
    start = model.initial_posterior(batch.x_train, batch.y_train)
    with pytest.raises(ValueError, match="Gauss-Newton.*method='svi'"):
        fit_posterior(model, MeanFieldGuide(), batch.x_train, batch.y_train, start,
                      config=InnerConfig(method="gauss-newton"))
    post = fit_posterior(model, MeanFieldGuide(), batch.x_train, batch.y_train, start,
                         config=InnerConfig(method="svi", steps=3, lr=0.01))
    assert set(post.latents) == {"s"} and post.latents["s"].loc.shape == (2, 1)  # its own posterior, not skipped
    with pytest.raises(ValueError, match=r"samples latent site 's' that the guide does not cover"):
        from hbmeta.inference.inner import negative_elbo  # the ELBO without the latents' guide
        negative_elbo(model, MeanFieldGuide(), MeanFieldGuide().init_params(start), batch.x_train, batch.y_train,
                      model.prior.distribution(2), torch.zeros(1, 2, net.num_params), backend="pyro")


def test_the_concepts_docs_example_runs():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "concepts.md").read_text()
    first, latent = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "PyroLikelihood(" in b]
    scope: dict = {}
    exec(compile(first, "docs/concepts.md", "exec"), scope)
    low, high = scope["low"], scope["high"]
    assert low.shape == high.shape == (1, 10, 1) and (low < high).all()
    exec(compile(latent, "docs/concepts.md", "exec"), scope)  # the per-task latent example, in the same session
    assert scope["q_s"].loc.shape == (1, 1) and scope["draws_of_s"].shape == (200, 1)
    assert (scope["draws_of_s"] > 0).all()
