"""``MetaLearner.meta_step`` reports its own meta-batch's adaptation (hbmeta.inference.metrics): the posterior its
meta-gradient fitted, read at its mean, with no random numbers drawn, so the run's trajectory is unchanged."""

import pytest
import torch

from hbmeta import MetaLearner, SinusoidTasks, TaskBatch, mlp
from hbmeta.inference.metrics import batch_adaptation_metrics
from hbmeta.models import CategoricalLikelihood


def _learner(algorithm: str, **kwargs) -> MetaLearner:
    torch.manual_seed(0)
    return MetaLearner(mlp(), algorithm=algorithm, **kwargs)


@pytest.mark.parametrize("algorithm", ["gem-bml+", "gem-bml"])
def test_meta_step_reports_the_support_posterior_it_fitted(algorithm):
    batch = SinusoidTasks().sample(4, torch.Generator().manual_seed(1))
    probe = _learner(algorithm)
    grads, posterior = probe.spec.meta_gradient_and_posterior(probe, batch, torch.Generator().manual_seed(2))
    expected_nll = -probe.model.log_likelihood(posterior.loc.unsqueeze(0), batch.x_train, batch.y_train)[0].mean()
    expected_mse = (probe.model.net(posterior.loc.unsqueeze(0), batch.x_val)[0] - batch.y_val).pow(2).mean()

    learner = _learner(algorithm)
    info = learner.meta_step(batch, torch.Generator().manual_seed(2))
    points = batch.x_train.shape[1]
    assert info["batch_support_nll"] == pytest.approx(float(expected_nll) / points, rel=1e-5)
    assert info["batch_query_loss"] == pytest.approx(float(expected_mse), rel=1e-5)
    assert info["batch_kl"] > 0
    assert info["batch_inner_elbo"] == pytest.approx(-(points * info["batch_support_nll"] + info["batch_kl"]), rel=1e-5)
    assert info["prior_scale_min"] <= info["prior_scale_median"] <= info["prior_scale_max"]

    manual = _learner(algorithm)  # the numbers draw nothing: the same update as meta_gradient + apply_meta_gradient
    manual.apply_meta_gradient(manual.meta_gradient(batch, torch.Generator().manual_seed(2)))
    for (name, a), b in zip(learner.prior.named_parameters(), manual.prior.parameters()):
        assert torch.equal(a, b), name


def test_classification_reports_accuracy_and_point_estimates_only_their_gradient():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    learner = MetaLearner(net, CategoricalLikelihood(), algorithm="gem-bml+")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, 2, generator=g)
    y = torch.randint(0, 3, (4, 6), generator=g)
    batch = TaskBatch(x[:, :3], y[:, :3], x[:, 3:], y[:, 3:])
    grads, posterior = learner.spec.meta_gradient_and_posterior(learner, batch, torch.Generator().manual_seed(1))
    out = batch_adaptation_metrics(learner.model, posterior, batch)
    accuracy = (learner.model.net(posterior.loc.unsqueeze(0), batch.x_val)[0].argmax(-1) == batch.y_val).float().mean()
    assert out["batch_query_accuracy"] == pytest.approx(float(accuracy))
    maml = _learner("maml").meta_step(SinusoidTasks().sample(2, g), g)
    assert "grad_norm" in maml and not any(k.startswith("batch_") for k in maml)


def test_meta_step_without_metrics_makes_the_same_update_and_reports_only_the_gradient_norm():
    batch = SinusoidTasks().sample(4, torch.Generator().manual_seed(1))
    with_metrics, without = _learner("gem-bml+"), _learner("gem-bml+")
    full = with_metrics.meta_step(batch, torch.Generator().manual_seed(2))
    bare = without.meta_step(batch, torch.Generator().manual_seed(2), metrics=False)
    assert set(bare) == {"grad_norm"} and bare["grad_norm"] == full["grad_norm"] and "batch_support_nll" in full
    for (name, a), b in zip(with_metrics.prior.named_parameters(), without.prior.parameters()):
        assert torch.equal(a, b), name
