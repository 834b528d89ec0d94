r"""Gaussian MLP policy ``pi(a | x; theta) = N(a; f_mu(x; theta), diag exp(2 log_std))`` (GEM-BML section 5.3).

The network is MAML's RL policy (Finn et al. 2017, sec. 5.3): 2 hidden layers of 100 ReLU units for the mean
and a state-independent, learned log standard deviation. Its flat weights ``theta`` (``log_std`` first, then the mean
network's, in ``named_parameters`` order) carry the hierarchical prior like any other ``nn.Module`` 's; :meth:`GaussianMLPPolicy.forward_batched`
lets :class:`~hbmeta.models.functional.BatchedNet` run many weight vectors (tasks x Monte-Carlo samples) in batched
matmuls. The output is ``[mean, log_std]`` concatenated on the last dimension; :func:`split_policy_output`
and :func:`gaussian_log_prob` read it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["GaussianMLPPolicy", "gaussian_kl", "gaussian_log_prob", "split_policy_output"]


class GaussianMLPPolicy(nn.Module):
    """Gaussian policy with an MLP mean and a learned, state-independent ``log_std``.

    Args:
        obs_dim: observation size.
        act_dim: action size.
        hidden: hidden widths (MAML / GEM-BML: ``(100, 100)``).
        init_log_std: initial ``log_std`` (MAML: 0, i.e. unit standard deviation).

    Example:
        >>> from hbmeta.models.functional import BatchedNet
        >>> policy = BatchedNet(GaussianMLPPolicy(2, 2))
        >>> theta = policy.initial_vector().expand(3, -1)          # 3 tasks
        >>> policy(theta, torch.zeros(3, 5, 2)).shape                # [T, N, 2 * act_dim]
        torch.Size([3, 5, 4])
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden: tuple[int, ...] = (100, 100), init_log_std: float = 0.0):
        super().__init__()
        if obs_dim < 1 or act_dim < 1 or any(h < 1 for h in hidden):
            raise ValueError(f"bad policy sizes: obs_dim={obs_dim}, act_dim={act_dim}, hidden={hidden}")
        layers: list[nn.Module] = []
        width = obs_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, act_dim))
        self.mean_net = nn.Sequential(*layers)
        self.log_std = nn.Parameter(torch.full((act_dim,), float(init_log_std)))
        self.obs_dim, self.act_dim = obs_dim, act_dim

    def forward(self, x: Tensor) -> Tensor:
        mean = self.mean_net(x)
        return torch.cat([mean, self.log_std.expand_as(mean)], -1)

    def forward_batched(self, theta: Tensor, x: Tensor) -> Tensor:
        """``theta [B, T, P]``, ``x [T, N, obs]`` -> ``[B, T, N, 2 * act]`` by batched matmuls."""
        sizes = [p.numel() for p in self.parameters()]
        chunks = iter(torch.split(theta, sizes, dim=-1))
        log_std = next(chunks)  # nn.Module lists its own parameters before its submodules'
        h = x
        for layer in self.mean_net:
            if isinstance(layer, nn.Linear):
                weight = next(chunks).unflatten(-1, (layer.out_features, layer.in_features))
                h = torch.matmul(h, weight.transpose(-1, -2)) + next(chunks).unsqueeze(-2)
            else:
                h = layer(h)
        return torch.cat([h, log_std.unsqueeze(-2).expand_as(h)], -1)


def split_policy_output(out: Tensor) -> tuple[Tensor, Tensor]:
    """``[..., 2A]`` -> ``(mean [..., A], log_std [..., A])``."""
    act_dim = out.shape[-1] // 2
    return out[..., :act_dim], out[..., act_dim:]


def gaussian_log_prob(out: Tensor, actions: Tensor) -> Tensor:
    r"""``log pi(a | x) = sum_i log N(a_i; mu_i, sigma_i^2)`` from a policy output ``[..., 2A]`` -> ``[...]``."""
    mean, log_std = split_policy_output(out)
    z = (actions - mean) * torch.exp(-log_std)
    return (-0.5 * z.pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


def gaussian_kl(out_p: Tensor, out_q: Tensor) -> Tensor:
    r"""``KL(pi_p(.|x) || pi_q(.|x))`` of two diagonal Gaussian policy outputs ``[..., 2A]`` -> ``[...]``."""
    mp, lp = split_policy_output(out_p)
    mq, lq = split_policy_output(out_q)
    return (lq - lp + (torch.exp(2 * lp) + (mp - mq).pow(2)) / (2 * torch.exp(2 * lq)) - 0.5).sum(-1)
