"""The small type the inner update hands to the meta-update: per-task posterior parameters.

GEM's meta-gradient needs only these numbers, never the graph of the inner loop (GEM-BML section 4,
appendix B.5), so a :class:`Posterior` is a plain, detached value that can be saved, moved to another
device or sent to another process.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyro.distributions as dist
import torch
from torch import Tensor

__all__ = ["Posterior"]


@dataclass(frozen=True)
class Posterior:
    """Gaussian (or point-mass) posteriors of ``T`` tasks over ``P`` weights.

    Exactly one form is used:
      - mean-field: ``loc [T, P]`` and ``scale [T, P]`` (standard deviations);
      - full covariance: ``loc [T, P]`` and ``scale_tril [T, P, P]`` (Cholesky factor);
      - point mass (Delta / MAP): ``loc`` only.
    """

    loc: Tensor
    scale: Tensor | None = None
    scale_tril: Tensor | None = None

    def __post_init__(self) -> None:
        if self.loc.dim() != 2:
            raise ValueError(f"Posterior.loc must be [tasks, params]; got shape {tuple(self.loc.shape)}")
        if self.scale is not None and self.scale_tril is not None:
            raise ValueError("give either scale (mean-field) or scale_tril (full covariance), not both")
        if self.scale is not None and self.scale.shape != self.loc.shape:
            raise ValueError(f"scale {tuple(self.scale.shape)} does not match loc {tuple(self.loc.shape)}")
        if self.scale_tril is not None and self.scale_tril.shape != (*self.loc.shape, self.loc.shape[-1]):
            raise ValueError(f"scale_tril {tuple(self.scale_tril.shape)} must be [T, P, P] for loc {tuple(self.loc.shape)}")

    @property
    def kind(self) -> str:
        if self.scale_tril is not None:
            return "full"
        return "delta" if self.scale is None else "meanfield"

    @property
    def num_tasks(self) -> int:
        return self.loc.shape[0]

    @property
    def variance(self) -> Tensor:
        """Marginal variances ``[T, P]`` (zeros for a point mass)."""
        if self.scale_tril is not None:
            return self.scale_tril.pow(2).sum(-1)
        if self.scale is None:
            return torch.zeros_like(self.loc)
        return self.scale.pow(2)

    @property
    def covariance(self) -> Tensor:
        """Full covariance ``[T, P, P]``."""
        if self.scale_tril is not None:
            return self.scale_tril @ self.scale_tril.transpose(-1, -2)
        return torch.diag_embed(self.variance)

    def distribution(self) -> dist.TorchDistribution:
        """The posterior as a Pyro distribution with batch shape ``[T]`` and event shape ``[P]``."""
        if self.scale_tril is not None:
            return dist.MultivariateNormal(self.loc, scale_tril=self.scale_tril)
        if self.scale is None:
            return dist.Delta(self.loc).to_event(1)
        return dist.Normal(self.loc, self.scale).to_event(1)

    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``[num_samples, T, P]`` weights."""
        eps = torch.randn((num_samples, *self.loc.shape), generator=generator, device=self.loc.device, dtype=self.loc.dtype)
        if self.scale_tril is not None:
            return self.loc + (self.scale_tril @ eps.unsqueeze(-1)).squeeze(-1)
        if self.scale is None:
            return self.loc.expand(num_samples, *self.loc.shape)
        return self.loc + self.scale * eps

    def _map(self, fn) -> "Posterior":
        return Posterior(fn(self.loc), None if self.scale is None else fn(self.scale),
                         None if self.scale_tril is None else fn(self.scale_tril))

    def detach(self) -> "Posterior":
        return self._map(lambda t: t.detach())

    def to(self, device: torch.device | str) -> "Posterior":
        return self._map(lambda t: t.to(device))

    def select(self, index: int | slice | Tensor) -> "Posterior":
        """The posteriors of a subset of tasks (keeps the task dimension)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return self._map(lambda t: t[index])

    @staticmethod
    def cat(parts: list["Posterior"]) -> "Posterior":
        """Concatenate posteriors of disjoint task sets along the task dimension."""
        first = parts[0]
        def cat(attr):
            return None if getattr(first, attr) is None else torch.cat([getattr(p, attr) for p in parts])
        return Posterior(cat("loc"), cat("scale"), cat("scale_tril"))
