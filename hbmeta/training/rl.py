"""Meta-RL training runs: the run folder, checkpoints, resume and seeded generators of :mod:`hbmeta.training.loop`.

Iteration ``i`` draws its tasks and the environments' reset seeds from the task generator of
:func:`hbmeta.training.runs.iteration_generators` ``(seed, i)`` and every action / posterior draw from its noise
generator, so a resumed run repeats an uninterrupted one. RL runs on the CPU (the simulators do).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hbmeta.experiments.config import TrainConfig
from hbmeta.experiments.resolve import resolve_config
from hbmeta.inference.rl_learner import PolicyMetaLearner, SampleFn
from hbmeta.models.policy import GaussianMLPPolicy
from hbmeta.tasks.rl.envs import make_task_distribution
from hbmeta.tasks.rl.rollouts import collect_rollouts
from hbmeta.training.runs import load_checkpoint
from hbmeta.training.runs import (
    CHECKPOINT,
    TrainResult,
    save_run_checkpoint,
    restore_run,
    check_new_run,
    iteration_generators,
    open_run_dir,
)
from hbmeta.training.runtime import torch_threads

__all__ = ["build_policy_learner", "load_policy_learner", "make_sampler", "train_rl"]


def build_policy_learner(config: TrainConfig) -> PolicyMetaLearner:
    """The policy (initialised from ``config.seed``) and meta-learner of an RL run."""
    config = resolve_config(config)
    if config.model.guide != "meanfield" or config.model.prior != "diagonal":
        raise ValueError(f"meta-RL uses the diagonal Gaussian prior and the mean-field guide; got prior "
                         f"{config.model.prior!r}, guide {config.model.guide!r}")
    env = make_task_distribution(config.experiment, 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        policy = GaussianMLPPolicy(env.obs_dim, env.act_dim)
    return PolicyMetaLearner(policy, config.algorithm, inner_update=config.rl.inner, inner_lr=config.inner.lr,
                             inner_steps=config.inner.steps, meta_lr=config.meta_lr,
                             prior_scale=config.model.prior_scale,
                             max_prior_scale=config.model.prior_scale_ceiling, max_kl=config.rl.max_kl,
                             num_samples=config.inner.num_samples, gem_plus_mode=config.inner.gem_plus_mode)


def make_sampler(env, tasks: torch.Tensor, learner: PolicyMetaLearner, episodes: int, noise: torch.Generator,
                 seed: int) -> SampleFn:
    """``sample(theta [T, P]) -> (PolicyData, mean return)`` on ``tasks``; each call resets with a new seed."""
    calls = [0]

    def sample(theta: torch.Tensor):
        rollouts = collect_rollouts(env, tasks, learner.model.net, theta, episodes, noise, seed=seed + calls[0])
        calls[0] += 1
        return rollouts.policy_data(), rollouts.mean_return()

    return sample


def load_policy_learner(run_dir: str | Path) -> tuple[PolicyMetaLearner, TrainConfig, int]:
    """Rebuild an RL run's learner from its checkpoint: ``(learner, config, iteration)``."""
    path = Path(run_dir) / CHECKPOINT if Path(run_dir).is_dir() else Path(run_dir)
    state = load_checkpoint(path)
    config = TrainConfig.from_dict(state["config"])
    learner = build_policy_learner(config)
    learner.load_state_dict(state["learner"])
    return learner, config, int(state["iteration"])


def train_rl(config: TrainConfig, run_dir: str | Path, resume: bool = False, progress: bool = True,
             stop_after: int | None = None) -> TrainResult:
    """Meta-train a policy per ``config`` into ``run_dir`` (same folder layout and resume rules as ``hbmeta.training.loop``)."""
    config = resolve_config(config)
    with torch_threads(config.threads):
        return _train_rl(config, Path(run_dir), resume, progress, stop_after)


def _train_rl(config: TrainConfig, run_dir: Path, resume: bool, progress: bool, stop_after: int | None) -> TrainResult:
    learner = build_policy_learner(config)
    env = make_task_distribution(config.experiment, config.rl.horizon)
    if resume:
        start = restore_run(config, run_dir, learner)
    else:
        check_new_run(run_dir)
        start = 0
    metrics_path = open_run_dir(config, run_dir, resume, start)
    end = config.iterations if stop_after is None else min(config.iterations, start + stop_after)
    began = time.perf_counter()
    bar = tqdm(range(start, end), initial=start, total=config.iterations, disable=not progress,
               desc=f"{config.algorithm} on {config.experiment}", unit="it")
    with metrics_path.open("a") as metrics:
        for it in bar:
            task_gen, noise_gen = iteration_generators(config.seed, it, torch.device("cpu"))
            tasks = env.sample_tasks(config.meta_batch, task_gen)
            seed = int(torch.randint(0, 2**30, (1,), generator=task_gen))
            sample = make_sampler(env, tasks, learner, config.k_shot, noise_gen, seed)
            info = learner.meta_step(sample, config.meta_batch, noise_gen)
            done = it + 1
            if done % config.log_every == 0 or done == end:
                record = {"iteration": done, "seconds": time.perf_counter() - began, **info,
                          "prior_scale": float(learner.prior.scale.detach().mean())}
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
            bar.set_postfix(before=f"{info['return_before']:.1f}", after=f"{info['return_after']:.1f}")
            if done % config.checkpoint_every == 0 or done == end:
                save_run_checkpoint(learner, config, done, run_dir)
    if start == end:
        save_run_checkpoint(learner, config, end, run_dir)
    return TrainResult(learner, config, run_dir, time.perf_counter() - began)
