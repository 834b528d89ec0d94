"""Multi-modal regression tasks (sinusoids, lines, quadratics) and their experiment with the mixture prior."""

import json

import pytest
import torch

from hbmeta.experiments.config import TrainConfig
from hbmeta.experiments.registry import get_experiment
from hbmeta.models.mixture_prior import MixtureGaussianPrior
from hbmeta.tasks.multimodal import FAMILIES, MultimodalTasks
from hbmeta.training.loop import train


def test_multimodal_tasks_draw_every_family_with_its_own_function():
    tasks = MultimodalTasks(k_shot=5, k_query=7, noise=0.0)
    batch = tasks.sample(300, torch.Generator().manual_seed(0))
    assert batch.x_train.shape == (300, 5, 1) and batch.y_val.shape == (300, 7, 1)
    counts = torch.bincount(batch.family, minlength=3)
    assert (counts > 70).all()  # uniform over the three families
    assert torch.allclose(batch.truth(batch.x_train), batch.y_train)  # noise 0: y is the family's curve
    x = torch.tensor([0.0, 1.0, 2.0]).view(1, 3, 1)
    for family, expected in ((0, lambda a, b, c: a * torch.sin(x - b)), (1, lambda a, b, c: a * x + b),
                             (2, lambda a, b, c: a * x ** 2 + b * x + c)):
        i = int((batch.family == family).nonzero()[0])
        a, b, c = batch.coef[i]
        assert torch.allclose(batch.select(slice(i, i + 1)).truth(x), expected(a, b, c)), FAMILIES[family]
    lines = batch.coef[batch.family == 1]
    assert lines[:, :2].abs().max() <= 3 and (lines[:, 2] == 0).all()


def test_multimodal_tasks_are_reproducible_and_noisy_as_asked():
    tasks = MultimodalTasks(noise=0.3)
    a = tasks.sample(50, torch.Generator().manual_seed(1))
    b = tasks.sample(50, torch.Generator().manual_seed(1))
    assert torch.equal(a.y_train, b.y_train)
    residual = (a.y_train - a.truth(a.x_train)).flatten()
    assert 0.25 < residual.std() < 0.35
    assert tasks.sample(2, k_query=40).x_val.shape == (2, 40, 1)
    with pytest.raises(ValueError, match="unknown or no task families"):
        MultimodalTasks(families=("cubic",))
    only_lines = MultimodalTasks(families=("line",)).sample(20, torch.Generator().manual_seed(0))
    assert (only_lines.family == 1).all()


def test_multimodal_experiment_trains_a_mixture_prior_from_the_command_line_config(tmp_path):
    assert get_experiment("multimodal").metric == "mse"
    config = TrainConfig.from_flat(experiment="multimodal", prior="mixture", prior_components=3, iterations=3,
                                   meta_batch=4, inner_steps=2, device="cpu", checkpoint_every=3)
    result = train(config, tmp_path / "run", progress=False)
    prior = result.learner.prior
    assert isinstance(prior, MixtureGaussianPrior) and prior.mu.shape == (3, 1761)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model"]["prior"] == "mixture" and saved["model"]["prior_components"] == 3
    assert (tmp_path / "run" / "checkpoint.pt").exists()
    assert torch.isfinite(prior.mu).all() and not torch.equal(prior.mu[0], prior.mu[1])
