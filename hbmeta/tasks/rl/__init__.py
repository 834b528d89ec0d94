"""Meta reinforcement learning tasks (GEM-BML section 5.3): task distributions and batched rollouts.

    hbmeta train nav2d --algo gem-bml+ --iterations 300 --out runs/nav2d
    hbmeta evaluate runs/nav2d --steps 3

A meta-RL task's data are the episodes a policy collects in it, so collecting rollouts
(:func:`collect_rollouts`, with the linear feature baseline of :mod:`hbmeta.tasks.rl.baseline`) lives here beside the
environments. The learners live in :mod:`hbmeta.inference.rl_learner` and :mod:`hbmeta.inference.policy_gradient`,
the policy in :mod:`hbmeta.models.policy`, training in :mod:`hbmeta.training.rl` and meta-test in
:mod:`hbmeta.evaluation.rl`. The HalfCheetah tasks need the ``rl`` extra (gymnasium, mujoco); 2D navigation does not.
"""

from hbmeta.tasks.rl.envs import (HalfCheetahDirection, HalfCheetahTasks, HalfCheetahVelocity, Nav2DTasks,
                                  make_task_distribution)
from hbmeta.tasks.rl.rollouts import Rollouts, collect_rollouts

__all__ = ["HalfCheetahDirection", "HalfCheetahTasks", "HalfCheetahVelocity", "Nav2DTasks", "Rollouts",
           "collect_rollouts", "make_task_distribution"]
