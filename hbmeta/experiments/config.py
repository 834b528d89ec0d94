"""The run configuration: plain data, in parts a reader can take in one at a time.

A :class:`TrainConfig` says what a meta-training run is. Its core fields (experiment, algorithm, budget, task
shape, seed, where it runs) sit at the top level; the rest is grouped:

- ``inner`` (:class:`InnerSettings`): the inner update, how each task's posterior is fitted and meta-tested;
- ``model`` (:class:`ModelSettings`): the hierarchical model's prior, guide and likelihood scale;
- ``rl`` (:class:`RLSettings`): meta-RL only;
- ``scheduler`` (:class:`SchedulerSettings`): the task scheduler (ATS);
- ``distributed`` (:class:`DistributedSettings`): torchrun.

A field left ``None`` means "the default": the experiment's (the papers' tables) and then the algorithm family's.
This module does not know them; :func:`hbmeta.experiments.resolve_config` fills them in, and
:func:`hbmeta.training.train` resolves the config it is given. Constructing a config only checks its own
values.

Every field also has a *flat name*, the command-line flag without dashes (``inner_steps``, ``prior_scale``,
``scheduler``): :meth:`TrainConfig.from_flat` and :meth:`TrainConfig.to_flat` speak it, and run folders written
before the config had parts (flat ``config.json``) still load and resume.

Example:
    >>> from hbmeta.experiments.config import InnerSettings, TrainConfig
    >>> config = TrainConfig("sinusoid", iterations=500, inner=InnerSettings(steps=3))
    >>> config.inner.steps, TrainConfig.from_flat(experiment="sinusoid", inner_steps=3).inner.steps
    (3, 3)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from hbmeta.inference.gem import HIDDEN_GRADIENTS
from hbmeta.inference.inner import InnerConfig
from hbmeta.inference.learner import get_algorithm
from hbmeta.models.prior_factory import PRIORS

__all__ = ["TrainConfig", "InnerSettings", "ModelSettings", "RLSettings", "SchedulerSettings", "DistributedSettings",
           "SCHEDULERS", "FLAT_FIELDS", "Range", "RANGES", "check_setting", "BOOLEAN_SETTINGS"]

#: task schedulers (:mod:`hbmeta.training.schedulers` builds them)
SCHEDULERS = ("uniform", "greedy", "ats")


@dataclass(frozen=True)
class Range:
    """What a numeric setting may be: an integer or a finite number, at least (or above) ``low``, at most ``high``."""

    kind: type
    low: float | None = None
    high: float | None = None
    above: bool = False  # the value must be > low, not >= low

    def describe(self) -> str:
        what = "an integer" if self.kind is int else "a finite number"
        if self.low is not None and self.high is not None:
            return f"{what} in {'(' if self.above else '['}{self.low}, {self.high}]"
        if self.low is not None:
            return f"{what} {'>' if self.above else '>='} {self.low}"
        return what if self.high is None else f"{what} <= {self.high}"

    def check(self, name: str, value: Any) -> Any:
        """``value`` if allowed, else a ValueError naming ``name``, the value and what is allowed."""
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if self.kind is int:
            ok = numeric and isinstance(value, int)
        else:
            ok = numeric and math.isfinite(value)
        if ok and self.low is not None:
            ok = value > self.low if self.above else value >= self.low
        if ok and self.high is not None:
            ok = value <= self.high
        if not ok:
            raise ValueError(f"{name} must be {self.describe()}; got {value!r}")
        return value


#: every numeric setting, by flat name (the command-line flag without dashes), and what it may be; ``None``
#: (a default filled in by resolution) is always allowed
RANGES: dict[str, Range] = {
    "iterations": Range(int, 0), "meta_batch": Range(int, 1), "k_shot": Range(int, 1), "k_query": Range(int, 0),
    "ways": Range(int, 1), "class_budget": Range(int, 1), "label_noise": Range(float, 0, 1),
    "meta_lr": Range(float, 0, 10, above=True), "seed": Range(int, 0, 2**63 - 1), "threads": Range(int, 1, 4096),
    "checkpoint_every": Range(int, 1), "log_every": Range(int, 1),
    "inner_steps": Range(int, 0, 100_000), "inner_lr": Range(float, 0, 1000, above=True),
    "inner_scale_lr": Range(float, 0, 1000, above=True), "num_samples": Range(int, 1, 100_000),
    "clip_norm": Range(float, 0, above=True), "imaml_lambda": Range(float, 0, above=True), "cg_steps": Range(int, 1),
    "test_steps": Range(int, 0, 100_000),
    "prior_components": Range(int, 1), "prior_scale": Range(float, 0, 1000, above=True),
    "max_prior_scale": Range(float, 0), "noise_scale": Range(float, 0, above=True),
    "horizon": Range(int, 1), "max_kl": Range(float, 0, above=True),
    "pool_size": Range(int, 1), "temperature": Range(float, 0, above=True), "scheduler_lr": Range(float, 0, above=True),
    "scheduler_warmup": Range(int, 0),
}
#: settings that are True or False
BOOLEAN_SETTINGS = ("amp", "learn_likelihood", "distributed", "private")


def check_setting(name: str, value: Any) -> Any:
    """``value`` if the setting ``name`` (a flat name) may take it (``None``: its default), else a one-line
    ValueError that names the setting, the value and what is allowed."""
    if value is None:
        return value
    if name in RANGES:
        return RANGES[name].check(name, value)
    if name in BOOLEAN_SETTINGS and not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false; got {value!r}")
    return value


@dataclass
class InnerSettings:
    """The inner update (GEM-BML Algorithm 1, line 6) and the meta-test adaptation.

    ``None`` takes the experiment's, then the algorithm family's default
    (:func:`hbmeta.inference.learner.default_inner`).
    """

    method: str | None = None  # "gauss-newton" or "svi" (hbmeta.inference.inner.INNER_METHODS)
    variance: str = "meanfield"  # Gauss-Newton's guide variances: meanfield or marginal (InnerConfig.variance)
    curvature: str | None = None  # Gauss-Newton's curvature: expected (VI) or mean (Laplace); None: InnerConfig's
    steps: int | None = None
    lr: float | None = None
    optimizer: str | None = None
    scale_lr: float | None = None  # SVI: learning rate of the guide's scales
    num_samples: int | None = None  # Monte-Carlo samples per SVI step (BMAML: particles)
    clip_norm: float | None = None  # per-task gradient clipping in the inner loop
    imaml_lambda: float | None = None
    cg_steps: int | None = None
    test_steps: int | None = None  # adaptation steps at meta-test (the paper's 10)
    gem_plus_mode: str | None = None  # how GEM-BML+ fits q2 (hbmeta.inference.gem.GEM_PLUS_MODES)
    hidden_gradient: str | None = None  # how GEM-BML+ learns hidden weights (hbmeta.inference.gem.HIDDEN_GRADIENTS)


@dataclass
class ModelSettings:
    """The hierarchical model: prior over the weights, per-task guide, likelihood scale."""

    prior: str = "diagonal"  # hbmeta.models.prior_factory.PRIORS
    prior_components: int = 2  # mixture components K, or the rank of the low-rank prior
    prior_scale: float | None = None  # initial prior sd; None: hbmeta.inference.learner.prior_defaults
    max_prior_scale: float | None = None  # ceiling on the learned prior sd; None: the default; 0: no ceiling
    guide: str = "meanfield"
    noise_scale: float | None = None  # regression likelihood noise sd; None: the inner update's default
    learn_likelihood: bool = False  # meta-learn the noise sd / softmax temperature by GEM (gem-bml, gem-bml+)
    hide: str | None = None  # kept out of the prior, shared point estimates: "none" or comma-separated submodule /
    # parameter names ("features": conv4's body); None: the experiment's default (hide_names() reads it)

    def hide_names(self) -> tuple[str, ...]:
        """``hide`` as ``MetaLearner(hide=...)`` takes it: a tuple of names, empty for ``"none"`` (or unset)."""
        if self.hide is None or self.hide.strip().lower() == "none":
            return ()
        names = tuple(n.strip() for n in self.hide.split(",") if n.strip())
        if not names:
            raise ValueError(f"hide={self.hide!r} names nothing; give 'none' or comma-separated parameter names")
        return names

    @property
    def prior_scale_ceiling(self) -> float | None:
        """``max_prior_scale`` as the prior takes it (``None``: no ceiling)."""
        return self.max_prior_scale if self.max_prior_scale and self.max_prior_scale > 0 else None


@dataclass
class RLSettings:
    """Meta-RL (GEM-BML section 5.3; :mod:`hbmeta.training.rl`)."""

    horizon: int | None = None  # steps per episode (nav2d 100, cheetah 200)
    inner: str | None = None  # the Bayesian learners' inner update, "pg" or "trpo"
    max_kl: float | None = None  # TRPO's KL bound (inner TRPO; MAML's meta-update)


@dataclass
class SchedulerSettings:
    """Which tasks each meta-iteration trains on (ATS, Yao et al. 2021; :mod:`hbmeta.training.schedulers`)."""

    name: str = "uniform"  # uniform, greedy or ats
    pool_size: int | None = None  # candidate tasks per iteration (default 2 x meta_batch)
    temperature: float | None = None  # softmax temperature (default 0.1 with label noise, else 1)
    lr: float = 1e-3
    warmup: int = 0  # first iterations train only the ATS scheduler (meta-updates undone)


@dataclass
class DistributedSettings:
    """torchrun (:mod:`hbmeta.training.distributed`)."""

    enabled: bool = False  # the tasks of each meta-batch split over the ranks
    private: bool = False  # GEM-BML(+): only posterior parameters on the wire


#: parts of a :class:`TrainConfig` and their classes
PARTS: dict[str, type] = {"inner": InnerSettings, "model": ModelSettings, "rl": RLSettings,
                          "scheduler": SchedulerSettings, "distributed": DistributedSettings}
#: flat names (the command-line flags, the fields of configs written before the parts) that are not ``part_field``
_RENAMED = {"inner_method": ("inner", "method"), "inner_variance": ("inner", "variance"),
            "inner_curvature": ("inner", "curvature"),
            "inner_steps": ("inner", "steps"), "inner_lr": ("inner", "lr"), "inner_optimizer": ("inner", "optimizer"),
            "inner_scale_lr": ("inner", "scale_lr"), "rl_inner": ("rl", "inner"), "scheduler": ("scheduler", "name"),
            "scheduler_lr": ("scheduler", "lr"), "scheduler_warmup": ("scheduler", "warmup"),
            "distributed": ("distributed", "enabled")}


def _flat_fields() -> dict[str, tuple[str, str]]:
    out = {}
    renamed = {v: k for k, v in _RENAMED.items()}
    for part, cls in PARTS.items():
        for f in fields(cls):
            out[renamed.get((part, f.name), f.name)] = (part, f.name)
    return out


#: flat name -> (part, field) for every field inside a part
FLAT_FIELDS: dict[str, tuple[str, str]] = _flat_fields()


@dataclass
class TrainConfig:
    """Everything that defines a meta-training run (saved as ``config.json`` in the run folder).

    Core fields here; the inner update, model, RL, scheduler and distributed settings in their parts.
    """

    experiment: str = "sinusoid"
    algorithm: str = "gem-bml+"
    iterations: int = 2000
    meta_batch: int | None = None
    k_shot: int | None = None
    k_query: int | None = None
    ways: int = 5
    data_root: str | None = None
    split: str = "paper"  # Omniglot character split: paper or vinyals
    label_noise: float = 0.0  # mean symmetric label-flip ratio of the support sets (hbmeta.tasks.noisy)
    class_budget: int | None = None  # meta-train on this many training classes only (hbmeta.tasks.noisy)
    meta_lr: float = 1e-3
    seed: int = 0
    device: str = "auto"
    threads: int | None = 1
    amp: bool = False  # bf16 autocast of the inner loop's network forward passes (hbmeta.training.runtime)
    checkpoint_every: int = 100
    log_every: int = 10
    inner: InnerSettings = field(default_factory=InnerSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    rl: RLSettings = field(default_factory=RLSettings)
    scheduler: SchedulerSettings = field(default_factory=SchedulerSettings)
    distributed: DistributedSettings = field(default_factory=DistributedSettings)

    def __post_init__(self) -> None:
        for name, cls in PARTS.items():
            value = getattr(self, name)
            if isinstance(value, dict):  # TrainConfig(inner={"steps": 3}) as from JSON
                setattr(self, name, cls(**value))
            elif not isinstance(value, cls):
                raise TypeError(f"TrainConfig.{name} must be a {cls.__name__}; got {type(value).__name__}")
        self.check()

    def check(self) -> None:
        """Check the values that are set (``None``: a default, filled in by resolution) against what is allowed:
        every numeric setting against :data:`RANGES`, the names against their registries."""
        for name in ("experiment", "algorithm", "device", "split"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a name (a string); got {getattr(self, name)!r}")
        get_algorithm(self.algorithm)  # a clear error for an unknown (or unregistered) name
        if self.inner.hidden_gradient not in (None, *HIDDEN_GRADIENTS):
            raise ValueError(f"hidden_gradient must be one of {', '.join(HIDDEN_GRADIENTS)}; got {self.inner.hidden_gradient!r}")
        if self.inner.curvature not in (None, "expected", "mean"):
            raise ValueError(f"inner_curvature must be 'expected' or 'mean'; got {self.inner.curvature!r}")
        if self.model.hide is not None and not isinstance(self.model.hide, str):
            raise ValueError(f"hide must be 'none' or comma-separated parameter names (a string); got {self.model.hide!r}")
        if self.model.prior not in PRIORS:
            raise ValueError(f"unknown prior {self.model.prior!r}; choose one of {', '.join(PRIORS)}")
        for name, value in self.to_flat().items():
            check_setting(name, value)
        if self.scheduler.name not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {self.scheduler.name!r}; choose one of {', '.join(SCHEDULERS)}")
        if self.scheduler.name != "uniform" and (self.distributed.enabled or self.distributed.private):
            raise ValueError(f"--scheduler {self.scheduler.name} runs in single-process training only, not distributed")
        if self.scheduler.pool_size is not None and self.meta_batch is not None \
                and self.scheduler.pool_size < self.meta_batch:
            raise ValueError(f"pool_size={self.scheduler.pool_size} must be at least meta_batch={self.meta_batch}")
        if self.scheduler.temperature is not None and not self.scheduler.temperature > 0:
            raise ValueError(f"temperature must be positive; got {self.scheduler.temperature}")

    def inner_config(self) -> InnerConfig:
        """The inner update's :class:`~hbmeta.inference.inner.InnerConfig` (of a resolved config)."""
        s = self.inner
        optional = {} if s.curvature is None else {"curvature": s.curvature}
        return InnerConfig(method=s.method, variance=s.variance, steps=s.steps, lr=s.lr, optimizer=s.optimizer,
                           num_samples=s.num_samples, clip_norm=s.clip_norm, scale_lr=s.scale_lr,
                           imaml_lambda=s.imaml_lambda, cg_steps=s.cg_steps, **optional)

    # ------------------------------------------------------------------------------------ flat names
    def to_flat(self) -> dict[str, Any]:
        """``{flat name: value}`` for every field (the command-line flags' names)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in PARTS}
        out.update({flat: getattr(getattr(self, part), name) for flat, (part, name) in FLAT_FIELDS.items()})
        return out

    @classmethod
    def from_flat(cls, **values: Any) -> "TrainConfig":
        """A config from flat names (``inner_steps=3``, ``prior_scale=0.1``, ``scheduler="ats"``, ...)."""
        core = {f.name for f in fields(cls)} - set(PARTS)
        unknown = set(values) - core - set(FLAT_FIELDS)
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}; the settings are {', '.join(sorted(core | set(FLAT_FIELDS)))}")
        parts: dict[str, dict[str, Any]] = {name: {} for name in PARTS}
        for key, value in values.items():
            if key in FLAT_FIELDS:
                part, name = FLAT_FIELDS[key]
                parts[part][name] = value
        return cls(**{k: v for k, v in values.items() if k in core},
                   **{name: PARTS[name](**kw) for name, kw in parts.items()})

    def with_flat(self, **values: Any) -> "TrainConfig":
        """A copy with some fields changed, by flat name."""
        return type(self).from_flat(**{**self.to_flat(), **values})

    # ------------------------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        """Nested plain data (``config.json``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """A config from :meth:`to_dict`'s nested form, or from a flat ``config.json`` written by hbmeta 0.1."""
        data = _written_before_the_image_defaults(data)
        if any(isinstance(data.get(name), dict) for name in PARTS):
            names = {f.name for f in fields(cls)}
            unknown = set(data) - names
            if unknown:
                raise ValueError(f"unknown config keys {sorted(unknown)}")
            for name, cls_ in PARTS.items():
                extra = set(data.get(name, {})) - {f.name for f in fields(cls_)}
                if extra:
                    raise ValueError(f"unknown config keys {sorted(f'{name}.{k}' for k in extra)}")
            return cls(**{k: (dict(v) if k in PARTS else v) for k, v in data.items()})
        if "inner_method" not in data:  # written before the Gauss-Newton update: every field had its SVI meaning
            data = {**data, "inner_method": "svi",
                    "max_prior_scale": 0.0 if data.get("max_prior_scale") is None else data["max_prior_scale"]}
        return cls.from_flat(**data)


def _written_before_the_image_defaults(data: dict[str, Any]) -> dict[str, Any]:
    """A saved config from before ``hide`` and ``hidden_gradient`` existed meant: nothing hidden, Fisher's identity
    (unset, they would now resolve to the image experiments' shared body)."""
    data = dict(data)
    if isinstance(data.get("model"), dict) or isinstance(data.get("inner"), dict):
        model, inner = dict(data.get("model") or {}), dict(data.get("inner") or {})
        model.setdefault("hide", "none")
        inner.setdefault("hidden_gradient", "fisher")
        return {**data, "model": model, "inner": inner}
    return {"hide": "none", "hidden_gradient": "fisher", **data}
