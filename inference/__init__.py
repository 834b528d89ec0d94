"""The "how" of hbmeta: the inner update (SVI on per-task guides) and every meta-gradient."""

# The built-in algorithms register on import (hbmeta.inference.algorithm.register_algorithm), so these come first
# and in the registry's order: gem-bml, gem-bml+ (gem), abml (elbo_gradient), maml, fomaml (maml), reptile,
# pretrain (reptile), imaml, bmaml, ibaml. The CLI help and tests list the algorithms in this order.
from hbmeta.inference.gem import gem_bml_gradient, gem_gradient, gem_plus_gradient, gem_plus_posteriors, mc_gem_gradient
from hbmeta.inference.elbo_gradient import abml_gradient, elbo_gradient
from hbmeta.inference.maml import fomaml_gradient, maml_gradient
from hbmeta.inference.reptile import pretrain_gradient, reptile_gradient
from hbmeta.inference.imaml import imaml_gradient
from hbmeta.inference.bmaml import bmaml_gradient, svgd
from hbmeta.inference.ibaml import ibaml_gradient
from hbmeta.inference.algorithm import ALGORITHMS, Algorithm, PosteriorAlgorithm, get_algorithm, register_algorithm
from hbmeta.inference.autoguide import AUTOGUIDES, fit_autoguide
from hbmeta.inference.batch import TaskBatch
from hbmeta.inference.inner import InnerConfig, InnerLoopDivergedError, fit_posterior, negative_elbo
from hbmeta.inference.learner import MetaLearner
from hbmeta.inference.predictive import PosteriorPredictive
from hbmeta.inference.rl_learner import RL_ALGORITHMS, PolicyMetaLearner

__all__ = [
    "TaskBatch", "InnerConfig", "InnerLoopDivergedError", "fit_posterior", "negative_elbo", "gem_gradient",
    "mc_gem_gradient", "gem_bml_gradient", "gem_plus_gradient", "gem_plus_posteriors", "elbo_gradient",
    "abml_gradient", "maml_gradient", "fomaml_gradient", "reptile_gradient", "pretrain_gradient", "MetaLearner",
    "PosteriorPredictive", "Algorithm", "PosteriorAlgorithm", "ALGORITHMS", "get_algorithm", "register_algorithm",
    "imaml_gradient", "bmaml_gradient", "ibaml_gradient", "svgd", "fit_autoguide", "AUTOGUIDES", "PolicyMetaLearner", "RL_ALGORITHMS",
]
