r"""Per-task variational guides ``q(theta; lambda_tau)``, as swappable objects.

A guide here is functional: it turns a dict of per-task parameter tensors (leading dimension ``T``) into a
Pyro distribution. The inner update owns those tensors and optimises them with any torch optimizer;
the unrolled ELBO-gradient baseline updates them with ``create_graph=True``. Both see the same guide.

Reparameterised draws use noise handed in by the caller (``theta = g(lambda, eps)``, Algorithm 1, VI), so
that every random number comes from an explicit ``torch.Generator``: a batched run over ``T`` tasks is then
exactly ``T`` single-task runs fed the same noise, and a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import Tensor

from hbmeta.models.posterior import Posterior

__all__ = ["Guide", "NoiseNormal", "MeanFieldGuide", "DeltaGuide", "FullCovarianceGuide", "LowRankGuide", "GUIDES", "make_guide"]


class NoiseNormal(dist.Normal):
    """``Normal(loc, scale)`` whose ``rsample`` returns ``loc + scale * noise`` with the given noise."""

    def __init__(self, loc: Tensor, scale: Tensor, noise: Tensor):
        super().__init__(loc, scale, validate_args=False)
        self.noise = noise

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        return NoiseNormal(self.loc.expand(batch_shape), self.scale.expand(batch_shape), self.noise.expand(batch_shape))

    def rsample(self, sample_shape=torch.Size()):
        if sample_shape:
            raise ValueError("a noise-driven guide draws exactly one value per call")
        return self.loc + self.scale * self.noise


class _NoiseMultivariateNormal(dist.MultivariateNormal):
    """``MultivariateNormal`` whose ``rsample`` returns ``loc + L @ noise``."""

    def __init__(self, loc: Tensor, scale_tril: Tensor, noise: Tensor):
        super().__init__(loc, scale_tril=scale_tril, validate_args=False)
        self.noise = noise

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        p = self.event_shape[0]
        return _NoiseMultivariateNormal(self.loc.expand(*batch_shape, p), self._unbroadcasted_scale_tril.expand(*batch_shape, p, p),
                                        self.noise.expand(*batch_shape, p))

    def rsample(self, sample_shape=torch.Size()):
        if sample_shape:
            raise ValueError("a noise-driven guide draws exactly one value per call")
        return self.loc + (self._unbroadcasted_scale_tril @ self.noise.unsqueeze(-1)).squeeze(-1)


class _NoiseLowRankNormal(dist.LowRankMultivariateNormal):
    """``LowRankMultivariateNormal`` whose ``rsample`` is ``loc + scale * noise[:P] + F @ noise[P:]``."""

    def __init__(self, loc: Tensor, cov_factor: Tensor, scale: Tensor, noise: Tensor):
        super().__init__(loc, cov_factor, scale.pow(2), validate_args=False)
        self.diag_scale, self.noise = scale, noise

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        p, r = self.cov_factor.shape[-2:]
        # factor and scale stay unbroadcast: torch then factorises the capacitance once per task, not per draw
        return _NoiseLowRankNormal(self.loc.expand(*batch_shape, p), self._unbroadcasted_cov_factor, self.diag_scale,
                                   self.noise.expand(*batch_shape, p + r))

    def rsample(self, sample_shape=torch.Size()):
        if sample_shape:
            raise ValueError("a noise-driven guide draws exactly one value per call")
        p = self.loc.shape[-1]
        low = (self._unbroadcasted_cov_factor * self.noise[..., p:].unsqueeze(-2)).sum(-1)  # F @ eps, elementwise
        return self.loc + self.diag_scale * self.noise[..., :p] + low


class Guide:
    """Interface of a per-task guide. Parameters are a ``dict[str, Tensor]`` with leading dim ``T``."""

    name: str = "guide"
    #: whether draws need noise (False for a point mass)
    stochastic: bool = True

    def init_params(self, start: Posterior, reference: tuple[Tensor, Tensor] | None = None) -> dict[str, Tensor]:
        """Parameters that represent ``start`` (the prior, or an earlier posterior), as fresh leaf tensors.

        ``reference`` is the diagonal Gaussian ``(loc, scale)`` of the prior inside the ELBO, for guides that
        parametrise themselves relative to it; entries that do not require grad are not optimised.
        """
        raise NotImplementedError

    def distribution(self, params: dict[str, Tensor], noise: Tensor | None) -> dist.TorchDistribution:
        """``q(theta; lambda)`` with event shape ``[P]``; batch ``[S, T]`` when ``noise [S, T, P]`` is given."""
        raise NotImplementedError

    def posterior(self, params: dict[str, Tensor]) -> Posterior:
        """The (possibly still attached) posterior the parameters describe."""
        raise NotImplementedError

    def noise_size(self, num_params: int) -> int:
        """Standard-normal numbers one draw of ``theta`` consumes (the last dim of ``noise``)."""
        return num_params

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class MeanFieldGuide(Guide):
    r"""Per-task diagonal Normal ``q = N(m_tau, diag s_tau^2)``. The default.

    With ``whiten=True`` (default) the parameters are whitened against a reference Gaussian
    ``N(mu_ref, sigma_ref^2)`` - the prior inside the ELBO - as in a non-centred parametrisation:

    .. math:: m = \mu_{ref} + \sigma_{ref}\, z, \qquad s = \sigma_{ref}\, e^{\rho}, \qquad \lambda = (z, \rho)

    It is the same variational family, but in ``(z, rho)`` the KL term has unit curvature whatever the
    prior's scale, and the mean and the scale get gradients of the same size (in ``(m, log s)`` the scale's
    gradient is ~ ``s^2 H``, orders of magnitude below the mean's). Plain SGD on the inner update is then
    stable for ``lr < 2 / (1 + sigma^2 H)`` instead of ``lr < 2 sigma^2``, and posterior variances actually
    shrink where the data are informative. ``whiten=False`` optimises ``(m, log s)`` directly.
    """

    name = "meanfield"

    def __init__(self, whiten: bool = True):
        self.whiten = whiten

    def init_params(self, start: Posterior, reference: tuple[Tensor, Tensor] | None = None) -> dict[str, Tensor]:
        """``reference``: the ``(loc, scale)`` to whiten against (broadcastable to ``[T, P]``)."""
        loc, scale = start.loc.detach(), start.variance.sqrt().clamp_min(1e-8).detach()
        if not self.whiten or reference is None:
            return {"loc": loc.clone().requires_grad_(), "log_scale": scale.log().requires_grad_()}
        ref_loc, ref_scale = (r.detach().expand_as(loc) for r in reference)
        return {"z": ((loc - ref_loc) / ref_scale).requires_grad_(),
                "rho": (scale.log() - ref_scale.log()).requires_grad_(),
                "ref_loc": ref_loc, "ref_scale": ref_scale}

    @staticmethod
    def moments(params: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``(m, log s)`` of the guide, whatever its parametrisation."""
        if "z" in params:
            return params["ref_loc"] + params["ref_scale"] * params["z"], params["ref_scale"].log() + params["rho"]
        return params["loc"], params["log_scale"]

    def distribution(self, params, noise):
        loc, log_scale = self.moments(params)
        scale = log_scale.exp()
        if noise is None:
            return dist.Normal(loc, scale).to_event(1)
        shape = noise.shape[:-1] + loc.shape[-1:]
        return NoiseNormal(loc.expand(shape), scale.expand(shape), noise).to_event(1)

    def posterior(self, params):
        loc, log_scale = self.moments(params)
        return Posterior(loc, log_scale.exp())

    def __repr__(self) -> str:
        return f"MeanFieldGuide(whiten={self.whiten})"


