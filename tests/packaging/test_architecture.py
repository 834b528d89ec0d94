"""The architecture holds: import-linter's contracts (``.importlinter``: layers cli > bench > evaluation > training >
experiments > tasks > inference > models, no cycles, independent task families and benchmarks, the config as
plain data) are kept, an upward import breaks them, and no module imports another module's private name."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("importlinter", reason="the architecture contracts need import-linter (the test extra)")


def _lint_script():
    spec = importlib.util.spec_from_file_location("lint_imports", ROOT / "scripts" / "lint_imports.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_import_contract_is_kept(tmp_path):
    lint = _lint_script()
    lint.stage(tmp_path)
    run = lint.lint(tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "6 kept, 0 broken" in run.stdout, run.stdout


@pytest.mark.parametrize("module,line,broken", [
    ("models/priors.py", "import hbmeta.training.runs", "hbmeta.models is not allowed to import hbmeta.training"),
    ("experiments/config.py", "from hbmeta.experiments import registry", "hbmeta.experiments.config is not allowed"),
    ("tasks/sinusoid.py", "import hbmeta.tasks.fewshot", "hbmeta.tasks.sinusoid is not allowed to import"),
    ("training/runtime.py", "import hbmeta.training.loop", "No cycles are allowed in hbmeta.training"),
], ids=["upward", "config-is-data", "independence", "cycle"])
def test_an_upward_import_or_a_cycle_breaks_a_contract(tmp_path, module, line, broken):
    lint = _lint_script()
    package = lint.stage(tmp_path)
    path = package / module
    path.write_text(path.read_text() + f"\n{line}\n")
    run = lint.lint(package.parent)
    assert run.returncode != 0 and broken in run.stdout, run.stdout


def _modules():
    for folder, name in ((ROOT / "hbmeta", "hbmeta"), (ROOT / "models", "hbmeta.models"),
                         (ROOT / "inference", "hbmeta.inference")):
        for path in sorted(folder.rglob("*.py")):
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
