r"""Batched rollouts: ``T`` tasks x ``K`` episodes with one policy weight vector per task (or per episode).

.. math:: a_t = \mu(x_t; \theta) + \sigma(\theta)\, \epsilon_t, \quad \epsilon_t \sim N(0, I)

All ``T K`` episodes advance together; the policy runs once per time step for every weight vector through
:class:`~hbmeta.models.functional.BatchedNet`. Noise comes from an explicit generator (or is handed in, for tests).
Actions are stored unclipped (the environment clips them), as in MAML's rllab sampler.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hbmeta.inference.policy_data import PolicyData
from hbmeta.models.functional import BatchedNet
from hbmeta.models.policy import split_policy_output
from hbmeta.tasks.rl.baseline import advantages

__all__ = ["Rollouts", "collect_rollouts"]


@dataclass
class Rollouts:
    """``obs [T, K, H, obs]``, ``actions [T, K, H, act]``, ``rewards [T, K, H]``, ``masks [T, K, H]`` (1 = step taken)."""

    obs: Tensor
    actions: Tensor
    rewards: Tensor
    masks: Tensor

    @property
    def num_tasks(self) -> int:
        return self.obs.shape[0]

    def returns(self) -> Tensor:
        """Undiscounted return of every episode ``[T, K]``."""
        return (self.rewards * self.masks).sum(-1)

    def mean_return(self) -> float:
        return float(self.returns().mean())

    def policy_data(self, gamma: float = 0.99, gae_lambda: float = 1.0, normalize: bool = True) -> PolicyData:
        """Flatten to ``N = K H`` steps per task with advantages from the linear feature baseline and GAE."""
        adv = advantages(self.obs, self.rewards, self.masks, gamma, gae_lambda, normalize)
        t, k, h = self.rewards.shape
        return PolicyData(self.obs.reshape(t, k * h, -1), self.actions.reshape(t, k * h, -1), adv.reshape(t, k * h),
                          self.masks.reshape(t, k * h))


@torch.no_grad()
def collect_rollouts(env, tasks: Tensor, policy: BatchedNet, theta: Tensor, episodes: int,
                     generator: torch.Generator | None = None, seed: int = 0, noise: Tensor | None = None) -> Rollouts:
    """Run ``episodes`` episodes of every task with its own policy weights.

    Args:
        env: a batched task distribution (``reset(tasks, K, seed)`` / ``step(actions)``, see :mod:`hbmeta.tasks.rl.envs`).
        tasks: ``[T, task_dim]``.
        policy: the Gaussian policy's functional view.
        theta: ``[T, P]`` (one policy per task) or ``[T, K, P]`` (one per episode, e.g. draws from a posterior).
        episodes: ``K``.
        generator: source of the action noise.
        seed: seed of the environments' initial states (MuJoCo's reset noise).
        noise: optional ``[T, K, H, act]`` standard-normal action noise to use instead of ``generator``.
    """
    num_tasks, horizon = tasks.shape[0], env.horizon
    per_task = theta.dim() == 2
    if theta.shape[:-1] not in ((num_tasks,), (num_tasks, episodes)):
        raise ValueError(f"theta {tuple(theta.shape)} must be [tasks={num_tasks}, P] or [tasks, episodes={episodes}, P]")
    # one weight vector per task: the K episodes are K inputs of its network; per episode: T K one-input "tasks"
    weights = theta.unsqueeze(0).float() if per_task else theta.reshape(1, num_tasks * episodes, -1).float()
    obs = env.reset(tasks, episodes, seed)
    shape = (num_tasks, episodes)
    all_obs, all_actions, rewards, masks = [], [], [], []
    alive = torch.ones(shape)
    for t in range(horizon):
        inputs = obs if per_task else obs.reshape(num_tasks * episodes, 1, -1)
        out = policy(weights, inputs)[0].reshape(num_tasks * episodes, -1)  # [T K, 2 act]
        mean, log_std = split_policy_output(out)
        eps = torch.randn(mean.shape, generator=generator) if noise is None else noise[:, :, t].reshape(mean.shape)
        action = (mean + log_std.exp() * eps).reshape(*shape, -1)
        next_obs, reward, done = env.step(action)
        all_obs.append(obs)
        all_actions.append(action)
        rewards.append(reward * alive)
        masks.append(alive.clone())
        alive = alive * (~done).float()
        obs = next_obs
    return Rollouts(torch.stack(all_obs, 2), torch.stack(all_actions, 2), torch.stack(rewards, 2), torch.stack(masks, 2))
