r"""The exact oracle (DESIGN.md; GEM-BML appendix A.3, A.4, B.7, C.1): Bayesian linear regression.

``log p(D; mu, sigma) = log N(y; X mu, X Sigma X^T + s^2 I)`` is exact, so autograd gives the true
meta-gradient and ``N(m, S)`` is the exact posterior. These tests fail if the GEM formulas, the GEM-BML+
difference, the guides or the inner SVI are wrong. Everything is float64 and seeded.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from hbmeta.bench.gradient_study import GradientStudyConfig, _elbo_estimates, format_table, run_gradient_study, write_gradient_study
from hbmeta.inference.batch import TaskBatch
from hbmeta.inference.elbo_gradient import elbo_gradient
from hbmeta.inference.gem import gem_gradient, gem_plus_posteriors, mc_gem_gradient
from hbmeta.inference.inner import InnerConfig, fit_posterior
from hbmeta.models import DiagonalGaussianPrior, FullCovarianceGuide, GaussianLikelihood, HierarchicalModel, MeanFieldGuide
from hbmeta.models.linear import exact_log_marginal, exact_posterior, linear_network
from hbmeta.models.posterior import Posterior

D = torch.float64


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread is ~5x faster (OpenMP barriers dominate, worse on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def problem(seed: int, tasks: int = 3, points: int = 8, features: int = 4, correlated: bool = False):
    """Random tasks ``x [T, N, d]``, ``y [T, N, 1]`` and a random diagonal Gaussian prior."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tasks, points, features, generator=g, dtype=D)
    if correlated:  # correlated features -> a posterior with clearly non-zero off-diagonal covariance
        x = x @ (torch.eye(features, dtype=D) + 0.8 * torch.diag(torch.ones(features - 1, dtype=D), 1))
    y = torch.randn(tasks, points, 1, generator=g, dtype=D)
    prior = DiagonalGaussianPrior(torch.randn(features, generator=g, dtype=D), 0.3 * torch.randn(features, generator=g, dtype=D))
    return x, y, prior


def model_for(prior: DiagonalGaussianPrior, noise_scale: float) -> HierarchicalModel:
    return HierarchicalModel(nn.Sequential(linear_network(prior.num_params)), prior, GaussianLikelihood(noise_scale))


