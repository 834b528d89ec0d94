"""A short, seeded meta-training on sinusoid really learns (GEM-BML section 5.1)."""

import pytest
import torch

from hbmeta.evaluation.meta_test import mean_ci95, regression_errors
from hbmeta.experiments.config import TrainConfig
from hbmeta.tasks.sinusoid import SinusoidTasks
from hbmeta.training.loop import train
from hbmeta.training.runs import build_learner

BUDGET = dict(experiment="sinusoid", iterations=400, meta_batch=10, device="cpu", checkpoint_every=1000)


@pytest.fixture(scope="module")
def mse_after_10_steps(tmp_path_factory):
    """Per-task query MSE after 10 adaptation steps on the same 100 new tasks, for each learner."""
    test = SinusoidTasks().sample(100, torch.Generator().manual_seed(99), k_query=50)
    out = {"untrained": regression_errors(build_learner(TrainConfig(algorithm="gem-bml+", **BUDGET)), test, (10,))[10]}
    for algorithm in ("gem-bml+", "pretrain"):
        run = train(TrainConfig(algorithm=algorithm, **BUDGET), tmp_path_factory.mktemp(algorithm), progress=False)
        out[algorithm] = regression_errors(run.learner, test, (10,))[10]
    return out


@pytest.mark.parametrize("baseline", ["untrained", "pretrain"])
def test_short_gem_plus_meta_training_beats_baseline_after_adaptation(mse_after_10_steps, baseline):
    gain, ci = mean_ci95(mse_after_10_steps[baseline] - mse_after_10_steps["gem-bml+"])  # paired over tasks
    assert gain - ci > 0, f"GEM-BML+ is not better than {baseline}: MSE gain {gain:.3f} ± {ci:.3f}"
