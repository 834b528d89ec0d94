"""Variance reduction for the SVI inner update (GEM-BML appendix B.7): local reparameterisation for MLPs,
Flipout for conv4, common random numbers for q1 / q2, separate clipping of location and scale.

Each estimator is checked to be unbiased (its mean equals plain reparameterisation's within Monte-Carlo error on
a fixed net) and to have lower variance (the measured ratio is asserted below 1).
"""


import torch

from hbmeta.inference.batch import TaskBatch
from hbmeta.inference.gem import gem_plus_gradient
import hbmeta.inference.inner as inner
from hbmeta.inference.inner import CommonNoise, InnerConfig, clip_per_task
from hbmeta.models import DiagonalGaussianPrior, GaussianLikelihood, HierarchicalModel, MeanFieldGuide
from hbmeta.models.conv import Conv4
from hbmeta.models.functional import BatchedNet, mlp
from hbmeta.models.likelihoods import CategoricalLikelihood
from hbmeta.models.local_reparam import local_forward

D = torch.float64


def estimates(net: BatchedNet, likelihood, loc, scale, x, y, samples: int, seed: int):
    """Per-sample estimates ``[S, T]`` of E_q log p(D | theta): plain reparameterisation and the local estimator."""
    g = torch.Generator().manual_seed(seed)
    theta = loc + scale * torch.randn((samples, *loc.shape), generator=g, dtype=loc.dtype)
    plain = likelihood.log_prob(net(theta, x), y)
    local = likelihood.log_prob(local_forward(net, loc, scale, x, samples,
                                              lambda shape: torch.randn(shape, generator=g, dtype=loc.dtype)), y)
    return plain, local


def assert_unbiased_and_lower_variance(plain, local, max_ratio):
    se = torch.sqrt(plain.var(0) / plain.shape[0] + local.var(0) / local.shape[0])
    z = (plain.mean(0) - local.mean(0)) / se
    assert z.abs().max() < 4.5, f"z-scores {z.tolist()}"
    ratio = local.var(0) / plain.var(0)
    assert (ratio < max_ratio).all(), f"variance ratios local / plain {ratio.tolist()}"
    return ratio


def test_local_reparameterisation_of_an_mlp_is_unbiased_and_lowers_the_variance():
    torch.manual_seed(0)
    net = BatchedNet(mlp(1, (40, 40), 1).double())
    g = torch.Generator().manual_seed(1)
    loc = net.initial_vector().expand(3, -1) + 0.1 * torch.randn(3, net.num_params, generator=g, dtype=D)
    scale = torch.full_like(loc, 0.15)
    x = 10 * torch.rand(3, 20, 1, generator=g, dtype=D) - 5
    y = torch.sin(x)
    plain, local = estimates(net, GaussianLikelihood(0.5), loc, scale, x, y, 20000, 2)
    ratio = assert_unbiased_and_lower_variance(plain, local, 0.8)
    assert ratio.max() < 0.8


def test_flipout_of_conv4_is_unbiased_lowers_the_gradient_variance_and_is_the_mean_net_without_noise():
    """Omniglot's conv4 on a 5-way 1-shot support set: Flipout in the head (the convolutions share a sample because
    batch norm couples the images; models/conv.py)."""
    torch.manual_seed(0)
    module = Conv4.omniglot(5)
    net = BatchedNet(module)
    g = torch.Generator().manual_seed(1)
    loc = net.initial_vector().expand(2, -1).clone()
    scale = torch.full_like(loc, 0.05)
    x = torch.rand(2, 5, 1, 28, 28, generator=g)
    y = torch.arange(5).expand(2, 5)
    zero = module.forward_flipout(loc, torch.zeros(1, *loc.shape), x, lambda shape: torch.randn(shape))
    torch.testing.assert_close(zero[0], net(loc, x))
    likelihood = CategoricalLikelihood()
    with torch.no_grad():
        plain, local = estimates(net, likelihood, loc, scale, x, y, 3000, 3)
    se = torch.sqrt(plain.var(0) / 3000 + local.var(0) / 3000)
    assert ((plain.mean(0) - local.mean(0)) / se).abs().max() < 4.5

    def gradient_variance(local: bool) -> float:
        mean = loc.clone().requires_grad_()
        grads = []
        for i in range(100):
            gen = torch.Generator().manual_seed(100 + i)
            if local:
                out = local_forward(net, mean, scale, x, 1, lambda shape: torch.randn(shape, generator=gen))
            else:
                out = net(mean + scale * torch.randn((1, *loc.shape), generator=gen), x)
            grads.append(torch.autograd.grad(likelihood.log_prob(out, y).sum(), mean)[0])
        return torch.stack(grads).var(0).sum().item()

    ratio = gradient_variance(True) / gradient_variance(False)
    assert ratio < 1.0, ratio


