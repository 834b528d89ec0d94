"""``import hbmeta`` from a folder that holds a user's own ``models.py`` / ``inference.py``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_import_hbmeta_beside_a_users_models_and_inference_files(tmp_path: Path) -> None:
    (tmp_path / "models.py").write_text("MINE = 1\n")
    (tmp_path / "inference.py").write_text("MINE = 2\n")
    code = ("import models as mine\n"            # the user's file, imported first
            "import hbmeta\n"
            "assert mine.MINE == 1\n"            # still theirs through the bound name
            "assert hbmeta.MetaLearner.__module__ == 'inference.learner'\n"
            "print('ok')\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "ok"
    assert "models.py is shadowed" in run.stderr and "inference.py is shadowed" in run.stderr
