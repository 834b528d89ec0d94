"""Resume, atomic checkpoints, clear errors on bad input, and the command line."""

import json

import pytest
import torch

from hbmeta.cli import main
from hbmeta.experiments.config import TrainConfig
from hbmeta.inference.batch import TaskBatch
from hbmeta.inference.learner import MetaLearner
from hbmeta.models import GaussianLikelihood, mlp
from hbmeta.training.loop import train
from hbmeta.training.runs import CheckpointError, load_checkpoint, save_checkpoint
from hbmeta.training.runs import load_learner
from hbmeta.training.runtime import resolve_device

TINY = dict(experiment="sinusoid", iterations=6, meta_batch=3, inner_steps=2, checkpoint_every=2, device="cpu",
            log_every=1)


def _prior_params(learner):
    return {k: v.detach().clone() for k, v in learner.prior.state_dict().items()}


@pytest.mark.parametrize("algorithm", ["gem-bml+", "maml"])
def test_resume_reaches_same_parameters_as_uninterrupted_run(tmp_path, algorithm):
    config = TrainConfig.from_flat(algorithm=algorithm, **TINY)
    straight = train(config, tmp_path / "straight", progress=False)
    train(config, tmp_path / "resumed", progress=False, stop_after=3)  # "crash" after 3 iterations
    assert load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")["iteration"] == 3
    resumed = train(config, tmp_path / "resumed", resume=True, progress=False)
    for name, value in _prior_params(straight.learner).items():
        torch.testing.assert_close(_prior_params(resumed.learner)[name], value, rtol=0, atol=0)
    lines = [json.loads(ln) for ln in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines] == list(range(1, 7))  # no duplicated or missing log lines


def test_checkpoint_write_is_atomic_and_loads_with_weights_only(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint({"learner": {"w": torch.ones(3)}, "config": {}}, path)
    save_checkpoint({"learner": {"w": torch.zeros(3)}, "config": {}}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temp files left behind
    assert torch.equal(load_checkpoint(path)["learner"]["w"], torch.zeros(3))


def test_missing_and_corrupt_checkpoints_raise_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(bad)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.ones(2)}, foreign)
    with pytest.raises(CheckpointError, match="not an hbmeta checkpoint"):
        load_checkpoint(foreign)


def test_resume_refuses_a_different_config(tmp_path):
    train(TrainConfig.from_flat(**TINY), tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"differs .*meta_lr"):
        train(TrainConfig.from_flat(**{**TINY, "meta_lr": 0.5}), tmp_path, resume=True, progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        train(TrainConfig.from_flat(**TINY), tmp_path, progress=False)


def _batch(**changes):
    data = dict(x_train=torch.zeros(2, 5, 1), y_train=torch.zeros(2, 5, 1), x_val=torch.zeros(2, 4, 1),
                y_val=torch.zeros(2, 4, 1))
    data.update(changes)
    return TaskBatch(**data)


@pytest.mark.parametrize("changes,message", [
    (dict(x_train=torch.zeros(2, 0, 1), y_train=torch.zeros(2, 0, 1)), "empty support set"),
    (dict(y_train=torch.zeros(2, 4, 1)), r"disagree on \[tasks, points\]"),
    (dict(x_val=torch.zeros(3, 4, 1), y_val=torch.zeros(3, 4, 1)), "support set has 2 tasks but query set has 3"),
    (dict(y_val=torch.tensor(float("nan")).expand(2, 4, 1)), r"NaN or inf \(task\(s\) \[0, 1\]\)"),
    (dict(x_train=torch.zeros(2, 5)), r"\[tasks, points, \.\.\.\]|differ in shape"),
], ids=["empty", "shape", "tasks", "nan", "rank"])
def test_bad_task_data_raises_error_naming_the_problem(changes, message):
    with pytest.raises(ValueError, match=message):
        _batch(**changes)


def test_bad_names_and_shapes_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown algorithm 'mamll'"):
        TrainConfig(algorithm="mamll")
    with pytest.raises(ValueError, match="unknown experiment 'cosine'"):
        train(TrainConfig(experiment="cosine", device="cpu"), "/tmp/never-written", progress=False)
    with pytest.raises(ValueError, match="unknown guide 'normal'"):
        MetaLearner(mlp(), guide="normal")
    learner = MetaLearner(mlp(), GaussianLikelihood(0.5))
    with pytest.raises(ValueError, match="theta has 7 weights"):
        learner.model.net(torch.zeros(2, 7), torch.zeros(2, 3, 1))
    with pytest.raises(ValueError, match="empty support set"):
        learner.adapt(torch.zeros(1, 0, 1), torch.zeros(1, 0, 1))
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu")


def test_cli_train_evaluate_and_errors(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "sinusoid", "--algo", "gem-bml+", "--iterations", "3", "--meta-batch", "2",
                 "--inner-steps", "1", "--device", "cpu", "--out", str(out), "--no-progress"]) == 0
    assert {p.name for p in out.iterdir()} >= {"config.json", "metrics.jsonl", "checkpoint.pt", "evaluation.json", "plots"}
    assert (out / "plots" / "predictive.png").stat().st_size > 10_000
    assert main(["evaluate", str(out), "--steps", "2", "--tasks", "5", "--device", "cpu"]) == 0
    assert "MSE after  2 steps" in capsys.readouterr().out
    assert main(["train", "sinusoid", "--algo", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "unknown algorithm 'nope'" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "missing")]) == 2  # a path that is not there: a bad input
    assert "checkpoint not found" in capsys.readouterr().err


