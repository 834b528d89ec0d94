"""The "what" of hbmeta: the hierarchical model, network bodies, priors, guides and likelihoods."""

from models.conv import Conv4
from models.functional import BatchedNet, mlp
from models.guides import GUIDES, DeltaGuide, FullCovarianceGuide, Guide, LowRankGuide, MeanFieldGuide, make_guide
from models.heavy_tailed import LaplacePrior, StudentTPrior
from models.hierarchical import HierarchicalModel
from models.likelihoods import CategoricalLikelihood, GaussianLikelihood, Likelihood
from models.lowrank_prior import LowRankGaussianPrior
from models.mixture_prior import MixtureGaussianPrior
from models.policy import GaussianMLPPolicy
from models.posterior import Posterior
from models.prior_factory import PRIORS, make_prior
from models.priors import DiagonalGaussianPrior, ParticlePrior, Prior

__all__ = [
    "BatchedNet", "mlp", "Conv4", "Guide", "MeanFieldGuide", "DeltaGuide", "FullCovarianceGuide", "GUIDES",
    "make_guide",
    "HierarchicalModel", "Likelihood", "GaussianLikelihood", "CategoricalLikelihood", "Posterior", "Prior",
    "DiagonalGaussianPrior", "ParticlePrior",
    "LowRankGuide", "LowRankGaussianPrior", "MixtureGaussianPrior", "LaplacePrior", "StudentTPrior", "PRIORS",
    "make_prior", "GaussianMLPPolicy",
]
