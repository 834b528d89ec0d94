"""Check the import contracts in ``.importlinter`` (import-linter) against hbmeta's installed layout.

hbmeta installs the top-level folders ``models/`` and ``inference/`` as ``hbmeta.models`` and ``hbmeta.inference``
(``package-dir`` in ``pyproject.toml``). import-linter builds its graph from the files under the root package's
folder, where those two are not, so this stages the installed layout (``hbmeta/``, ``hbmeta/models``,
``hbmeta/inference``) in a temporary folder and runs ``lint-imports`` on it with the repository's contract file.

    python scripts/lint_imports.py            # exit status 0: every contract kept
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc")


def stage(into: Path, root: Path = ROOT) -> Path:
    """Copy the package as it installs (``hbmeta`` with ``models`` and ``inference`` inside) into ``into``."""
    package = into / "hbmeta"
    shutil.copytree(root / "hbmeta", package, ignore=IGNORE)
    for layer in ("models", "inference"):
        shutil.copytree(root / layer, package / layer, ignore=IGNORE)
    return package


def lint(staged: Path, config: Path = ROOT / ".importlinter") -> subprocess.CompletedProcess:
    """Run ``lint-imports`` on a staged tree; the finished process (``returncode`` 0: all contracts kept)."""
    env = {**os.environ, "PYTHONPATH": str(staged)}
    command = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command as c; sys.exit(c())",
               str(config), "--no-cache"]
    return subprocess.run(command, cwd=staged, env=env, capture_output=True, text=True)


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        stage(Path(tmp))
        run = lint(Path(tmp))
    print(run.stdout, end="")
    print(run.stderr, end="", file=sys.stderr)
    return run.returncode


if __name__ == "__main__":
    sys.exit(main())
