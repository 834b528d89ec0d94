"""The step benchmark (``hbmeta bench step``): structure of its result and the memory property it shows.

Memory is measured as saved-for-backward bytes, which is deterministic; timings are not asserted.
"""

import json

import pytest
import torch

from hbmeta.bench.step import (LOWER_BOUND, PYRO_TRACED, SVI, StepBenchConfig, format_step_table, peak_saved_bytes,
                          run_step_benchmark, write_step_benchmark)

ALGORITHMS = ("gem-bml+", SVI, PYRO_TRACED, "maml", "fomaml", "reptile", "abml", "ibaml")


@pytest.fixture(scope="module")
def result():
    return run_step_benchmark(StepBenchConfig(steps=(1, 3), repeats=1, warmup=0, meta_batch=4))


def saved(result, name, steps):
    return next(r["saved_bytes"] for r in result["rows"] if r["algorithm"] == name and r["steps"] == steps
                and not r.get("default_steps"))


def test_step_benchmark_has_a_row_per_algorithm_and_step_count(result):
    pairs = {(r["algorithm"], r["steps"]) for r in result["rows"] if not r["default_steps"]}
    assert pairs == {(n, k) for n in (*ALGORITHMS, LOWER_BOUND) for k in (1, 3)}
    defaults = {(r["algorithm"], r["steps"]) for r in result["rows"] if r["default_steps"]}
    assert defaults == {("gem-bml+", 2), ("maml", 5)}  # each at its own default inner steps too
    for r in result["rows"]:
        assert r["ms_per_iter"] > 0 and len(r["ms_all"]) == 1 and r["saved_bytes"] > 0
    for k in (1, 3):  # Gauss-Newton VI builds no graph of the inner loop: a few KB against SVI's
        assert saved(result, "gem-bml+", k) < 0.05 * saved(result, SVI, k)
    assert set(result["lower_bound_ratio"]) == {"1", "3"}
    assert {"gem_memory_flat", "hbmeta_within_1.3x_lower_bound", "gem_time_within_1.5x_maml_at_defaults"} <= set(
        result["targets"])


def test_maml_saved_memory_grows_with_inner_steps_gem_plus_does_not(result):
    assert saved(result, "maml", 3) > saved(result, "maml", 1)
    assert saved(result, "abml", 3) > saved(result, "abml", 1)
    assert saved(result, "gem-bml+", 3) == saved(result, "gem-bml+", 1)
    assert saved(result, SVI, 3) == saved(result, SVI, 1) > 0
    assert saved(result, LOWER_BOUND, 3) == saved(result, LOWER_BOUND, 1)
    assert saved(result, "ibaml", 3) == saved(result, "ibaml", 1)  # the implicit gradient: flat as GEM's
    assert result["targets"]["gem_memory_flat"]["met"] is True


def test_peak_saved_bytes_counts_live_graphs_not_freed_ones():
    x = torch.zeros(1000, requires_grad=True)  # 4000 bytes

    def one_graph_at_a_time():
        for _ in range(3):
            (x.exp() * x).sum().backward()  # saves x and exp(x); freed by backward

    def three_graphs_alive():
        losses = [(x.exp() * x).sum() for _ in range(3)]
        return losses

    assert peak_saved_bytes(one_graph_at_a_time) == 8000
    assert peak_saved_bytes(three_graphs_alive) == 4000 + 3 * 4000  # x deduplicated, three exp(x) outputs


def test_package_torch_func_transforms_run_under_the_tracker_and_outer_graphs_still_count():
    """``torch.func`` refuses saved-tensor hooks; the package's transforms lift them (``untracked``) and the
    tracker resumes after: a conv net's VJP Jacobian runs, and the outer graph's saved bytes are counted."""
    from hbmeta.models.conv import Conv4
    from hbmeta.models.functional import BatchedNet
    from hbmeta.models.jacobian import vjp_jacobian

    net = BatchedNet(Conv4(in_channels=1, num_classes=2, filters=4, image_size=16))
    theta = torch.randn(2, net.num_params) * 0.1
    x = torch.rand(2, 3, 1, 16, 16)
    w = torch.zeros(1000, requires_grad=True)

    def jacobian_then_graph():
        _, jac = vjp_jacobian(net, theta, x)
        assert jac.shape == (2, 3, 2, net.num_params)
        return (w.exp() * w).sum()  # saves w and exp(w): 8000 bytes, alive at the end

    assert peak_saved_bytes(jacobian_then_graph) == 8000


def test_table_and_output_files(result, tmp_path):
    table = format_step_table(result)
    assert table.startswith("| algorithm |") and "gem-bml+" in table and LOWER_BOUND in table
    paths = write_step_benchmark(result, tmp_path / "out")
    assert json.loads(paths["json"].read_text())["rows"] == result["rows"]
    assert paths["png"].stat().st_size > 0 and paths["markdown"].read_text().startswith("| algorithm |")


def test_scaling_benchmark_conv4_memory_flat_for_gem_growing_for_unrolled(tmp_path):
    """``hbmeta bench scaling`` on a small conv4 (16x16 inputs): every algorithm has its rows, GEM-BML+,
    FOMAML, Reptile and iMAML keep the same saved memory at 1 and 3 inner steps, MAML/ABML/BMAML grow."""
    from hbmeta.bench.scaling import ScalingBenchConfig, format_scaling_table, run_scaling_benchmark, write_scaling_benchmark

    config = ScalingBenchConfig(steps=(1, 3), image_size=16, queries=2, meta_batch=2, repeats=1, warmup=0)
    result = run_scaling_benchmark(config)
    assert {(r["algorithm"], r["steps"]) for r in result["rows"]} == {(a, k) for a in config.algorithms for k in (1, 3)}
    for flat in ("gem-bml+", "fomaml", "reptile", "imaml", "ibaml"):
        assert saved(result, flat, 3) == saved(result, flat, 1), flat
    for unrolled in ("maml", "abml", "bmaml"):
        assert saved(result, unrolled, 3) > 1.5 * saved(result, unrolled, 1), unrolled
    assert "gem-bml+" in format_scaling_table(result)
    paths = write_scaling_benchmark(result, tmp_path)
    assert json.loads(paths["json"].read_text())["rows"] == result["rows"] and paths["png"].stat().st_size > 0


def test_bench_scaling_cli_takes_the_algorithms_and_threads_it_is_given(tmp_path, monkeypatch):
    """``hbmeta bench scaling --algos ... --threads N`` runs only those algorithms, on N threads (the run itself is
    shrunk to 16x16 images here)."""
    import dataclasses

    from hbmeta.bench import scaling
    from hbmeta.cli.main import main

    seen, real = [], scaling.run_scaling_benchmark

    def small(config, progress=False):
        seen.append(config)
        return real(dataclasses.replace(config, image_size=16, queries=2, meta_batch=2))

    monkeypatch.setattr(scaling, "run_scaling_benchmark", small)
    assert main(["bench", "scaling", "--algos", "fomaml,gem-bml+", "--threads", "1", "--inner-steps", "1",
                 "--repeats", "1", "--warmup", "0", "--out", str(tmp_path)]) == 0
    assert seen[0].algorithms == ("fomaml", "gem-bml+") and seen[0].threads == 1
    rows = json.loads((tmp_path / "scaling_benchmark.json").read_text())["rows"]
    assert {r["algorithm"] for r in rows} == {"fomaml", "gem-bml+"}
