"""Meta-test for RL (GEM-BML section 5.3, Fig. 3): average return after 0, 1, 2, 3 adaptation steps.

For each held-out task: roll out ``episodes`` (paper: 40) episodes with the current policy, record their mean
return, adapt on them (one inner update: VI for the Bayesian learners, a PG step for MAML / Reptile), repeat.
Bayesian learners act with weights drawn from their posterior, one draw per task.
"""

from __future__ import annotations

import torch

from hbmeta.evaluation.stats import mean_ci95
from hbmeta.inference.rl_learner import PolicyMetaLearner
from hbmeta.tasks.rl.rollouts import collect_rollouts

__all__ = ["evaluate_policy", "evaluate_rl_run", "format_returns"]


def evaluate_policy(learner: PolicyMetaLearner, env, tasks: torch.Tensor, steps: int = 3, episodes: int = 40,
                    seed: int = 12345) -> dict[int, dict[str, float]]:
    """Mean return over ``tasks [T, d]`` (95% CI over tasks) after ``0..steps`` adaptation steps."""
    if steps < 0 or episodes < 1:
        raise ValueError(f"need steps >= 0 and episodes >= 1; got {steps}, {episodes}")
    noise = torch.Generator().manual_seed(seed + 1)
    posterior = learner.initial(tasks.shape[0])
    out: dict[int, dict[str, float]] = {}
    for k in range(steps + 1):
        rollouts = collect_rollouts(env, tasks, learner.model.net, learner.behaviour(posterior, noise),
                                    episodes, noise, seed=seed + 7919 * k)
        mean, ci = mean_ci95(rollouts.returns().mean(1))
        out[k] = {"return": mean, "ci95": ci, "num_tasks": int(tasks.shape[0]), "episodes": episodes}
        if k < steps:
            posterior = learner.adapt_step(posterior, rollouts.policy_data(), generator=noise)
    return out


def evaluate_rl_run(learner: PolicyMetaLearner, config, steps: int = 3, num_tasks: int | None = None,
                    episodes: int = 40, seed: int = 12345) -> dict[int, dict[str, float]]:
    """Meta-test a run on new tasks of its experiment (default: 40 tasks for nav2d, 10 for HalfCheetah)."""
    from hbmeta.tasks.rl.envs import make_task_distribution

    env = make_task_distribution(config.experiment, config.rl.horizon)
    num_tasks = num_tasks or (40 if config.experiment == "nav2d" else 10)
    tasks = env.sample_tasks(num_tasks, torch.Generator().manual_seed(seed))
    return evaluate_policy(learner, env, tasks, steps, episodes, seed)


def format_returns(evaluation: dict[int, dict[str, float]]) -> str:
    return "\n".join(f"  return after {k} steps: {v['return']:.2f} ± {v['ci95']:.2f}" for k, v in evaluation.items())