def test_cli_demo_smoke_with_tiny_budget(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--iterations", "3", "--meta-batch", "2", "--device", "cpu",
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| gem-bml+ |" in printed and "| maml |" in printed and "10 steps" in printed
    summary = json.loads((tmp_path / "demo.json").read_text())
    assert set(summary["mse"]) == {"gem-bml+", "maml"} and set(summary["mse"]["maml"]) == {"0", "1", "5", "10"}
    assert (tmp_path / "predictive.png").stat().st_size > 10_000


def test_load_learner_restores_the_trained_prior(tmp_path):
    run = train(TrainConfig.from_flat(**TINY), tmp_path, progress=False)
    learner, config, iteration = load_learner(tmp_path, "cpu")
    assert iteration == 6 and config.algorithm == "gem-bml+"
    torch.testing.assert_close(learner.prior.mu, run.learner.prior.mu)


def test_cli_reports_a_diverging_inner_loop_with_task_and_step(tmp_path, capsys):
    rc = main(["train", "sinusoid", "--algo", "gem-bml+", "--iterations", "2", "--meta-batch", "2",
               "--inner-lr", "1000", "--inner-method", "svi", "--device", "cpu", "--out", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "inner loop diverged" in err and "task(s)" in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised when no GPU is present")
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(RuntimeError, match="torch sees no CUDA device"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"

def test_resume_into_a_folder_that_does_not_exist_says_so_and_creates_nothing(tmp_path, capsys):
    from hbmeta.cli import main

    missing = tmp_path / "no-such-run"
    code = main(["train", "sinusoid", "--iterations", "2", "--resume", "--out", str(missing)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "does not exist" in err and "--resume" in err and len(err.splitlines()) == 1
    assert not missing.exists()


def test_readers_see_a_whole_checkpoint_while_a_run_is_being_written(tmp_path):
    """A live writer (``hbmeta train`` in another process, a checkpoint every iteration) and a reader loading the
    run over and over: every read is a whole checkpoint (atomic rename), its iteration never goes back, and the
    CLI's readers say which iteration they read."""
    import subprocess
    import sys
    import time

    from hbmeta.training import load_learner

    run = tmp_path / "live"
    log = (tmp_path / "err.txt").open("wb")
    writer = subprocess.Popen([sys.executable, "-m", "hbmeta.cli", "train", "sinusoid", "--iterations", "150",
                               "--checkpoint-every", "1", "--log-every", "50", "--eval-tasks", "2", "--out", str(run),
                               "--no-progress"], stdout=subprocess.DEVNULL, stderr=log)
    seen, deadline = [], time.monotonic() + 120
    try:
        while writer.poll() is None and time.monotonic() < deadline:
            if (run / "checkpoint.pt").is_file():
                _, _, iteration = load_learner(run, "cpu")  # raises on a half-written file
                seen.append(iteration)
        assert writer.wait(timeout=120) == 0, (tmp_path / "err.txt").read_text()
    finally:
        writer.kill()
        log.close()
    assert len(seen) >= 5 and seen == sorted(seen) and len(set(seen)) > 1, seen[:20]
    from hbmeta.cli import main
    assert main(["summary", str(run)]) == 0
