"""The small type the inner update hands to the meta-update: per-task posterior parameters.

GEM's meta-gradient needs only these numbers, never the graph of the inner loop (GEM-BML section 4,
appendix B.5), so a :class:`Posterior` is a plain, detached value that can be saved, moved to another
device or sent to another process.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pyro.distributions as dist
import torch
from torch import Tensor

__all__ = ["Posterior"]


@dataclass(frozen=True)
class Posterior:
    """Gaussian, point-mass or particle posteriors of ``T`` tasks over ``P`` weights.

    Exactly one form is used:
      - mean-field: ``loc [T, P]`` and ``scale [T, P]`` (standard deviations);
      - full covariance: ``loc [T, P]`` and ``scale_tril [T, P, P]`` (Cholesky factor);
      - low rank plus diagonal: ``loc [T, P]``, ``scale [T, P]`` and ``cov_factor [T, P, r]``
        (covariance ``diag(scale^2) + F F^T``, the low-rank guide);
      - point mass (Delta / MAP): ``loc`` only;
      - particles (SVGD, BMAML): ``particles [M, T, P]``, an equally weighted empirical distribution, with
        ``loc`` their mean (build it with :meth:`from_particles`).

    A mean-field posterior from the Gauss-Newton inner update may also carry the *linearised* model's full
    Gaussian posterior ``N(loc, diag(laplace_scale^2) - laplace_factor laplace_factor^T)`` (``laplace_scale
    [T, P]``, ``laplace_factor [T, P, R]``): the guide (``scale``) is what GEM and sampling use, the linearised
    posterior is what the posterior predictive uses (:attr:`has_laplace`).

    A task model with per-task latents beyond the weights (:mod:`hbmeta.models.latents`, e.g. an unknown noise
    scale) carries their posteriors in ``latents``: site name -> mean-field posterior over the site's flattened
    unconstrained values, ``[T, k]``. Everything that acts on the weights' posterior (``sample``, ``distribution``,
    GEM's meta-gradient) ignores them; ``select``, ``cat``, ``to`` and ``detach`` carry them along.
    """

    loc: Tensor
    scale: Tensor | None = None
    scale_tril: Tensor | None = None
    particles: Tensor | None = None
    cov_factor: Tensor | None = None
    laplace_scale: Tensor | None = None
    laplace_factor: Tensor | None = None
    latents: dict[str, "Posterior"] | None = None

    def __post_init__(self) -> None:
        if self.loc.dim() != 2:
            raise ValueError(f"Posterior.loc must be [tasks, params]; got shape {tuple(self.loc.shape)}")
        if self.scale is not None and self.scale_tril is not None:
            raise ValueError("give either scale (mean-field) or scale_tril (full covariance), not both")
        if self.scale is not None and self.scale.shape != self.loc.shape:
            raise ValueError(f"scale {tuple(self.scale.shape)} does not match loc {tuple(self.loc.shape)}")
        if self.scale_tril is not None and self.scale_tril.shape != (*self.loc.shape, self.loc.shape[-1]):
            raise ValueError(f"scale_tril {tuple(self.scale_tril.shape)} must be [T, P, P] for loc {tuple(self.loc.shape)}")
        if self.cov_factor is not None and (self.scale is None or self.cov_factor.dim() != 3
                                            or self.cov_factor.shape[:2] != self.loc.shape):
            raise ValueError(f"cov_factor {tuple(self.cov_factor.shape)} needs scale and must be [T, P, r] for loc "
                             f"{tuple(self.loc.shape)}")
        if (self.laplace_scale is None) != (self.laplace_factor is None) or (
                self.laplace_factor is not None and (self.laplace_scale.shape != self.loc.shape
                                                     or self.laplace_factor.dim() != 3
                                                     or self.laplace_factor.shape[:2] != self.loc.shape)):
            raise ValueError("laplace_scale [T, P] and laplace_factor [T, P, R] go together and must match loc "
                             f"{tuple(self.loc.shape)}")
        if self.particles is not None:
            if self.scale is not None or self.scale_tril is not None:
                raise ValueError("a particle posterior carries no scale / scale_tril: its spread is the particles'")
            if self.particles.dim() != 3 or self.particles.shape[1:] != self.loc.shape or self.particles.shape[0] < 1:
                raise ValueError(f"particles {tuple(self.particles.shape)} must be [M, T, P] for loc {tuple(self.loc.shape)}")

    @classmethod
    def from_particles(cls, particles: Tensor) -> "Posterior":
        """An empirical posterior from ``particles [M, T, P]``; its ``loc`` is the particle mean."""
        if particles.dim() != 3:
            raise ValueError(f"particles must be [M, T, P]; got shape {tuple(particles.shape)}")
        return cls(particles.mean(0), particles=particles)

    @property
    def kind(self) -> str:
        if self.particles is not None:
            return "particles"
        if self.scale_tril is not None:
            return "full"
        if self.cov_factor is not None:
            return "lowrank"
        return "delta" if self.scale is None else "meanfield"

    @property
    def has_laplace(self) -> bool:
        """Whether the linearised model's full posterior is attached (Gauss-Newton inner update, ``laplace=True``)."""
        return self.laplace_factor is not None

    def function_covariance(self, jac: Tensor) -> Tensor:
        r"""Covariance of the linearised outputs ``J (theta - loc)`` per point, ``[T, M, O, O]``, for ``jac [T, M, O, P]``.

        With the linearised posterior attached, :math:`J (\Sigma_0 - U U^\top) J^\top` (correlations kept); for a
        full-covariance or low-rank posterior ``J S J^T``; for a mean-field one ``J diag(variance) J^T``; zero for
        a point mass.
        """
        if self.has_laplace:
            spread = jac * self.laplace_scale[:, None, None, :]
            down = torch.einsum("tmop,tpr->tmor", jac, self.laplace_factor)
            return spread @ spread.transpose(-1, -2) - down @ down.transpose(-1, -2)
        if self.scale_tril is not None:  # full covariance: (J L)(J L)^T
            spread = torch.einsum("tmop,tpq->tmoq", jac, self.scale_tril)
            return spread @ spread.transpose(-1, -2)
        if self.kind == "particles":
            raise ValueError("a particle posterior has no covariance to push through the Jacobian")
        diagonal = self.variance if self.cov_factor is None else self.scale.pow(2)
        spread = jac * diagonal.sqrt()[:, None, None, :]
        covariance = spread @ spread.transpose(-1, -2)
        if self.cov_factor is not None:
            low = torch.einsum("tmop,tpr->tmor", jac, self.cov_factor)
            covariance = covariance + low @ low.transpose(-1, -2)
        return covariance

    @property
    def num_tasks(self) -> int:
        return self.loc.shape[0]

    @property
    def variance(self) -> Tensor:
        """Marginal variances ``[T, P]`` (zeros for a point mass; the particles' spread, divisor M)."""
        if self.particles is not None:
            return self.particles.var(0, unbiased=False)
        if self.scale_tril is not None:
            return self.scale_tril.pow(2).sum(-1)
        if self.scale is None:
            return torch.zeros_like(self.loc)
        if self.cov_factor is not None:
            return self.scale.pow(2) + self.cov_factor.pow(2).sum(-1)
        return self.scale.pow(2)

    @property
    def covariance(self) -> Tensor:
        """Full covariance ``[T, P, P]`` (for particles, their empirical covariance with divisor M)."""
        if self.particles is not None:
            centred = (self.particles - self.loc).transpose(0, 1)  # [T, M, P]
            return centred.transpose(-1, -2) @ centred / self.particles.shape[0]
        if self.scale_tril is not None:
            return self.scale_tril @ self.scale_tril.transpose(-1, -2)
        if self.cov_factor is not None:
            return torch.diag_embed(self.scale.pow(2)) + self.cov_factor @ self.cov_factor.transpose(-1, -2)
        return torch.diag_embed(self.variance)

    def distribution(self) -> dist.TorchDistribution:
        """The posterior as a Pyro distribution with batch shape ``[T]`` and event shape ``[P]``."""
        if self.particles is not None:
            raise NotImplementedError("a particle posterior (BMAML's SVGD) has no density to hand out; "
                                      "use sample() or .particles")
        if self.scale_tril is not None:
            return dist.MultivariateNormal(self.loc, scale_tril=self.scale_tril)
        if self.cov_factor is not None:
            return dist.LowRankMultivariateNormal(self.loc, self.cov_factor, self.scale.pow(2))
        if self.scale is None:
            return dist.Delta(self.loc).to_event(1)
        return dist.Normal(self.loc, self.scale).to_event(1)

    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``[num_samples, T, P]`` weights.

        A particle posterior returns its particles, cycled when ``num_samples`` is not ``M`` (no randomness).
        """
        if self.particles is not None:
            index = torch.arange(num_samples, device=self.particles.device) % self.particles.shape[0]
            return self.particles[index]
        eps = torch.randn((num_samples, *self.loc.shape), generator=generator, device=self.loc.device, dtype=self.loc.dtype)
        if self.scale_tril is not None:
            return self.loc + (self.scale_tril @ eps.unsqueeze(-1)).squeeze(-1)
        if self.scale is None:
            return self.loc.expand(num_samples, *self.loc.shape)
        if self.cov_factor is not None:
            low = torch.randn((num_samples, *self.cov_factor.shape[:1], self.cov_factor.shape[-1]), generator=generator,
                              device=self.loc.device, dtype=self.loc.dtype)
            return self.loc + self.scale * eps + (self.cov_factor @ low.unsqueeze(-1)).squeeze(-1)
        return self.loc + self.scale * eps

    def _map(self, fn, particle_fn=None) -> "Posterior":
        """Apply ``fn`` to every tensor (``particle_fn`` to ``particles``, whose task dimension is 1)."""
        particle_fn = fn if particle_fn is None else particle_fn
        def opt(t):
            return None if t is None else fn(t)
        latents = None if self.latents is None else {n: p._map(fn) for n, p in self.latents.items()}
        return Posterior(fn(self.loc), opt(self.scale), opt(self.scale_tril),
                         None if self.particles is None else particle_fn(self.particles), opt(self.cov_factor),
                         opt(self.laplace_scale), opt(self.laplace_factor), latents)

    def detach(self) -> "Posterior":
        return self._map(lambda t: t.detach())

    def clone(self) -> "Posterior":
        """A detached copy that owns its tensors (a snapshot that later in-place updates of the source leave alone)."""
        return self._map(lambda t: t.detach().clone())

    def to(self, device: torch.device | str) -> "Posterior":
        return self._map(lambda t: t.to(device))

    def select(self, index: int | slice | Tensor) -> "Posterior":
        """The posteriors of a subset of tasks (keeps the task dimension)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return self._map(lambda t: t[index], lambda t: t[:, index])

    @staticmethod
    def cat(parts: list["Posterior"]) -> "Posterior":
        """Concatenate posteriors of disjoint task sets along the task dimension."""
        first = parts[0]
        def cat(attr, dim=0):
            return None if getattr(first, attr) is None else torch.cat([getattr(p, attr) for p in parts], dim)
        latents = None if first.latents is None else {
            n: Posterior.cat([p.latents[n] for p in parts]) for n in first.latents}
        return Posterior(cat("loc"), cat("scale"), cat("scale_tril"), cat("particles", 1), cat("cov_factor"),
                         cat("laplace_scale"), cat("laplace_factor"), latents)

    def with_latents(self, latents: dict[str, "Posterior"] | None) -> "Posterior":
        """This posterior with the per-task latents' posteriors ``latents`` attached (each ``[T, k]``)."""
        if latents:
            for name, part in latents.items():
                if part.loc.shape[0] != self.num_tasks:
                    raise ValueError(f"latent {name!r} has posteriors for {part.loc.shape[0]} tasks; the weights' "
                                     f"for {self.num_tasks}")
        return dataclasses.replace(self, latents=latents or None)
