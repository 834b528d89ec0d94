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

import importlib.util
import sys
import warnings
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent  # where hbmeta's sibling packages ``models`` and ``inference`` live


def _bind_own_packages() -> None:
    """Make ``models`` and ``inference`` (hbmeta's layers, imported by those names) resolve to hbmeta's own
    packages even when the working folder holds a user's ``models.py`` / ``inference.py``, which Python would
    otherwise find first. The user's file keeps working through any name already bound to it; a new
    ``import models`` in the same process then gets hbmeta's package, so a warning names the shadowed file."""
    for name in ("models", "inference"):
        own = _ROOT / name
        loaded = sys.modules.get(name)
        if loaded is not None and Path(getattr(loaded, "__file__", "") or "").resolve().parent == own:
            continue
        spec = importlib.util.find_spec(name) if loaded is None else loaded.__spec__
        origin = Path(spec.origin).resolve() if spec is not None and spec.origin else None
        if origin is not None and origin.parent == own:
            continue
        sys.modules.pop(name, None)
        sys.path.insert(0, str(_ROOT))
        try:
            importlib.import_module(name)
        finally:
            sys.path.remove(str(_ROOT))
        if origin is not None:
            warnings.warn(f"hbmeta: your {origin} is shadowed by hbmeta's own '{name}' package in this process; "
                          f"rename it (e.g. my_{name}.py) to import it by name after hbmeta", stacklevel=3)


_bind_own_packages()

from hbmeta.checkpoint import CheckpointError, load_checkpoint, save_checkpoint  # noqa: E402
from hbmeta.config import TrainConfig
from hbmeta.evaluate import evaluate_regression
from hbmeta.experiments import EXPERIMENTS
from hbmeta.tasks import SinusoidTasks
from hbmeta.train import load_learner, train
from inference import (ALGORITHMS, InnerConfig, InnerLoopDivergedError, MetaLearner, TaskBatch, fit_posterior,
                       gem_gradient, gem_plus_gradient)
from models import (BatchedNet, CategoricalLikelihood, DeltaGuide, DiagonalGaussianPrior, FullCovarianceGuide,
                    GaussianLikelihood, HierarchicalModel, MeanFieldGuide, Posterior, make_prior, mlp)

__version__ = "0.1.0"

__all__ = [
    "MetaLearner", "InnerConfig", "TaskBatch", "ALGORITHMS", "fit_posterior", "gem_gradient", "gem_plus_gradient",
    "InnerLoopDivergedError", "HierarchicalModel", "DiagonalGaussianPrior", "MeanFieldGuide", "DeltaGuide",
    "FullCovarianceGuide", "GaussianLikelihood", "CategoricalLikelihood", "Posterior", "BatchedNet", "mlp",
    "SinusoidTasks", "TrainConfig", "train", "load_learner", "evaluate_regression", "EXPERIMENTS",
    "save_checkpoint", "load_checkpoint", "CheckpointError", "make_prior",
]
