"""The docstring examples run (BoTorch's habit: examples that execute)."""

import doctest

import pytest

import hbmeta
import models.functional


@pytest.mark.parametrize("module", [hbmeta, models.functional], ids=lambda m: m.__name__)
def test_docstring_examples_run(module):
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0
