"""Posterior predictive samples by site (Pyro ``Predictive`` layout): ``f`` and the observations through the
likelihood, their moments and quantiles; drawing observations leaves the caller's random stream untouched."""

from __future__ import annotations

import pytest
import torch

from hbmeta import CategoricalLikelihood, GaussianLikelihood, MetaLearner, SinusoidTasks, mlp
from hbmeta.inference import PosteriorPredictive


@pytest.mark.parametrize("algorithm", ["gem-bml+", "maml"])
def test_observed_draws_add_the_likelihoods_noise_to_f(algorithm):
    learner = MetaLearner(mlp(1, (16,), 1), GaussianLikelihood(0.5), algorithm=algorithm)
    batch = SinusoidTasks().sample(3, torch.Generator().manual_seed(0), k_query=7)
    posterior = learner.adapt(batch.x_train, batch.y_train, steps=2)
    pred = learner.predict(posterior, batch.x_val, num_samples=4000, generator=torch.Generator().manual_seed(1))
    assert isinstance(pred, PosteriorPredictive)
    sites = pred.sites
    assert set(sites) == {"f", "obs"} and sites["obs"].shape == (4000, 3, 7, 1)
    assert sites["f"].shape[1:] == (3, 7, 1)  # a point posterior has one draw of f, reused for every observation
    # Var[y] = Var[f] + s^2 (law of total variance), E[y] = E[f]
    expected = (pred.std.pow(2) + 0.25).sqrt()
    torch.testing.assert_close(pred.site_std("obs"), expected, rtol=0.06, atol=0.0)
    torch.testing.assert_close(pred.site_mean("obs"), pred.mean, rtol=0, atol=0.06)
    low, high = pred.quantiles((0.05, 0.95))
    assert (low < pred.mean).all() and (high > pred.mean).all()
    inside = ((sites["obs"] > low) & (sites["obs"] < high)).double().mean()
    assert abs(inside.item() - 0.9) < 0.01


def test_observations_do_not_draw_from_the_callers_generator():
    learner = MetaLearner(mlp(1, (8,), 1), GaussianLikelihood(0.3))
    batch = SinusoidTasks().sample(2, torch.Generator().manual_seed(0))
    posterior = learner.adapt(batch.x_train, batch.y_train)
    a, b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    first = learner.predict(posterior, batch.x_val, 20, a)
    _ = first.observed  # drawn lazily from a stream derived from a's state
    learner.predict(posterior, batch.x_val, 20, b)
    assert torch.equal(torch.rand(3, generator=a), torch.rand(3, generator=b))
    again = learner.predict(posterior, batch.x_val, 20, torch.Generator().manual_seed(5))
    assert torch.equal(first.observed, again.observed)  # reproducible from the generator's seed


def test_classification_observations_are_labels_with_the_predictive_frequencies():
    likelihood = CategoricalLikelihood()
    logits = torch.tensor([[[[2.0, 0.0, -1.0]]]]).expand(20000, 1, 1, 3)
    pred = PosteriorPredictive(logits.mean(0), logits.std(0), logits, likelihood, 20000, torch.Generator().manual_seed(0))
    assert pred.observed.dtype == torch.int64 and pred.observed.shape == (20000, 1, 1)
    torch.testing.assert_close(pred.class_probs(3)[0, 0], torch.softmax(logits[0, 0, 0], -1), atol=0.01, rtol=0)
    with pytest.raises(ValueError, match="class labels"):
        pred.quantiles((0.5,))
    with pytest.raises(ValueError, match="unknown predictive site 'y'"):
        pred.site_mean("y")
