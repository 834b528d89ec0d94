r"""The posterior predictive at query inputs: draws of the network's output ``f`` and of the observations ``y``.

:meth:`hbmeta.inference.learner.MetaLearner.predict` returns a :class:`PosteriorPredictive`. Like Pyro's
:class:`pyro.infer.Predictive` it holds samples by site, ``[S, T, N, ...]`` (draws, tasks, query points):

- ``"f"``: the network's output under the adapted posterior, :math:`f(x; \theta_s)` with :math:`\theta_s \sim q`
  (after Gauss-Newton VI the linearised model's Gaussian draws);
- ``"obs"``: observations through the likelihood, :math:`y_s \sim p(y \mid f_s)` (Gaussian noise, a class label),
  drawn the first time they are asked for;
- one site per per-task latent of the model besides the weights (:mod:`hbmeta.models.latents`, e.g. ``"s"``, a
  noise scale): ``[S, T, *event]`` draws of its posterior, with which ``obs`` is drawn, :math:`y_s \sim p(y \mid
  f_s, z_s)`, and which :attr:`PosteriorPredictive.likelihood` is conditioned on.

``mean`` and ``std`` are those of ``f`` (the epistemic part); :meth:`site_mean`, :meth:`site_std` and
:meth:`quantiles` read any site, so ``quantiles((0.05, 0.95))`` is a 90% band for new observations.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

from hbmeta.models.likelihoods import Likelihood

__all__ = ["PosteriorPredictive"]


def _derived_seed(generator: torch.Generator) -> int:
    """A seed read off ``generator``'s state without drawing from it (so callers' random streams are unchanged)."""
    return int.from_bytes(hashlib.blake2b(generator.get_state().numpy().tobytes(), digest_size=8).digest(), "little") >> 1


class PosteriorPredictive:
    """Posterior predictive draws by site (``"f"``, ``"obs"``), with their mean, spread and quantiles.

    Attributes:
        mean: ``[T, N, out]`` mean of ``f`` (the linearised predictive's exact mean after Gauss-Newton VI).
        std: ``[T, N, out]`` spread of ``f`` over the posterior (epistemic).
        samples: ``[S, T, N, out]`` draws of ``f`` (as ``sites["f"]``).
        cov: ``[T, N, O, O]`` covariance of ``f`` per point where the predictive is Gaussian in function space (the
            linearised one after Gauss-Newton VI), else ``None``.
    """

    def __init__(self, mean: Tensor, std: Tensor, samples: Tensor, likelihood: Likelihood, num_samples: int,
                 generator: torch.Generator | None = None, latents: dict[str, Tensor] | None = None,
                 cov: Tensor | None = None) -> None:
        self.mean, self.std, self.samples, self.cov = mean, std, samples, cov
        self.latents = latents or {}
        if self.latents:
            likelihood = likelihood.condition(self.latents)
        self._likelihood, self._num_samples = likelihood, num_samples
        self._seed = None if generator is None else _derived_seed(generator)
        self._observed: Tensor | None = None

    def with_latents(self, latents: dict[str, Tensor]) -> "PosteriorPredictive":
        """This predictive with draws of per-task latents added as sites (``obs`` is then drawn given them)."""
        if not latents:
            return self
        return PosteriorPredictive(self.mean, self.std, self.samples, self._likelihood, self._num_samples, None,
                                   latents, self.cov)._seeded(self._seed)

    def _seeded(self, seed: int | None) -> "PosteriorPredictive":
        self._seed = seed
        return self

    @property
    def observed(self) -> Tensor:
        """``[S, T, N, ...]`` draws of the observations, ``y_s ~ p(y | f_s)``; a point or particle posterior's ``f``
        draws are reused in turn, so there are always ``num_samples`` of them."""
        if self._observed is None:
            f = self.samples
            if f.shape[0] != self._num_samples:
                f = f[torch.arange(self._num_samples, device=f.device) % f.shape[0]]
            generator = None
            if self._seed is not None:
                generator = torch.Generator(device=f.device).manual_seed(self._seed)
            self._observed = self._likelihood.sample(f, generator)
        return self._observed

    @property
    def likelihood(self) -> Likelihood:
        """The observation model the draws of ``obs`` come from: the learner's, conditioned on the draws of the
        per-task latents where the model has any (so ``likelihood.log_prob(samples, y)`` is ``log p(y | f_s, z_s)``)."""
        return self._likelihood

    @property
    def sites(self) -> dict[str, Tensor]:
        """``{"f": samples, "obs": observed, **latents}``, each ``[S, T, ...]`` (Pyro ``Predictive``'s layout)."""
        return {"f": self.samples, "obs": self.observed, **self.latents}

    def _site(self, site: str) -> Tensor:
        if site == "f":
            return self.samples
        if site == "obs":
            return self.observed
        if site in self.latents:
            return self.latents[site]
        raise ValueError(f"unknown predictive site {site!r}; choose 'f' (network output), 'obs' (observations)"
                         + "".join(f", {name!r}" for name in self.latents))

    def site_mean(self, site: str = "obs") -> Tensor:
        """Monte-Carlo mean of a site over the draws (class labels: their frequencies are in :meth:`class_probs`)."""
        return self._site(site).double().mean(0).to(self.mean.dtype)

    def site_std(self, site: str = "obs") -> Tensor:
        """Monte-Carlo standard deviation of a site over the draws."""
        return self._site(site).double().std(0, unbiased=False).to(self.mean.dtype)

    def quantiles(self, q: tuple[float, ...] | list[float] | Tensor, site: str = "obs") -> Tensor:
        """``[len(q), T, N, ...]`` quantiles of a site over the draws, e.g. ``quantiles((0.05, 0.95))``."""
        values = self._site(site)
        if not values.is_floating_point():
            raise ValueError(f"site {site!r} holds class labels; quantiles need a real-valued site (use 'f')")
        return torch.quantile(values, torch.as_tensor(q, dtype=values.dtype, device=values.device), dim=0)

    def class_probs(self, num_classes: int) -> Tensor:
        """``[T, N, C]`` predictive class frequencies of sampled labels (a classification likelihood's ``obs``)."""
        labels = self.observed
        if labels.is_floating_point():
            raise ValueError("class_probs reads sampled class labels; this likelihood's observations are real")
        return torch.nn.functional.one_hot(labels, num_classes).double().mean(0).to(self.mean.dtype)

    def __repr__(self) -> str:
        return f"PosteriorPredictive(draws={self.samples.shape[0]}, tasks={self.mean.shape[0]}, f={tuple(self.mean.shape)})"
