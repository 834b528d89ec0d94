"""Meta-RL task distributions: 2D navigation by hand, HalfCheetah goal velocity / direction on a few hundred steps."""

import pytest
import torch

from hbmeta.tasks.rl.envs import HalfCheetahTasks, Nav2DTasks, make_task_distribution

gym = pytest.importorskip("gymnasium", reason="HalfCheetah needs the rl extra (gymnasium[mujoco])")


def test_nav2d_steps_by_the_clipped_action_and_rewards_minus_squared_distance():
    env = Nav2DTasks(horizon=2)
    obs = env.reset(torch.tensor([[0.3, -0.2]]), episodes=1)
    assert torch.equal(obs, torch.zeros(1, 1, 2))
    obs, reward, done = env.step(torch.tensor([[[0.05, 0.5]]]))          # clipped to (0.05, 0.1)
    assert torch.allclose(obs, torch.tensor([[[0.05, 0.1]]]))
    assert reward.item() == pytest.approx(-((0.05 - 0.3) ** 2 + (0.1 + 0.2) ** 2))   # -0.1525
    obs, reward, done = env.step(torch.tensor([[[-0.3, 0.02]]]))         # clipped to (-0.1, 0.02)
    assert torch.allclose(obs, torch.tensor([[[-0.05, 0.12]]]))
    assert reward.item() == pytest.approx(-(0.35 ** 2 + 0.32 ** 2))       # -0.2249
    assert not done.any()


def test_nav2d_goals_lie_in_the_unit_square_and_bad_input_is_named():
    goals = Nav2DTasks().sample_tasks(500, torch.Generator().manual_seed(0))
    assert goals.shape == (500, 2) and goals.abs().max() <= 0.5 and goals.std(0).min() > 0.25
    env = Nav2DTasks()
    with pytest.raises(RuntimeError, match="reset"):
        env.step(torch.zeros(1, 1, 2))
    with pytest.raises(ValueError, match="tasks must be"):
        env.reset(torch.zeros(3), episodes=1)
    env.reset(torch.zeros(2, 2), episodes=3)
    with pytest.raises(ValueError, match="actions"):
        env.step(torch.zeros(2, 2, 2))
    with pytest.raises(ValueError, match="unknown RL task distribution"):
        make_task_distribution("ant", 10)


@pytest.mark.parametrize("kind", ["vel", "dir"])
def test_halfcheetah_reward_is_the_task_reward_of_maml(kind):
    tasks = HalfCheetahTasks(kind, horizon=50)
    goal = 1.5 if kind == "vel" else -1.0
    env = tasks._make()
    env.reset_task(goal)
    env.reset(seed=3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        action = (2 * torch.rand(6, generator=gen) - 1).double().numpy()
        _, reward, _, _, info = env.step(action)
        forward = -abs(info["x_velocity"] - goal) if kind == "vel" else goal * info["x_velocity"]
        assert reward == pytest.approx(forward - 0.05 * float((action ** 2).sum()), rel=1e-5, abs=1e-6)
    env.close()


def test_halfcheetah_batch_steps_tasks_x_episodes_reproducibly():
    tasks = HalfCheetahTasks("vel", horizon=25)
    goals = tasks.sample_tasks(2, torch.Generator().manual_seed(0))
    assert goals.shape == (2, 1) and ((goals >= 0) & (goals <= 2)).all()
    first = tasks.reset(goals, episodes=2, seed=5)
    assert first.shape == (2, 2, 17)
    actions = torch.full((2, 2, 6), 0.3)
    obs, reward, done = tasks.step(actions)
    assert obs.shape == (2, 2, 17) and reward.shape == (2, 2) and done.shape == (2, 2)
    again = tasks.reset(goals, episodes=2, seed=5)
    assert torch.equal(first, again)
    obs2, reward2, _ = tasks.step(actions)
    assert torch.equal(obs, obs2) and torch.equal(reward, reward2)
    with pytest.raises(ValueError, match="actions"):
        tasks.step(torch.zeros(2, 2, 5))
    directions = HalfCheetahTasks("dir").sample_tasks(200, torch.Generator().manual_seed(0))
    assert set(directions.flatten().tolist()) == {-1.0, 1.0}
    tasks.close()
