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

from models.posterior import Posterior

__all__ = ["Guide", "MeanFieldGuide", "DeltaGuide", "FullCovarianceGuide", "GUIDES", "make_guide"]


class _NoiseNormal(dist.Normal):
    """``Normal(loc, scale)`` whose ``rsample`` returns ``loc + scale * noise`` with the given noise."""

    def __init__(self, loc: Tensor, scale: Tensor, noise: Tensor):
        super().__init__(loc, scale, validate_args=False)
        self.noise = noise

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        return _NoiseNormal(self.loc.expand(batch_shape), self.scale.expand(batch_shape), self.noise.expand(batch_shape))

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
        return _NoiseNormal(loc.expand(shape), scale.expand(shape), noise).to_event(1)

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


GUIDES: dict[str, type[Guide]] = {g.name: g for g in (MeanFieldGuide, DeltaGuide, FullCovarianceGuide)}


def make_guide(name: str) -> Guide:
    """A guide by name: ``meanfield`` (default), ``delta`` or ``fullcov``."""
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
