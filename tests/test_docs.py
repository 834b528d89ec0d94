"""The examples in docstrings and in the README run (BoTorch's habit: examples that execute)."""

import doctest
import re
from pathlib import Path

import pytest

import hbmeta
import hbmeta.evaluation.calibration
import hbmeta.experiments.config
import hbmeta.experiments.registry
import hbmeta.models.functional
import hbmeta.tasks.fewshot

README = Path(__file__).resolve().parents[1] / "README.md"
MODULES = [hbmeta, hbmeta.evaluation.calibration, hbmeta.tasks.fewshot, hbmeta.models.functional,
           hbmeta.experiments.config, hbmeta.experiments.registry]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_docstring_examples_run(module):
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0


def test_readme_run_config_example_runs(tmp_path, monkeypatch):
    """The README's ``TrainConfig`` block trains, resolves its defaults and reloads, as it says."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    (code,) = [b for b in blocks if "TrainConfig(" in b]
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code.replace("iterations=200", "iterations=20"), "README.md", "exec"), scope)
    assert scope["saved"] == scope["result"].config and scope["iteration"] == 20
    assert scope["result"].config.meta_batch == 25 and scope["result"].config.inner.steps == 3
