"""A short, seeded meta-training on sinusoid really learns (GEM-BML section 5.1)."""

import pytest
import torch

from hbmeta.config import TrainConfig
from hbmeta.evaluate import evaluate_regression
from hbmeta.tasks import SinusoidTasks
from hbmeta.train import build_learner, train

BUDGET = dict(experiment="sinusoid", iterations=150, meta_batch=10, device="cpu", checkpoint_every=1000)


@pytest.fixture(scope="module")
def mse_after_10_steps(tmp_path_factory):
    tasks = SinusoidTasks()
    out = {}
    untrained = build_learner(TrainConfig(algorithm="gem-bml+", **BUDGET))
    out["untrained"] = evaluate_regression(untrained, tasks, (10,), num_tasks=50)[10]
    for algorithm in ("gem-bml+", "pretrain"):
        run = train(TrainConfig(algorithm=algorithm, **BUDGET), tmp_path_factory.mktemp(algorithm), progress=False)
        out[algorithm] = evaluate_regression(run.learner, tasks, (10,), num_tasks=50)[10]
    return out


def test_short_gem_plus_meta_training_beats_untrained_prior(mse_after_10_steps):
    gem, untrained = mse_after_10_steps["gem-bml+"], mse_after_10_steps["untrained"]
    assert gem["mse"] + gem["ci95"] < untrained["mse"] - untrained["ci95"]


def test_short_gem_plus_meta_training_beats_pretraining(mse_after_10_steps):
    gem, pretrain = mse_after_10_steps["gem-bml+"], mse_after_10_steps["pretrain"]
    assert gem["mse"] < 0.8 * pretrain["mse"]
