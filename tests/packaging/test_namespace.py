"""One import namespace: hbmeta installs ``hbmeta``, ``hbmeta.models`` and ``hbmeta.inference`` and no top-level
``models`` / ``inference`` names, so it imports and trains beside a user's own ``models.py``, ``inference.py`` or
``models/`` package (the commonest folder names in machine-learning code)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_import_and_one_meta_step_beside_a_users_models_and_inference(tmp_path: Path) -> None:
    (tmp_path / "models.py").write_text("MINE = 1\n")
    (tmp_path / "inference.py").write_text("MINE = 2\n")
    (tmp_path / "nets").mkdir()  # a models/ package can't sit beside models.py: give it its own folder
    (tmp_path / "nets" / "models").mkdir()
    (tmp_path / "nets" / "models" / "__init__.py").write_text("MINE = 3\n")
    code = ("import sys; sys.path.insert(1, 'nets')\n"
            "import inference as mine, models as theirs\n"   # the user's modules, imported first
            "import torch, hbmeta\n"
            "from hbmeta import GaussianLikelihood, MetaLearner, SinusoidTasks, mlp\n"
            "learner = MetaLearner(mlp(), GaussianLikelihood(0.5), algorithm='gem-bml+')\n"
            "info = learner.meta_step(SinusoidTasks().sample(2, torch.Generator().manual_seed(0)))\n"
            "import models, inference\n"
            "assert (models.MINE, inference.MINE, mine.MINE, theirs.MINE) == (1, 2, 2, 1)\n"
            "assert MetaLearner.__module__ == 'hbmeta.inference.learner', MetaLearner.__module__\n"
            "print('ok', sorted(info))\n")
    run = subprocess.run([sys.executable, "-W", "error", "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("ok"), run.stdout
    (tmp_path / "models.py").unlink()  # now the models/ package is the first ``models`` on the path
    code = ("import sys; sys.path.insert(0, 'nets')\nimport models\nimport hbmeta.models\n"
            "assert models.MINE == 3 and hbmeta.models.__name__ == 'hbmeta.models'\nprint('ok')\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr


def test_no_top_level_models_or_inference_name_is_installed(tmp_path: Path) -> None:
    code = "import importlib.util as u; print(u.find_spec('models'), u.find_spec('inference'))"
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.stdout.strip() == "None None", run.stdout
    origin = importlib.util.find_spec("hbmeta.models").origin  # hbmeta/models links to the top-level models/
    assert Path(origin).resolve() == (ROOT / "models" / "__init__.py").resolve()


def test_pyproject_lists_every_package_folder() -> None:
    """A package folder missing from ``[tool.setuptools] packages`` would be left out of the wheel."""
    settings = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(settings["packages"])
    mapping = settings["package-dir"]
    found = set()
    for name, folder in mapping.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((name, *rel)))
    assert found == listed, f"unlisted: {sorted(found - listed)}; listed but missing: {sorted(listed - found)}"
