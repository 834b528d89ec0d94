r"""Task likelihoods ``p(D | theta) = exp(-loss)`` (GEM-BML section 2.2).

Each likelihood maps network outputs ``pred [*S, T, N, ...]`` and targets to

- a Pyro distribution whose event covers a task's points (so its batch shape is ``[*S, T]``),
- ``log_prob(pred, y) -> [*S, T]``, summed over a task's points,
- ``point_loss(pred, y) -> [*S, T]``, the conventional per-point loss averaged over points (MSE, cross
  entropy) that the MAML-family baselines minimise, as in their papers,
- ``curvature(pred, y)``: the gradient and Gauss-Newton Hessian in the outputs (the Gauss-Newton inner update),
- ``expected_log_prob(mean, cov, y)``: :math:`\mathbb{E}\, \log p(y \mid f)` for Gaussian outputs
  ``f ~ N(mean, cov)`` to second order (exact for the Gaussian likelihood), which with the linearised posterior
  of the weights gives the GEM gradient of the likelihood's own parameters (:mod:`hbmeta.inference.gem`).

A likelihood is an ``nn.Module``: a learned noise scale or temperature (``learn_scale=True``) is an
``nn.Parameter`` that GEM-BML(+) meta-learns with the prior (Fisher's identity,
:math:`\nabla_\phi \log p(D; \Theta, \phi) = \mathbb{E}_{p(\theta \mid D)} \nabla_\phi \log p(D \mid \theta; \phi)`).
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Likelihood", "GaussianLikelihood", "CategoricalLikelihood"]


class Likelihood(nn.Module):
    """Interface of a task likelihood (see the module docstring). Learnable parameters are ``nn.Parameter`` s."""

    #: whether :meth:`pyro_model` runs user code that may sample latent sites (:class:`~hbmeta.models.pyro_likelihood.PyroLikelihood`)
    is_program: bool = False

    def distribution(self, pred: Tensor) -> dist.TorchDistribution:
        raise NotImplementedError

    def condition(self, values: dict[str, Tensor]) -> "Likelihood":
        """This likelihood with per-task latent sites fixed at ``values``; only a Pyro-program likelihood
        (:class:`~hbmeta.models.pyro_likelihood.PyroLikelihood`) samples any, so the others take none."""
        if values:
            raise ValueError(f"{type(self).__name__} samples no latent sites, so it cannot be conditioned on "
                             f"{sorted(values)}; sample per-task latents in a PyroLikelihood program")
        return self

    def pyro_model(self, pred: Tensor, y: Tensor | None) -> None:
        """The observation model as Pyro statements (inside the tasks plate): samples the site ``"obs"``."""
        pyro.sample("obs", self.distribution(pred), obs=y)

    def sample(self, pred: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Observations ``y ~ p(y | f = pred)``, one per entry of ``pred``'s batch (a posterior predictive draw).

        The default samples :meth:`distribution` (torch's global random stream); the built-in likelihoods draw from
        ``generator``.
        """
        return self.distribution(pred).sample()

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

    def expected_log_prob(self, mean: Tensor, cov: Tensor, y: Tensor) -> Tensor:
        r""":math:`\mathbb{E}_{f \sim N(\mathrm{mean}, \mathrm{cov})} \log p(y \mid f)` per task ``[T]``, to second order:
        :math:`\log p(y \mid \bar f) - \tfrac12 \mathrm{tr}(H(\bar f)\, \Sigma_f)` summed over points.

        ``mean [T, N, ...]`` (the network's output shape), ``cov [T, N, O, O]``. Differentiable in the likelihood's
        parameters. Uses :meth:`curvature`'s Gauss-Newton Hessian.
        """
        _, factor = self.curvature(mean, y)
        factor = factor.expand(*cov.shape)
        hess = factor @ factor.transpose(-1, -2)
        return self.log_prob(mean, y) - 0.5 * (hess * cov).sum((-1, -2)).sum(-1)

    def forward(self, mean: Tensor, cov: Tensor, y: Tensor) -> Tensor:
        """:meth:`expected_log_prob` (so that ``torch.func.functional_call`` can take per-task gradients of it)."""
        return self.expected_log_prob(mean, cov, y)

    @property
    def has_curvature(self) -> bool:
        """Whether :meth:`curvature` is implemented (the Gauss-Newton inner update needs it)."""
        return type(self).curvature is not Likelihood.curvature

    @property
    def learnable(self) -> bool:
        """Whether the likelihood has parameters to meta-learn."""
        return any(p.requires_grad for p in self.parameters())

    def check_targets(self, y: Tensor, x: Tensor) -> None:
        """Raise a clear error if targets ``y`` cannot belong to inputs ``x`` ([T, N, ...] each)."""
        if y.shape[:2] != x.shape[:2]:
            raise ValueError(f"targets {tuple(y.shape)} and inputs {tuple(x.shape)} disagree on [tasks, points]")


