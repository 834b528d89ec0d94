"""pytest / nbmake settings for the notebooks: the small budget, and skip the Omniglot one without its data."""

import os

import pytest

os.environ.setdefault("HBMETA_SMALL", "1")  # inherited by the notebook kernels nbmake starts
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(config, items):
    from hbmeta.tasks.data import default_data_root

    root = default_data_root()
    if (root / "omniglot").is_dir():
        return
    skip = pytest.mark.skip(reason=f"Omniglot data not found in {root / 'omniglot'} (set HBMETA_DATA)")
    for item in items:
        path = str(getattr(item, "path", ""))
        if path.endswith(".ipynb") and "omniglot" in path:
            item.add_marker(skip)