class DeltaGuide(Guide):
    r"""Per-task point mass ``q = delta(theta - m_tau)``: MAP inference (GEM-BML section 3.1)."""

    name = "delta"
    stochastic = False

    def init_params(self, start: Posterior, reference=None) -> dict[str, Tensor]:
        return {"loc": start.loc.detach().clone().requires_grad_()}

    def distribution(self, params, noise):
        loc = params["loc"]
        if noise is not None:
            loc = loc.expand(noise.shape[:-1] + loc.shape[-1:])
        return dist.Delta(loc).to_event(1)

    def posterior(self, params):
        return Posterior(params["loc"])


class FullCovarianceGuide(Guide):
    r"""Per-task full-covariance Normal ``q = N(m_tau, L_tau L_tau^T)`` for small models.

    ``lambda = (m, strictly-lower part of L, log diag L)``; ``P x P`` parameters per task, so only for
    models with a few hundred weights (the linear-regression oracle of appendix C.1).
    """

    name = "fullcov"

    def init_params(self, start: Posterior, reference=None) -> dict[str, Tensor]:
        tril = start.scale_tril if start.scale_tril is not None else torch.diag_embed(start.variance.sqrt())
        diag = torch.diagonal(tril, dim1=-2, dim2=-1).clamp_min(1e-8)
        return {"loc": start.loc.detach().clone().requires_grad_(),
                "tril": torch.tril(tril.detach(), diagonal=-1).clone().requires_grad_(),
                "log_diag": diag.detach().log().requires_grad_()}

    @staticmethod
    def scale_tril(params: dict[str, Tensor]) -> Tensor:
        return torch.tril(params["tril"], diagonal=-1) + torch.diag_embed(params["log_diag"].exp())

    def distribution(self, params, noise):
        loc, tril = params["loc"], self.scale_tril(params)
        if noise is None:
            return dist.MultivariateNormal(loc, scale_tril=tril)
        p = loc.shape[-1]
        shape = noise.shape[:-1]
        return _NoiseMultivariateNormal(loc.expand(*shape, p), tril.expand(*shape, p, p), noise)

    def posterior(self, params):
        return Posterior(params["loc"], scale_tril=self.scale_tril(params))


