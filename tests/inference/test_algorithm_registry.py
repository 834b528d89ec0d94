"""The algorithm registry: a user's algorithm is one subclass and one call, and the built-ins are unchanged."""

import math
import re
from pathlib import Path

import pytest
import torch

from hbmeta.inference import MetaLearner, register_algorithm
from hbmeta.inference.algorithm import ALGORITHMS, Algorithm, PriorDefaults, get_algorithm
from hbmeta.inference.inner import InnerConfig
from hbmeta.inference.learner import default_inner, prior_defaults
from hbmeta.inference.maml import fomaml_gradient
from hbmeta.models import GaussianLikelihood, mlp
from hbmeta.tasks.sinusoid import SinusoidTasks

CONCEPTS = Path(__file__).resolve().parents[2] / "docs" / "concepts.md"
BUILTINS = ("gem-bml", "gem-bml+", "abml", "maml", "fomaml", "reptile", "pretrain", "imaml", "bmaml", "ibaml")


@pytest.fixture
def registry():
    """Whatever a test registers is gone afterwards (other tests see the built-ins only)."""
    before = dict(ALGORITHMS)
    yield ALGORITHMS
    ALGORITHMS.clear()
    ALGORITHMS.update(before)


def docs_example() -> str:
    """The ```python block of docs/concepts.md's section "## Algorithms"."""
    text = CONCEPTS.read_text()
    section = text[text.index("\n## Algorithms"):]
    section = section[:section.index("\n## ", 1)]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the Algorithms section should hold one python example"
    return blocks[0]


def test_docs_example_registers_an_algorithm_that_trains(registry, capsys):
    namespace: dict = {}
    exec(compile(docs_example(), f"{CONCEPTS}:Algorithms", "exec"), namespace)
    learner, info = namespace["learner"], namespace["info"]
    name = learner.algorithm
    assert name not in BUILTINS and list(registry) == [*BUILTINS, name]
    assert isinstance(learner.spec, Algorithm) and learner.spec is registry[name] and learner.iteration == 1
    assert math.isfinite(info["grad_norm"]) and info["grad_norm"] > 0
    assert not torch.equal(learner.prior.loc, learner.model.net.initial_vector())  # the prior mean moved
    assert "grad norm" in capsys.readouterr().out
    # and it adapts with the base class's point-estimate default (inner SGD from the prior mean)
    batch = SinusoidTasks().sample(2, torch.Generator().manual_seed(1))
    assert learner.adapt(batch.x_train, batch.y_train, steps=2).kind == "delta"


class Spy(Algorithm):
    name, meta_loss, estimator, reference = "spy-fomaml", "L[2]", "first-order, spied", "test"

    def __init__(self, **fields):
        super().__init__(**fields)
        self.calls = 0

    def meta_gradient(self, learner, batch, generator=None):
        self.calls += 1
        return fomaml_gradient(learner.model, batch, learner.inner)


def test_meta_step_dispatches_to_the_registered_algorithm(registry):
    spy = register_algorithm(Spy())
    learner = MetaLearner(mlp(1, (8,), 1), GaussianLikelihood(0.5), algorithm="SPY-fomaml")
    assert learner.spec is spy and learner.algorithm == "spy-fomaml"
    assert learner.inner == InnerConfig(steps=5, lr=0.01, optimizer="sgd")  # the point-estimate default
    learner.meta_step(SinusoidTasks().sample(3, torch.Generator().manual_seed(0)))
    assert spy.calls == 1 and learner.iteration == 1


def test_duplicate_names_are_refused_unless_replaced(registry):
    first = register_algorithm(Spy())
    with pytest.raises(ValueError, match=r"register_algorithm: name 'spy-fomaml' is already registered; "
                                         r"pass replace=True"):
        register_algorithm(Spy())
    with pytest.raises(ValueError, match="name 'maml' is already registered"):
        register_algorithm(Spy(name="maml"))
    second = register_algorithm(Spy(), replace=True)
    assert registry["spy-fomaml"] is second is not first and list(registry) == [*BUILTINS, "spy-fomaml"]


@pytest.mark.parametrize("bad", ["", "My Algo", "UPPER", "-dash"])
def test_bad_names_are_refused(registry, bad):
    message = rf"register_algorithm: name {re.escape(repr(bad))} is not allowed; use lowercase"
    with pytest.raises(ValueError, match=message):
        register_algorithm(Spy(name=bad))
    assert list(registry) == list(BUILTINS)


def test_only_algorithms_register(registry):
    with pytest.raises(ValueError, match="algorithm must be an Algorithm instance"):
        register_algorithm(Spy)
    with pytest.raises(TypeError, match="unknown field"):
        Spy(nmae="typo")


def test_unknown_algorithm_names_the_choices():
    message = f"unknown algorithm 'nope'; choose one of {', '.join(BUILTINS)}"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        get_algorithm("nope")
    with pytest.raises(ValueError, match=re.escape(message)):
        MetaLearner(mlp(1, (8,), 1), algorithm="nope")


def test_base_algorithm_without_meta_gradient_says_so(registry):
    register_algorithm(Algorithm(name="empty"))
    learner = MetaLearner(mlp(1, (8,), 1), GaussianLikelihood(0.5), algorithm="empty")
    with pytest.raises(NotImplementedError, match="must define meta_gradient"):
        learner.meta_step(SinusoidTasks().sample(2, torch.Generator().manual_seed(0)))



