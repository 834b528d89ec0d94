"""Experiments by name: which tasks, which network, which likelihood, and the paper's settings as defaults.

Registered here:

- ``sinusoid``, ``sinusoid-challenging``: regression (GEM-BML section 5.1, appendix C.4.1).
- ``multimodal``: sinusoids, lines and quadratics (``hbmeta.tasks.multimodal``), for the mixture prior.
- ``omniglot``, ``miniimagenet``: N-way K-shot classification with the conv4 body (section 5.2,
  appendix C.4.2). ``--ways`` / ``--shots`` choose N and K.
- ``drug``: FS-Mol assays, pXC50 regression, metric R^2 per assay (ATS appendix B.1; :mod:`hbmeta.tasks.drug`).
- ``nav2d``, ``cheetah-vel``, ``cheetah-dir``: meta-RL (section 5.3, appendix C.4.3; :mod:`hbmeta.tasks.rl`), metric
  the average return; training and evaluation dispatch to :mod:`hbmeta.training.rl` and :mod:`hbmeta.evaluation.rl`.

An experiment's ``defaults(config)`` returns ``{flat name: value}`` for the run-config fields the user left unset
(``None``); :func:`hbmeta.experiments.resolve_config` applies them, then the algorithm family's defaults
(:func:`hbmeta.inference.learner.default_inner`). Your own experiment is one :func:`register_experiment` call.

Example:
    >>> from hbmeta.experiments import EXPERIMENTS, Experiment, make_config, register_experiment
    >>> from hbmeta.models import GaussianLikelihood, mlp
    >>> from hbmeta.tasks import SinusoidTasks
    >>> mine = register_experiment(Experiment(
    ...     "my-sinusoid", make_tasks=lambda c: SinusoidTasks("default", c.k_shot, c.k_query),
    ...     make_net=lambda c: mlp(1, (40, 40), 1), make_likelihood=lambda c: GaussianLikelihood(0.1),
    ...     metric="mse", defaults=lambda c: {"meta_batch": 25, "k_shot": 5, "k_query": 10}))
    >>> make_config(experiment="my-sinusoid").k_shot    # hbmeta train my-sinusoid ... works the same
    5
    >>> del EXPERIMENTS["my-sinusoid"]                  # (this example tidies up after itself)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from hbmeta.experiments.config import TrainConfig
from hbmeta.inference.learner import get_algorithm, prior_defaults
from hbmeta.models.likelihoods import CategoricalLikelihood, GaussianLikelihood, Likelihood
from hbmeta.tasks.fewshot import FewShotTasks
from hbmeta.tasks.noisy import NoisyTasks, restrict_classes

__all__ = ["Experiment", "EXPERIMENTS", "get_experiment", "register_experiment", "classification_defaults"]


def _no_defaults(config: TrainConfig) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Experiment:
    """An experiment: how to build its tasks, network and likelihood from a run config.

    Attributes:
        make_tasks: meta-training task distribution; ``.sample(T, generator)`` gives a ``TaskBatch``.
        make_test_tasks: held-out tasks for meta-test (``None``: the same distribution as ``make_tasks``).
        metric: what ``evaluate`` reports (``"mse"``, ``"accuracy"`` or ``"r2"``).
        defaults: ``config -> {field: value}`` for fields the user left unset.
    """

    name: str
    make_tasks: Callable[[TrainConfig], Any]
    make_net: Callable[[TrainConfig], nn.Module]
    make_likelihood: Callable[[TrainConfig], Likelihood]
    metric: str
    defaults: Callable[[TrainConfig], dict[str, Any]] = field(default=_no_defaults)
    make_test_tasks: Callable[[TrainConfig], Any] | None = None
    make_val_tasks: Callable[[TrainConfig], Any] | None = None  # ATS's validation tasks (None: clean train tasks)

    def test_tasks(self, config: TrainConfig):
        return (self.make_test_tasks or self.make_tasks)(config)


def _gaussian(config: TrainConfig) -> Likelihood:
    """Regression: Gaussian noise ``noise_scale``, meta-learned with ``--learn-likelihood``."""
    return GaussianLikelihood(config.model.noise_scale, learn_scale=config.model.learn_likelihood)


def _categorical(config: TrainConfig) -> Likelihood:
    """Classification: softmax with temperature 1, meta-learned with ``--learn-likelihood``."""
    return CategoricalLikelihood(learn_scale=config.model.learn_likelihood)


def _sinusoid(setting: str) -> Callable[[TrainConfig], Any]:
    def make(config: TrainConfig):
        from hbmeta.tasks.sinusoid import SinusoidTasks

        return SinusoidTasks(setting, config.k_shot, config.k_query)
    return make


def _sinusoid_net(config: TrainConfig) -> nn.Module:
    from hbmeta.models.functional import mlp

    return mlp(1, (40, 40), 1)


def _sinusoid_defaults(config: TrainConfig) -> dict[str, Any]:
    return {"meta_batch": 25, "k_shot": 10, "k_query": 10}


def _multimodal(config: TrainConfig):
    """Sinusoids, lines and quadratics (``hbmeta.tasks.multimodal``; the mixture prior's experiment)."""
    from hbmeta.tasks.multimodal import MultimodalTasks

    return MultimodalTasks(config.k_shot, config.k_query)


# ------------------------------------------------------------------------------------------ classification
#: Inner-update recipes per algorithm on the image benchmarks. Bayesian algorithms: the paper's C.4.2 table
#: (Adam; 1 step for 1-shot and 5 for 5-shot on Omniglot). The guide is whitened against the prior, so the
#: inner learning rate is in units of the prior sd: Adam moves each coordinate by about ``lr`` per step,
#: i.e. by ``lr * sigma`` in weight space; ``0.01 / prior_scale`` is the paper's 0.01 in weight space.
#: Baselines: their own papers' recipes (MAML: SGD 0.4 on Omniglot, 0.01 on miniImageNet; Reptile: Adam 1e-3).
#: the image defaults of the algorithms that meta-learn hidden parameters (GEM-BML, GEM-BML+, iBaML), chosen on
#: validation characters (``scripts/omniglot_sweep.py``; README, "Few-shot Omniglot"): the head's initial prior sd and
#: the Gauss-Newton VI steps at meta-training
HEAD_PRIOR_SCALE = 1.0
HEAD_INNER_STEPS = 2


def classification_defaults(dataset: str) -> Callable[[TrainConfig], dict[str, Any]]:
    """The paper's appendix C.4.2 table (and the baselines' own papers) as run-config defaults."""

    def defaults(config: TrainConfig) -> dict[str, Any]:
        shots = config.k_shot if config.k_shot is not None else 1
        spec = get_algorithm(config.algorithm)
        if dataset == "omniglot":
            out = {"k_shot": shots, "k_query": 15, "meta_batch": 32 if shots == 1 else 16,
                   "inner_steps": 1 if shots == 1 else 5}
            weight_lr, maml_lr = 0.01, 0.4
        else:  # miniimagenet
            out = {"k_shot": shots, "k_query": 15, "meta_batch": 4, "inner_steps": 5}
            weight_lr, maml_lr = 0.001, 0.01
        if spec.name == "bmaml":
            out.update(inner_optimizer="sgd")  # plain SVGD steps at the algorithm's default size (hbmeta.inference.learner)
        elif spec.name == "abml":
            out.update(inner_optimizer="sgd", num_samples=2)  # ABML unrolls plain SGD on the whitened guide
        elif spec.learns_hidden and config.model.hide != "none":
            # a Bayesian head on a shared body (README, "Few-shot Omniglot"): the conv body is a point estimate that
            # GEM meta-learns by Fisher's identity, the head's posterior comes from Gauss-Newton VI, solved exactly
            out.update(hide=config.model.hide or "features", inner_method="gauss-newton", prior_scale=HEAD_PRIOR_SCALE,
                       inner_steps=HEAD_INNER_STEPS, test_steps=10)
            if spec.name == "gem-bml+":  # the body by the query likelihood's implicit gradient: Fisher's identity
                out["hidden_gradient"] = "implicit"  # learns it too slowly (validation sweep, README)
        elif spec.bayesian:
            prior_scale = config.model.prior_scale if config.model.prior_scale is not None else prior_defaults(spec.name, "svi").prior_scale
            out.update(inner_method="svi", inner_optimizer="adam", inner_lr=weight_lr / prior_scale,
                       inner_scale_lr=weight_lr, num_samples=2)
            if dataset == "omniglot":  # one whitened-Adam step also for 5-shot (C.4.2 says 5): with 5 steps the
                out["inner_steps"] = 1  # means swing past the prior and 5-shot meta-training fails (README, "Omniglot")
            # meta-test with the inner update the prior was learned for: with a tight prior on 112k weights
            # the KL dominates the 1-shot likelihood after the first step and Adam's momentum then swings the
            # means back past the prior (accuracy after 5 steps collapses; README, "Omniglot").
            out["test_steps"] = config.inner.steps if config.inner.steps is not None else out["inner_steps"]
        elif spec.name == "reptile":
            out.update(inner_optimizer="adam", inner_lr=1e-3, inner_steps=5)
        else:
            out.update(inner_optimizer="sgd", inner_lr=maml_lr)
            if spec.name == "imaml":
                out.update(imaml_lambda=2.0)  # Rajeswaran et al.'s Omniglot value
        return out

    return defaults


def _omniglot_tasks(part: str) -> Callable[[TrainConfig], Any]:
    def make(config: TrainConfig):
        from hbmeta.tasks.fewshot import omniglot_tasks

        tasks = omniglot_tasks(config.ways, config.k_shot, config.k_query, part=part, split=config.split,
                               root=config.data_root, seed=config.seed)
        return _training_variant(tasks, config) if part == "train" else tasks
    return make


def _miniimagenet_tasks(part: str) -> Callable[[TrainConfig], Any]:
    def make(config: TrainConfig):
        from hbmeta.tasks.fewshot import miniimagenet_tasks

        tasks = miniimagenet_tasks(config.ways, config.k_shot, config.k_query, part=part, root=config.data_root)
        return _training_variant(tasks, config) if part == "train" else tasks
    return make


def _training_variant(tasks: Any, config: TrainConfig) -> Any:
    """Apply the run's ``class_budget`` and ``label_noise`` to meta-training tasks (unchanged when unset)."""
    if config.class_budget is not None:
        if not isinstance(tasks, FewShotTasks):
            raise ValueError(f"class_budget applies to classification tasks; {config.experiment} has {type(tasks).__name__}")
        tasks = restrict_classes(tasks, config.class_budget, config.seed)
    if config.label_noise:
        if not isinstance(tasks, FewShotTasks):
            raise ValueError(f"label_noise flips class labels; {config.experiment} has {type(tasks).__name__}")
        tasks = NoisyTasks(tasks, config.label_noise)
    return tasks


# ------------------------------------------------------------------------------------------ drug activity
def _drug_tasks(part: str) -> Callable[[TrainConfig], Any]:
    def make(config: TrainConfig):
        from hbmeta.tasks.drug import DrugTasks

        return DrugTasks.from_root(config.data_root, part, config.k_shot, config.k_query)
    return make


def _drug_net(config: TrainConfig) -> nn.Module:
    from hbmeta.tasks.drug import drug_net

    return drug_net()


def _drug_defaults(config: TrainConfig) -> dict[str, Any]:
    """ATS appendix C.1: meta-batch 8, pool 20; 16-shot support and query sets of FS-Mol assays."""
    return {"meta_batch": 8, "k_shot": 16, "k_query": 16, "pool_size": 20}


def _conv4(dataset: str) -> Callable[[TrainConfig], nn.Module]:
    def make(config: TrainConfig) -> nn.Module:
        from hbmeta.models.conv import Conv4

        return Conv4.omniglot(config.ways) if dataset == "omniglot" else Conv4.miniimagenet(config.ways)
    return make


# ------------------------------------------------------------------------------------------ meta-RL (hbmeta.tasks.rl)
def _rl_tasks(name: str) -> Callable[[TrainConfig], Any]:
    def make(config: TrainConfig):
        from hbmeta.tasks.rl.envs import make_task_distribution

        return make_task_distribution(name, config.rl.horizon)
    return make


def _rl_policy(name: str) -> Callable[[TrainConfig], nn.Module]:
    def make(config: TrainConfig) -> nn.Module:
        from hbmeta.models.policy import GaussianMLPPolicy
        from hbmeta.tasks.rl.envs import make_task_distribution

        env = make_task_distribution(name, 1)
        return GaussianMLPPolicy(env.obs_dim, env.act_dim)
    return make


def _rl_likelihood(config: TrainConfig) -> Likelihood:
    from hbmeta.inference.policy_gradient import PolicyGradientLikelihood

    return PolicyGradientLikelihood()


def _rl_experiment(name: str) -> Experiment:
    """An RL experiment (metric ``"return"``): ``hbmeta.training.loop.train`` and the CLI hand it to :mod:`hbmeta.tasks.rl`."""
    from hbmeta.experiments.rl import rl_defaults

    return Experiment(name, _rl_tasks(name), _rl_policy(name), _rl_likelihood, "return", rl_defaults(name))


EXPERIMENTS: dict[str, Experiment] = {
    e.name: e for e in (
        Experiment("sinusoid", _sinusoid("default"), _sinusoid_net, _gaussian, "mse",
                   _sinusoid_defaults),
        Experiment("sinusoid-challenging", _sinusoid("challenging"), _sinusoid_net,
                   _gaussian, "mse", _sinusoid_defaults),
        Experiment("multimodal", _multimodal, _sinusoid_net, _gaussian, "mse",
                   _sinusoid_defaults),
        Experiment("omniglot", _omniglot_tasks("train"), _conv4("omniglot"), _categorical,
                   "accuracy", classification_defaults("omniglot"), _omniglot_tasks("test")),
        Experiment("miniimagenet", _miniimagenet_tasks("train"), _conv4("miniimagenet"),
                   _categorical, "accuracy", classification_defaults("miniimagenet"),
                   _miniimagenet_tasks("test")),
        Experiment("drug", _drug_tasks("train"), _drug_net, _gaussian, "r2",
                   _drug_defaults, _drug_tasks("test"), _drug_tasks("valid")),
        *(_rl_experiment(name) for name in ("nav2d", "cheetah-vel", "cheetah-dir")),
    )
}


def get_experiment(name: str) -> Experiment:
    try:
        return EXPERIMENTS[name]
    except KeyError:
        raise ValueError(f"unknown experiment {name!r}; choose one of {', '.join(EXPERIMENTS)}") from None


def register_experiment(experiment: Experiment, *, replace: bool = False) -> Experiment:
    """Add ``experiment`` to :data:`EXPERIMENTS` (``hbmeta train <name>`` and :func:`hbmeta.training.train` find it).

    A name already registered needs ``replace=True``. Returns the experiment, so it can decorate a factory's result.
    """
    if not isinstance(experiment, Experiment):
        raise TypeError(f"register_experiment takes an Experiment; got {type(experiment).__name__}")
    if not experiment.name or not isinstance(experiment.name, str):
        raise ValueError(f"experiment name must be a non-empty string; got {experiment.name!r}")
    if experiment.name in EXPERIMENTS and not replace:
        raise ValueError(f"experiment {experiment.name!r} is already registered; pass replace=True to replace it")
    EXPERIMENTS[experiment.name] = experiment
    return experiment
