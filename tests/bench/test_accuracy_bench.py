"""``hbmeta bench accuracy``: one result per (benchmark, algorithm, seed), reused and resumed, a table over seeds."""

import json
import math

import pytest

from hbmeta.bench.accuracy import (
    AccuracyBenchConfig,
    collect_results,
    format_accuracy_table,
    largest_step_loss,
    run_accuracy_benchmark,
    run_dir,
    run_one,
    seed_interval,
    summarize,
    write_accuracy_benchmark,
)
from hbmeta.cli import main


def small(tmp_path, **changes) -> AccuracyBenchConfig:
    return AccuracyBenchConfig(**{"benchmarks": ("sinusoid",), "algorithms": ("gem-bml+", "maml"), "seeds": (0, 1),
                                  "budget": "smoke", "out": str(tmp_path), "progress": False, **changes})


def test_seed_interval_is_the_t_interval_over_seeds():
    mean, half = seed_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.303 * 1.0 / math.sqrt(3), rel=1e-4)
    assert math.isnan(seed_interval([5.0])[1])


def test_largest_step_loss_is_the_worst_drop_between_consecutive_steps():
    assert largest_step_loss({"0": 0.2, "1": 0.9, "2": 0.85, "3": 0.86, "5": 0.1}, "accuracy") == (1, pytest.approx(0.05))
    assert largest_step_loss({"0": 5.0, "1": 1.0, "2": 1.3}, "mse") == (1, pytest.approx(0.3))
    assert largest_step_loss({"0": 5.0, "1": 1.0, "2": 0.9}, "mse")[1] < 0  # never got worse
    assert largest_step_loss({"0": 0.2, "5": 0.9}, "accuracy") is None  # no consecutive steps


def test_grid_writes_one_result_per_run_on_the_same_tasks_and_a_table(tmp_path):
    summary = run_accuracy_benchmark(small(tmp_path))
    results = collect_results(tmp_path)
    assert {(r["algorithm"], r["seed"]) for r in results} == {(a, s) for a in ("gem-bml+", "maml") for s in (0, 1)}
    for r in results:
        assert r["test_tasks"] == 5 and r["test_seed"] == 12345 and list(r["evaluation"]) == [str(k) for k in range(11)]
        assert r["config"]["iterations"] == 3 and r["train_seconds"] > 0
    # the 0-step error is the prior mean's on the held-out tasks: the same tasks for every run of a seed's net
    row = {r["algorithm"]: r for r in summary["rows"]}
    assert row["maml"]["seeds"] == [0, 1] and set(row["maml"]["steps"]) == {str(k) for k in range(11)}
    worst = [largest_step_loss({k: v["mse"] for k, v in r["evaluation"].items()}, "mse")[1]
             for r in results if r["algorithm"] == "maml"]
    assert row["maml"]["largest_step_loss"] == pytest.approx(seed_interval(worst), nan_ok=True)
    table = format_accuracy_table(summary)
    assert "**sinusoid**" in table and "| gem-bml+ | 2 |" in table and "| maml | 2 |" in table
    assert "MSE after 10 | largest loss k→k+1 | train s |" in table and "MSE after 2 " not in table
    paths = write_accuracy_benchmark(summary, tmp_path)
    assert json.loads(paths["json"].read_text())["rows"] and paths["png"].read_bytes()[:4] == b"\x89PNG"


def test_a_finished_run_is_reused_and_other_settings_are_refused(tmp_path):
    config = small(tmp_path, algorithms=("fomaml",), seeds=(0,))
    first = run_one(config, "sinusoid", "fomaml", 0)
    result_file = run_dir(config, "sinusoid", "fomaml", 0) / "result.json"
    stamp = result_file.stat().st_mtime_ns
    assert run_one(config, "sinusoid", "fomaml", 0) == first and result_file.stat().st_mtime_ns == stamp
    other = small(tmp_path, algorithms=("fomaml",), seeds=(0,), budget="small")  # 4000 iterations: not the same run
    with pytest.raises(FileExistsError, match="other settings"):
        run_one(other, "sinusoid", "fomaml", 0)


def test_an_interrupted_run_resumes_from_its_checkpoint(tmp_path):
    from hbmeta.training.loop import train

    config = small(tmp_path, algorithms=("reptile",), seeds=(0,))
    folder = run_dir(config, "sinusoid", "reptile", 0)
    train(config.run_config("sinusoid", "reptile", 0), folder, progress=False, stop_after=2)  # "killed" after 2 of 3
    result = run_one(config, "sinusoid", "reptile", 0)
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["iteration"] == 3 and result["config"]["iterations"] == 3


def test_cli_table_only_assembles_what_has_finished(tmp_path, capsys):
    run_one(small(tmp_path), "sinusoid", "maml", 0)
    assert main(["bench", "accuracy", "--table-only", "--out", str(tmp_path), "--budget", "smoke"]) == 0
    out = capsys.readouterr().out
    assert "| maml | 1 |" in out and (tmp_path / "accuracy.md").exists()
    summary = summarize(collect_results(tmp_path))
    assert [r["algorithm"] for r in summary["rows"]] == ["maml"]
