"""One contract every meta-learner keeps (as GPyTorch's base test cases do), plus the GEM-specific facts."""

import pytest
import torch

from hbmeta.inference.gem import gem_gradient, gem_plus_posteriors, mc_gem_gradient
from hbmeta.inference.inner import InnerConfig
from hbmeta.inference.learner import ALGORITHMS, MetaLearner
from hbmeta.models import DiagonalGaussianPrior, GaussianLikelihood, MeanFieldGuide, mlp
from hbmeta.tasks.sinusoid import SinusoidTasks

TASKS = SinusoidTasks(k_shot=5, k_query=5)


#: the posterior each algorithm adapts to
KIND = {"bmaml": "particles"}


def _learner(algorithm, **kw):
    torch.manual_seed(0)
    if algorithm == "bmaml":  # SVGD steps on the summed log-likelihood, 3 particles
        kw.setdefault("inner", InnerConfig(steps=2, lr=1e-3, optimizer="sgd", num_samples=3))
    kw.setdefault("inner", InnerConfig(steps=2, lr=0.3 if ALGORITHMS[algorithm].bayesian else 0.01, optimizer="sgd"))
    return MetaLearner(mlp(1, (16, 16), 1), GaussianLikelihood(0.5), algorithm=algorithm, prior_scale=0.05, **kw)


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_meta_step_contract(algorithm):
    learner = _learner(algorithm)
    batch = TASKS.sample(3, torch.Generator().manual_seed(0))
    grads = learner.meta_gradient(batch, torch.Generator().manual_seed(1))
    params = dict(learner.prior.named_parameters())
    assert grads and set(grads) <= set(params)
    for name, g in grads.items():
        assert g.shape == params[name].shape and torch.isfinite(g).all() and g.abs().sum() > 0
    before = learner.prior.loc.detach().clone()
    learner.meta_step(batch, torch.Generator().manual_seed(1))
    assert learner.iteration == 1 and not torch.equal(before, learner.prior.loc)
    post = learner.adapt(batch.x_train, batch.y_train, steps=3)
    assert post.loc.shape == (3, learner.prior.num_params)
    assert post.kind == KIND.get(algorithm, "meanfield" if learner.spec.bayesian else "delta")
    pred = learner.predict(post, batch.x_val, num_samples=4)
    assert pred.mean.shape == batch.y_val.shape and (pred.std >= 0).all()


@pytest.mark.parametrize("algorithm", ["gem-bml", "gem-bml+"])
def test_gem_meta_gradient_needs_no_graph_of_the_inner_loop(algorithm):
    learner = _learner(algorithm)
    batch = TASKS.sample(3, torch.Generator().manual_seed(0))
    grads = learner.meta_gradient(batch, torch.Generator().manual_seed(1))
    assert all(g.grad_fn is None for g in grads.values())  # plain numbers from posterior parameters


def test_gem_plus_monte_carlo_form_matches_closed_form_within_standard_errors():
    learner = _learner("gem-bml+")
    batch = TASKS.sample(4, torch.Generator().manual_seed(0))
    q1, q2 = gem_plus_posteriors(learner.model, learner.guide, batch, learner.inner, torch.Generator().manual_seed(1))
    prior, n = learner.prior, 256
    closed = gem_gradient(prior, q2)["mu"] - gem_gradient(prior, q1)["mu"]
    gen = torch.Generator().manual_seed(2)
    mc = mc_gem_gradient(prior, q2, n, gen)["mu"] - mc_gem_gradient(prior, q1, n, gen)["mu"]
    z = (mc - closed) / ((q1.variance + q2.variance).sqrt() / prior.scale.detach().pow(2) / n**0.5)
    assert 0.6 < z.abs().mean() < 1.0 and z.abs().max() < 6  # |N(0,1)| has mean 0.80
    assert closed.abs().max() > 0  # the posteriors did move


@pytest.mark.parametrize("options", [dict(closed_form=False), dict(gem_plus_mode="joint"),
                                     dict(guide=MeanFieldGuide(whiten=False), inner=InnerConfig(2, 5e-4, "sgd"))],
                         ids=["mc", "joint", "unwhitened"])
def test_gem_plus_options_run(options):
    learner = _learner("gem-bml+", **options)
    learner.meta_step(TASKS.sample(3, torch.Generator().manual_seed(0)), torch.Generator().manual_seed(1))
    assert torch.isfinite(learner.prior.mu).all() and learner.iteration == 1


def test_sequential_gem_plus_rejects_delta_guide():
    learner = _learner("gem-bml+", guide="delta")
    with pytest.raises(ValueError, match="use mode='joint'"):
        gem_plus_posteriors(learner.model, learner.guide, TASKS.sample(2), learner.inner, mode="sequential")


def test_maml_memory_grows_with_inner_steps_but_gem_does_not():
    from hbmeta.bench.step import peak_saved_bytes

    batch = TASKS.sample(4, torch.Generator().manual_seed(0))
    saved = {}
    for algorithm in ("maml", "gem-bml+"):
        for steps in (1, 4):
            learner = _learner(algorithm)
            learner.inner = InnerConfig(steps=steps, lr=learner.inner.lr, optimizer="sgd")
            saved[algorithm, steps] = peak_saved_bytes(learner.meta_step, batch)
    assert saved["maml", 4] > 2 * saved["maml", 1]
    assert saved["gem-bml+", 4] == saved["gem-bml+", 1]


def test_prior_from_module_matches_module_weights():
    net = mlp()
    prior = DiagonalGaussianPrior.from_module(net, 0.2)
    torch.testing.assert_close(prior.mu[:40], net[0].weight.detach().flatten())
    torch.testing.assert_close(prior.scale, torch.full_like(prior.mu, 0.2))


def test_point_learner_adapts_with_the_optimizer_it_meta_trained_with():
    """Reptile meta-trained with an Adam inner loop also adapts with Adam at meta-test: Adam's first step
    moves every weight with a non-zero gradient by the learning rate."""
    from hbmeta.inference.inner import InnerConfig
    from hbmeta.tasks.sinusoid import SinusoidTasks

    learner = MetaLearner(mlp(1, (16, 16), 1), GaussianLikelihood(0.5), algorithm="reptile",
                          inner=InnerConfig(steps=1, lr=0.05, optimizer="adam"))
    task = SinusoidTasks().sample(2, torch.Generator().manual_seed(0))
    moved = (learner.adapt(task.x_train, task.y_train, steps=1).loc - learner.prior.loc.detach()).abs()
    assert torch.allclose(moved[moved > 1e-6], torch.tensor(0.05), rtol=1e-3)
