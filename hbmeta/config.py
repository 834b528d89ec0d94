"""Run configuration as a dataclass; defaults follow the paper's tables where they fit a CPU budget."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields

import torch

from inference.inner import InnerConfig
from inference.learner import get_algorithm

__all__ = ["TrainConfig", "resolve_device", "torch_threads"]

#: inner-update defaults per (family): the Bayesian algorithms run VI on summed log-likelihoods, the
#: point-estimate baselines run SGD on the mean loss with the MAML learning rate (appendix C.4.1 / Finn et al.)
_INNER_DEFAULTS = {
    "bayesian": dict(inner_optimizer="sgd", inner_lr=0.002, inner_steps=5),
    "point": dict(inner_optimizer="sgd", inner_lr=0.01, inner_steps=5),
}


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA device; use --device cpu or auto")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise ValueError(f"unknown device {name!r}; choose auto, cpu or cuda")
    return torch.device(name)


@contextmanager
def torch_threads(num: int | None):
    """Run with ``num`` intra-op CPU threads (``None``: leave torch's setting), restoring it afterwards.

    Small networks (the 2 x 40 sinusoid MLP) run several times faster on one thread: their kernels are
    too short to pay for waking OpenMP workers.
    """
    before = torch.get_num_threads()
    if num is not None:
        torch.set_num_threads(num)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class TrainConfig:
    """Everything that defines a meta-training run (saved as ``config.json`` in the run folder)."""

    experiment: str = "sinusoid"
    algorithm: str = "gem-bml+"
    iterations: int = 2000
    meta_batch: int = 25
    k_shot: int = 10
    k_query: int = 10
    inner_steps: int | None = None
    inner_lr: float | None = None
    inner_optimizer: str | None = None
    num_samples: int = 2
    test_steps: int = 10
    meta_lr: float = 1e-3
    prior_scale: float = 0.05
    noise_scale: float = 0.5
    guide: str = "meanfield"
    gem_plus_mode: str = "sequential"
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int = 100
    log_every: int = 10
    threads: int | None = 1

    def __post_init__(self) -> None:
        spec = get_algorithm(self.algorithm)
        self.algorithm = spec.name
        for key, value in _INNER_DEFAULTS["bayesian" if spec.bayesian else "point"].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.iterations < 0 or self.meta_batch < 1:
            raise ValueError(f"iterations must be >= 0 and meta_batch >= 1; got {self.iterations}, {self.meta_batch}")

    def inner(self) -> InnerConfig:
        return InnerConfig(steps=self.inner_steps, lr=self.inner_lr, optimizer=self.inner_optimizer,
                           num_samples=self.num_samples)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}")
        return cls(**data)
