"""Experiments by name: which tasks, which network, which likelihood.

Registered here: ``sinusoid`` (Finn et al.'s default setting) and ``sinusoid-challenging`` (the paper's
challenging setting, section 5.1). Later families (images, RL) register the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from hbmeta.config import TrainConfig
from hbmeta.tasks import SinusoidTasks
from models.functional import mlp
from models.likelihoods import GaussianLikelihood, Likelihood

__all__ = ["Experiment", "EXPERIMENTS", "get_experiment"]


@dataclass(frozen=True)
class Experiment:
    name: str
    make_tasks: Callable[[TrainConfig], SinusoidTasks]
    make_net: Callable[[TrainConfig], nn.Module]
    make_likelihood: Callable[[TrainConfig], Likelihood]
    metric: str  # what `evaluate` reports


EXPERIMENTS: dict[str, Experiment] = {
    e.name: e for e in (
        Experiment("sinusoid", lambda c: SinusoidTasks("default", c.k_shot, c.k_query), lambda c: mlp(1, (40, 40), 1),
                   lambda c: GaussianLikelihood(c.noise_scale), "mse"),
        Experiment("sinusoid-challenging", lambda c: SinusoidTasks("challenging", c.k_shot, c.k_query),
                   lambda c: mlp(1, (40, 40), 1), lambda c: GaussianLikelihood(c.noise_scale), "mse"),
    )
}


def get_experiment(name: str) -> Experiment:
    try:
        return EXPERIMENTS[name]
    except KeyError:
        raise ValueError(f"unknown experiment {name!r}; choose one of {', '.join(EXPERIMENTS)}") from None
