"""Meta reinforcement learning (GEM-BML section 5.3): task distributions, batched rollouts, training, evaluation.

    hbmeta train nav2d --algo gem-bml+ --iterations 300 --out runs/nav2d
    hbmeta evaluate runs/nav2d --steps 3

The learners themselves live in :mod:`inference.rl_learner` and :mod:`inference.policy_gradient`; the policy in
:mod:`models.policy`. Names are imported on first use (``hbmeta.experiments`` registers the RL experiments
through :mod:`hbmeta.rl.defaults` while ``hbmeta.train`` is still importing).
"""

from importlib import import_module

_EXPORTS = {
    "HalfCheetahDirection": "envs", "HalfCheetahTasks": "envs", "HalfCheetahVelocity": "envs", "Nav2DTasks": "envs",
    "make_task_distribution": "envs", "Rollouts": "rollouts", "collect_rollouts": "rollouts",
    "evaluate_policy": "evaluate", "evaluate_rl_run": "evaluate", "build_policy_learner": "train",
    "load_policy_learner": "train", "train_rl": "train",
}

__all__ = [
    "HalfCheetahDirection", "HalfCheetahTasks", "HalfCheetahVelocity", "Nav2DTasks", "Rollouts", "build_policy_learner",
    "collect_rollouts", "evaluate_policy", "evaluate_rl_run", "load_policy_learner", "make_task_distribution", "train_rl",
]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hbmeta.rl' has no attribute {name!r}")
    return getattr(import_module(f"hbmeta.rl.{_EXPORTS[name]}"), name)
