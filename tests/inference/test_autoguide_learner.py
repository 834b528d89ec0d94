"""Pyro autoguides as a MetaLearner's per-task guide (TyXe's convention: a class or a functools.partial)."""

from __future__ import annotations

import functools

import pytest
import torch
from pyro.infer.autoguide import AutoDelta, AutoMultivariateNormal, AutoNormal

from hbmeta import GaussianLikelihood, MetaLearner, SinusoidTasks, mlp
from hbmeta.inference.autoguide import AutoGuidePerTask


@pytest.mark.parametrize("guide", [AutoNormal, functools.partial(AutoNormal, init_scale=0.05), AutoDelta, "AutoNormal"],
                         ids=["class", "partial", "delta", "name"])
def test_gem_bml_plus_meta_trains_with_an_autoguide(guide):
    mode = "joint" if guide is AutoDelta else None  # sequential GEM-BML+ needs q1 with a density (any Delta guide)
    learner = MetaLearner(mlp(1, (8,), 1), GaussianLikelihood(0.5), algorithm="gem-bml+", guide=guide,
                          gem_plus_mode=mode)
    assert isinstance(learner.guide, AutoGuidePerTask) and learner.inner.method == "svi"
    tasks, gen = SinusoidTasks(), torch.Generator().manual_seed(0)
    before = learner.prior.loc.clone()
    info = learner.meta_step(tasks.sample(3, gen), gen)
    assert torch.isfinite(torch.tensor(info["grad_norm"])) and not torch.equal(before, learner.prior.loc)
    test = tasks.sample(2, gen)
    posterior = learner.adapt(test.x_train, test.y_train, steps=3)
    assert posterior.loc.shape == (2, learner.prior.num_params)
    assert posterior.kind == ("delta" if guide is AutoDelta else "meanfield")


def test_an_autoguide_that_couples_tasks_is_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"AutoMultivariateNormal does not work per task .*couples tasks"):
        MetaLearner(mlp(1, (8,), 1), GaussianLikelihood(0.5), guide=AutoMultivariateNormal)
    with pytest.raises(ValueError, match="does not work per task"):
        MetaLearner(mlp(1, (8,), 1), GaussianLikelihood(0.5), guide=functools.partial(AutoMultivariateNormal))
