"""``hbmeta bench throughput``: one row per (workload, algorithm, meta-batch), tasks/s = T / seconds; timings not asserted."""

import json

import pytest

from hbmeta.bench.throughput import (
    ThroughputConfig,
    format_throughput_table,
    run_throughput_benchmark,
)
from hbmeta.cli import main
from hbmeta.experiments.registry import HEAD_INNER_STEPS


@pytest.fixture(scope="module")
def result():
    return run_throughput_benchmark(ThroughputConfig(meta_batches=(2, 3), repeats=1, warmup=0, queries=1))


def test_throughput_has_a_row_per_workload_algorithm_and_meta_batch(result):
    keys = {(r["workload"], r["algorithm"], r["meta_batch"]) for r in result["rows"]}
    assert keys == {(w, a, t) for w in ("sinusoid", "conv4") for a in ("gem-bml+", "maml") for t in (2, 3)}
    for r in result["rows"]:
        assert r["seconds_per_iter"] > 0 and r["tasks_per_second"] == pytest.approx(r["meta_batch"] / r["seconds_per_iter"])
    conv = {r["algorithm"]: r for r in result["rows"] if r["workload"] == "conv4" and r["meta_batch"] == 2}
    assert conv["gem-bml+"]["inner_steps"] == HEAD_INNER_STEPS  # the Omniglot recipe: Gauss-Newton on the head
    table = format_throughput_table(result)
    assert table.startswith("| workload | algorithm | T=2 | T=3 |") and "| conv4 | maml |" in table


def test_amp_skips_algorithms_that_backpropagate_through_the_inner_loop():
    out = run_throughput_benchmark(ThroughputConfig(meta_batches=(2,), workloads=("sinusoid",), repeats=1, warmup=0,
                                                    amp=True))
    assert [r["algorithm"] for r in out["rows"]] == ["gem-bml+"]
    assert out["skipped"][0]["algorithm"] == "maml" and "inner loop" in out["skipped"][0]["reason"]


def test_bench_throughput_command_writes_json_and_markdown(tmp_path, capsys):
    code = main(["bench", "throughput", "--meta-batches", "2", "--benchmarks", "sinusoid", "--repeats", "1",
                 "--warmup", "0", "--out", str(tmp_path)])
    assert code == 0 and "| sinusoid | gem-bml+ |" in capsys.readouterr().out
    saved = json.loads((tmp_path / "throughput.json").read_text())
    assert len(saved["rows"]) == 2 and (tmp_path / "throughput.md").read_text().startswith("| workload |")
    with pytest.raises(ValueError, match="unknown throughput workload"):
        ThroughputConfig(workloads=("resnet",))
