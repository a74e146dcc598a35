"""Every stage is runnable by hand: `python -m wsi_asmil.<stage> --help` works and says what it does."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

STAGES = ["synthetic", "segment", "tile", "features", "split", "train", "report", "heatmap", "viewer", "vendor"]


@pytest.mark.parametrize("stage", STAGES)
def test_stage_help(stage: str, capsys: pytest.CaptureFixture[str]) -> None:
    module = importlib.import_module(f"wsi_asmil.{stage}")
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert f"python -m wsi_asmil.{stage}" in out or "usage:" in out


def test_module_entry_point() -> None:
    proc = subprocess.run([sys.executable, "-m", "wsi_asmil.segment", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--min-area-um2" in proc.stdout
