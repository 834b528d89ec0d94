"""The docstring examples run (BoTorch's habit: examples that execute)."""

import doctest

import pytest

import hbmeta
import hbmeta.calibration
import hbmeta.fewshot
import models.functional


@pytest.mark.parametrize("module", [hbmeta, hbmeta.calibration, hbmeta.fewshot, models.functional], ids=lambda m: m.__name__)
def test_docstring_examples_run(module):
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0
