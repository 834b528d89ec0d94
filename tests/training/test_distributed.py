"""Distributed meta-training (hbmeta.training.distributed): 2 gloo processes on the CPU reproduce the single-process run,
private mode puts only posterior / prior parameters on the wire, a dead worker stops torchrun and --resume
finishes the run at the uninterrupted run's parameters."""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hbmeta.cli import main
from hbmeta.experiments.config import TrainConfig
from hbmeta.models.posterior import Posterior
from hbmeta.training.distributed import (
    check_distributable,
    init_distributed,
    pack_posterior,
    sliced_noise,
    task_slice,
    unpack_posterior,
)
from hbmeta.training.loop import train
from hbmeta.training.runs import load_checkpoint
from hbmeta.training.runs import build_learner
from hbmeta.training.runtime import amp_autocast

ROOT = Path(__file__).resolve().parents[2]
NUM_PARAMS = 1761  # the 2 x 40 sinusoid MLP
ITERATIONS = 4
META_BATCH = 5  # split 3 + 2 over two ranks: the uneven case


def run_config(algorithm: str, **changes) -> TrainConfig:
    return TrainConfig.from_flat(experiment="sinusoid", algorithm=algorithm, iterations=ITERATIONS,
                                 meta_batch=META_BATCH, device="cpu", checkpoint_every=1, **changes)


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """Final prior parameters of the ordinary single-process runs."""
    out = {}
    for algorithm in ("gem-bml+", "maml"):
        result = train(run_config(algorithm), tmp_path_factory.mktemp(algorithm), progress=False)
        out[algorithm] = {n: p.detach().clone() for n, p in result.learner.prior.state_dict().items()}
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_COLLECTIVES = ("all_reduce", "gather", "broadcast", "all_gather", "all_gather_into_tensor", "reduce", "scatter",
                "reduce_scatter", "all_to_all", "send", "recv", "isend", "irecv", "broadcast_object_list",
                "all_gather_object", "gather_object", "scatter_object_list", "send_object_list", "recv_object_list")


