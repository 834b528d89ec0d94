"""Nothing lost, nothing silent: bad inputs through the CLI and the Python API are refused with one line that names the
setting, the value and what is allowed; two writers on one run folder, stale locks and kills while checkpointing.

Each row of a table is one bad input and the words its error must contain. CLI errors exit with status 2 for a bad
setting or input and 1 for a failure while running, and never print a traceback.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hbmeta import MetaLearner, SinusoidTasks, TaskBatch, mlp
from hbmeta.cli import main
from hbmeta.experiments import TrainConfig
from hbmeta.inference import InnerConfig
from hbmeta.models import DiagonalGaussianPrior
from hbmeta.tasks.data import open_npz
from hbmeta.training.lock import RunLock, RunLockedError
from hbmeta.training.runs import CHECKPOINT, load_checkpoint, load_learner, save_checkpoint

TINY = ["--iterations", "2", "--meta-batch", "2", "--device", "cpu", "--no-progress", "--eval-tasks", "2"]


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """``(exit status, stderr)`` of ``hbmeta ARGV``, argparse's usage errors included."""
    try:
        code = main(argv)
    except SystemExit as done:
        code = done.code
    err = capsys.readouterr().err
    return code, err


# ------------------------------------------------------------------------------ refused when parsed (status 2)
PARSE_ERRORS = [  # (flags after "train sinusoid --out X", words the error must contain)
    (["--clip-norm", "-1"], "clip_norm must be a finite number > 0; got -1.0"),
    (["--clip-norm", "0"], "clip_norm must be a finite number > 0; got 0.0"),
    (["--inner-steps", "-1"], "inner_steps must be an integer in [0, 100000]; got -1"),
    (["--inner-steps", "2.5"], "inner_steps must be an integer in [0, 100000]; got '2.5'"),
    (["--inner-lr", "0"], "inner_lr must be a finite number in (0, 1000]; got 0.0"),
    (["--inner-lr", "nan"], "inner_lr must be a finite number in (0, 1000]; got nan"),
    (["--inner-lr", "abc"], "inner_lr must be a finite number in (0, 1000]; got 'abc'"),
    (["--inner-lr", "1e12"], "inner_lr must be a finite number in (0, 1000]; got 1000000000000.0"),
    (["--inner-scale-lr", "0"], "inner_scale_lr must be a finite number in (0, 1000]; got 0.0"),
    (["--num-samples", "0"], "num_samples must be an integer in [1, 100000]; got 0"),
    (["--test-steps", "-1"], "test_steps must be an integer in [0, 100000]; got -1"),
    (["--eval-tasks", "0"], "eval_tasks must be an integer >= 1; got 0"),
    (["--eval-tasks", "-1"], "eval_tasks must be an integer >= 1; got -1"),
    (["--max-prior-scale", "-1"], "max_prior_scale must be a finite number >= 0; got -1.0"),
    (["--prior-scale", "0"], "prior_scale must be a finite number in (0, 1000]; got 0.0"),
    (["--prior-scale", "-1"], "prior_scale must be a finite number in (0, 1000]; got -1.0"),
    (["--prior-scale", "nan"], "prior_scale must be a finite number in (0, 1000]; got nan"),
    (["--prior-scale", "inf"], "prior_scale must be a finite number in (0, 1000]; got inf"),
    (["--meta-lr", "1e9"], "meta_lr must be a finite number in (0, 10]; got 1000000000.0"),
    (["--meta-lr", "0"], "meta_lr must be a finite number in (0, 10]; got 0.0"),
    (["--checkpoint-every", "0"], "checkpoint_every must be an integer >= 1; got 0"),
    (["--log-every", "0"], "log_every must be an integer >= 1; got 0"),
    (["--iterations", "-5"], "iterations must be an integer >= 0; got -5"),
    (["--iterations", "2.5"], "iterations must be an integer >= 0; got '2.5'"),
    (["--meta-batch", "0"], "meta_batch must be an integer >= 1; got 0"),
    (["--shots", "0"], "k_shot must be an integer >= 1; got 0"),
    (["--k-query", "-1"], "k_query must be an integer >= 0; got -1"),
    (["--ways", "0"], "ways must be an integer >= 1; got 0"),
    (["--label-noise", "1.5"], "label_noise must be a finite number in [0, 1]; got 1.5"),
    (["--threads", "0"], "threads must be an integer in [1, 4096]; got 0"),
    (["--seed", "-1"], "seed must be an integer in [0, 9223372036854775807]; got -1"),
    (["--imaml-lambda", "0"], "imaml_lambda must be a finite number > 0; got 0.0"),
    (["--cg-steps", "0"], "cg_steps must be an integer >= 1; got 0"),
    (["--noise-scale", "0"], "noise_scale must be a finite number > 0; got 0.0"),
    (["--temperature", "0"], "temperature must be a finite number > 0; got 0.0"),
    (["--pool-size", "0"], "pool_size must be an integer >= 1; got 0"),
    (["--scheduler-lr", "-1"], "scheduler_lr must be a finite number > 0; got -1.0"),
    (["--scheduler-warmup", "-1"], "scheduler_warmup must be an integer >= 0; got -1"),
    (["--prior-components", "0"], "prior_components must be an integer >= 1; got 0"),
    (["--class-budget", "0"], "class_budget must be an integer >= 1; got 0"),
    (["--max-kl", "0"], "max_kl must be a finite number > 0; got 0.0"),
    (["--horizon", "0"], "horizon must be an integer >= 1; got 0"),
    (["--algo", "nope"], "unknown algorithm 'nope'"),
]