def test_common_random_numbers_replay_the_first_fits_draws_and_lower_gem_plus_variance(monkeypatch):
    draws = CommonNoise(lambda step, shape: torch.randn(shape))
    a = draws.first(1, torch.Size((2, 3, 4)))
    b = draws.first(1, torch.Size((2, 3, 10, 5)))
    assert torch.equal(draws.second(1, torch.Size((2, 3, 4))), a)
    longer = draws.second(1, torch.Size((2, 3, 20, 5)))  # more query points: the first 10 rows are replayed
    assert torch.equal(longer[..., :10, :], b) and not torch.equal(longer[..., 10:, :], b)

    torch.manual_seed(0)
    net = mlp(1, (20,), 1)
    prior = DiagonalGaussianPrior.from_module(net, 0.05)
    model = HierarchicalModel(net, prior, GaussianLikelihood(0.5))
    batch = TaskBatch(*(t for t in _sinusoids(4)))
    config = InnerConfig(steps=3, lr=0.1, optimizer="sgd", num_samples=1, clip_norm=5.0, estimator="reparam")

    def spread() -> float:
        grads = [gem_plus_gradient(model, MeanFieldGuide(), batch, config, torch.Generator().manual_seed(s))[0]["mu"]
                 for s in range(30)]
        return torch.stack(grads).var(0).sum().item()

    with_crn = spread()
    monkeypatch.setattr(CommonNoise, "second", lambda self, step, shape: self.draw(step, shape))  # independent noise
    without = spread()
    assert with_crn < 0.85 * without, (with_crn, without)  # measured 0.73


def _sinusoids(tasks: int):
    g = torch.Generator().manual_seed(0)
    x = 10 * torch.rand(tasks, 20, 1, generator=g) - 5
    y = (1 + 4 * torch.rand(tasks, 1, 1, generator=g)) * torch.sin(x + 3 * torch.rand(tasks, 1, 1, generator=g))
    return x[:, :10], y[:, :10], x[:, 10:], y[:, 10:]


def test_location_and_scale_gradients_are_clipped_separately():
    """A huge scale gradient must not shrink the location's step (it did when both were clipped jointly)."""
    loc = torch.zeros(2, 3, requires_grad=True)
    rho = torch.zeros(2, 3, requires_grad=True)
    loc.grad = torch.tensor([[0.3, 0.0, 0.4], [3.0, 0.0, 4.0]])
    rho.grad = torch.full((2, 3), 100.0)
    for group in ([loc], [rho]):
        clip_per_task(group, 1.0)
    torch.testing.assert_close(loc.grad, torch.tensor([[0.3, 0.0, 0.4], [0.6, 0.0, 0.8]]))
    torch.testing.assert_close(rho.grad.norm(dim=1), torch.ones(2))


def test_svi_uses_the_local_estimator_for_a_meanfield_mlp(monkeypatch):
    calls = []
    real = inner.local_forward
    monkeypatch.setattr(inner, "local_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    net = mlp(1, (8,), 1)
    prior = DiagonalGaussianPrior.from_module(net, 0.05)
    model = HierarchicalModel(net, prior, GaussianLikelihood(0.5))
    x, y = torch.randn(2, 5, 1), torch.randn(2, 5, 1)
    inner.fit_posterior(model, MeanFieldGuide(), x, y, prior.initial_posterior(2), config=InnerConfig(steps=2))
    assert len(calls) == 2
    inner.fit_posterior(model, MeanFieldGuide(), x, y, prior.initial_posterior(2),
                        config=InnerConfig(steps=2, estimator="reparam"))
    assert len(calls) == 2
