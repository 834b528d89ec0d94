r"""Advantages: MAML's linear feature baseline and generalized advantage estimation (GAE).

Linear feature baseline (rllab ``LinearFeatureBaseline``, used by MAML): per task, ridge regression of the
discounted returns-to-go on the features

.. math:: \phi(x_t, t) = [x, x^2, t/100, (t/100)^2, (t/100)^3, 1], \quad x = \mathrm{clip}(x_t, -10, 10),

with ridge ``1e-5``. GAE (Schulman et al. 2016):

.. math:: \delta_t = r_t + \gamma V(x_{t+1}) - V(x_t), \qquad A_t = \sum_{l \ge 0} (\gamma\lambda)^l \delta_{t+l}

(``lambda = 1`` gives returns-to-go minus the baseline, MAML's setting). Everything is batched over tasks and
episodes; steps after an episode's end (``mask = 0``) get advantage 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["advantages", "baseline_features", "discounted_returns", "fit_linear_baseline", "gae"]


def discounted_returns(rewards: Tensor, masks: Tensor, gamma: float) -> Tensor:
    r"""``R_t = sum_{l >= 0} gamma^l r_{t+l}`` over ``[..., H]`` (masked rewards)."""
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[..., 0])
    for t in range(rewards.shape[-1] - 1, -1, -1):
        running = rewards[..., t] * masks[..., t] + gamma * running * masks[..., t]
        out[..., t] = running
    return out


def baseline_features(obs: Tensor) -> Tensor:
    """``[T, K, H, obs]`` -> ``[T, K, H, 2 obs + 4]`` (rllab's features)."""
    o = obs.clamp(-10, 10)
    t = (torch.arange(obs.shape[-2], dtype=obs.dtype) / 100.0).expand(*obs.shape[:-1]).unsqueeze(-1)
    return torch.cat([o, o.pow(2), t, t.pow(2), t.pow(3), torch.ones_like(t)], -1)


def fit_linear_baseline(obs: Tensor, returns: Tensor, masks: Tensor, ridge: float = 1e-5) -> Tensor:
    """Per-task least squares of ``returns [T, K, H]`` on the features; returns the fitted values ``[T, K, H]``."""
    feats = baseline_features(obs).double() * masks.double().unsqueeze(-1)
    x = feats.flatten(1, 2)                                   # [T, K H, F]
    y = (returns.double() * masks.double()).flatten(1, 2)     # [T, K H]
    gram, rhs = x.transpose(1, 2) @ x, (x.transpose(1, 2) @ y.unsqueeze(-1))
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype)
    for _ in range(5):  # rllab raises the ridge by x10 until the solve is finite
        weights = torch.linalg.solve(gram + ridge * eye, rhs)
        if torch.isfinite(weights).all():
            break
        ridge *= 10
    return (baseline_features(obs).double() @ weights.unsqueeze(1)).squeeze(-1).to(obs.dtype) * masks


def gae(rewards: Tensor, values: Tensor, masks: Tensor, gamma: float, gae_lambda: float) -> Tensor:
    """Generalized advantage estimates ``[..., H]`` (``V = 0`` after the last step and after an episode's end)."""
    next_values = torch.cat([values[..., 1:] * masks[..., 1:], torch.zeros_like(values[..., :1])], -1)
    deltas = (rewards + gamma * next_values - values) * masks
    return discounted_returns(deltas, masks, gamma * gae_lambda)


def advantages(obs: Tensor, rewards: Tensor, masks: Tensor, gamma: float = 0.99, gae_lambda: float = 1.0,
               normalize: bool = True) -> Tensor:
    """GAE with the linear feature baseline, normalised per task to mean 0 / sd 1 over its valid steps (MAML)."""
    values = fit_linear_baseline(obs, discounted_returns(rewards, masks, gamma), masks)
    adv = gae(rewards, values, masks, gamma, gae_lambda)
    if normalize:
        dims = (1, 2)
        count = masks.sum(dims, keepdim=True)
        mean = (adv * masks).sum(dims, keepdim=True) / count
        var = ((adv - mean).pow(2) * masks).sum(dims, keepdim=True) / count
        adv = (adv - mean) / (var.sqrt() + 1e-8) * masks
    return adv
