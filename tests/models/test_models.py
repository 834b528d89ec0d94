"""The model pieces: batched network evaluation, likelihoods, priors and posteriors."""

import math

import pytest
import torch
from torch import nn

from hbmeta.models import (BatchedNet, CategoricalLikelihood, DiagonalGaussianPrior, GaussianLikelihood, HierarchicalModel,
                    Posterior, mlp)


@pytest.mark.parametrize("net", [
    nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, 3)),
    nn.Sequential(nn.Linear(1, 5), nn.ReLU(), nn.Linear(5, 4, bias=False), nn.ReLU(), nn.Tanh(), nn.Linear(4, 1)),
    nn.Sequential(nn.Linear(1, 3, bias=False), nn.Linear(3, 2)),
], ids=["tanh", "fan-in-1-no-bias-stacked-activations", "linear-no-bias-fan-in-1"])
def test_mlp_fast_path_equals_generic_vmap_path_and_a_loop(net):
    """The fused batched matmuls (``baddbmm``, ``addcmul`` for one input feature, ReLU in place) against vmap, a
    loop over ``functional_call``, and in their gradients."""
    batched = BatchedNet(net)
    assert batched._fast_mlp
    in_features = net[0].in_features
    theta = torch.randn(4, 3, batched.num_params, requires_grad=True)  # 4 samples x 3 tasks
    x = torch.randn(3, 6, in_features)
    fast = batched(theta, x)
    (grad_fast,) = torch.autograd.grad(fast.square().sum(), theta)
    batched._fast_mlp = False
    slow = batched(theta, x)
    torch.testing.assert_close(slow, fast)
    torch.testing.assert_close(torch.autograd.grad(slow.square().sum(), theta)[0], grad_fast)
    theta = theta.detach()
    for s in range(4):
        for t in range(3):
            params = batched.unflatten(theta[s, t])
            ref = torch.func.functional_call(net, params, (x[t],))
            torch.testing.assert_close(fast[s, t], ref)


def test_generic_module_runs_through_vmap():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(1, 8), nn.Linear(8, 1)

        def forward(self, x):
            return x + self.b(torch.relu(self.a(x)))

    batched = BatchedNet(Residual())
    assert not batched._fast_mlp
    out = batched(batched.initial_vector().expand(2, 3, -1), torch.randn(3, 4, 1))
    assert out.shape == (2, 3, 4, 1)


def test_gaussian_log_prob_equals_pyro_distribution():
    lik = GaussianLikelihood(0.7)
    pred, y = torch.randn(2, 3, 5, 1), torch.randn(3, 5, 1)
    torch.testing.assert_close(lik.log_prob(pred, y), lik.distribution(pred).log_prob(y))
    expected = torch.distributions.Normal(pred, 0.7).log_prob(y).sum((-1, -2))
    torch.testing.assert_close(lik.log_prob(pred, y), expected)
    torch.testing.assert_close(lik.point_loss(pred, y), (pred - y).pow(2).mean((-1, -2)))


def test_categorical_likelihood_on_hand_made_logits():
    lik = CategoricalLikelihood()
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]]))  # 1 task, 2 points
    y = torch.tensor([[0, 1]])
    assert lik.log_prob(logits, y).item() == pytest.approx(math.log(0.5) + math.log(0.8), rel=1e-6)
    assert lik.point_loss(logits, y).item() == pytest.approx(-(math.log(0.5) + math.log(0.8)) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="class labels must be integers"):
        lik.check_targets(y.float(), torch.zeros(1, 2, 4))


def test_prior_gem_gradient_for_point_mass_and_fixed_scale():
    prior = DiagonalGaussianPrior(torch.zeros(3), math.log(2.0), learn_scale=False)
    grads = prior.gem_gradient(Posterior(torch.tensor([[2.0, 0.0, -4.0]])))
    assert set(grads) == {"mu"}  # the scale is a buffer, not learned
    torch.testing.assert_close(grads["mu"], torch.tensor([[0.5, 0.0, -1.0]]))  # (m - mu) / sigma^2


def test_shape_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"scale \(2, 4\) does not match loc \(2, 3\)"):
        Posterior(torch.zeros(2, 3), torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"Posterior.loc must be \[tasks, params\]"):
        Posterior(torch.zeros(3))
    with pytest.raises(ValueError, match="prior is over 3 weights; the network has 1761"):
        HierarchicalModel(mlp(), DiagonalGaussianPrior(torch.zeros(3)), GaussianLikelihood())
    with pytest.raises(ValueError, match="prior loc contains NaN"):
        DiagonalGaussianPrior(torch.tensor([0.0, float("nan")]))
    with pytest.raises(ValueError, match="noise_scale must be a positive number"):
        GaussianLikelihood(0.0)


def test_prior_scale_ceiling_holds_after_meta_steps():
    from hbmeta.inference.learner import MetaLearner
    from hbmeta.tasks.sinusoid import SinusoidTasks

    from hbmeta.inference.learner import default_inner

    learner = MetaLearner(mlp(1, (8,), 1), GaussianLikelihood(0.5), algorithm="gem-bml+", meta_lr=0.5,
                          prior_scale=0.02, max_prior_scale=0.021, inner=default_inner("gem-bml+", gauss_newton=False))
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        learner.meta_step(SinusoidTasks().sample(4, gen), gen)
    assert learner.prior.scale.max() <= 0.021 * (1 + 1e-6)
    assert learner.prior.scale.min() < 0.0209  # only the ceiling is enforced: scales below it stay where they are


def test_dropout_in_train_mode_is_a_clear_error_and_eval_mode_works():
    net = nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Dropout(0.1), nn.Linear(8, 1))
    with pytest.raises(ValueError, match=r"Dropout in train mode \(2\).*call net.eval\(\)"):
        BatchedNet(net)
    out = BatchedNet(net.eval())(BatchedNet(net.eval()).initial_vector().expand(2, -1), torch.zeros(2, 3, 1))
    assert out.shape == (2, 3, 1)


def test_full_covariance_guide_on_a_big_net_warns_what_it_costs():
    from hbmeta.inference.learner import MetaLearner

    with pytest.warns(UserWarning, match=r"full-covariance guide on 2561 weights .* MiB each"):
        MetaLearner(mlp(1, (40, 40, 20), 1), GaussianLikelihood(0.5), guide="fullcov")