class LowRankGuide(Guide):
    r"""Per-task low-rank-plus-diagonal Normal ``q = N(m_tau, diag s_tau^2 + F_tau F_tau^T)``, ``F [T, P, r]``.

    Between mean-field (``r = 0``) and full covariance: ``P (r + 2)`` parameters per task, so it scales to
    conv nets while capturing the ``r`` main directions of posterior correlation. Draws use ``P + r``
    standard normals: :math:`\theta = m + s \odot \epsilon_{1:P} + F \epsilon_{P+1:P+r}`. Parametrised like
    the whitened mean-field guide (``m = mu_ref + sigma_ref z``, ``s = sigma_ref e^rho``,
    ``F = sigma_ref * G``) when a reference Gaussian is given. ``G`` starts at ``init_scale * N(0, 1)`` from a
    fixed seed (``F = 0`` would be a stationary point of the expected ELBO in ``F``).

    Args:
        rank: ``r``.
        init_scale: size of the initial factor, in units of the reference scale.
        seed: seed of the initial factor.
    """

    name = "lowrank"

    def __init__(self, rank: int = 2, init_scale: float = 0.01, seed: int = 0):
        if rank < 1:
            raise ValueError(f"LowRankGuide needs rank >= 1; got {rank}")
        self.rank, self.init_scale, self.seed = rank, init_scale, seed

    def noise_size(self, num_params: int) -> int:
        return num_params + self.rank

    def init_params(self, start: Posterior, reference: tuple[Tensor, Tensor] | None = None) -> dict[str, Tensor]:
        loc, scale = start.loc.detach(), start.variance.sqrt().clamp_min(1e-8).detach()
        if reference is None:
            ref_loc, ref_scale = torch.zeros_like(loc), torch.ones_like(loc)
        else:
            ref_loc, ref_scale = (r.detach().expand_as(loc) for r in reference)
        gen = torch.Generator().manual_seed(self.seed)
        factor = self.init_scale * torch.randn((*loc.shape, self.rank), generator=gen, dtype=loc.dtype)
        return {"z": ((loc - ref_loc) / ref_scale).requires_grad_(), "rho": (scale.log() - ref_scale.log()).requires_grad_(),
                "factor": factor.to(loc.device).requires_grad_(), "ref_loc": ref_loc, "ref_scale": ref_scale}

    @staticmethod
    def moments(params: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """``(m, s, F)`` of the guide."""
        ref_scale = params["ref_scale"]
        return (params["ref_loc"] + ref_scale * params["z"], ref_scale * params["rho"].exp(),
                ref_scale.unsqueeze(-1) * params["factor"])

    def distribution(self, params, noise):
        loc, scale, factor = self.moments(params)
        if noise is None:
            return dist.LowRankMultivariateNormal(loc, factor, scale.pow(2))
        shape = noise.shape[:-1]
        p = loc.shape[-1]
        return _NoiseLowRankNormal(loc.expand(*shape, p), factor, scale, noise)

    def posterior(self, params):
        loc, scale, factor = self.moments(params)
        return Posterior(loc, scale, cov_factor=factor)

    def __repr__(self) -> str:
        return f"LowRankGuide(rank={self.rank})"


GUIDES: dict[str, type[Guide]] = {g.name: g for g in (MeanFieldGuide, DeltaGuide, FullCovarianceGuide, LowRankGuide)}


def make_guide(name: str) -> Guide:
    """A guide by name: ``meanfield`` (default), ``delta``, ``fullcov`` or ``lowrank`` (rank 2)."""
    try:
        return GUIDES[name]()
    except KeyError:
        raise ValueError(f"unknown guide {name!r}; choose one of {sorted(GUIDES)}") from None



@torch.distributions.kl.register_kl(dist.MultivariateNormal, torch.distributions.Independent)
def _kl_mvn_diagonal_normal(p: dist.MultivariateNormal, q: torch.distributions.Independent) -> Tensor:
    """Analytic KL( N(m, L L^T) || N(mu, diag sigma^2) ), so full-covariance guides get analytic KL too."""
    if not (isinstance(q.base_dist, torch.distributions.Normal) and q.reinterpreted_batch_ndims == 1):
        raise NotImplementedError
    mu, sigma = q.base_dist.loc, q.base_dist.scale
    tril = p._unbroadcasted_scale_tril
    var_p = tril.pow(2).sum(-1)
    log_det_p = 2 * torch.diagonal(tril, dim1=-2, dim2=-1).log().sum(-1)
    return 0.5 * ((var_p + (p.loc - mu).pow(2)) / sigma.pow(2) - 1 + 2 * sigma.log()).sum(-1) - 0.5 * log_det_p


@torch.distributions.kl.register_kl(dist.LowRankMultivariateNormal, torch.distributions.Independent)
def _kl_lowrank_diagonal_normal(p: dist.LowRankMultivariateNormal, q: torch.distributions.Independent) -> Tensor:
    """Analytic KL( N(m, F F^T + diag s^2) || N(mu, diag sigma^2) ) (matrix determinant lemma for log|Sigma_p|)."""
    if not (isinstance(q.base_dist, torch.distributions.Normal) and q.reinterpreted_batch_ndims == 1):
        raise NotImplementedError
    mu, sigma = q.base_dist.loc, q.base_dist.scale
    factor, diag = p._unbroadcasted_cov_factor, p._unbroadcasted_cov_diag
    var_p = diag + factor.pow(2).sum(-1)
    log_det_p = diag.log().sum(-1) + 2 * torch.diagonal(p._capacitance_tril, dim1=-2, dim2=-1).log().sum(-1)
    return 0.5 * ((var_p + (p.loc - mu).pow(2)) / sigma.pow(2) - 1 + 2 * sigma.log()).sum(-1) - 0.5 * log_det_p
