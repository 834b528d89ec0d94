"""Selective priors: parameters kept out of the hierarchical prior (TyXe's hide), shared by the tasks and
meta-learned as point estimates by GEM's Fisher identity."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hbmeta import GaussianLikelihood, MetaLearner, SinusoidTasks
from hbmeta.inference import InnerConfig, TaskBatch
from hbmeta.inference.gem import gem_bml_gradient
from hbmeta.models import BatchedNet, Conv4, DiagonalGaussianPrior, HierarchicalModel, MeanFieldGuide
from hbmeta.models.linear import exact_log_marginal


def test_hide_by_type_and_name_keeps_parameters_out_of_theta():
    net = nn.Sequential(nn.Linear(1, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 1))
    batched = BatchedNet(net, hide=[nn.LayerNorm, "3.bias"])
    assert batched.names == ["0.weight", "0.bias", "3.weight"] and set(batched.hidden) == {"1.weight", "1.bias", "3.bias"}
    assert batched.num_params == 8 + 8 + 8 and batched.initial_vector().shape == (24,)
    theta = batched.initial_vector().expand(2, -1)
    torch.testing.assert_close(batched(theta, torch.ones(2, 3, 1))[0], net(torch.ones(3, 1)))  # same function
    with pytest.raises(ValueError, match="hide='head' names no parameter, submodule or module type"):
        BatchedNet(net, hide=["head"])


def test_gem_gradient_of_a_hidden_output_offset_is_the_exact_marginal_gradient(float64):
    """y = x^T w + b + noise with w ~ N(mu, sigma^2) under the prior and b hidden: GEM-BML's Fisher gradient in b with
    the exact posterior (one Gauss-Newton step, exact for a linear-Gaussian model) equals autograd of
    log N(y; X mu + b, X Sigma X^T + s^2 I)."""
    gen = torch.Generator().manual_seed(0)
    d, s = 3, 0.4
    net = nn.Linear(d, 1)
    batched = BatchedNet(net, hide=["bias"])
    mu, log_sigma = torch.randn(d, generator=gen), torch.full((d,), -0.5)
    model = HierarchicalModel(batched, DiagonalGaussianPrior(mu, log_sigma), GaussianLikelihood(s))
    x = torch.randn(4, 6, d, generator=gen)
    y = torch.randn(4, 6, 1, generator=gen)
    batch = TaskBatch(x[:, :3], y[:, :3], x[:, 3:], y[:, 3:])
    grads, _ = gem_bml_gradient(model, MeanFieldGuide(), batch, InnerConfig(method="gauss-newton", solver="woodbury",
                                                                            steps=1))
    b = net.bias.detach().clone().requires_grad_()
    exact = exact_log_marginal(x, y - b, mu, log_sigma, s)
    (expected,) = torch.autograd.grad(exact.mean(), b)
    torch.testing.assert_close(grads["net.bias"].mean(0), expected, rtol=1e-8, atol=1e-10)  # mean over tasks


def test_meta_training_moves_hidden_parameters_and_checkpoints_keep_them():
    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(1, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 1))

    learner = MetaLearner(make(), GaussianLikelihood(0.3), algorithm="gem-bml+", hide=(nn.LayerNorm,), meta_lr=0.01)
    before = {n: p.detach().clone() for n, p in learner.model.net.hidden.items()}
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        learner.meta_step(SinusoidTasks().sample(4, gen), gen)
    moved = [n for n, p in learner.model.net.hidden.items() if not torch.equal(p, before[n])]
    assert moved == ["1.weight", "1.bias"]
    state = learner.state_dict()
    again = MetaLearner(make(), GaussianLikelihood(0.3), algorithm="gem-bml+", hide=(nn.LayerNorm,), meta_lr=0.01)
    again.load_state_dict(state)
    for n, p in again.model.net.hidden.items():
        assert torch.equal(p, learner.model.net.hidden[n]), n
    with pytest.raises(ValueError, match=r"hidden parameters .* meta-learned .* 'maml' does not learn them"):
        MetaLearner(make(), GaussianLikelihood(0.3), algorithm="maml", hide=(nn.LayerNorm,))


@pytest.mark.parametrize("hide", [("features",), ("head.bias",), (nn.BatchNorm2d,)])
def test_conv4_shared_fast_path_matches_vmap(hide):
    """Conv4.forward_batched with shared parameters equals the generic vmap path, values and hidden gradients."""
    torch.manual_seed(0)
    net = Conv4(in_channels=1, num_classes=3, filters=4, image_size=12)
    fast, slow = BatchedNet(net, hide=hide), BatchedNet(net, hide=hide)
    slow._fast_batched = False  # the reference: functional_call under vmap
    theta = fast.initial_vector() + 0.1 * torch.randn(2, 3, fast.num_params)
    x = torch.randn(3, 4, 1, 12, 12)
    a, b = fast(theta, x), slow(theta, x)
    assert torch.allclose(a, b, atol=1e-5)
    ga = torch.autograd.grad(a.square().sum(), list(fast.hidden.values()))
    gb = torch.autograd.grad(b.square().sum(), list(slow.hidden.values()))
    for u, v in zip(ga, gb):
        assert torch.allclose(u, v, atol=1e-4)


def test_shared_constant_caches_body_per_input():
    """Inside shared_constant() a shared body runs once per input tensor; outputs and theta-gradients are unchanged."""
    torch.manual_seed(0)
    net = Conv4(in_channels=1, num_classes=3, filters=4, image_size=12)
    batched = BatchedNet(net, hide=("features",))
    theta = (batched.initial_vector() + 0.1 * torch.randn(2, 3, batched.num_params)).requires_grad_()
    x = torch.randn(3, 4, 1, 12, 12)
    reference = batched(theta, x)
    with batched.shared_constant():
        first = batched(theta, x)
        cache = batched._cache
        assert len(cache) == 1
        second = batched(theta * 1.0, x)
        assert len(cache) == 1  # the same images: features reused
        batched(theta, x + 0.0)
        assert len(cache) == 2  # new images: computed
        (g,) = torch.autograd.grad(second.sum(), theta)
    assert batched._cache is None
    assert torch.allclose(first, reference, atol=1e-6) and torch.allclose(second, reference, atol=1e-6)
    (g_ref,) = torch.autograd.grad(reference.sum(), theta)
    assert torch.allclose(g, g_ref, atol=1e-5)
