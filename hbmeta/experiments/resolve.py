"""Fill a run config's defaults: the experiment's (the papers' tables), then the algorithm family's.

:class:`~hbmeta.experiments.config.TrainConfig` is plain data; a field left ``None`` means "the default".
:func:`resolve_config` returns a copy with every default filled in, in this order:

1. the experiment's ``defaults(config)`` (:class:`~hbmeta.experiments.registry.Experiment`), for fields still unset;
2. the inner update: Gauss-Newton VI for GEM-BML(+) with the diagonal prior and a guide it fits (not meta-RL),
   else SVI (:func:`hbmeta.inference.learner.default_inner`), and its prior / likelihood defaults
   (:func:`hbmeta.inference.learner.prior_defaults`);
3. the task scheduler's pool (2 x meta-batch) and temperature (0.1 with label noise, else 1; ATS appendix C.1 / D.2).

Resolving a resolved config changes nothing; :func:`hbmeta.training.train` resolves the config it is given.
"""

from __future__ import annotations

from typing import Any

from hbmeta.experiments.config import TrainConfig
from hbmeta.experiments.registry import get_experiment
from hbmeta.inference.learner import GAUSS_NEWTON_GUIDES, default_inner, get_algorithm, prior_defaults

__all__ = ["resolve_config", "make_config"]

#: flat config name -> InnerConfig attribute of the algorithm family's default inner update
_INNER_DEFAULTS = (("inner_steps", "steps"), ("inner_lr", "lr"), ("inner_optimizer", "optimizer"),
                   ("num_samples", "num_samples"), ("clip_norm", "clip_norm"), ("imaml_lambda", "imaml_lambda"),
                   ("cg_steps", "cg_steps"))


def resolve_config(config: TrainConfig) -> TrainConfig:
    """``config`` with every default filled in (a new config; ``config`` is not changed)."""
    flat = config.to_flat()
    flat["algorithm"] = get_algorithm(flat["algorithm"]).name
    experiment = get_experiment(flat["experiment"])
    for key, value in experiment.defaults(TrainConfig.from_flat(**flat)).items():
        if flat[key] is None:
            flat[key] = value
    if flat["hide"] is None:
        flat["hide"] = "none"
    if flat["hidden_gradient"] is None:
        flat["hidden_gradient"] = "fisher"
    algorithm = flat["algorithm"]
    gauss_newton = (flat["prior"] == "diagonal" and flat["guide"] in GAUSS_NEWTON_GUIDES
                    and experiment.metric != "return")  # RL: policy-gradient VI
    default = default_inner(algorithm, gauss_newton=gauss_newton)
    if flat["inner_method"] is None:
        flat["inner_method"] = default.method
    if flat["inner_method"] != default.method:
        default = default_inner(algorithm, gauss_newton=flat["inner_method"] == "gauss-newton")
    family = prior_defaults(algorithm, flat["inner_method"])
    for key in ("prior_scale", "noise_scale", "gem_plus_mode"):
        if flat[key] is None:
            flat[key] = getattr(family, key)
    if flat["max_prior_scale"] is None:
        flat["max_prior_scale"] = family.max_prior_scale or 0.0  # 0: no ceiling (build_learner passes None)
    if flat["test_steps"] is None:
        flat["test_steps"] = 10  # the paper's meta-test budget (appendix C.4)
    for key, attr in _INNER_DEFAULTS:
        if flat[key] is None:
            flat[key] = getattr(default, attr)
    for key in ("meta_batch", "k_shot", "k_query"):
        if flat[key] is None:
            raise ValueError(f"experiment {flat['experiment']!r} has no default for {key}; give it explicitly")
    if flat["scheduler"] != "uniform":
        if flat["pool_size"] is None:
            flat["pool_size"] = 2 * flat["meta_batch"]
        if flat["temperature"] is None:
            flat["temperature"] = 0.1 if flat["label_noise"] > 0 else 1.0
    return TrainConfig.from_flat(**flat)


def make_config(**values: Any) -> TrainConfig:
    """A resolved config from flat names, as the command line takes them.

    ``make_config(experiment="omniglot", algorithm="maml", k_shot=5).inner.steps`` is 5 (appendix C.4.2).
    """
    return resolve_config(TrainConfig.from_flat(**values))
