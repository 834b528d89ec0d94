"""Experiments: the registry of named experiments (tasks, network, likelihood, metric), their defaults from the
papers' tables, and the run configuration (:class:`TrainConfig`, plain data).
"""

from hbmeta.experiments.config import TrainConfig
from hbmeta.experiments.registry import EXPERIMENTS, Experiment, get_experiment

__all__ = ["TrainConfig", "Experiment", "EXPERIMENTS", "get_experiment"]