def _positive(name: str, value: float) -> float:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive number; got {value!r}")
    return float(value)


class GaussianLikelihood(Likelihood):
    r"""``y ~ N(f(x; theta), s^2)`` independently per point and output.

    ``s = noise_scale``, fixed (the default) or, with ``learn_scale=True``, meta-learned as ``log s`` by GEM
    (:attr:`log_noise`). The log-likelihood is summed over a task's points, so the data term of the ELBO grows with
    K while the KL to the prior does not. ``point_loss`` is the mean squared error, the loss the paper's baselines
    use (appendix C.4.1).
    """

    def __init__(self, noise_scale: float = 0.1, learn_scale: bool = False):
        super().__init__()
        log_noise = torch.tensor(math.log(_positive("noise_scale", noise_scale)), dtype=torch.float64)
        if learn_scale:
            self.log_noise = nn.Parameter(log_noise.float())
        else:  # a fixed scale keeps its exact value (float64; cast to the data's dtype where used)
            self.register_buffer("log_noise", log_noise)

    @property
    def noise_scale(self) -> float:
        """The current noise sd ``s`` as a number (read it again after meta-steps when it is learned)."""
        return float(self.log_noise.detach().exp())

    def _scale(self) -> Tensor:
        return self.log_noise.exp()

    def distribution(self, pred: Tensor) -> dist.TorchDistribution:
        return dist.Normal(pred, self._scale().to(pred), validate_args=False).to_event(2)

    def sample(self, pred: Tensor, generator: torch.Generator | None = None) -> Tensor:
        noise = torch.randn(pred.shape, generator=generator, device=pred.device, dtype=pred.dtype)
        return pred + self._scale().to(pred) * noise

    @staticmethod
    def _check_outputs(pred: Tensor, y: Tensor) -> None:
        if pred.shape[-2:] != y.shape[-2:]:
            raise ValueError(f"the network gives {tuple(pred.shape[-2:])} (points, outputs) per task but the targets are "
                             f"{tuple(y.shape[-2:])}: its output layer must have {y.shape[-1]} output(s) for these targets")

    def log_prob(self, pred: Tensor, y: Tensor) -> Tensor:
        """The same value as ``distribution(pred).log_prob(y)``, without building a distribution object."""
        self._check_outputs(pred, y)
        log_s = self.log_noise.to(pred)
        z = (y - pred) / log_s.exp()
        return (-0.5 * z.square()).flatten(-2).sum(-1) - y.shape[-2] * y.shape[-1] * (log_s + 0.5 * math.log(2 * math.pi))

    def point_loss(self, pred: Tensor, y: Tensor) -> Tensor:
        self._check_outputs(pred, y)
        return (pred - y).pow(2).flatten(-2).mean(-1)

    def curvature(self, pred: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """``(f - y) / s^2`` and ``R = I / s`` (the Hessian ``I / s^2`` is exact: the loss is quadratic in ``f``)."""
        scale = self.noise_scale
        grad = ((pred - y) / scale ** 2).flatten(2)
        outputs = grad.shape[-1]
        if outputs == 1:  # one number for every point
            return grad, torch.full((1, 1, 1, 1), 1.0 / scale, dtype=pred.dtype, device=pred.device)
        eye = torch.eye(outputs, dtype=pred.dtype, device=pred.device) / scale
        return grad, eye.expand(*grad.shape, outputs)

    def expected_log_prob(self, mean: Tensor, cov: Tensor, y: Tensor) -> Tensor:
        r"""Exact: :math:`-\tfrac{1}{2 s^2}\big(\lVert y - \bar f\rVert^2 + \mathrm{tr}\, \Sigma_f\big) - N O \log(s \sqrt{2\pi})`."""
        trace = cov.diagonal(dim1=-2, dim2=-1).sum((-1, -2))
        return self.log_prob(mean, y) - 0.5 * trace / self._scale().to(mean).pow(2)

    def __repr__(self) -> str:
        learned = ", learned" if self.learnable else ""
        return f"GaussianLikelihood(noise_scale={self.noise_scale:.4g}{learned})"


class CategoricalLikelihood(Likelihood):
    r"""``y ~ Categorical(softmax(f(x; theta) / T))`` per point; ``point_loss`` is the mean cross entropy.

    ``T = temperature`` (1 by default), fixed or, with ``learn_scale=True``, meta-learned as ``log T`` by GEM
    (:attr:`log_temperature`).
    """

    def __init__(self, temperature: float = 1.0, learn_scale: bool = False):
        super().__init__()
        log_t = torch.tensor(math.log(_positive("temperature", temperature)), dtype=torch.float64)
        if learn_scale:
            self.log_temperature = nn.Parameter(log_t.float())
        else:
            self.register_buffer("log_temperature", log_t)

    @property
    def temperature(self) -> float:
        return float(self.log_temperature.detach().exp())

    def _logits(self, pred: Tensor) -> Tensor:
        if not self.log_temperature.requires_grad and float(self.log_temperature) == 0.0:
            return pred
        return pred / self.log_temperature.exp().to(pred)

    def distribution(self, pred: Tensor) -> dist.TorchDistribution:
        return dist.Categorical(logits=self._logits(pred), validate_args=False).to_event(1)

    def sample(self, pred: Tensor, generator: torch.Generator | None = None) -> Tensor:
        probs = torch.softmax(self._logits(pred), dim=-1)
        flat = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator)
        return flat.reshape(probs.shape[:-1])

    def point_loss(self, pred: Tensor, y: Tensor) -> Tensor:
        logp = F.log_softmax(self._logits(pred), dim=-1)
        return -logp.gather(-1, y.expand(pred.shape[:-1]).unsqueeze(-1)).squeeze(-1).mean(-1)

    def curvature(self, pred: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        r"""``(p - onehot(y)) / T`` and :math:`R = (\mathrm{diag}(\sqrt p) - p \sqrt p^\top) / T`, so that
        :math:`R R^\top = (\mathrm{diag}(p) - p p^\top) / T^2`, the Hessian of the cross entropy in ``f``."""
        temperature = self.temperature
        prob = torch.softmax(pred.detach() / temperature, dim=-1)
        grad = (prob - F.one_hot(y, pred.shape[-1]).to(prob.dtype)) / temperature
        root = prob.sqrt()
        return grad, (torch.diag_embed(root) - prob.unsqueeze(-1) * root.unsqueeze(-2)) / temperature

    def expected_log_prob(self, mean: Tensor, cov: Tensor, y: Tensor) -> Tensor:
        """Second order, with the softmax Hessian at ``mean / T`` differentiable in ``T``."""
        prob = torch.softmax(self._logits(mean), dim=-1)
        hess = (torch.diag_embed(prob) - prob.unsqueeze(-1) * prob.unsqueeze(-2)) / self.log_temperature.exp().to(mean) ** 2
        return self.log_prob(mean, y) - 0.5 * (hess * cov).sum((-1, -2)).sum(-1)

    def check_targets(self, y: Tensor, x: Tensor) -> None:
        super().check_targets(y, x)
        if y.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"class labels must be integers; got {y.dtype}")

    def __repr__(self) -> str:
        learned = ", learned" if self.learnable else ""
        return f"CategoricalLikelihood(temperature={self.temperature:.4g}{learned})"