@pytest.mark.parametrize("flags, words", PARSE_ERRORS, ids=[" ".join(f) for f, _ in PARSE_ERRORS])
def test_train_flags_are_checked_when_parsed(flags, words, tmp_path, capsys):
    code, err = run_cli(["train", "sinusoid", "--out", str(tmp_path / "run"), *flags], capsys)
    assert code == 2 and words in err, err
    assert not (tmp_path / "run").exists()  # nothing was started


OTHER_COMMANDS = [
    (["evaluate", "RUN", "--tasks", "0"], "tasks must be an integer >= 1; got 0"),
    (["evaluate", "RUN", "--tasks", "-3"], "tasks must be an integer >= 1; got -3"),
    (["evaluate", "RUN", "--steps", "-1"], "steps must be an integer >= 0; got -1"),
    (["diagnose", "RUN", "--tasks", "0"], "tasks must be an integer >= 1; got 0"),
    (["compare", "RUN", "RUN", "--samples", "0"], "samples must be an integer >= 1; got 0"),
    (["calibrate", "RUN", "--steps", "-2"], "steps must be an integer >= 0; got -2"),
    (["demo", "--iterations", "-1"], "iterations must be an integer >= 0; got -1"),
    (["demo", "--meta-batch", "0"], "meta_batch must be an integer >= 1; got 0"),
]


@pytest.mark.parametrize("argv, words", OTHER_COMMANDS, ids=[" ".join(a) for a, _ in OTHER_COMMANDS])
def test_other_commands_check_their_numbers_when_parsed(argv, words, tmp_path, capsys):
    code, err = run_cli([str(tmp_path) if a == "RUN" else a for a in argv], capsys)
    assert code == 2 and words in err, err


# ------------------------------------------------------------------------------------- run folders (CLI)
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", "sinusoid", "--out", str(out), *TINY]) == 0
    return out