def _worker(rank: int, world_size: int, port: int, config: dict, run_dir: str, record_dir: str,
            resume: bool = False) -> None:
    """One rank of a gloo job: record every collective's tensors, then meta-train."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    sent: list[dict] = []

    def recording(name, fn):
        def wrapped(*args, **kwargs):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            tensors += [t for a in args if isinstance(a, list) for t in a if isinstance(t, torch.Tensor)]
            sent.append({"op": name, "shapes": [list(t.shape) for t in tensors], "other": not tensors})
            return fn(*args, **kwargs)
        return wrapped

    for name in _COLLECTIVES:
        setattr(dist, name, recording(name, getattr(dist, name)))
    from hbmeta.training.distributed import train_distributed

    train_distributed(TrainConfig.from_dict(config), run_dir, resume=resume, progress=False)
    Path(record_dir, f"rank{rank}.json").write_text(json.dumps(sent))


def _spawn(config: TrainConfig, tmp_path: Path, resume: bool = False) -> tuple[dict, list[list[dict]]]:
    """Run ``config`` on 2 gloo processes; the final prior (rank 0's checkpoint) and each rank's collectives."""
    # fork: the children start in milliseconds instead of re-importing torch and pyro (no CUDA is initialised here)
    mp.start_processes(_worker, args=(2, _free_port(), config.to_dict(), str(tmp_path / "run"), str(tmp_path), resume),
                       nprocs=2, start_method="fork")
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["iteration"] == ITERATIONS
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    return state["learner"]["prior"], records


def _assert_same_prior(got: dict, expected: dict, **config) -> None:
    initial = build_learner(run_config("gem-bml+", **config)).prior.state_dict()
    moved = [n for n, v in expected.items() if not torch.allclose(v, initial[n])]
    assert "mu" in moved or "loc" in moved, f"the prior mean did not move ({moved}); the comparison would prove nothing"
    assert set(got) == set(expected)
    # Float rounding only: batched BLAS kernels round differently for a split meta-batch (1e-6 in a Gauss-Newton
    # direction), and Adam turns a rounding difference in a near-zero gradient into up to 1e-5 of a weight over
    # 4 steps of 1e-3; a wrong split or a missing task moves weights by ~1e-3. (MAML leaves log sigma in place.)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------- units
def test_task_slices_cover_the_meta_batch_once_in_order_sizes_differ_by_at_most_one():
    for num_tasks, world in ((5, 2), (8, 4), (7, 3), (3, 3)):
        slices = [task_slice(num_tasks, r, world) for r in range(world)]
        covered = [t for s in slices for t in range(num_tasks)[s]]
        assert covered == list(range(num_tasks))
        sizes = [s.stop - s.start for s in slices]
        assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    with pytest.raises(ValueError, match="cannot be split over 4 ranks"):
        task_slice(3, 0, 4)


def test_sliced_noise_gives_each_rank_the_columns_of_the_full_batch_noise():
    shape_full, columns = torch.Size((2, 5, 7)), slice(3, 5)
    full_gen, rank_gen = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    draw = sliced_noise(rank_gen, 5, columns)
    for step in (1, 2, 3):  # consecutive draws stay aligned with the single process's draws
        expected = torch.randn(shape_full, generator=full_gen)[:, columns]
        assert torch.equal(draw(step, torch.Size((2, 2, 7))), expected)


@pytest.mark.parametrize("kind", ["meanfield", "delta", "full", "lowrank"])
def test_packed_posteriors_unpack_to_the_same_parameters_and_are_multiples_of_the_parameter_count(kind):
    loc, p = torch.randn(3, 4), 4
    scale = torch.rand(3, 4) + 0.1 if kind in ("meanfield", "lowrank") else None
    tril = torch.tril(torch.rand(3, 4, 4)) + torch.eye(4) if kind == "full" else None
    factor = torch.randn(3, 4, 2) if kind == "lowrank" else None
    q = (Posterior(loc, scale, tril, cov_factor=factor), Posterior(loc + 1, scale, tril, cov_factor=factor))
    flat = pack_posterior(q)
    assert flat.shape[0] == 3 and flat.shape[1] % p == 0
    for a, b in zip(unpack_posterior(flat, q), q):
        assert a.kind == b.kind and torch.equal(a.loc, b.loc) and torch.equal(a.variance, b.variance)
        assert (a.cov_factor is None) == (factor is None) and (factor is None or torch.equal(a.cov_factor, factor))


def test_bad_distributed_settings_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="--private needs"):
        check_distributable(run_config("maml", private=True), 2)
    with pytest.raises(ValueError, match="--distributed supports"):
        check_distributable(run_config("abml", distributed=True), 2)
    with pytest.raises(ValueError, match="cannot be split over 8 ranks"):
        check_distributable(run_config("gem-bml+", distributed=True), 8)


def test_distributed_without_torchrun_environment_says_how_to_launch(monkeypatch, tmp_path, capsys):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match="torchrun --nproc-per-node"):
        init_distributed("cpu")
    code = main(["train", "sinusoid", "--iterations", "1", "--out", str(tmp_path / "r"), "--private", "--device", "cpu"])
    assert code == 1 and "MASTER_ADDR" in capsys.readouterr().err


def test_amp_refuses_maml_and_runs_a_gem_plus_step_in_bf16_autocast():
    with pytest.raises(ValueError, match="backpropagate through the inner loop"):
        amp_autocast(True, torch.device("cpu"), "maml")
    config = run_config("gem-bml+", amp=True)
    learner, reference = build_learner(config), build_learner(config)
    from hbmeta.tasks.sinusoid import SinusoidTasks

    batch = SinusoidTasks().sample(4, torch.Generator().manual_seed(0))
    with amp_autocast(True, torch.device("cpu"), "gem-bml+"):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
        learner.meta_step(batch, torch.Generator().manual_seed(1))
    reference.meta_step(batch, torch.Generator().manual_seed(1))
    moved = learner.prior.mu.detach() - build_learner(config).prior.mu.detach()
    assert torch.isfinite(moved).all() and moved.abs().max() > 0 and learner.prior.mu.dtype == torch.float32
    torch.testing.assert_close(learner.prior.mu, reference.prior.mu, atol=5e-3, rtol=0)  # one Adam step of 1e-3


# --------------------------------------------------------------------------------------- two processes
@pytest.mark.parametrize("algorithm", ["gem-bml+", "maml"])
def test_two_gloo_processes_end_at_the_single_process_parameters(algorithm, single_process, tmp_path):
    prior, records = _spawn(run_config(algorithm, distributed=True), tmp_path)
    _assert_same_prior(prior, single_process[algorithm])
    width = 2 * NUM_PARAMS if algorithm == "gem-bml+" else NUM_PARAMS  # (mu, log sigma) or mu
    for sent in records:  # one broadcast per prior tensor at the start, then one all-reduce per iteration
        reduces = [r for r in sent if r["op"] == "all_reduce"]
        assert len(reduces) == ITERATIONS and all(r["shapes"] == [[width]] for r in reduces)


def test_private_mode_puts_only_posterior_and_prior_parameters_on_the_wire(single_process, tmp_path):
    prior, records = _spawn(run_config("gem-bml+", private=True), tmp_path)
    _assert_same_prior(prior, single_process["gem-bml+"])
    rows = math.ceil(META_BATCH / 2)
    for sent in records:
        assert {r["op"] for r in sent} == {"gather", "broadcast"}, sent
        assert not any(r["other"] for r in sent), "a collective carried something that is not a tensor"
        shapes = [s for r in sent for s in r["shapes"]]
        assert all(math.prod(s) % NUM_PARAMS == 0 for s in shapes), shapes  # never task data (5 x 10 x 1 points)
        gathers = [r for r in sent if r["op"] == "gather"]
        assert len(gathers) == ITERATIONS
        # what a rank sends: its tasks' q1 and q2 (mean and scale each), padded to ceil(T / R) rows
        assert all(r["shapes"][0] == [rows, 4 * NUM_PARAMS] for r in gathers)


def test_private_mode_reproduces_a_monte_carlo_gem_prior_and_all_reduce_mode_refuses_it(tmp_path):
    config = run_config("gem-bml+", prior="studentt")
    assert build_learner(config).prior.gem_gradient(build_learner(config).prior.initial_posterior(1)) is None
    expected = train(config, tmp_path / "single", progress=False).learner.prior.state_dict()
    prior, _ = _spawn(run_config("gem-bml+", prior="studentt", private=True), tmp_path)
    _assert_same_prior(prior, expected, prior="studentt")
    with pytest.raises(mp.ProcessRaisedException, match="Monte-Carlo estimate"):
        _spawn(run_config("gem-bml+", prior="studentt", distributed=True), tmp_path / "refused")


def test_dead_worker_stops_torchrun_with_a_clear_message_and_resume_ends_at_the_uninterrupted_result(
        single_process, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HBMETA_FAIL_AT_ITERATION": "3", "HBMETA_FAIL_RANK": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "hbmeta.cli", "train", "sinusoid", "--iterations", str(ITERATIONS), "--meta-batch",
               str(META_BATCH), "--device", "cpu", "--checkpoint-every", "1", "--no-progress", "--distributed",
               "--out", str(out)]
    failed = subprocess.run(command, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    log = failed.stdout + failed.stderr
    assert failed.returncode != 0
    assert "ChildFailedError" in log and "Root Cause" in log
    assert "rank 1: injected failure at iteration 3" in log.split("Root Cause")[1]  # torchrun names the culprit
    saved = load_checkpoint(out / "checkpoint.pt")["iteration"]
    assert 1 <= saved <= 2  # rank 0 checkpoints after every iteration it completed
    # --resume on 2 gloo processes (forked here rather than a second torchrun, to keep the test short)
    prior, _ = _spawn(run_config("gem-bml+", distributed=True), tmp_path, resume=True)
    _assert_same_prior(prior, single_process["gem-bml+"])
    logged = [json.loads(ln)["iteration"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged == sorted(set(logged)) and logged[-1] == ITERATIONS
