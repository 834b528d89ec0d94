"""Meta-RL training: learning on 2D navigation, resume, every algorithm, HalfCheetah on a few hundred steps, CLI."""

import json

import pytest
import torch

from hbmeta.cli import main
from hbmeta.evaluation.rl import evaluate_policy
from hbmeta.evaluation.rl_report import load_evaluations, plot_returns, plot_training, returns_table
from hbmeta.experiments import TrainConfig, make_config, resolve_config
from hbmeta.inference.rl_learner import PolicyMetaLearner
from hbmeta.models.policy import GaussianMLPPolicy
from hbmeta.tasks.rl.envs import Nav2DTasks
from hbmeta.training.loop import train
from hbmeta.training.rl import build_policy_learner, load_policy_learner, train_rl


def _config(algorithm="gem-bml+", **kw) -> TrainConfig:
    base = {"experiment": "nav2d", "algorithm": algorithm, "iterations": 4, "meta_batch": 3, "k_shot": 3, "horizon": 10,
            "log_every": 1, "checkpoint_every": 2, "seed": 0}
    return TrainConfig.from_flat(**{**base, **kw})


def test_short_nav2d_meta_training_improves_post_adaptation_return_over_the_initial_policy(tmp_path):
    config = _config(iterations=20, meta_batch=10, k_shot=10, horizon=25)
    result = train(config, tmp_path / "run", progress=False)   # hbmeta.training.loop dispatches RL runs to hbmeta.tasks.rl
    env = Nav2DTasks(25)
    tasks = env.sample_tasks(10, torch.Generator().manual_seed(1))
    initial = evaluate_policy(build_policy_learner(config), env, tasks, steps=1, episodes=10, seed=3)
    trained = evaluate_policy(result.learner, env, tasks, steps=1, episodes=10, seed=3)
    assert trained[1]["return"] > initial[1]["return"] + 1.5, (initial, trained)
    assert trained[1]["return"] > trained[0]["return"]            # one adaptation step helps
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 20 and metrics[-1]["prior_scale"] != pytest.approx(0.02, abs=1e-6)


def test_resumed_rl_run_ends_where_an_uninterrupted_run_ends(tmp_path):
    config = _config()
    whole = train_rl(config, tmp_path / "whole", progress=False)
    train_rl(config, tmp_path / "part", progress=False, stop_after=2)
    resumed = train_rl(config, tmp_path / "part", resume=True, progress=False)
    for name, value in whole.learner.prior.state_dict().items():
        assert torch.equal(value, resumed.learner.prior.state_dict()[name]), name
    learner, loaded_config, iteration = load_policy_learner(tmp_path / "part")
    assert iteration == 4 and loaded_config == resolve_config(config) == whole.config
    assert torch.equal(learner.prior.mu, whole.learner.prior.mu)
    with pytest.raises(FileExistsError):
        train_rl(config, tmp_path / "whole", progress=False)


@pytest.mark.parametrize("algorithm,inner", [("gem-bml", "pg"), ("gem-bml+", "trpo"), ("maml", "pg"), ("reptile", "pg")])
def test_every_rl_algorithm_moves_the_prior_mean(tmp_path, algorithm, inner):
    config = _config(algorithm, iterations=2, rl_inner=inner)
    before = build_policy_learner(config).prior.mu.detach().clone()
    result = train_rl(config, tmp_path / algorithm, progress=False)
    after = result.learner.prior.mu.detach()
    assert torch.isfinite(after).all() and not torch.equal(before, after)
    scale_learned = not torch.allclose(result.learner.prior.scale, torch.tensor(0.02))
    assert scale_learned == algorithm.startswith("gem")        # Bayesian learners learn sigma, MAML / Reptile do not


def test_halfcheetah_meta_step_and_evaluation_run_on_a_few_hundred_steps(tmp_path):
    pytest.importorskip("gymnasium", reason="HalfCheetah needs the rl extra (gymnasium[mujoco])")
    config = TrainConfig.from_flat(experiment="cheetah-vel", algorithm="gem-bml+", iterations=1, meta_batch=2,
                                   k_shot=2, horizon=25, seed=0)           # 2 rollouts x (2 tasks x 2 episodes x 25 steps) = 200 steps
    result = train_rl(config, tmp_path / "cheetah", progress=False)
    assert result.learner.prior.mu.shape == (GaussianMLPPolicy(17, 6).log_std.numel()
                                             + sum(p.numel() for p in GaussianMLPPolicy(17, 6).mean_net.parameters()),)
    from hbmeta.tasks.rl.envs import HalfCheetahTasks

    env = HalfCheetahTasks("vel", horizon=25)
    evaluation = evaluate_policy(result.learner, env, torch.tensor([[0.5], [1.5]]), steps=1, episodes=2)
    assert set(evaluation) == {0, 1} and all(v["return"] < 0 for v in evaluation.values())  # r = -|v - goal| - cost


def test_rl_rejects_unsupported_algorithms_and_settings():
    with pytest.raises(ValueError, match="not available for RL"):
        make_config(experiment="nav2d", algorithm="abml")
    with pytest.raises(ValueError, match="not available for RL"):
        PolicyMetaLearner(GaussianMLPPolicy(2, 2), algorithm="imaml")
    with pytest.raises(ValueError, match="inner update"):
        PolicyMetaLearner(GaussianMLPPolicy(2, 2), inner_update="adam")
    with pytest.raises(ValueError, match="mean-field guide"):
        build_policy_learner(_config(guide="delta"))
    with pytest.raises(ValueError, match="bad RL settings"):
        PolicyMetaLearner(GaussianMLPPolicy(2, 2), max_kl=0.0)


def test_cli_trains_and_evaluates_an_rl_run(tmp_path, capsys):
    out = str(tmp_path / "cli")
    assert main(["train", "nav2d", "--algo", "reptile", "--iterations", "2", "--meta-batch", "2", "--shots", "2",
                 "--horizon", "10", "--out", out, "--no-progress", "--eval-tasks", "2"]) == 0
    assert set(json.loads((tmp_path / "cli" / "evaluation.json").read_text())) == {"0", "1", "2", "3"}
    assert main(["evaluate", out, "--steps", "1", "--tasks", "2"]) == 0
    text = capsys.readouterr().out
    assert "return after 1 steps" in text and "reptile on nav2d" in text
    assert set(json.loads((tmp_path / "cli" / "evaluation.json").read_text())) == {"0", "1", "2", "3"}  # kept
    keyed = json.loads((tmp_path / "cli" / "evaluation-tasks2-steps1-seed12345.json").read_text())
    assert keyed["settings"] == {"tasks": 2, "steps": 1, "seed": 12345, "checkpoint_iteration": 2}
    assert set(keyed["results"]) == {"0", "1"}
    runs = load_evaluations([out])
    assert returns_table(runs).count("\n") == 2 and "| reptile | 2 |" in returns_table(runs)
    assert plot_returns(runs, tmp_path / "returns.png").stat().st_size > 0
    assert plot_training(runs, tmp_path / "training.png").stat().st_size > 0