def _copy(run: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(run, to)
    return to


def test_an_empty_out_is_refused(capsys):
    code, err = run_cli(["train", "sinusoid", "--out", "", *TINY], capsys)
    assert code == 2 and "--out) is empty" in err


def test_a_fresh_run_into_a_crashed_runs_folder_needs_overwrite(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / "metrics.jsonl").write_text('{"iteration": 1}\n')
    code, err = run_cli(["train", "sinusoid", "--out", str(run), *TINY], capsys)
    assert code == 2 and "config.json, metrics.jsonl of a run that never wrote a checkpoint" in err
    assert (run / "metrics.jsonl").read_text() == '{"iteration": 1}\n'  # untouched
    assert run_cli(["train", "sinusoid", "--out", str(run), "--overwrite", *TINY], capsys)[0] == 0
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["iteration"] for ln in lines] == [2]  # the old line is gone, not appended to


def test_a_fresh_run_into_a_finished_run_is_refused(finished_run, tmp_path, capsys):
    run = _copy(finished_run, tmp_path / "run")
    code, err = run_cli(["train", "sinusoid", "--algo", "maml", "--out", str(run), *TINY], capsys)
    assert code == 2 and "already holds a run; pass --resume" in err and "--overwrite" in err
    code, err = run_cli(["train", "sinusoid", "--out", str(run), "--resume", "--overwrite", *TINY], capsys)
    assert code == 2 and "choose one" in err


def test_resume_with_fewer_iterations_than_the_checkpoint_is_refused(finished_run, tmp_path, capsys):
    run = _copy(finished_run, tmp_path / "run")
    before = (run / "config.json").read_text()
    flags = [f if f != "2" or i != 1 else "1" for i, f in enumerate(TINY)]  # --iterations 1
    code, err = run_cli(["train", "sinusoid", "--out", str(run), "--resume", *flags], capsys)
    assert code == 2 and "checkpoint is at iteration 2 but --iterations is 1" in err
    assert (run / "config.json").read_text() == before  # the config was not rewritten


def _damage(run: Path, edit) -> None:
    state = torch.load(run / CHECKPOINT, weights_only=True)
    edit(state)
    save_checkpoint(state, run / CHECKPOINT)


CHECKPOINT_DAMAGE = [
    ("iteration-1e6", lambda s: s.update(iteration=10**6), "claims iteration 1000000, outside 0..2"),
    ("negative-iteration", lambda s: s.update(iteration=-3), "claims iteration -3"),
    ("empty-learner", lambda s: s.update(learner={}), "does not match the learner its config builds (KeyError"),
    ("spliced-prior", lambda s: s["learner"]["prior"].update(mu=torch.zeros(7)),
     "does not match the learner its config builds"),
]


@pytest.mark.parametrize("name, edit, words", CHECKPOINT_DAMAGE, ids=[c[0] for c in CHECKPOINT_DAMAGE])
def test_a_damaged_checkpoint_is_named_on_resume(name, edit, words, finished_run, tmp_path, capsys):
    run = _copy(finished_run, tmp_path / "run")
    _damage(run, edit)
    flags = [f if f != "2" or i != 1 else "4" for i, f in enumerate(TINY)]  # --iterations 4
    code, err = run_cli(["train", "sinusoid", "--out", str(run), "--resume", *flags], capsys)
    assert code == 1 and words in err and "Traceback" not in err, err


def test_a_damaged_checkpoint_is_named_on_evaluate(finished_run, tmp_path, capsys):
    run = _copy(finished_run, tmp_path / "run")
    _damage(run, lambda s: s.update(learner={}))
    code, err = run_cli(["evaluate", str(run), "--tasks", "2", "--steps", "1", "--device", "cpu"], capsys)
    assert code == 1 and "does not match the learner its config builds" in err
    (run / CHECKPOINT).write_bytes(b"not a torch file")
    code, err = run_cli(["evaluate", str(run), "--tasks", "2", "--device", "cpu"], capsys)
    assert code == 1 and "is corrupt or not a torch file" in err


