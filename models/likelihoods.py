r"""Task likelihoods ``p(D | theta) = exp(-loss)`` (GEM-BML section 2.2).

Each likelihood maps network outputs ``pred [*S, T, N, ...]`` and targets to

- a Pyro distribution whose event covers a task's points (so its batch shape is ``[*S, T]``),
- ``log_prob(pred, y) -> [*S, T]``, summed over a task's points,
- ``point_loss(pred, y) -> [*S, T]``, the conventional per-point loss averaged over points (MSE, cross
  entropy) that the MAML-family baselines minimise, as in their papers.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Likelihood", "GaussianLikelihood", "CategoricalLikelihood"]


class Likelihood:
    def distribution(self, pred: Tensor) -> dist.TorchDistribution:
        raise NotImplementedError

    def log_prob(self, pred: Tensor, y: Tensor) -> Tensor:
        return self.distribution(pred).log_prob(y)

    def point_loss(self, pred: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError

    def curvature(self, pred: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        r"""What the Gauss-Newton inner update needs of ``-log p(y | f)`` at ``f = pred [T, N, ...]``.

        Returns its gradient in ``f``, ``[T, N, O]`` (output dims flattened), and a factor ``R`` (broadcastable to
        ``[T, N, O, O]``) of its Gauss-Newton Hessian per point, :math:`H = R R^\top \succeq 0`.
        """
        raise NotImplementedError(f"{type(self).__name__} has no Gauss-Newton curvature; use the SVI inner update "
                                  f"(InnerConfig(method='svi'))")

    @property
    def has_curvature(self) -> bool:
        """Whether :meth:`curvature` is implemented (the Gauss-Newton inner update needs it)."""
        return type(self).curvature is not Likelihood.curvature

    def check_targets(self, y: Tensor, x: Tensor) -> None:
        """Raise a clear error if targets ``y`` cannot belong to inputs ``x`` ([T, N, ...] each)."""
        if y.shape[:2] != x.shape[:2]:
            raise ValueError(f"targets {tuple(y.shape)} and inputs {tuple(x.shape)} disagree on [tasks, points]")


class GaussianLikelihood(Likelihood):
    r"""``y ~ N(f(x; theta), noise_scale^2)`` independently per point and output.

    Observation-noise choice: a fixed, stated ``noise_scale`` (not learned). The log-likelihood is summed
    over a task's points, so the data term of the ELBO grows with K while the KL to the prior does not.
    ``point_loss`` is the mean squared error, the loss the paper's baselines use (appendix C.4.1).
    """

    def __init__(self, noise_scale: float = 0.1):
        if not noise_scale > 0:
            raise ValueError(f"noise_scale must be positive; got {noise_scale}")
        self.noise_scale = float(noise_scale)

    def distribution(self, pred: Tensor) -> dist.TorchDistribution:
        return dist.Normal(pred, self.noise_scale, validate_args=False).to_event(2)

    def log_prob(self, pred: Tensor, y: Tensor) -> Tensor:
        """The same value as ``distribution(pred).log_prob(y)``, without building a distribution object."""
        z = (y - pred) / self.noise_scale
        return (-0.5 * z.pow(2)).flatten(-2).sum(-1) - y.shape[-2] * y.shape[-1] * (
            math.log(self.noise_scale) + 0.5 * math.log(2 * math.pi))

    def point_loss(self, pred: Tensor, y: Tensor) -> Tensor:
        return (pred - y).pow(2).flatten(-2).mean(-1)

    def curvature(self, pred: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """``(f - y) / s^2`` and ``R = I / s`` (the Hessian ``I / s^2`` is exact: the loss is quadratic in ``f``)."""
        var = self.noise_scale ** 2
        grad = ((pred - y) / var).flatten(2)
        outputs = grad.shape[-1]
        if outputs == 1:  # one number for every point
            return grad, torch.full((1, 1, 1, 1), 1.0 / self.noise_scale, dtype=pred.dtype, device=pred.device)
        eye = torch.eye(outputs, dtype=pred.dtype, device=pred.device) / self.noise_scale
        return grad, eye.expand(*grad.shape, outputs)

    def __repr__(self) -> str:
        return f"GaussianLikelihood(noise_scale={self.noise_scale})"


class CategoricalLikelihood(Likelihood):
    """``y ~ Categorical(softmax(f(x; theta)))`` per point; ``point_loss`` is the mean cross entropy."""

    def distribution(self, pred: Tensor) -> dist.TorchDistribution:
        return dist.Categorical(logits=pred, validate_args=False).to_event(1)

    def point_loss(self, pred: Tensor, y: Tensor) -> Tensor:
        logp = F.log_softmax(pred, dim=-1)
        return -logp.gather(-1, y.expand(pred.shape[:-1]).unsqueeze(-1)).squeeze(-1).mean(-1)

    def curvature(self, pred: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        r"""``p - onehot(y)`` and :math:`R = \mathrm{diag}(\sqrt p) - p \sqrt p^\top`, so that
        :math:`R R^\top = \mathrm{diag}(p) - p p^\top`, the Hessian of the cross entropy in the logits."""
        prob = torch.softmax(pred, dim=-1)
        grad = prob - F.one_hot(y, pred.shape[-1]).to(prob.dtype)
        root = prob.sqrt()
        return grad, torch.diag_embed(root) - prob.unsqueeze(-1) * root.unsqueeze(-2)

    def check_targets(self, y: Tensor, x: Tensor) -> None:
        super().check_targets(y, x)
        if y.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"class labels must be integers; got {y.dtype}")

    def __repr__(self) -> str:
        return "CategoricalLikelihood()"
