"""hbmeta: Bayesian meta-learning with Gradient-EM (GEM-BML, GEM-BML+) on Pyro and PyTorch.

The public face: build a hierarchical model around your own ``nn.Module``, meta-train it with any
algorithm by name, adapt to new tasks and read the posterior predictive.

Example:
    >>> import torch
    >>> from hbmeta import MetaLearner, GaussianLikelihood, SinusoidTasks, mlp
    >>> tasks = SinusoidTasks()
    >>> learner = MetaLearner(mlp(), GaussianLikelihood(0.5), algorithm="gem-bml+")  # default inner update
    >>> info = learner.meta_step(tasks.sample(4, torch.Generator().manual_seed(0)))
    >>> test = tasks.sample(2, torch.Generator().manual_seed(1))
    >>> posterior = learner.adapt(test.x_train, test.y_train, steps=10)
    >>> learner.predict(posterior, test.x_val).mean.shape
    torch.Size([2, 10, 1])

References:
    [1] Zou, Y. & Lu, X. Gradient-EM Bayesian Meta-learning. NeurIPS 2020.
"""

from hbmeta.models import (BatchedNet, CategoricalLikelihood, DeltaGuide, DiagonalGaussianPrior, FullCovarianceGuide,
                           GaussianLikelihood, HierarchicalModel, MeanFieldGuide, Posterior, make_prior, mlp)
from hbmeta.inference import (ALGORITHMS, InnerConfig, InnerLoopDivergedError, MetaLearner, TaskBatch, fit_posterior,
                              gem_gradient, gem_plus_gradient)
from hbmeta.tasks import SinusoidTasks
from hbmeta.experiments import EXPERIMENTS, TrainConfig
from hbmeta.training import CheckpointError, keep_freed_memory, load_checkpoint, load_learner, save_checkpoint, train
from hbmeta.evaluation import evaluate_regression

__version__ = "0.1.0"

__all__ = [
    "MetaLearner", "InnerConfig", "TaskBatch", "ALGORITHMS", "fit_posterior", "gem_gradient", "gem_plus_gradient",
    "InnerLoopDivergedError", "HierarchicalModel", "DiagonalGaussianPrior", "MeanFieldGuide", "DeltaGuide",
    "FullCovarianceGuide", "GaussianLikelihood", "CategoricalLikelihood", "Posterior", "BatchedNet", "mlp",
    "SinusoidTasks", "TrainConfig", "train", "load_learner", "evaluate_regression", "EXPERIMENTS",
    "save_checkpoint", "load_checkpoint", "CheckpointError", "make_prior", "keep_freed_memory",
]
