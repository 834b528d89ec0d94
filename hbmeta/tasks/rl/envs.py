r"""Task distributions for meta-RL (GEM-BML section 5.3, appendix C.4.3; MAML's RL benchmarks).

Each distribution samples tasks (``sample_tasks``) and runs a whole meta-batch of them at once: ``T`` tasks x
``K`` episodes as one batched environment with

- ``reset(tasks [T, d], episodes K, seed) -> obs [T, K, obs_dim]``
- ``step(actions [T, K, act_dim]) -> (obs [T, K, obs_dim], reward [T, K], done [T, K])``

``Nav2DTasks`` is fully vectorised in torch. ``HalfCheetahTasks`` wraps gymnasium's MuJoCo ``HalfCheetah-v5``:
:class:`HalfCheetahVelocity` and :class:`HalfCheetahDirection` are ``gym.Wrapper`` s with ``reset_task``; a pool of
``T * K`` of them is stepped in a loop (each step is ~15 us of MuJoCo).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

try:  # the HalfCheetah tasks need the ``rl`` extra; 2D navigation does not
    import gymnasium as gym
    _Wrapper = gym.Wrapper
except ImportError:  # pragma: no cover - depends on the installed extras
    gym, _Wrapper = None, object

__all__ = ["HalfCheetahDirection", "HalfCheetahTasks", "HalfCheetahVelocity", "Nav2DTasks", "make_task_distribution"]


class Nav2DTasks:
    r"""2D point navigation (MAML sec. 5.3): reach a goal drawn uniformly in the unit square ``[-0.5, 0.5]^2``.

    The agent starts at the origin; observation = position; action = velocity, clipped to ``[-0.1, 0.1]`` per
    coordinate; ``x_{t+1} = x_t + clip(a_t)``; reward ``r_t = -||x_{t+1} - g||^2`` (the negative squared distance
    of the paper, C.4.3). Episodes run the full horizon (no early termination), so ``done`` is always false.
    """

    obs_dim = 2
    act_dim = 2
    task_dim = 2
    max_speed = 0.1

    def __init__(self, horizon: int = 100):
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1; got {horizon}")
        self.horizon = horizon
        self.position: Tensor | None = None
        self.goals: Tensor | None = None

    def sample_tasks(self, num_tasks: int, generator: torch.Generator | None = None) -> Tensor:
        """Goals ``[num_tasks, 2]`` uniform in ``[-0.5, 0.5]^2``."""
        return torch.rand((num_tasks, 2), generator=generator) - 0.5

    def reset(self, tasks: Tensor, episodes: int, seed: int = 0) -> Tensor:
        tasks = _check_tasks(tasks, self.task_dim)
        self.goals = tasks.float()
        self.position = torch.zeros(tasks.shape[0], episodes, 2)
        return self.position.clone()

    def step(self, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.position is None:
            raise RuntimeError("call reset(tasks, episodes) before step()")
        if actions.shape != self.position.shape:
            raise ValueError(f"actions {tuple(actions.shape)} must be [tasks, episodes, 2] = {tuple(self.position.shape)}")
        self.position = self.position + actions.clamp(-self.max_speed, self.max_speed)
        reward = -(self.position - self.goals.unsqueeze(1)).pow(2).sum(-1)
        return self.position.clone(), reward, torch.zeros(reward.shape, dtype=torch.bool)


def _check_tasks(tasks: Tensor, task_dim: int) -> Tensor:
    tasks = torch.as_tensor(tasks)
    if tasks.dim() == 1 and task_dim == 1:
        tasks = tasks.unsqueeze(-1)
    if tasks.dim() != 2 or tasks.shape[-1] != task_dim or tasks.shape[0] < 1:
        raise ValueError(f"tasks must be [num_tasks >= 1, {task_dim}]; got shape {tuple(tasks.shape)}")
    return tasks


def _gym():
    if gym is None:  # pragma: no cover - depends on the installed extras
        raise ImportError("HalfCheetah tasks need gymnasium and mujoco: pip install 'hbmeta[rl]'")
    return gym


class HalfCheetahVelocity(_Wrapper):
    r"""Goal velocity (MAML sec. 5.3): ``r = -|v_x - v_goal| - 0.05 ||a||^2``; ``v_goal ~ U[0, 2]``."""

    def __init__(self, env, goal_velocity: float = 1.0):
        super().__init__(env)
        self.goal_velocity = float(goal_velocity)

    @staticmethod
    def sample_tasks(num_tasks: int, generator: torch.Generator | None = None) -> Tensor:
        return 2.0 * torch.rand((num_tasks, 1), generator=generator)

    def reset_task(self, task) -> None:
        self.goal_velocity = float(task)

    def step(self, action):
        obs, _, terminated, truncated, info = self.env.step(action)
        reward = -abs(info["x_velocity"] - self.goal_velocity) + info["reward_ctrl"]
        return obs, reward, terminated, truncated, info


class HalfCheetahDirection(_Wrapper):
    r"""Forward / backward (MAML sec. 5.3): ``r = d v_x - 0.05 ||a||^2`` with direction ``d = +-1`` equally likely."""

    def __init__(self, env, direction: float = 1.0):
        super().__init__(env)
        self.direction = float(direction)

    @staticmethod
    def sample_tasks(num_tasks: int, generator: torch.Generator | None = None) -> Tensor:
        return (2.0 * torch.randint(0, 2, (num_tasks, 1), generator=generator) - 1.0).float()

    def reset_task(self, task) -> None:
        self.direction = float(task)

    def step(self, action):
        obs, _, terminated, truncated, info = self.env.step(action)
        reward = self.direction * info["x_velocity"] + info["reward_ctrl"]
        return obs, reward, terminated, truncated, info


class HalfCheetahTasks:
    """A meta-batch of HalfCheetah tasks (``kind`` ``"vel"`` or ``"dir"``) stepped as ``T x K`` gymnasium envs.

    Control cost ``0.05 ||a||^2`` as in MAML's rllab environments; actions are clipped to ``[-1, 1]`` before the
    simulator. Episodes are cut at ``horizon`` (paper: 200); HalfCheetah never terminates early.
    """

    obs_dim = 17
    act_dim = 6
    task_dim = 1

    def __init__(self, kind: str = "vel", horizon: int = 200):
        wrappers = {"vel": HalfCheetahVelocity, "dir": HalfCheetahDirection}
        if kind not in wrappers:
            raise ValueError(f"unknown HalfCheetah task kind {kind!r}; choose 'vel' or 'dir'")
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1; got {horizon}")
        self.kind, self.horizon, self.wrapper = kind, horizon, wrappers[kind]
        self.envs: list = []
        self.shape: tuple[int, int] | None = None

    def sample_tasks(self, num_tasks: int, generator: torch.Generator | None = None) -> Tensor:
        return self.wrapper.sample_tasks(num_tasks, generator)

    def _make(self):
        env = _gym().make("HalfCheetah-v5", ctrl_cost_weight=0.05, max_episode_steps=max(self.horizon, 1000))
        return self.wrapper(env)

    def reset(self, tasks: Tensor, episodes: int, seed: int = 0) -> Tensor:
        tasks = _check_tasks(tasks, self.task_dim)
        num = tasks.shape[0] * episodes
        while len(self.envs) < num:
            self.envs.append(self._make())
        self.shape = (tasks.shape[0], episodes)
        obs = []
        for i in range(num):
            env = self.envs[i]
            env.reset_task(tasks[i // episodes, 0].item())
            obs.append(env.reset(seed=int(seed) * 100_003 + i)[0])
        return torch.as_tensor(_stack(obs), dtype=torch.float32).reshape(*self.shape, self.obs_dim)

    def step(self, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.shape is None:
            raise RuntimeError("call reset(tasks, episodes) before step()")
        if actions.shape != (*self.shape, self.act_dim):
            raise ValueError(f"actions {tuple(actions.shape)} must be [tasks, episodes, {self.act_dim}]")
        flat = actions.detach().clamp(-1.0, 1.0).reshape(-1, self.act_dim).double().numpy()
        obs, rewards, dones = [], [], []
        for env, action in zip(self.envs, flat):
            o, r, terminated, _, _ = env.step(action)
            obs.append(o)
            rewards.append(r)
            dones.append(terminated)
        return (torch.as_tensor(_stack(obs), dtype=torch.float32).reshape(*self.shape, self.obs_dim),
                torch.tensor(rewards, dtype=torch.float32).reshape(self.shape),
                torch.tensor(dones, dtype=torch.bool).reshape(self.shape))

    def close(self) -> None:
        for env in self.envs:
            env.close()
        self.envs = []


def _stack(arrays) -> np.ndarray:
    return np.stack(arrays)


def make_task_distribution(name: str, horizon: int):
    """``nav2d``, ``cheetah-vel`` or ``cheetah-dir`` with episodes of ``horizon`` steps."""
    if name == "nav2d":
        return Nav2DTasks(horizon)
    if name in ("cheetah-vel", "cheetah-dir"):
        return HalfCheetahTasks(name.split("-")[1], horizon)
    raise ValueError(f"unknown RL task distribution {name!r}; choose nav2d, cheetah-vel or cheetah-dir")
