"""Run-config defaults of the meta-RL experiments (GEM-BML appendix C.4.3, Table 3; MAML's RL recipe).

Paper: inner PG learning rate 0.1, 1 inner step at meta-train and 3 at meta-test, meta learning rate 1e-3,
meta-batch 20 (2D navigation) / 40 (HalfCheetah), 20 rollouts per task, horizon 100 / 200. On a 2-core CPU
the HalfCheetah meta-batch and rollouts per task are cut to 10 and 10 (stated in ``docs/rl.md``); give
``--meta-batch 40 --shots 20`` for the paper's budget.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hbmeta.experiments.config import TrainConfig

__all__ = ["RL_EXPERIMENTS", "rl_defaults"]

RL_EXPERIMENTS = ("nav2d", "cheetah-vel", "cheetah-dir")


def rl_defaults(name: str) -> Callable[[TrainConfig], dict[str, Any]]:
    """``config -> {field: value}`` for an RL experiment; rejects algorithms meta-RL does not support."""

    def defaults(config: TrainConfig) -> dict[str, Any]:
        from hbmeta.inference.rl_learner import RL_ALGORITHMS

        if config.algorithm not in RL_ALGORITHMS:
            raise ValueError(f"algorithm {config.algorithm!r} is not available for RL ({name}); "
                             f"choose one of {', '.join(RL_ALGORITHMS)}")
        common = {"inner_lr": 0.1, "inner_steps": 1, "inner_optimizer": "sgd", "num_samples": 1, "test_steps": 3,
                  "rl_inner": "pg", "max_kl": 0.01}
        if name == "nav2d":
            return {**common, "meta_batch": 20, "k_shot": 20, "k_query": 20, "horizon": 100}
        return {**common, "meta_batch": 10, "k_shot": 10, "k_query": 10, "horizon": 200}

    return defaults
