"""Run folders with damaged files: a checkpoint or ``config.json`` with random bytes changed, cut short or
appended to. Reading the run either refuses it with a one-line ``CheckpointError`` / ``ValueError`` or loads a
learner whose prior is finite; the files are never changed by a read."""

from __future__ import annotations

import hashlib
import shutil

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from hbmeta.experiments import TrainConfig
from hbmeta.training import CheckpointError, load_learner, train


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("fuzz-run") / "run"
    train(TrainConfig(experiment="sinusoid", algorithm="gem-bml+", iterations=2, meta_batch=2, seed=0), out,
          progress=False)
    return out


damage = st.one_of(
    st.tuples(st.just("flip"), st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)),
                                        min_size=1, max_size=8)),
    st.tuples(st.just("cut"), st.floats(0, 1, exclude_max=True)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=64)),
)


def _damage(path, how) -> None:
    data = bytearray(path.read_bytes())
    kind, arg = how
    if kind == "flip":
        for where, xor in arg:
            data[int(where * len(data))] ^= xor
    elif kind == "cut":
        data = data[:int(arg * len(data))]
    else:
        data += arg
    path.write_bytes(bytes(data))


@given(st.sampled_from(["checkpoint.pt", "config.json"]), damage)
@example("checkpoint.pt", ("flip", [(0.16013621282363277, 68)]))  # found: loaded a NaN prior before the CRC check
@example("checkpoint.pt", ("flip", [(6.103515625e-05, 1)]))  # found: a 20-line message from torch.load
def test_a_damaged_run_is_refused_in_one_line_or_loads_finite(run_dir, tmp_path_factory, name, how):
    copy = tmp_path_factory.mktemp("damaged") / "run"
    shutil.copytree(run_dir, copy)
    _damage(copy / name, how)
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in copy.iterdir() if p.is_file()}
    try:
        learner, _, _ = load_learner(copy, "cpu")
    except (CheckpointError, ValueError, TypeError) as err:
        assert "\n" not in str(err).strip(), str(err)
    else:
        assert all(torch.isfinite(p).all() for p in learner.prior.parameters())
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in copy.iterdir() if p.is_file()}
    assert after == before


def test_a_flipped_byte_inside_a_tensor_is_caught_by_the_checksum(run_dir, tmp_path):
    """What the generator found: torch.load does not check the zip's CRC-32, so this byte flip loaded a NaN prior."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    _damage(copy / "checkpoint.pt", ("flip", [(0.16013621282363277, 68)]))
    with pytest.raises(CheckpointError, match="checksum"):
        load_learner(copy, "cpu")


def test_a_damaged_end_of_archive_record_is_refused_in_one_line(run_dir, tmp_path):
    """Found by a long run: a flipped byte in the zip's end-of-central-directory record made ``zipfile.is_zipfile``
    itself raise (``BadZipFile``, "zipfiles that span multiple disks are not supported")."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    path = copy / "checkpoint.pt"
    data = bytearray(path.read_bytes())
    data[len(data) - 38] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as err:
        load_learner(copy, "cpu")
    assert "\n" not in str(err.value)
