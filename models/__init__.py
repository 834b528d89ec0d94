"""The "what" of hbmeta: the hierarchical model, network bodies, priors, guides and likelihoods."""

from models.conv import Conv4
from models.functional import BatchedNet, mlp
from models.guides import GUIDES, DeltaGuide, FullCovarianceGuide, Guide, MeanFieldGuide, make_guide
from models.hierarchical import HierarchicalModel
from models.likelihoods import CategoricalLikelihood, GaussianLikelihood, Likelihood
from models.posterior import Posterior
from models.priors import DiagonalGaussianPrior, ParticlePrior, Prior

__all__ = [
    "BatchedNet", "mlp", "Conv4", "Guide", "MeanFieldGuide", "DeltaGuide", "FullCovarianceGuide", "GUIDES",
    "make_guide",
    "HierarchicalModel", "Likelihood", "GaussianLikelihood", "CategoricalLikelihood", "Posterior", "Prior",
    "DiagonalGaussianPrior", "ParticlePrior",
]
