"""Every stage is runnable by hand, as ``wsi-asmil <stage>`` and as ``python -m wsi_asmil.<package>.<module>``."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from wsi_asmil.__main__ import STAGES, main

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_help(stage: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([stage, "--help"])
    assert exit_.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_every_stage_module_with_a_command_line_is_a_subcommand() -> None:
    with_main = set()
    for path in (REPO / "wsi_asmil").rglob("*.py"):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts)
        if "def main(" in path.read_text() and not module.endswith("__main__"):
            with_main.add(module)
    assert with_main - set(STAGES.values()) <= {"wsi_asmil.synthetic.witness"}  # a benchmark helper
    assert set(STAGES.values()) <= with_main


def test_unknown_stage_is_refused_with_the_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["segmnet"]) == 2
    err = capsys.readouterr().err
    assert "unknown stage 'segmnet'" in err and "python -m wsi_asmil.tissue.segment" in err


def test_module_entry_points() -> None:
    proc = subprocess.run([sys.executable, "-m", "wsi_asmil.tissue.segment", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--min-area-um2" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "wsi_asmil", "segment", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--min-area-um2" in proc.stdout


def test_console_command_is_installed() -> None:
    exe = shutil.which("wsi-asmil", path=str(Path(sys.executable).parent))
    assert exe, "the wsi-asmil console script is missing (pyproject [project.scripts])"
    proc = subprocess.run([exe, "tile", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "usage:" in proc.stdout
    assert importlib.import_module("wsi_asmil").__version__ in subprocess.run(
        [exe, "--version"], capture_output=True, text=True).stdout
