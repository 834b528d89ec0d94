"""Run configuration as a dataclass; defaults follow the paper's tables where they fit a CPU budget."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch

from hbmeta.inference.inner import InnerConfig
from hbmeta.inference.learner import GAUSS_NEWTON_GUIDES, default_inner, get_algorithm, prior_defaults

__all__ = ["TrainConfig"]

@dataclass
class TrainConfig:
    """Everything that defines a meta-training run (saved as ``config.json`` in the run folder)."""

    experiment: str = "sinusoid"
    algorithm: str = "gem-bml+"
    iterations: int = 2000
    meta_batch: int | None = None
    k_shot: int | None = None
    k_query: int | None = None
    ways: int = 5
    data_root: str | None = None
    split: str = "paper"
    inner_method: str | None = None  # "gauss-newton" or "svi" (hbmeta.inference.inner.INNER_METHODS); None: the algorithm's
    inner_variance: str = "meanfield"  # Gauss-Newton's guide variances: meanfield or marginal (InnerConfig.variance)
    inner_steps: int | None = None
    inner_lr: float | None = None
    inner_optimizer: str | None = None
    inner_scale_lr: float | None = None
    num_samples: int | None = None
    clip_norm: float | None = None
    imaml_lambda: float | None = None
    cg_steps: int | None = None
    test_steps: int | None = None
    meta_lr: float = 1e-3
    prior_scale: float | None = None  # None: hbmeta.inference.learner.prior_defaults of the inner update
    max_prior_scale: float | None = None  # None: the inner update's default; 0: no ceiling
    noise_scale: float | None = None  # regression likelihood noise; None: the inner update's default
    learn_likelihood: bool = False  # meta-learn the noise sd / softmax temperature by GEM (gem-bml, gem-bml+)
    guide: str = "meanfield"
    prior: str = "diagonal"
    prior_components: int = 2
    gem_plus_mode: str | None = None  # None: the inner update's default (hbmeta.inference.gem.GEM_PLUS_MODES)
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int = 100
    log_every: int = 10
    threads: int | None = 1
    horizon: int | None = None  # RL: steps per episode (nav2d 100, cheetah 200; hbmeta.tasks.rl)
    rl_inner: str | None = None  # RL: the Bayesian learners' inner update, "pg" or "trpo"
    max_kl: float | None = None  # RL: TRPO's KL bound (inner TRPO; MAML's meta-update)
    scheduler: str = "uniform"  # task scheduler (hbmeta.training.schedulers): uniform, greedy or ats
    pool_size: int | None = None  # candidate tasks per iteration (non-uniform schedulers; default 2 x meta_batch)
    temperature: float | None = None  # scheduler softmax temperature (default 0.1 with label noise, else 1)
    scheduler_lr: float = 1e-3
    scheduler_warmup: int = 0  # first iterations train only the ATS scheduler (meta-updates undone)
    label_noise: float = 0.0  # mean symmetric label-flip ratio of the support sets (hbmeta.tasks.noisy)
    class_budget: int | None = None  # meta-train on this many training classes only (hbmeta.tasks.noisy)
    distributed: bool = False  # run under torchrun, tasks split over the ranks (hbmeta.training.distributed)
    private: bool = False  # distributed, only posterior parameters on the wire (hbmeta.training.distributed)
    amp: bool = False  # bf16 autocast of the inner loop's network forward passes (hbmeta.training.runtime)

    def __post_init__(self) -> None:
        from hbmeta.experiments.registry import get_experiment

        self.algorithm = get_algorithm(self.algorithm).name
        from hbmeta.models.prior_factory import PRIORS

        if self.prior not in PRIORS or self.prior_components < 1:
            raise ValueError(f"bad prior {self.prior!r} with {self.prior_components} components; choose one of "
                             f"{', '.join(PRIORS)} and components >= 1")
        experiment = get_experiment(self.experiment)
        # fields left as None take the experiment's defaults (the paper's tables), then the algorithm's
        for key, value in experiment.defaults(self).items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        gauss_newton = (self.prior == "diagonal" and self.guide in GAUSS_NEWTON_GUIDES
                        and experiment.metric != "return")  # RL: policy-gradient VI
        default = default_inner(self.algorithm, gauss_newton=gauss_newton)
        if self.inner_method is None:
            self.inner_method = default.method
        if self.inner_method != default.method:
            default = default_inner(self.algorithm, gauss_newton=self.inner_method == "gauss-newton")
        family = prior_defaults(self.algorithm, self.inner_method)
        for key in ("prior_scale", "noise_scale", "gem_plus_mode"):
            if getattr(self, key) is None:
                setattr(self, key, getattr(family, key))
        if self.max_prior_scale is None:
            self.max_prior_scale = family.max_prior_scale or 0.0  # 0: no ceiling (build_learner passes None)
        if self.test_steps is None:
            self.test_steps = 10  # the paper's meta-test budget (appendix C.4)
        for key, attr in (("inner_steps", "steps"), ("inner_lr", "lr"), ("inner_optimizer", "optimizer"),
                          ("num_samples", "num_samples"), ("clip_norm", "clip_norm"),
                          ("imaml_lambda", "imaml_lambda"), ("cg_steps", "cg_steps")):
            if getattr(self, key) is None:
                setattr(self, key, getattr(default, attr))
        for key in ("meta_batch", "k_shot", "k_query"):
            if getattr(self, key) is None:
                raise ValueError(f"experiment {self.experiment!r} has no default for {key}; give it explicitly")
        if self.iterations < 0 or self.meta_batch < 1:
            raise ValueError(f"iterations must be >= 0 and meta_batch >= 1; got {self.iterations}, {self.meta_batch}")
        self._check_scheduler()

    def _check_scheduler(self) -> None:
        """Validate the task-scheduler fields and fill their defaults (ATS appendix C.1 / D.2)."""
        from hbmeta.training.schedulers import SCHEDULERS

        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {self.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
        if not 0.0 <= self.label_noise <= 1.0:
            raise ValueError(f"label_noise must be in [0, 1]; got {self.label_noise}")
        if self.scheduler != "uniform":
            if self.distributed or self.private:
                raise ValueError(f"--scheduler {self.scheduler} runs in single-process training only, not distributed")
            self.pool_size = 2 * self.meta_batch if self.pool_size is None else self.pool_size
            self.temperature = (0.1 if self.label_noise > 0 else 1.0) if self.temperature is None else self.temperature
        if self.pool_size is not None and self.pool_size < self.meta_batch:
            raise ValueError(f"pool_size={self.pool_size} must be at least meta_batch={self.meta_batch}")
        if self.temperature is not None and not self.temperature > 0:
            raise ValueError(f"temperature must be positive; got {self.temperature}")

    @property
    def prior_scale_ceiling(self) -> float | None:
        """``max_prior_scale`` as the prior takes it (``None``: no ceiling)."""
        return self.max_prior_scale if self.max_prior_scale and self.max_prior_scale > 0 else None

    def inner(self) -> InnerConfig:
        return InnerConfig(method=self.inner_method, variance=self.inner_variance, steps=self.inner_steps, lr=self.inner_lr, optimizer=self.inner_optimizer,
                           num_samples=self.num_samples, clip_norm=self.clip_norm, scale_lr=self.inner_scale_lr,
                           imaml_lambda=self.imaml_lambda, cg_steps=self.cg_steps)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}")
        if "inner_method" not in data:  # written before the Gauss-Newton update: every field had its SVI meaning
            data = {**data, "inner_method": "svi",
                    "max_prior_scale": 0.0 if data.get("max_prior_scale") is None else data["max_prior_scale"]}
        return cls(**data)
