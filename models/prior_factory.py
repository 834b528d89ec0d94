"""Priors by name: one line to swap the prior over a network's weights.

.. code-block:: python

    prior = make_prior("mixture", net, components=3, scale=0.02)
    learner = MetaLearner(net, likelihood, algorithm="gem-bml+", prior=prior)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from hbmeta.models.functional import BatchedNet
from hbmeta.models.heavy_tailed import LaplacePrior, StudentTPrior
from hbmeta.models.lowrank_prior import LowRankGaussianPrior
from hbmeta.models.mixture_prior import MixtureGaussianPrior
from hbmeta.models.priors import DiagonalGaussianPrior, Prior

__all__ = ["PRIORS", "make_prior"]

#: name -> what it is (the CLI's ``--prior`` choices)
PRIORS: dict[str, str] = {
    "diagonal": "N(mu, diag sigma^2), closed-form GEM (the default)",
    "lowrank": "N(mu, W W^T + diag sigma^2), rank = components, closed-form GEM (Woodbury)",
    "mixture": "sum_k pi_k N(mu_k, diag sigma_k^2), K = components, EM-style closed form or Monte Carlo",
    "laplace": "Laplace(mu, b) per weight, closed-form GEM",
    "studentt": "StudentT(nu=4, mu, b) per weight, Monte-Carlo GEM",
}


def _flat(net_or_vector: nn.Module | BatchedNet | Tensor) -> Tensor:
    if isinstance(net_or_vector, Tensor):
        return net_or_vector.detach()
    if isinstance(net_or_vector, BatchedNet):
        return net_or_vector.initial_vector()
    if isinstance(net_or_vector, nn.Module):
        return torch.cat([p.detach().reshape(-1) for p in net_or_vector.parameters()])
    raise TypeError(f"make_prior needs an nn.Module, a BatchedNet or a flat weight vector; got {type(net_or_vector)}")


def make_prior(name: str, net_or_vector: nn.Module | BatchedNet | Tensor, scale: float = 0.02,
               components: int = 2, max_scale: float | None = 0.1, seed: int = 0, **kw) -> Prior:
    """A prior by name (:data:`PRIORS`) centred at a network's current weights (or a flat vector).

    Args:
        name: ``diagonal``, ``lowrank``, ``mixture``, ``laplace`` or ``studentt``.
        net_or_vector: the network (its weights are the prior mean) or a flat ``[P]`` vector.
        scale: the prior's initial standard deviation per weight (Laplace: ``b = scale / sqrt 2``, the same sd).
        components: mixture components ``K`` or the low-rank factor's rank ``r``.
        max_scale: ceiling on the learned scales (``None``: none).
        seed: seeds the random parts (mixture components' initialisations, the low-rank factor).
        **kw: passed to the prior's constructor (e.g. ``df`` for ``studentt``, ``learn_weights`` for ``mixture``).

    Example:
        >>> from hbmeta.models.functional import mlp
        >>> prior = make_prior("mixture", mlp(), components=3)   # 3 components over the 1,761 weights
        >>> prior.mu.shape, prior.weights.tolist()
        (torch.Size([3, 1761]), [0.3333333432674408, 0.3333333432674408, 0.3333333432674408])
        >>> type(make_prior("studentt", mlp(), df=5.0)).__name__
        'StudentTPrior'
    """
    if not scale > 0:
        raise ValueError(f"prior scale must be > 0; got {scale}")
    if components < 1:
        raise ValueError(f"prior components must be >= 1; got {components}")
    generator = torch.Generator().manual_seed(seed)
    if name == "mixture":
        module = net_or_vector.module if isinstance(net_or_vector, BatchedNet) else net_or_vector
        if isinstance(module, nn.Module):
            return MixtureGaussianPrior.from_module(module, components, scale, generator, max_scale, **kw)
        loc = _flat(module)
        locs = loc + scale * torch.randn((components, loc.numel()), generator=generator, dtype=loc.dtype).to(loc.device)
        return MixtureGaussianPrior(locs, math.log(scale), max_scale=max_scale, **kw)
    loc = _flat(net_or_vector)
    if name == "diagonal":
        return DiagonalGaussianPrior(loc, math.log(scale), max_scale=max_scale, **kw)
    if name == "lowrank":
        return LowRankGaussianPrior(loc, components, math.log(scale), factor_scale=kw.pop("factor_scale", 0.5 * scale),
                                    generator=generator, max_scale=max_scale, **kw)
    if name == "laplace":
        return LaplacePrior(loc, math.log(scale / math.sqrt(2)), max_scale=max_scale, **kw)
    if name == "studentt":
        return StudentTPrior(loc, math.log(scale), max_scale=max_scale, **kw)
    raise ValueError(f"unknown prior {name!r}; choose one of {', '.join(PRIORS)}")
