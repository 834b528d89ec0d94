"""Batched rollouts equal a plain loop; GAE and the linear feature baseline on hand-computed cases."""

import pytest
import torch

from hbmeta.models.functional import BatchedNet
from hbmeta.models.policy import GaussianMLPPolicy, split_policy_output
from hbmeta.tasks.rl.baseline import advantages, discounted_returns, fit_linear_baseline, gae
from hbmeta.tasks.rl.envs import Nav2DTasks
from hbmeta.tasks.rl.rollouts import collect_rollouts


@pytest.mark.parametrize("per_episode", [False, True])
def test_vectorised_rollout_equals_a_loop_over_tasks_episodes_and_steps(per_episode):
    num_tasks, episodes, horizon = 3, 2, 6
    net = BatchedNet(GaussianMLPPolicy(2, 2, hidden=(16, 16)))
    gen = torch.Generator().manual_seed(0)
    shape = (num_tasks, episodes, net.num_params) if per_episode else (num_tasks, net.num_params)
    theta = net.initial_vector() + 0.3 * torch.randn(shape, generator=gen)
    goals = Nav2DTasks().sample_tasks(num_tasks, gen)
    noise = torch.randn(num_tasks, episodes, horizon, 2, generator=gen)
    batched = collect_rollouts(Nav2DTasks(horizon), goals, net, theta, episodes, noise=noise)
    for i in range(num_tasks):
        for k in range(episodes):
            weights = theta[i, k] if per_episode else theta[i]
            position = torch.zeros(2)
            for t in range(horizon):
                params = net.unflatten(weights)
                out = torch.func.functional_call(net.module, params, (position,))
                mean, log_std = split_policy_output(out)
                action = mean + log_std.exp() * noise[i, k, t]
                assert torch.allclose(batched.obs[i, k, t], position, atol=1e-6)
                assert torch.allclose(batched.actions[i, k, t], action, atol=1e-5)
                position = position + action.clamp(-0.1, 0.1)
                reward = -(position - goals[i]).pow(2).sum()
                assert batched.rewards[i, k, t].item() == pytest.approx(reward.item(), abs=1e-5)
    assert batched.masks.eq(1).all()
    assert torch.allclose(batched.returns(), batched.rewards.sum(-1))


def test_gae_matches_a_hand_computed_example():
    rewards, values, masks = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[0.5, 0.5, 0.5]]), torch.ones(1, 3)
    # deltas 0.95, 1.95, 2.5; A2 = 2.5, A1 = 1.95 + 0.72 * 2.5 = 3.75, A0 = 0.95 + 0.72 * 3.75 = 3.65
    assert torch.allclose(gae(rewards, values, masks, gamma=0.9, gae_lambda=0.8), torch.tensor([[3.65, 3.75, 2.5]]))
    # lambda = 1 and no baseline: the discounted returns-to-go 1 + 0.9 * 2 + 0.81 * 3, 2 + 0.9 * 3, 3
    assert torch.allclose(discounted_returns(rewards, masks, 0.9), torch.tensor([[5.23, 4.7, 3.0]]))
    # an ended episode contributes nothing after its end
    cut = torch.tensor([[1.0, 1.0, 0.0]])
    assert discounted_returns(rewards, cut, 0.9)[0, 2] == 0


def test_linear_baseline_reproduces_returns_that_are_linear_in_its_features():
    gen = torch.Generator().manual_seed(0)
    obs = torch.rand(2, 3, 10, 2, generator=gen)
    t = torch.arange(10.0) / 100
    target = 2.0 * obs[..., 0] - obs[..., 1].pow(2) + 5 * t + 0.5
    fitted = fit_linear_baseline(obs, target, torch.ones(2, 3, 10))
    assert torch.allclose(fitted, target, atol=1e-3)
    adv = advantages(obs, torch.randn(2, 3, 10, generator=gen), torch.ones(2, 3, 10))
    assert torch.allclose(adv.mean((1, 2)), torch.zeros(2), atol=1e-5)
    assert torch.allclose(adv.std((1, 2), unbiased=False), torch.ones(2), atol=1e-4)


def test_rollouts_reject_weights_of_the_wrong_shape():
    net = BatchedNet(GaussianMLPPolicy(2, 2, hidden=(4,)))
    with pytest.raises(ValueError, match="theta"):
        collect_rollouts(Nav2DTasks(3), torch.zeros(2, 2), net, torch.zeros(3, net.num_params), episodes=2)