def test_a_pickled_payload_is_refused_by_weights_only(tmp_path, capsys):
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo owned > " + str(tmp_path / "owned"),))

    (tmp_path / CHECKPOINT).write_bytes(pickle.dumps({"learner": Payload(), "config": {}}))
    code, err = run_cli(["evaluate", str(tmp_path), "--tasks", "2", "--device", "cpu"], capsys)
    assert code == 1 and "corrupt or not a torch file" in err and not (tmp_path / "owned").exists()


def test_a_corrupt_config_json_does_not_break_evaluate(finished_run, tmp_path, capsys):
    run = _copy(finished_run, tmp_path / "run")
    (run / "config.json").write_text("{ not json")
    code, err = run_cli(["evaluate", str(run), "--tasks", "2", "--steps", "1", "--device", "cpu"], capsys)
    assert code == 0, err  # the checkpoint holds the config


def test_evaluate_keys_its_file_by_its_settings(finished_run, tmp_path, capsys):
    run = _copy(finished_run, tmp_path / "run")
    trained = (run / "evaluation.json").read_text()
    assert run_cli(["evaluate", str(run), "--tasks", "3", "--steps", "2", "--device", "cpu"], capsys)[0] == 0
    assert (run / "evaluation.json").read_text() == trained  # the training run's evaluation is kept
    keyed = json.loads((run / "evaluation-tasks3-steps2-seed12345.json").read_text())
    assert keyed["settings"] == {"tasks": 3, "steps": 2, "seed": 12345, "checkpoint_iteration": 2}
    assert set(keyed["results"]) == {"0", "1", "2"}


def test_a_bad_metrics_line_is_named_on_resume(finished_run, tmp_path, capsys):
    run = _copy(finished_run, tmp_path / "run")
    with open(run / "metrics.jsonl", "a") as f:
        f.write("garbage\n{\"iteration\": 2}\n")
    flags = [f if f != "2" or i != 1 else "3" for i, f in enumerate(TINY)]
    code, err = run_cli(["train", "sinusoid", "--out", str(run), "--resume", *flags], capsys)
    assert code == 1 and "metrics.jsonl line 2 is not a JSON record" in err


