"""Every numeric run setting, inside and just outside :data:`hbmeta.experiments.config.RANGES`, and values of any
type: a setting is either accepted as given or refused with one line that names it (the Python API and the CLI)."""

from __future__ import annotations

import math

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from hbmeta.cli import main
from hbmeta.experiments import TrainConfig
from hbmeta.experiments.config import BOOLEAN_SETTINGS, RANGES, Range

NAMES = sorted(RANGES)


def inside(r: Range) -> st.SearchStrategy:
    if r.kind is int:
        low = 0 if r.low is None else int(r.low)
        high = low + 10**6 if r.high is None else int(r.high)
        return st.integers(low, high)
    low = -1e6 if r.low is None else r.low
    high = 1e6 if r.high is None else r.high
    return st.floats(low, high, exclude_min=r.above, allow_nan=False, allow_infinity=False)


def outside(r: Range) -> st.SearchStrategy:
    bad = [st.just(math.nan), st.just(math.inf), st.just(-math.inf), st.text(max_size=5), st.just(True),
           st.lists(st.integers(), max_size=2)]
    if r.kind is int:
        if r.low is not None:
            low = int(r.low)
            bad.append(st.integers(low - 10**6, low if r.above else low - 1))
        if r.high is not None:
            bad.append(st.integers(int(r.high) + 1, int(r.high) + 10**6))
    else:
        if r.low is not None:
            bad.append(st.floats(r.low - 1e6, r.low, exclude_max=not r.above, allow_nan=False))
        if r.high is not None:
            bad.append(st.floats(r.high, r.high + 1e6, exclude_min=True, allow_nan=False, allow_infinity=False))
    if r.kind is int:
        bad.append(st.floats(0.5, 1e6).filter(lambda v: v != int(v)))
    return st.one_of(bad)


@given(st.sampled_from(NAMES).flatmap(lambda n: st.tuples(st.just(n), inside(RANGES[n]))))
def test_a_setting_inside_its_range_is_kept_as_given(case):
    name, value = case
    config = TrainConfig.from_flat(**{name: value})
    assert config.to_flat()[name] == value


@given(st.sampled_from(NAMES).flatmap(lambda n: st.tuples(st.just(n), outside(RANGES[n]))))
def test_a_setting_outside_its_range_is_refused_in_one_line_that_names_it(case):
    name, value = case
    with pytest.raises((ValueError, TypeError)) as err:
        TrainConfig.from_flat(**{name: value})
    message = str(err.value)
    assert name in message and "\n" not in message


@given(st.sampled_from(BOOLEAN_SETTINGS), st.one_of(st.integers(), st.text(max_size=4), st.none(), st.floats()))
def test_a_switch_takes_only_true_or_false(name, value):
    assume(value is not None)
    with pytest.raises(ValueError, match=name):
        TrainConfig.from_flat(**{name: value})


FLAGS = [n for n in NAMES if n not in ("threads", "seed")]  # options shared with every command; both are in NAMES


@given(st.sampled_from(FLAGS), st.one_of(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=8),
                                         st.sampled_from(["nan", "inf", "-1", "1e400", "0x10", "", " ", "1_0"])))
def test_cli_refuses_a_bad_flag_value_in_one_line_and_creates_no_run_folder(tmp_path_factory, name, text):
    """Any string after a numeric flag: either a value inside the range (then the run would start: skipped) or
    exit status 2, one line on stderr that names the flag, and no run folder."""
    r = RANGES[name]
    try:
        r.check(name, (int if r.kind is int else float)(text))
        assume(False)  # a valid value: the run would start
    except (ValueError, TypeError, OverflowError):
        pass
    out = tmp_path_factory.mktemp("run") / "r"
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(["train", "sinusoid", f"--{name.replace('_', '-')}={text}", "--out", str(out)])
        except SystemExit as exit_:  # argparse's own errors
            code = exit_.code
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    assert code == 2, (name, text, err.getvalue())
    assert not out.exists()
    assert "Traceback" not in err.getvalue()
    assert any(name.replace("_", "-") in line or name in line for line in lines), err.getvalue()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    from hbmeta.training import train

    out = tmp_path_factory.mktemp("finished") / "run"
    train(TrainConfig(experiment="sinusoid", algorithm="maml", iterations=2, meta_batch=2, seed=0), out, progress=False)
    return out


@given(st.sampled_from(FLAGS), st.sampled_from(["nan", "-1", "abc", "1e400", ""]))
def test_a_refused_resume_changes_no_file_of_the_run(finished_run, name, text):
    """``hbmeta train --resume`` with a bad setting on a finished run: refused (exit 2), every file as it was."""
    import contextlib
    import hashlib
    import io

    r = RANGES[name]
    try:
        r.check(name, (int if r.kind is int else float)(text))
        assume(False)
    except (ValueError, TypeError, OverflowError):
        pass
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in finished_run.rglob("*") if p.is_file()}
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(["train", "sinusoid", "--algo", "maml", "--resume", f"--{name.replace('_', '-')}={text}",
                         "--out", str(finished_run)])
        except SystemExit as exit_:
            code = exit_.code
    after = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in finished_run.rglob("*") if p.is_file()}
    assert code == 2 and after == before
