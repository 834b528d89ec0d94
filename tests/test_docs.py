"""The docstring examples run (BoTorch's habit: examples that execute)."""

import doctest

import pytest

import hbmeta
import hbmeta.evaluation.calibration
import hbmeta.tasks.fewshot
import hbmeta.models.functional


@pytest.mark.parametrize("module", [hbmeta, hbmeta.evaluation.calibration, hbmeta.tasks.fewshot, hbmeta.models.functional], ids=lambda m: m.__name__)
def test_docstring_examples_run(module):
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0
