"""The "what" of hbmeta: the hierarchical model, network bodies, priors, guides and likelihoods."""

from hbmeta.models.conv import Conv4
from hbmeta.models.functional import BatchedNet, mlp
from hbmeta.models.guides import GUIDES, DeltaGuide, FullCovarianceGuide, Guide, LowRankGuide, MeanFieldGuide, make_guide
from hbmeta.models.heavy_tailed import LaplacePrior, StudentTPrior
from hbmeta.models.hierarchical import HierarchicalModel
from hbmeta.models.latents import LatentGuide, LatentSite
from hbmeta.models.likelihoods import CategoricalLikelihood, GaussianLikelihood, Likelihood
from hbmeta.models.lowrank_prior import LowRankGaussianPrior
from hbmeta.models.mixture_prior import MixtureGaussianPrior
from hbmeta.models.policy import GaussianMLPPolicy
from hbmeta.models.posterior import Posterior
from hbmeta.models.prior_factory import PRIORS, make_prior
from hbmeta.models.priors import DiagonalGaussianPrior, ParticlePrior, Prior
from hbmeta.models.pyro_likelihood import PyroLikelihood

__all__ = [
    "BatchedNet", "mlp", "Conv4", "Guide", "MeanFieldGuide", "DeltaGuide", "FullCovarianceGuide", "GUIDES",
    "make_guide",
    "HierarchicalModel", "Likelihood", "GaussianLikelihood", "CategoricalLikelihood", "Posterior", "Prior",
    "DiagonalGaussianPrior", "ParticlePrior",
    "LowRankGuide", "LowRankGaussianPrior", "MixtureGaussianPrior", "LaplacePrior", "StudentTPrior", "PRIORS",
    "make_prior", "GaussianMLPPolicy", "PyroLikelihood", "LatentSite", "LatentGuide",
]
