"""The architecture holds: ``lint-imports`` in the repository root keeps the contracts of ``.importlinter`` (layers
cli > bench > evaluation > training > experiments > tasks > inference > models, no cycles, independent task families,
benchmarks and algorithms, the config as plain data), an upward import breaks them, and no module imports another
module's private name. ``hbmeta/models`` and ``hbmeta/inference`` link to the top-level folders, so import-linter
walks the layout the package installs."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("importlinter", reason="the architecture contracts need import-linter (the test extra)")


def _stage(into: Path) -> Path:
    """A copy of the package as it installs (hbmeta/ with models/ and inference/ inside, links followed)."""
    shutil.copytree(ROOT / "hbmeta", into / "hbmeta", ignore=shutil.ignore_patterns("__pycache__"))
    return into / "hbmeta"


def _lint(staged_root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` with the repository's contract file on a staged copy (``PYTHONPATH`` first)."""
    env = {**os.environ, "PYTHONPATH": str(staged_root)}
    command = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command as c; sys.exit(c())",
               str(ROOT / ".importlinter"), "--no-cache"]
    return subprocess.run(command, cwd=staged_root, env=env, capture_output=True, text=True)


def test_every_import_contract_is_kept_on_the_repository():
    command = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command as c; sys.exit(c())",
               "--no-cache"]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "6 kept, 0 broken" in run.stdout, run.stdout


@pytest.mark.parametrize("module,line,broken", [
    ("models/priors.py", "import hbmeta.training.runs", "hbmeta.models is not allowed to import hbmeta.training"),
    ("experiments/config.py", "from hbmeta.experiments import registry", "hbmeta.experiments.config is not allowed"),
    ("tasks/sinusoid.py", "import hbmeta.tasks.fewshot", "hbmeta.tasks.sinusoid is not allowed to import"),
    ("training/runtime.py", "import hbmeta.training.loop", "No cycles are allowed in hbmeta.training"),
], ids=["upward", "config-is-data", "independence", "cycle"])
def test_an_upward_import_or_a_cycle_breaks_a_contract(tmp_path, module, line, broken):
    package = _stage(tmp_path)
    path = package / module
    path.write_text(path.read_text() + f"\n{line}\n")
    run = _lint(tmp_path)
    assert run.returncode != 0 and broken in run.stdout, run.stdout


def _modules():
    for folder, name in ((ROOT / "hbmeta", "hbmeta"), (ROOT / "models", "hbmeta.models"),
                         (ROOT / "inference", "hbmeta.inference")):
        for path in sorted(folder.rglob("*.py")):
            if folder.name == "hbmeta" and path.relative_to(folder).parts[0] in ("models", "inference"):
                continue  # the links to the top-level folders, read under their own names below
            parts = path.relative_to(folder).with_suffix("").parts
            yield ".".join((name, *parts)).removesuffix(".__init__"), path


def test_no_module_imports_another_modules_private_names():
    """``from hbmeta.x import _helper`` couples two modules through a name that only one of them may change."""
    offences = []
    for module, path in _modules():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            source = node.module or ""
            if node.level:  # relative: resolve against the importing module's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([source] if source else []))
            if not source.startswith("hbmeta") or source == module:
                continue
            offences += [f"{path.relative_to(ROOT)}:{node.lineno} imports {source}.{a.name}" for a in node.names
                         if a.name.startswith("_") and not a.name.startswith("__")]
    assert not offences, "\n".join(offences)
