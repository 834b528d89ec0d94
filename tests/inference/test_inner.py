"""The inner update: batched plate SVI, the analytic fast path, limits of GEM, divergence errors."""

import pytest
import torch

from hbmeta.inference.batch import TaskBatch
from hbmeta.inference.gem import gem_bml_gradient
from hbmeta.inference.inner import InnerConfig, InnerLoopDivergedError, fit_posterior, negative_elbo
from hbmeta.inference.reptile import reptile_gradient
from hbmeta.models import (DeltaGuide, DiagonalGaussianPrior, FullCovarianceGuide, GaussianLikelihood, HierarchicalModel,
                    MeanFieldGuide, mlp)


def _model(noise_scale=0.5, prior_scale=0.1, learn_scale=True, hidden=(8, 8)):
    net = mlp(1, hidden, 1)
    prior = DiagonalGaussianPrior.from_module(net, prior_scale, learn_scale)
    return HierarchicalModel(net, prior, GaussianLikelihood(noise_scale))


def _data(num_tasks=4, num_points=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(num_tasks, num_points, 1, generator=g) * 10 - 5
    return x, torch.sin(x) * torch.rand(num_tasks, 1, 1, generator=g) * 3


@pytest.mark.parametrize("guide", [MeanFieldGuide(), DeltaGuide()], ids=["meanfield", "delta"])
def test_analytic_fast_path_equals_pyro_trace_mean_field_elbo(float64, guide):
    model = _model()
    x, y = _data()
    params = guide.init_params(model.prior.initial_posterior(4))
    with torch.no_grad():
        params["loc"].add_(0.05 * torch.randn_like(params["loc"]))
    noise = torch.randn(3, 4, model.prior.num_params)
    fast = negative_elbo(model, guide, params, x, y, model.prior.distribution(4), noise, backend="auto")
    traced = negative_elbo(model, guide, params, x, y, model.prior.distribution(4), noise, backend="pyro")
    wrt = [*params.values(), model.prior.mu, model.prior.log_sigma]
    for a, b in zip(torch.autograd.grad(fast, wrt), torch.autograd.grad(traced, wrt)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert fast.item() == pytest.approx(traced.item(), rel=1e-12)


def task_sliced_noise(num_tasks: int, task: int | None = None):
    """A NoiseFn whose k-th step's i-th draw is one fixed full-batch tensor (task dim 1), or task ``task``'s slice of it:
    a batched run and per-task runs then see the same numbers whatever the shapes (weights or activations)."""
    calls: dict[int, int] = {}

    def draw(step, shape):
        i = calls.get(step, 0)
        calls[step] = i + 1
        full = list(shape)
        full[1] = num_tasks
        eps = torch.randn(full, generator=torch.Generator().manual_seed(1000 * step + i), dtype=torch.float64)
        return eps if task is None else eps[:, task:task + 1]
    return draw


@pytest.mark.parametrize("guide,elbo,estimator", [(MeanFieldGuide(), "auto", "reparam"), (MeanFieldGuide(), "auto", "local"),
                                                  (MeanFieldGuide(), "pyro", "reparam"), (DeltaGuide(), "auto", "reparam"),
                                                  (FullCovarianceGuide(), "pyro", "reparam")],
                         ids=["meanfield-fast", "meanfield-local", "meanfield-pyro", "delta", "fullcov"])
def test_batched_plate_svi_equals_separate_per_task_svis(float64, guide, elbo, estimator):
    model = _model(hidden=(4,)) if guide.name == "fullcov" else _model()
    x, y = _data(num_tasks=3)
    config = InnerConfig(steps=6, lr=0.01, optimizer="adam", num_samples=2, elbo=elbo, estimator=estimator)
    start = model.prior.initial_posterior(3)
    batched = fit_posterior(model, guide, x, y, start, config=config, noise=task_sliced_noise(3))
    for t in range(3):
        single = fit_posterior(model, guide, x[t:t + 1], y[t:t + 1], start.select(t), config=config,
                               noise=task_sliced_noise(3, t))
        torch.testing.assert_close(single.loc, batched.loc[t:t + 1], rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(single.variance, batched.variance[t:t + 1], rtol=1e-9, atol=1e-11)


def test_gem_bml_delta_guide_fixed_scale_mean_update_equals_reptile(float64):
    # -log N(y; f, s^2) summed over N points has the gradient of the mean squared error when s^2 = N / 2,
    # and a very wide fixed prior makes the MAP inner loop Reptile's unregularised one (GEM-BML section 4).
    num_points, sigma = 20, 1e4
    model = _model(noise_scale=(num_points / 2) ** 0.5, prior_scale=sigma, learn_scale=False)
    x, y = _data(num_tasks=5, num_points=num_points)
    batch = TaskBatch(x[:, :10], y[:, :10], x[:, 10:], y[:, 10:])
    config = InnerConfig(steps=5, lr=0.01, optimizer="sgd")
    gem, _ = gem_bml_gradient(model, DeltaGuide(), batch, config)
    reptile = reptile_gradient(model, batch, config)
    assert set(gem) == {"mu"}
    gem_mean_step = -(gem["mu"] * sigma**2).mean(0)  # descent direction, rescaled by the prior variance
    torch.testing.assert_close(gem_mean_step, reptile["mu"], rtol=1e-6, atol=1e-9)
    assert reptile["mu"].abs().max() > 1e-3  # the update is not trivially zero


def test_diverging_inner_loop_names_task_and_step():
    model = _model()
    x, y = _data(num_tasks=3)
    y = y.clone()
    y[1] = 1e30  # task 1's likelihood overflows
    with pytest.raises(InnerLoopDivergedError, match=r"step 1 .*task\(s\) \[1\]"):
        fit_posterior(model, MeanFieldGuide(), x, y, model.prior.initial_posterior(3), config=InnerConfig(steps=3))


def test_unclipped_sgd_divergence_suggests_clip_norm_which_keeps_the_fit_finite():
    """Precise data (noise sd 0.01) give huge ELBO gradients: unclipped whitened SGD at 0.3 overflows in two steps and
    the error says to clip; with ``clip_norm`` every step is bounded and the fit ends finite, with positive scales."""
    model = _model(noise_scale=0.01)
    x, y = _data(num_tasks=3)
    start = model.prior.initial_posterior(3)
    with pytest.raises(InnerLoopDivergedError, match=r"lower the inner learning rate \(now 0.3\), or set clip_norm"):
        fit_posterior(model, MeanFieldGuide(), x, y, start, config=InnerConfig(steps=10, lr=0.3, optimizer="sgd"),
                      generator=torch.Generator().manual_seed(0))
    q = fit_posterior(model, MeanFieldGuide(), x, y, start,
                      config=InnerConfig(steps=10, lr=0.3, optimizer="sgd", clip_norm=5.0),
                      generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(q.loc).all() and (q.scale > 0).all()


def test_inner_config_rejects_unknown_optimizer_and_bad_values():
    with pytest.raises(ValueError, match="unknown optimizer 'adamm'"):
        InnerConfig(optimizer="adamm")
    with pytest.raises(ValueError, match="bad inner config"):
        InnerConfig(steps=-1)
    with pytest.raises(ValueError, match="unknown elbo"):
        InnerConfig(elbo="jit")


def test_safeguarded_svi_never_raises_the_deterministic_objective(float64):
    """InnerConfig(safeguard=True): Adam at a rate that overshoots keeps only steps that lower
    -log p(D | m) + KL(q || p) per task; without the safeguard the same run raises it."""
    from hbmeta.inference.inner import _task_objective

    model = _model()
    x, y = _data(num_tasks=3)
    prior = model.prior.distribution(3)
    for guard in (True, False):
        values = []
        config = InnerConfig(steps=12, lr=2.0, optimizer="adam", num_samples=1, safeguard=guard)

        def record(step, post):
            params = {"loc": post.loc, "log_scale": post.scale.log()}
            values.append(_task_objective(model, MeanFieldGuide(whiten=False), params, x, y, prior))

        fit_posterior(model, MeanFieldGuide(), x, y, model.prior.initial_posterior(3), config=config,
                      generator=torch.Generator().manual_seed(0), callback=record)
        rises = (torch.stack(values).diff(dim=0) > 1e-9).any()
        assert bool(rises) != guard


def test_callback_posteriors_are_snapshots_not_views_of_the_optimised_parameters():
    """Each step's posterior handed to the callback keeps that step's values (the optimizer updates the guide's
    tensors in place; a detached view would follow them to the last step, as the gradient study's once did)."""
    from hbmeta.models import DiagonalGaussianPrior, GaussianLikelihood, HierarchicalModel, MeanFieldGuide, mlp
    from hbmeta.tasks import SinusoidTasks

    net = mlp(1, (8,), 1)
    model = HierarchicalModel(net, DiagonalGaussianPrior.from_module(net, 0.1), GaussianLikelihood(0.5))
    batch = SinusoidTasks().sample(2, torch.Generator().manual_seed(0))
    seen = {}
    final = fit_posterior(model, MeanFieldGuide(whiten=False), batch.x_train, batch.y_train,
                          model.initial_posterior(batch.x_train, batch.y_train),
                          config=InnerConfig(steps=3, lr=0.01, optimizer="sgd"), generator=torch.Generator().manual_seed(1),
                          callback=lambda step, post: seen.__setitem__(step, post))
    assert torch.equal(seen[0].loc, model.prior.loc.detach().expand(2, -1))  # still the start
    assert not torch.equal(seen[1].loc, seen[3].loc) and torch.equal(seen[3].loc, final.loc)