def test_a_folder_that_cannot_be_written_says_what_and_where(finished_run, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, err = run_cli(["evaluate", str(finished_run), "--tasks", "2", "--steps", "1", "--device", "cpu",
                         "--out", str(blocker / "sub")], capsys)
    assert code == 1 and "could not write" in err and str(blocker / "sub") in err


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from hbmeta.training import runs

    path = tmp_path / CHECKPOINT
    save_checkpoint({"learner": {"x": torch.ones(2)}, "config": {}, "iteration": 1}, path)

    def full_disk(obj, f, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(runs.torch, "save", full_disk)
    with pytest.raises(OSError, match=r"could not write .*checkpoint.pt \(\[enforce fail.*the previous checkpoint.pt "
                                      r"is intact"):
        save_checkpoint({"learner": {}, "config": {}, "iteration": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["iteration"] == 1 and not list(tmp_path.glob(".*.tmp"))


def test_resume_without_a_checkpoint_names_it(tmp_path, capsys):
    code, err = run_cli(["train", "sinusoid", "--out", str(tmp_path / "none"), "--resume", *TINY], capsys)
    assert code == 2 and "does not exist" in err and not (tmp_path / "none").exists()  # and is not created
    (tmp_path / "empty").mkdir()
    code, err = run_cli(["train", "sinusoid", "--out", str(tmp_path / "empty"), "--resume", *TINY], capsys)
    assert code == 2 and "checkpoint not found" in err


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(FileExistsError):
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "config.json").write_text("{}")
        main(["--debug", "train", "sinusoid", "--out", str(tmp_path / "run"), *TINY])


# ------------------------------------------------------------------------------------------ Python API
def _learner(**kwargs) -> MetaLearner:
    torch.manual_seed(0)
    return MetaLearner(mlp(), **kwargs)


def _batch(num_tasks: int = 2) -> TaskBatch:
    return SinusoidTasks().sample(num_tasks, torch.Generator().manual_seed(0))


def _bad_npz(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / "images_background.npz"
    np.savez(path, other=np.zeros(3))
    if kind == "truncated":
        path.write_bytes(path.read_bytes()[:40])
    with open_npz(path) as z:
        z["images"]


API_ERRORS = [  # (name, call, exception type, words)
    ("inner-clip-norm", lambda tmp: InnerConfig(clip_norm=-1), ValueError, "clip_norm=-1 must be > 0"),
    ("inner-val-steps", lambda tmp: InnerConfig(val_steps=-1), ValueError, "val_steps=-1 must be an integer >= 0"),
    ("inner-scale-lr", lambda tmp: InnerConfig(scale_lr=0.0), ValueError, "scale_lr=0.0 must be a finite number > 0"),
    ("inner-steps-str", lambda tmp: InnerConfig(steps="3"), ValueError, "steps='3' must be an integer"),
    ("inner-lr-nan", lambda tmp: InnerConfig(lr=math.nan), ValueError, "lr=nan must be a finite number"),
    ("adapt-steps", lambda tmp: _learner().adapt(_batch().x_train, _batch().y_train, steps=-1), ValueError,
     "steps must be an integer >= 0 (or None for the inner update's); got -1"),
    ("adapt-2d", lambda tmp: _learner().adapt(_batch().x_train[0], _batch().y_train[0]), ValueError,
     "must be [tasks, points, features...] (3 or more dims); got shape (10, 1)"),
    ("adapt-numpy", lambda tmp: _learner().adapt(_batch().x_train.numpy(), _batch().y_train), TypeError,
     "adapt: x must be a torch.Tensor; got ndarray"),
    ("adapt-list", lambda tmp: _learner().adapt([[0.0]], _batch().y_train), TypeError,
     "adapt: x must be a torch.Tensor; got list"),
    ("adapt-nan", lambda tmp: _learner().adapt(_batch().x_train * math.nan, _batch().y_train), ValueError,
     "x contains NaN or inf"),
    ("predict-samples", lambda tmp: _learner().predict(_learner().prior.initial_posterior(2), _batch().x_val, 0),
     ValueError, "num_samples must be an integer >= 1; got 0"),
    ("predict-nan", lambda tmp: _learner().predict(_learner().prior.initial_posterior(2), _batch().x_val * math.nan),
     ValueError, "predict: x contains NaN or inf"),
    ("predict-tasks", lambda tmp: _learner().predict(_learner().prior.initial_posterior(3), _batch().x_val),
     ValueError, "x has 2 tasks but the posterior has 3"),
    ("predict-posterior", lambda tmp: _learner().predict(None, _batch().x_val), TypeError,
     "posterior must be a Posterior"),
    ("outputs-vs-targets", lambda tmp: MetaLearner(mlp(1, (8,), 3)).meta_step(_batch()), ValueError,
     "its output layer must have 1 output(s)"),
    ("from-module-nan", lambda tmp: DiagonalGaussianPrior.from_module(mlp(), scale=math.nan), ValueError,
     "scale must be a finite number > 0"),
    ("from-module-zero", lambda tmp: DiagonalGaussianPrior.from_module(mlp(), scale=0), ValueError,
     "scale must be a finite number > 0 (the prior sd of every weight); got 0"),
    ("x-range", lambda tmp: SinusoidTasks(x_range=(5, -5)), ValueError,
     "x_range must be (low, high) with finite low < high; got (5, -5)"),
    ("net-none", lambda tmp: MetaLearner(None), TypeError, "net must be a torch nn.Module"),
    ("algorithm-none", lambda tmp: MetaLearner(mlp(), algorithm=None), TypeError, "algorithm must be a name"),
    ("meta-lr-str", lambda tmp: MetaLearner(mlp(), meta_lr="0.1"), ValueError, "meta_lr must be a finite number > 0"),
    ("meta-lr-inf", lambda tmp: MetaLearner(mlp(), meta_lr=math.inf), ValueError, "got inf"),
    ("prior-scale", lambda tmp: MetaLearner(mlp(), prior_scale=0.0), ValueError, "prior_scale must be a finite number"),
    ("max-prior-scale", lambda tmp: MetaLearner(mlp(), max_prior_scale=-1.0), ValueError,
     "max_prior_scale must be a finite number > 0, None (no ceiling) or 'auto'; got -1.0"),
    ("likelihood", lambda tmp: MetaLearner(mlp(), likelihood="gaussian"), TypeError, "likelihood must be a hbmeta"),
    ("meta-step-none", lambda tmp: _learner().meta_step(None), TypeError, "meta_step takes a TaskBatch"),
    ("config-str", lambda tmp: TrainConfig.from_flat(inner_lr="0.1"), ValueError,
     "inner_lr must be a finite number in (0, 1000]; got '0.1'"),
    ("config-bool", lambda tmp: TrainConfig.from_flat(amp=1), ValueError, "amp must be true or false; got 1"),
    ("config-algorithm", lambda tmp: TrainConfig(algorithm=None), ValueError, "algorithm must be a name"),
    ("empty-support", lambda tmp: TaskBatch(torch.zeros(2, 0, 1), torch.zeros(2, 0, 1), torch.zeros(2, 3, 1),
                                            torch.zeros(2, 3, 1)), ValueError, "empty support set"),
    ("npz-truncated", lambda tmp: _bad_npz(tmp, "truncated"), ValueError, "is not a readable .npz archive"),
    ("npz-key", lambda tmp: _bad_npz(tmp, "key"), ValueError, "has no array 'images' (it has other)"),
    ("maml-diverges", lambda tmp: _learner(algorithm="maml", inner=InnerConfig(lr=1e6, steps=3, optimizer="sgd"))
     .meta_step(_batch()), RuntimeError, "inner loop diverged by step 3 (inner SGD): the weights of task(s) [0, 1]"),
]


@pytest.mark.parametrize("name, call, kind, words", API_ERRORS, ids=[c[0] for c in API_ERRORS])
def test_the_python_api_refuses_bad_input_with_a_clear_message(name, call, kind, words, tmp_path):
    with pytest.raises(kind) as info:
        call(tmp_path)
    assert words in str(info.value), str(info.value)
    assert "\n" not in str(info.value)  # one line


# ------------------------------------------------------------------------------ one writer, locks and kills
def _train_command(out: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "hbmeta", "train", "sinusoid", "--out", str(out), "--device", "cpu",
            "--no-progress", "--meta-batch", "2", "--eval-tasks", "2", *flags]


ENV = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}


def test_a_second_writer_is_refused_and_the_first_run_is_intact(tmp_path):
    out = tmp_path / "run"
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(_train_command(out, "--iterations", "5000", "--checkpoint-every", "20"), env=ENV,
                                 stdout=subprocess.DEVNULL, stderr=log)
        try:
            deadline = time.time() + 120
            while not (out / CHECKPOINT).exists() and time.time() < deadline:
                time.sleep(0.1)
            second = subprocess.run(_train_command(out, "--algo", "maml", "--iterations", "5"), env=ENV,
                                    capture_output=True, text=True, timeout=120)
            third = subprocess.run(_train_command(out, "--iterations", "5000", "--resume"), env=ENV,
                                   capture_output=True, text=True, timeout=120)
            assert first.poll() is None, "the first run ended before the others tried: make it longer"
        finally:
            first.kill()  # kill -9 while it writes
            first.wait(timeout=60)
    for refused in (second, third):
        assert refused.returncode == 1, refused.stderr
        assert f"is being written by another hbmeta process (pid {first.pid} on" in refused.stderr
        assert "Traceback" not in refused.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["algorithm"] == "gem-bml+"  # the first run's, not the refused maml's
    iterations = [json.loads(line)["iteration"] for line in (out / "metrics.jsonl").read_text().splitlines()
                  if line.endswith("}")]
    assert iterations == list(range(10, 10 * len(iterations) + 1, 10))  # one run's lines, none interleaved
    reached = load_checkpoint(out / CHECKPOINT)["iteration"]
    assert reached % 20 == 0 and reached > 0
    resumed = subprocess.run(_train_command(out, "--iterations", str(reached + 20), "--resume"), env=ENV,
                             capture_output=True, text=True, timeout=300)  # the killed holder's lock is stale
    assert resumed.returncode == 0, resumed.stderr
    assert load_checkpoint(out / CHECKPOINT)["iteration"] == reached + 20 and not (out / ".lock.json").exists()


def test_a_stale_lock_from_a_killed_process_does_not_block(tmp_path):
    out = tmp_path / "run"
    code = (f"from hbmeta.training.lock import RunLock; import os, signal; RunLock({str(out)!r}).__enter__(); "
            f"open({str(out / '.checkpoint.pt.abc.tmp')!r}, 'w').write('half'); os.kill(os.getpid(), signal.SIGKILL)")
    killed = subprocess.run([sys.executable, "-c", code], env=ENV)
    assert killed.returncode == -signal.SIGKILL and (out / ".lock.json").exists()  # it died holding the lock
    with RunLock(out):  # the kernel released it with the process
        assert not list(out.glob(".*.tmp"))  # and the orphan temp file is cleaned
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()} on"):
            RunLock(out).__enter__()  # while held, a second holder is refused, naming this one


def _holder_pid(run: Path) -> int | None:
    try:
        return json.loads((run / ".lock.json").read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


def test_kills_while_checkpointing_every_iteration_always_leave_a_loadable_checkpoint(tmp_path):
    """At least 10 kill -9 at random moments of a run that checkpoints every iteration: each time the checkpoint
    loads, and the resumed run ends bit-identical to an uninterrupted one."""
    iterations = 40
    flags = ("--iterations", str(iterations), "--checkpoint-every", "1", "--log-every", "5")
    reference = tmp_path / "reference"
    subprocess.run(_train_command(reference, *flags), env=ENV, check=True, capture_output=True, timeout=300)
    out, rng, kills = tmp_path / "killed", random.Random(0), 0
    done = False
    while not done:
        resume = ("--resume",) if (out / CHECKPOINT).exists() else ()
        overwrite = ("--overwrite",) if out.exists() and not resume else ()  # killed before the first checkpoint
        with open(tmp_path / "log", "w") as log:
            proc = subprocess.Popen(_train_command(out, *flags, *resume, *overwrite), env=ENV,
                                    stdout=subprocess.DEVNULL, stderr=log)
        if kills < 10:
            deadline = time.time() + 60
            while _holder_pid(out) != proc.pid and time.time() < deadline and proc.poll() is None:
                time.sleep(0.02)  # until this process holds the run folder (not a killed one's stale .lock.json)
            time.sleep(rng.uniform(0.0, 0.4))  # into the training loop, which writes a checkpoint every iteration
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
            proc.wait(timeout=60)
            if (out / CHECKPOINT).exists():
                assert load_checkpoint(out / CHECKPOINT)["iteration"] <= iterations  # always loads
            continue
        proc.wait(timeout=300)
        assert proc.returncode == 0, (tmp_path / "log").read_text()
        done = True
    assert kills >= 10
    a, _, it_a = load_learner(reference, "cpu")
    b, _, it_b = load_learner(out, "cpu")
    assert it_a == it_b == iterations
    for (name, p), q in zip(a.prior.named_parameters(), b.prior.parameters()):
        assert torch.equal(p, q), name
    logged = [json.loads(line)["iteration"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(5, iterations + 1, 5))
