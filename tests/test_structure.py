"""The import contracts in pyproject.toml ([tool.importlinter]) hold on this tree, and they
catch what they promise to: a planted upward import (between rooms and inside production),
torch in a torch-free room, a private module used from another room, the training worker
reaching production's serving side."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

ROOMS = ("common", "data", "candidates", "orchestrator", "production", "development", "tui")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        capture_output=True,
        text=True,
        cwd=root,
        # The tree under test first: the editable install's finder only comes after sys.path.
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)},
        timeout=300,
    )


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the rooms and pyproject.toml to plant imports in."""
    root = tmp_path / "tree"
    root.mkdir()
    shutil.copy(REPO / "pyproject.toml", root)
    for room in ROOMS:
        shutil.copytree(REPO / room, root / room, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def plant(path: Path, line: str) -> None:
    """Add an import inside a new function: lazy imports count as much as top-level ones."""
    path.write_text(path.read_text() + f"\n\ndef _planted():\n    {line}\n")


def test_the_tree_keeps_every_import_contract() -> None:
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout and "Rooms import only downward KEPT" in result.stdout
    assert "Inside production, modules import only downward KEPT" in result.stdout


def test_planted_imports_break_the_contract_that_forbids_them(tree: Path) -> None:
    plant(tree / "production" / "engine.py", "from orchestrator.daemon import Daemon")
    plant(tree / "orchestrator" / "schedule.py", "import torch")
    plant(tree / "production" / "chat" / "harmony.py", "import xgrammar")
    (tree / "candidates" / "_scratch.py").write_text("VALUE = 1\n")
    plant(tree / "data" / "store.py", "from candidates._scratch import VALUE")
    plant(tree / "production" / "model" / "loading.py", "from production.engine import Engine")
    plant(tree / "development" / "export_model.py", "from production.decode import steering")

    result = lint_imports(tree)

    out = " ".join(result.stdout.split())  # lint-imports wraps long lines
    assert result.returncode == 1, out
    assert "Rooms import only downward BROKEN" in out
    assert "production.engine -> orchestrator.daemon" in out
    assert "never import torch or the ML stack BROKEN" in out
    assert "orchestrator.schedule -> torch" in out
    assert "never import torch, the ML stack or xgrammar BROKEN" in out
    assert "production.chat.harmony -> xgrammar" in out
    assert "imported only from inside its own package BROKEN" in out
    assert "data.store -> candidates._scratch" in out
    assert "Inside production, modules import only downward BROKEN" in out
    assert "production.model.loading -> production.engine" in out
    assert "never its serving BROKEN" in out
    assert "development.export_model -> production.decode.steering" in out