def autograd_gradients(prior: DiagonalGaussianPrior, log_marginal: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-task autograd of a ``[T]`` vector of exact log marginals wrt ``(mu, log_sigma)``."""
    rows = [torch.autograd.grad(log_marginal[t], [prior.mu, prior.log_sigma], retain_graph=True)
            for t in range(log_marginal.shape[0])]
    return {"mu": torch.stack([r[0] for r in rows]), "log_sigma": torch.stack([r[1] for r in rows])}


def assert_rel_close_per_task(estimate: dict, exact: dict, tol: float) -> None:
    for name in ("mu", "log_sigma"):
        err = (estimate[name] - exact[name]).norm(dim=-1) / exact[name].norm(dim=-1)
        assert err.max() < tol, f"{name}: per-task relative errors {err.tolist()}"


def exact(x, y, prior, s) -> Posterior:
    return exact_posterior(x, y, prior.mu.detach(), prior.log_sigma.detach(), s)


@pytest.mark.parametrize("seed,noise_scale", [(0, 0.5), (1, 2.0)])
def test_gem_equals_exact_marginal_gradient_linear_gaussian(seed, noise_scale):
    """Theorem 1 + B.7: with the exact posterior, closed-form GEM IS the gradient of log p(D; Theta)."""
    x, y, prior = problem(seed)
    truth = autograd_gradients(prior, exact_log_marginal(x, y, prior.mu, prior.log_sigma, noise_scale))
    assert_rel_close_per_task(gem_gradient(prior, exact(x, y, prior, noise_scale)), truth, 1e-4)


@pytest.mark.parametrize("seed", [0, 1])
def test_gem_plus_equals_gradient_of_l2_property(seed):
    """A.4: grad L[2] = grad L(D_tr u D_val) - grad L(D_tr) = GEM(q on D_tr u D_val) - GEM(q on D_tr)."""
    s, k = 0.5, 5
    x, y, prior = problem(seed, points=12)
    l2 = (exact_log_marginal(x, y, prior.mu, prior.log_sigma, s)
          - exact_log_marginal(x[:, :k], y[:, :k], prior.mu, prior.log_sigma, s))
    truth = autograd_gradients(prior, l2)
    g2, g1 = gem_gradient(prior, exact(x, y, prior, s)), gem_gradient(prior, exact(x[:, :k], y[:, :k], prior, s))
    assert_rel_close_per_task({n: g2[n] - g1[n] for n in g2}, truth, 1e-4)
    # L[2] is the predictive log-likelihood of D_val given D_tr, not L(D_val): the difference matters
    l_val = autograd_gradients(prior, exact_log_marginal(x[:, k:], y[:, k:], prior.mu, prior.log_sigma, s))
    assert ((l_val["mu"] - truth["mu"]).norm(dim=-1) / truth["mu"].norm(dim=-1)).min() > 0.1


def test_sequential_vi_with_fullcov_guide_reaches_joint_exact_posterior():
    """GEM-BML+'s VI(lambda_tr, D_val) (q1 as the prior, data D_val) lands on the exact posterior on
    D_tr u D_val. Tolerance 2e-2 (observed ~5e-3, the Adam noise floor at lr 1e-2 with 256 draws, against
    posterior sds of ~0.1-0.2); the plausible wiring mistakes (q2 = q1, or a posterior on D_val alone from
    Theta) are > 0.1 away in the mean."""
    s, k = 0.5, 6
    x, y, prior = problem(0, tasks=2, points=12, features=3)
    batch = TaskBatch(x[:, :k], y[:, :k], x[:, k:], y[:, k:])
    config = InnerConfig(steps=1500, lr=0.01, optimizer="adam", num_samples=256)
    q1, q2 = gem_plus_posteriors(model_for(prior, s), FullCovarianceGuide(), batch, config,
                                 torch.Generator().manual_seed(0), mode="sequential")
    joint, tr, val_only = exact(x, y, prior, s), exact(batch.x_train, batch.y_train, prior, s), exact(batch.x_val, batch.y_val, prior, s)
    tol = 2e-2
    for wrong in (tr, val_only):
        assert (wrong.loc - joint.loc).abs().max() > 5 * tol
    assert (q1.loc - tr.loc).abs().max() < tol and (q1.covariance - tr.covariance).abs().max() < tol
    assert (q2.loc - joint.loc).abs().max() < tol
    assert (q2.covariance - joint.covariance).abs().max() < tol


def test_fullcov_guide_svi_converges_to_exact_posterior():
    """fit_posterior + FullCovarianceGuide -> N(m, S) exactly (the family contains the posterior).

    Adam at lr 3e-2 (1000 steps) then 1e-3 (1000 steps), 256 draws a step: the remaining error is Adam's
    noise floor (a few lr per coordinate), observed 6e-3 (mean) and 4e-3 (covariance). Tolerances: 2e-2
    for the mean (posterior sds 0.29-0.53) and 1e-2 for the covariance, whose largest off-diagonal entry
    is 0.15, so a guide that lost the correlations (mean-field: error 0.16) fails."""
    s = 1.0
    x, y, prior = problem(2, tasks=2, points=8, features=3, correlated=True)
    model, guide, truth = model_for(prior, s), FullCovarianceGuide(), exact(x, y, prior, s)
    g = torch.Generator().manual_seed(0)
    q = fit_posterior(model, guide, x, y, prior.initial_posterior(2), config=InnerConfig(1000, 0.03, "adam", 256), generator=g)
    q = fit_posterior(model, guide, x, y, q, config=InnerConfig(1000, 1e-3, "adam", 256), generator=g)
    off_diagonal = truth.covariance - torch.diag_embed(truth.variance)
    assert off_diagonal.abs().max() > 0.1
    assert (q.loc - truth.loc).abs().max() < 2e-2
    assert (q.covariance - truth.covariance).abs().max() < 1e-2


@pytest.mark.parametrize("kind", ["meanfield", "fullcov"])
def test_closed_form_gem_equals_monte_carlo_gem(kind):
    r"""B.7 closed form vs ``mean_s grad log p(theta_s; Theta)``, ``theta_s ~ q``, within 5 standard errors.

    Per weight, with ``delta = m - mu`` and ``v = diag S``: ``sd[d/dmu] = sqrt(v)/sigma^2`` and
    ``sd[d/dlog sigma] = sqrt(2 v^2 + 4 delta^2 v)/sigma^2``; 5 SE over 24 entries fails by chance with p < 2e-5."""
    x, y, prior = problem(3)
    post = exact(x, y, prior, 0.5)
    if kind == "meanfield":
        post = Posterior(post.loc, post.variance.sqrt())
    n = 20000
    closed = gem_gradient(prior, post)
    mc = mc_gem_gradient(prior, post, n, torch.Generator().manual_seed(0))
    var_prior, delta, v = torch.exp(2 * prior.log_sigma.detach()), post.loc - prior.mu.detach(), post.variance
    se = {"mu": v.sqrt() / var_prior / n**0.5, "log_sigma": (2 * v**2 + 4 * delta**2 * v).sqrt() / var_prior / n**0.5}
    for name in ("mu", "log_sigma"):
        z = (mc[name] - closed[name]) / se[name]
        assert z.abs().max() < 5, f"{name}: z-scores {z}"


def test_study_elbo_estimator_matches_library_elbo_gradient(float64):  # elbo_gradient draws noise in the default dtype
    """The study's own unroll (per-run priors, gradients at every K) reproduces
    hbmeta.inference.elbo_gradient.elbo_gradient (summed over tasks) given the same noise."""
    s, steps, lr, samples = 0.5, 7, 0.01, 4
    x, y, prior = problem(4)
    model = model_for(prior, s)
    library = elbo_gradient(model, MeanFieldGuide(whiten=False), x, y, InnerConfig(steps, lr, "sgd", samples),
                            torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    noise = torch.stack([torch.randn(samples, x.shape[0], prior.num_params, generator=g) for _ in range(steps)])
    config = GradientStudyConfig(iterations=(steps,), lr=lr, num_samples=samples)
    mu, log_sigma = (prior.mu.detach().expand(x.shape[0], -1), prior.log_sigma.detach().expand(x.shape[0], -1))
    ours = _elbo_estimates(model, MeanFieldGuide(whiten=False), x, y, mu, log_sigma, config, noise, g)[steps]
    d = prior.num_params
    torch.testing.assert_close(ours[:, :d].sum(0), library["mu"], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours[:, d:].sum(0), library["log_sigma"], rtol=1e-10, atol=1e-10)


def test_gradient_study_gem_error_shrinks_with_inner_iterations(tmp_path):
    """C.1: GEM's error falls with K; with a full-covariance guide it reaches the SGD noise floor (< 5%)."""
    config = GradientStudyConfig.quick()
    result = run_gradient_study(config)
    mean = {(r["guide"], r["estimator"], r["K"]): r["mean"] for r in result["rows"]}
    first, last = min(config.iterations), max(config.iterations)
    assert mean[("fullcov", "GEM", last)] < 0.05
    for guide in config.guides:
        for est in ("GEM", "ELBO"):
            assert mean[(guide, est, last)] < mean[(guide, est, first)]
    table = format_table(result)
    assert table.count("\n| ") == len(config.iterations) and "fullcov GEM" in table
    write_gradient_study(result, tmp_path)
    saved = json.loads((tmp_path / "gradient_study.json").read_text())
    estimators = {"meanfield": 3, "fullcov": 2}  # GEM, ELBO (and iBaML for the mean-field guide)
    assert len(saved["rows"]) == sum(estimators[g] for g in config.guides) * len(config.iterations)
    ibaml = {r["K"]: r["mean"] for r in result["rows"] if r["estimator"] == "iBaML"}
    assert ibaml[last] < ibaml[first]  # its implicit gradient improves as the inner VI converges
    assert (tmp_path / "gradient_study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
