"""The process settings of hbmeta commands (training/runtime.py)."""

import sys

import pytest

from hbmeta.training.runtime import keep_freed_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt exists on Linux only")
def test_keep_freed_memory_applies_on_glibc_and_can_be_skipped(monkeypatch):
    monkeypatch.setenv("HBMETA_MALLOC", "system")
    assert keep_freed_memory() is False
    monkeypatch.delenv("HBMETA_MALLOC")
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    assert keep_freed_memory() is True
