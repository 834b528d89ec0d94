"""Command-line conventions: --version, defaults and a help line for every flag, --threads / --out on every command
that reads runs, and --config to repeat a run."""

from __future__ import annotations

import argparse
import json

import pytest

from hbmeta import __version__
from hbmeta.cli import build_parser, main
from hbmeta.cli.main import diagnosis_summary


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_version_and_every_flag_has_a_help_line(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"hbmeta {__version__}"
    missing = [f"{name} {action.option_strings or action.dest}" for name, p in _subcommands(build_parser()).items()
               for action in p._actions if not isinstance(action, argparse._HelpAction) and not action.help]
    assert not missing, missing


@pytest.mark.parametrize("command", ["train", "evaluate", "diagnose", "calibrate", "demo", "bench"])
def test_help_shows_defaults(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    assert "(default:" in text, text


@pytest.mark.parametrize("command", ["evaluate", "diagnose", "calibrate"])
def test_commands_that_read_runs_take_threads_and_out(command):
    args = build_parser().parse_args([command, "RUN", "--threads", "2", "--out", "somewhere"])
    assert args.threads == 2 and args.out == "somewhere"


def test_config_file_repeats_a_run_with_the_flags_given_overriding_it(tmp_path, capsys):
    first = tmp_path / "first"
    common = ["--no-progress", "--eval-tasks", "3"]
    assert main(["train", "sinusoid", "--iterations", "2", "--meta-batch", "3", "--inner-steps", "1", "--out",
                 str(first), *common]) == 0
    again = tmp_path / "again"
    assert main(["train", "--config", str(first / "config.json"), "--seed", "4", "--out", str(again), *common]) == 0
    one, two = (json.loads((d / "config.json").read_text()) for d in (first, again))
    assert two["seed"] == 4 and {**one, "seed": 4} == two  # the same run but for the seed
    assert main(["train", "omniglot", "--config", str(first / "config.json"), "--out", str(tmp_path / "x")]) == 2
    assert "differs from --config's 'sinusoid'" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "y")]) == 2
    assert "needs an experiment" in capsys.readouterr().err


def test_diagnose_prints_a_summary_a_person_reads():
    report = {"algorithm": "gem-bml+", "experiment": "sinusoid", "iteration": 40, "num_tasks": 5,
              "adaptation_steps": 10, "posterior": "meanfield", "predictive_samples": 32,
              "metrics": {"mse": 0.1, "mse_ci95": 0.02, "log_predictive_density": -0.5, "noise_scale": 0.25,
                          "pit": {"coverage_50": 0.5, "coverage_90": 0.88, "ks_pvalue": 0.4, "num_points": 50}}}
    text = diagnosis_summary(report)
    assert "gem-bml+ on sinusoid (iteration 40)" in text and "query MSE 0.1000 ± 0.0200" in text
    assert "50% and 88% at 90%" in text and "{" not in text
