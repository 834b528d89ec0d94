"""Experiments: the registry of named experiments (tasks, network, likelihood, metric), their defaults from the
papers' tables, and the run configuration (:class:`TrainConfig`, plain data; :func:`resolve_config` fills in its
defaults).
"""

from hbmeta.experiments.config import (DistributedSettings, InnerSettings, ModelSettings, RLSettings, SchedulerSettings,
                                       TrainConfig)
from hbmeta.experiments.registry import EXPERIMENTS, Experiment, get_experiment, register_experiment
from hbmeta.experiments.resolve import make_config, resolve_config

__all__ = ["TrainConfig", "InnerSettings", "ModelSettings", "RLSettings", "SchedulerSettings", "DistributedSettings",
           "Experiment", "EXPERIMENTS", "get_experiment", "register_experiment", "resolve_config", "make_config"]
