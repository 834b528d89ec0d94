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

import functools
import math
import random

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Likelihood", "GaussianLikelihood", "CategoricalLikelihood", "EXPECTATION_DRAWS", "standard_draws",
           "gaussian_draws", "psd_factor"]


class Likelihood(nn.Module):
    """Interface of a task likelihood (see the module docstring). Learnable parameters are ``nn.Parameter`` s."""

    #: whether :meth:`pyro_model` runs user code that may sample latent sites (:class:`~hbmeta.models.pyro_likelihood.PyroLikelihood`)
    is_program: bool = False
    #: whether ``log p(y | f)`` is quadratic in ``f`` (Gaussian): its curvature is the same everywhere, so expectations
    #: over the posterior's spread (:meth:`expected_curvature`) equal the values at the mean
    quadratic: bool = False

    def distribution(self, pred: Tensor) -> dist.TorchDistribution:
        raise NotImplementedError

    def condition(self, values: dict[str, Tensor]) -> "Likelihood":
        """This likelihood with per-task latent sites fixed at ``values``; only a Pyro-program likelihood
        (:class:`~hbmeta.models.pyro_likelihood.PyroLikelihood`) samples any, so the others take none."""
        if values:
            raise ValueError(f"{type(self).__name__} samples no latent sites, so it cannot be conditioned on "
                             f"{sorted(values)}; sample per-task latents in a PyroLikelihood program")
        return self

    def select(self, index: Tensor | slice) -> "Likelihood":
        """This likelihood for the tasks ``index`` of a batch: itself, unless it holds per-task values (a Pyro
        program conditioned on each task's latents, :meth:`PyroLikelihood.condition_tasks
        <hbmeta.models.pyro_likelihood.PyroLikelihood.condition_tasks>`)."""
        return self

    def tiled(self, times: int) -> "Likelihood":
        """This likelihood for ``times`` copies of a batch's tasks stacked task-major (``[times * T, ...]``): itself,
        unless it holds per-task values."""
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
        ``[T, N, O, O]``) of its Hessian per point, :math:`H = R R^\top \succeq 0`.

        This default works for any :meth:`log_prob` whose observations are conditionally independent across points
        given ``f`` (a Student-t, a heteroscedastic head, a Pyro program's ``Independent`` of element-wise
        distributions): the gradient is one reverse pass, the Hessian's ``O x O`` block of every point ``O`` more
        (Hessian-vector products with the unit vector of output ``o`` at every point at once). A Hessian need not be
        positive semi-definite (a Student-t far in its tail bends the other way), so each block is projected onto
        the PSD cone (:func:`psd_factor`). The built-in likelihoods override it with their closed forms.
        """
        f = pred.detach().flatten(2).clone().requires_grad_()          # [T, N, O]
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(-self.log_prob(f.reshape(pred.shape), y).sum(), f, create_graph=True)
            outputs = f.shape[-1]
            columns = []
            for o in range(outputs):
                unit = torch.zeros_like(f)
                unit[..., o] = 1.0
                (column,) = torch.autograd.grad(grad, f, unit, retain_graph=o < outputs - 1, allow_unused=True)
                columns.append(torch.zeros_like(f) if column is None else column)
        hess = torch.stack(columns, -1)                                   # [T, N, O, O]
        return grad.detach().flatten(2), psd_factor(0.5 * (hess + hess.transpose(-1, -2)).detach())

    def expected_curvature(self, pred: Tensor, draws: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        r""":meth:`curvature` averaged over the outputs ``f = pred + draws`` (``draws [K, T, N, O]``: draws of the
        posterior's spread in function space, :func:`gaussian_draws`): :math:`\mathbb{E}_q[g]` and a factor of
        :math:`\mathbb{E}_q[H]`, what the Bayesian learning rule's Gaussian VI step takes where the Gauss-Newton step
        takes ``g`` and ``H`` at the mean. A likelihood quadratic in ``f`` (:attr:`quadratic`) has the same ``g`` on
        average and the same ``H`` everywhere, so it takes :meth:`curvature` at ``pred``."""
        if self.quadratic:
            return self.curvature(pred, y)
        num_draws, num_tasks = draws.shape[0], pred.shape[0]
        f = (pred.reshape(draws.shape[1:]).unsqueeze(0) + draws).reshape(num_draws * num_tasks, *pred.shape[1:])
        grad, factor = self.tiled(num_draws).curvature(
            f, y.unsqueeze(0).expand(num_draws, *y.shape).reshape(-1, *y.shape[1:]))
        factor = factor.expand(*grad.shape, grad.shape[-1])
        hess = (factor @ factor.transpose(-1, -2)).unflatten(0, (num_draws, num_tasks)).mean(0)
        return grad.unflatten(0, (num_draws, num_tasks)).mean(0), psd_factor(hess)

    def expected_log_prob(self, mean: Tensor, cov: Tensor, y: Tensor) -> Tensor:
        r""":math:`\mathbb{E}_{f \sim N(\mathrm{mean}, \mathrm{cov})} \log p(y \mid f)` per task ``[T]``, summed over points.

        ``mean [T, N, ...]`` (the network's output shape), ``cov [T, N, O, O]``. A quasi-Monte-Carlo average over
        :data:`EXPECTATION_DRAWS` fixed draws (:func:`gaussian_draws`: deterministic, and the same draws at every call,
        so that differences and gradients are smooth); differentiable in ``mean`` and in the likelihood's parameters.
        A likelihood quadratic in ``f`` overrides it with its closed form.
        """
        draws = gaussian_draws(cov.detach(), EXPECTATION_DRAWS)          # [K, T, N, O]
        f = mean.reshape(draws.shape[1:]).unsqueeze(0) + draws
        return self.log_prob(f.reshape(EXPECTATION_DRAWS, *mean.shape), y).mean(0)

    def forward(self, mean: Tensor, cov: Tensor, y: Tensor) -> Tensor:
        """:meth:`expected_log_prob` (so that ``torch.func.functional_call`` can take per-task gradients of it)."""
        return self.expected_log_prob(mean, cov, y)

    @property
    def has_curvature(self) -> bool:
        """Whether :meth:`curvature` applies: every likelihood's ``log p(y | f)`` has one (:meth:`curvature`'s default
        takes it by autograd); a Pyro program's with per-task latents needs their values, which the inner update
        fits beside the weights."""
        return True

    @property
    def learnable(self) -> bool:
        """Whether the likelihood has parameters to meta-learn."""
        return any(p.requires_grad for p in self.parameters())

    def check_targets(self, y: Tensor, x: Tensor) -> None:
        """Raise a clear error if targets ``y`` cannot belong to inputs ``x`` ([T, N, ...] each)."""
        if y.shape[:2] != x.shape[:2]:
            raise ValueError(f"targets {tuple(y.shape)} and inputs {tuple(x.shape)} disagree on [tasks, points]")


#: quasi-Monte-Carlo draws per point of :meth:`Likelihood.expected_log_prob` and of the Gauss-Newton VI's expected curvature
EXPECTATION_DRAWS = 64


def standard_draws(num_draws: int, dim: int, dtype: torch.dtype = torch.float32,
                   device: torch.device | str | None = None) -> Tensor:
    """``[num_draws, dim]`` fixed standard-normal points: the same at every call (common random numbers, so that
    differences and gradients of averages over them are smooth), in antithetic pairs (for an even ``num_draws`` their
    mean is exactly zero: averages of a linear function are exact, of a quadratic one unbiased). They come from
    Python's own seeded generator, not torch's, so no random stream is read and they can be made inside
    ``torch.func`` transforms."""
    half = _fixed_normals((num_draws + 1) // 2, dim)
    points = torch.tensor(half, dtype=torch.float64)
    return torch.cat([points, -points])[:num_draws].to(dtype=dtype, device=device)


@functools.lru_cache(maxsize=32)
def _fixed_normals(count: int, dim: int) -> tuple[tuple[float, ...], ...]:
    stream = random.Random(0)
    return tuple(tuple(stream.gauss(0.0, 1.0) for _ in range(dim)) for _ in range(count))


def gaussian_draws(cov: Tensor, num_draws: int) -> Tensor:
    """``[K, *batch, O]`` draws of ``N(0, cov)`` for ``cov [*batch, O, O]``: :func:`standard_draws` through a Cholesky
    factor (with a jitter of ``1e-9`` of the mean variance, for singular covariances)."""
    size = cov.shape[-1]
    eye = torch.eye(size, dtype=cov.dtype, device=cov.device)
    jitter = 1e-9 * cov.diagonal(dim1=-2, dim2=-1).mean().clamp_min(1e-12)
    chol = torch.linalg.cholesky(cov + jitter * eye)
    eps = standard_draws(num_draws, size, cov.dtype, cov.device)                 # [K, O]
    return torch.einsum("...oq,kq->k...o", chol, eps)


def psd_factor(hess: Tensor) -> Tensor:
    r"""``R`` with :math:`R R^\top` the projection of the symmetric ``hess [..., O, O]`` onto the PSD cone (eigenvalues
    clipped at zero, then floored at ``1e-12``); one number per point (``O = 1``) is its square root. The
    eigendecomposition runs in double precision: a saturated softmax's Hessian has subnormal single-precision
    entries, on which single precision's ``eigh`` returns NaN (measured on Omniglot)."""
    if hess.shape[-1] == 1:
        return hess.clamp(min=1e-12).sqrt()
    values, vectors = torch.linalg.eigh(hess.double())  # single precision's eigh returns NaN on subnormal entries
    return (vectors * values.clamp(min=1e-12).sqrt().unsqueeze(-2)).to(hess.dtype)


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

    quadratic = True

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

    def probs(self, pred: Tensor) -> Tensor:
        """Class probabilities ``softmax(pred / T)`` of the outputs ``pred [..., classes]``."""
        return torch.softmax(self._logits(pred), dim=-1)

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

    def check_targets(self, y: Tensor, x: Tensor) -> None:
        super().check_targets(y, x)
        if y.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"class labels must be integers; got {y.dtype}")

    def __repr__(self) -> str:
        learned = ", learned" if self.learnable else ""
        return f"CategoricalLikelihood(temperature={self.temperature:.4g}{learned})"
