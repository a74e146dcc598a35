"""The layering is a checked contract (pyproject.toml [tool.importlinter]), not a convention."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"]


def lint(package_parent: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(package_parent)}
    return subprocess.run([*LINT, "--config", str(REPO / "pyproject.toml"), "--no-cache"], cwd=package_parent,
                          env=env, capture_output=True, text=True, timeout=300)


def test_the_package_keeps_its_layers() -> None:
    proc = lint(REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "3 kept, 0 broken" in proc.stdout


def test_an_upward_import_breaks_the_build(tmp_path: Path) -> None:
    shutil.copytree(REPO / "wsi_asmil", tmp_path / "wsi_asmil", ignore=shutil.ignore_patterns("__pycache__"))
    store = tmp_path / "wsi_asmil" / "features" / "store.py"
    store.write_text(store.read_text() + "\nfrom wsi_asmil.mil import train  # noqa: E402\n")
    heatmap = tmp_path / "wsi_asmil" / "maps" / "heatmap.py"
    heatmap.write_text(heatmap.read_text() + "\nimport torch  # noqa: E402\n")
    proc = lint(tmp_path)
    assert proc.returncode != 0
    assert "wsi_asmil.features.store -> wsi_asmil.mil.train" in proc.stdout
    assert "wsi_asmil.maps.heatmap -> torch" in proc.stdout and "1 kept, 2 broken" in proc.stdout