def test_posterior_algorithm_defines_one_method_and_meta_gradient_follows(registry):
    """A :class:`PosteriorAlgorithm` defines only ``meta_gradient_and_posterior``: ``meta_gradient`` is its first
    part, ``meta_step`` reports the posterior's adaptation numbers; without it the error names the method."""
    from hbmeta.inference.algorithm import PosteriorAlgorithm
    from hbmeta.inference.gem import gem_bml_gradient

    class OwnGEM(PosteriorAlgorithm):
        bayesian = True

        def meta_gradient_and_posterior(self, learner, batch, generator=None):
            per_task, q = gem_bml_gradient(learner.model, learner.guide, batch, learner.inner, generator)
            return {n: -g.mean(0) for n, g in per_task.items()}, q

    register_algorithm(OwnGEM(name="own-gem"))
    register_algorithm(PosteriorAlgorithm(name="no-posterior"))
    batch = SinusoidTasks().sample(2, torch.Generator().manual_seed(0))
    learner = MetaLearner(mlp(1, (8,), 1), GaussianLikelihood(0.5), algorithm="own-gem")
    grads = learner.spec.meta_gradient(learner, batch, torch.Generator().manual_seed(1))
    expected = get_algorithm("gem-bml").meta_gradient(learner, batch, torch.Generator().manual_seed(1))  # same state
    assert set(grads) == set(expected) and all(torch.allclose(grads[n], expected[n]) for n in grads)
    assert "batch_support_nll" in learner.meta_step(batch)
    empty = MetaLearner(mlp(1, (8,), 1), GaussianLikelihood(0.5), algorithm="no-posterior")
    with pytest.raises(NotImplementedError, match="must define meta_gradient_and_posterior"):
        empty.meta_step(batch)

# ---------------------------------------------------------------------- the built-ins, as before the registry
#: (meta_loss, estimator, backprop_through_inner, bayesian, reference), written down from the old table
SPECS = {
    "gem-bml": ("L[1]", "GEM (closed form or Monte Carlo)", False, True, "Zou & Lu 2020, sec. 3.2"),
    "gem-bml+": ("L[2]", "GEM, difference of two L[1] terms", False, True, "Zou & Lu 2020, sec. 3.2, A.4"),
    "abml": ("L[1]", "ELBO gradient (unrolled SVI)", True, True, "Ravi & Beatson 2019"),
    "maml": ("L[2]", "unrolled SGD, second order", True, False, "Finn et al. 2017"),
    "fomaml": ("L[2]", "first-order approximation", False, False, "Finn et al. 2017"),
    "reptile": ("L[1]", "GEM with a Delta guide, fixed scale", False, False, "Nichol et al. 2018"),
    "pretrain": ("L[1]", "GEM with a Delta prior (sigma -> 0)", False, False, "GEM-BML sec. 4"),
    "imaml": ("L[2]", "implicit gradient (CG on the regularised inner problem)", False, False,
              "Rajeswaran et al. 2019"),
    "bmaml": ("L[2]", "SVGD particles + chaser loss (unrolled)", True, True, "Yoon et al. 2018"),
    "ibaml": ("query NLL", "implicit gradient (CG through the VI optimality condition)", False, True,
              "Zhang et al. 2023"),
}

GAUSS_NEWTON = InnerConfig(method="gauss-newton", steps=2)
SVI = InnerConfig(steps=5, lr=0.3, optimizer="sgd", num_samples=2, clip_norm=5.0)
POINT = InnerConfig(steps=5, lr=0.01, optimizer="sgd")
#: default_inner(name, gauss_newton=True), default_inner(name, gauss_newton=False)
INNER = {
    "gem-bml": (GAUSS_NEWTON, SVI), "gem-bml+": (GAUSS_NEWTON, SVI), "abml": (SVI, SVI),
    "maml": (POINT, POINT), "fomaml": (POINT, POINT), "reptile": (POINT, POINT), "pretrain": (POINT, POINT),
    "imaml": (InnerConfig(steps=20, lr=0.005, optimizer="sgd", clip_norm=50.0, imaml_lambda=10.0, cg_steps=5),) * 2,
    "bmaml": (InnerConfig(steps=5, lr=1e-3, optimizer="sgd", num_samples=5),) * 2,
    "ibaml": (InnerConfig(method="gauss-newton", steps=2, cg_steps=5), SVI),
}


def test_builtin_registry_order_and_fields():
    assert list(ALGORITHMS) == list(BUILTINS)
    for name, (meta_loss, estimator, backprop, bayesian, reference) in SPECS.items():
        spec = get_algorithm(name.upper())
        assert spec.name == name and isinstance(spec, Algorithm)
        assert (spec.meta_loss, spec.estimator, spec.backprop_through_inner, spec.bayesian, spec.reference) == (
            meta_loss, estimator, backprop, bayesian, reference)
        assert spec.learns_likelihood == (name in ("gem-bml", "gem-bml+"))


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_defaults_are_unchanged(name):
    assert (default_inner(name), default_inner(name, gauss_newton=False)) == INNER[name]
    assert default_inner(name, True) == get_algorithm(name).default_inner(True)
    assert prior_defaults(name, "gauss-newton") == PriorDefaults(0.2, None, 0.25, "restart")
    svi = PriorDefaults(0.1 if name == "bmaml" else 0.02, 0.1, 0.5, "sequential")
    assert prior_defaults(name, "svi") == svi == get_algorithm(name).prior_defaults("svi")


def test_learner_has_no_name_dispatch_left():
    """MetaLearner's methods never compare the algorithm's name (the registry's objects dispatch)."""
    import inspect

    from hbmeta.inference.learner import MetaLearner as Learner

    for method in ("__post_init__", "meta_gradient", "meta_step", "apply_meta_gradient", "adapt"):
        source = inspect.getsource(getattr(Learner, method))
        assert "self.algorithm ==" not in source and "self.algorithm in" not in source, method
        for name in BUILTINS:
            assert f'"{name}"' not in source and f"'{name}'" not in source, (method, name)
