"""What a run logs: adaptation metrics of the current prior on a monitoring batch, prior statistics, TensorBoard
scalars, and ``hbmeta summary`` over finished runs. Monitoring never changes the run's parameters."""

from __future__ import annotations

import json

import pytest
import torch

from hbmeta.cli import main
from hbmeta.experiments import get_experiment, make_config
from hbmeta.training import train
from hbmeta.training.monitor import adaptation_metrics, monitor_generator


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_logged_metrics_describe_adaptation_and_the_prior(tmp_path):
    config = make_config(iterations=6, meta_batch=3, log_every=3, device="cpu", checkpoint_every=6)
    result = train(config, tmp_path / "gem", progress=False)
    last = _records(tmp_path / "gem")[-1]
    for key in ("grad_norm", "support_nll", "query_nll", "query_loss", "kl", "inner_elbo", "prior_scale",
                "prior_scale_min", "prior_scale_median", "prior_scale_max"):
        assert key in last and last[key] == last[key], key  # present and not NaN
    assert last["kl"] >= 0 and last["prior_scale_min"] <= last["prior_scale_median"] <= last["prior_scale_max"]
    assert last["support_nll"] < last["query_nll"]  # the posterior was fitted to the support set
    tasks = get_experiment(config.experiment).make_tasks(config)  # the same numbers again from the same stream
    monitor = monitor_generator(config.seed, 6)
    again = adaptation_metrics(result.learner, tasks.sample(3, monitor), monitor)
    assert again["query_loss"] == pytest.approx(last["query_loss"], rel=1e-6)
    n = config.k_shot
    assert last["inner_elbo"] == pytest.approx(-(n * last["support_nll"] + last["kl"]), rel=1e-3)
    for key in ("batch_support_nll", "batch_query_nll", "batch_query_loss", "batch_kl", "batch_inner_elbo"):
        assert key in last and last[key] == last[key], key  # meta_step's own adaptation, logged beside


def test_point_estimates_log_no_elbo(tmp_path):
    config = make_config(algorithm="maml", iterations=2, meta_batch=2, log_every=1, device="cpu", inner_steps=1)
    train(config, tmp_path / "maml", progress=False)
    last = _records(tmp_path / "maml")[-1]
    assert "query_loss" in last and "inner_elbo" not in last and "kl" not in last
    assert "batch_query_loss" not in last  # MAML's meta-gradient fits no posterior to report on


def test_monitoring_leaves_the_runs_parameters_unchanged(tmp_path):
    quiet = make_config(iterations=4, meta_batch=3, log_every=4, device="cpu", checkpoint_every=4)
    chatty = quiet.with_flat(log_every=1)
    a = train(quiet, tmp_path / "quiet", progress=False)
    b = train(chatty, tmp_path / "chatty", progress=False)
    assert torch.equal(a.learner.prior.loc, b.learner.prior.loc) and len(_records(tmp_path / "chatty")) == 4


def test_tensorboard_scalars_and_summary_of_runs(tmp_path, capsys):
    pytest.importorskip("tensorboard", reason="the tensorboard extra")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for algo in ("gem-bml+", "maml"):
        assert main(["train", "sinusoid", "--algo", algo, "--iterations", "4", "--meta-batch", "3", "--log-every",
                     "2", "--out", str(tmp_path / algo), "--no-progress", "--eval-tasks", "3", "--tensorboard"]) == 0
    events = EventAccumulator(str(tmp_path / "gem-bml+" / "tensorboard")).Reload()
    assert {"query_loss", "grad_norm", "prior_scale"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("query_loss")] == [2, 4]
    capsys.readouterr()
    assert main(["summary", str(tmp_path / "gem-bml+"), str(tmp_path / "maml"), "--out", str(tmp_path / "s")]) == 0
    table = capsys.readouterr().out
    assert "| gem-bml+ | sinusoid | gem-bml+ | 4 / 4 |" in table and "| maml | sinusoid | maml | 4 / 4 |" in table
    assert (tmp_path / "s" / "learning_curves.png").stat().st_size > 0 and (tmp_path / "s" / "summary.md").exists()


def test_classification_monitoring_reports_accuracy():
    from hbmeta import CategoricalLikelihood, MetaLearner, mlp
    from hbmeta.inference import TaskBatch

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 10, 3, generator=gen)
    y = (x[..., 0] > 0).long()
    learner = MetaLearner(mlp(3, (8,), 2), CategoricalLikelihood(), algorithm="gem-bml+")
    out = adaptation_metrics(learner, TaskBatch(x[:, :6], y[:, :6], x[:, 6:], y[:, 6:]), gen)
    assert 0.0 <= out["query_accuracy"] <= 1.0 and out["query_loss"] > 0 and out["kl"] >= 0
