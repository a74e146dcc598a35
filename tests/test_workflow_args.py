"""Config to command line: one translation, tested here rather than only through dry runs."""

from __future__ import annotations

import json
import shlex

import pytest

from wsi_asmil.pipeline.workflow_args import mpp_options, options, train_params


def test_options_follow_the_keys() -> None:
    section = {"tile_size": 224, "overlap": 0.5, "exclude_pen": False, "clip": True, "max_edge": None,
               "top_k": [5, 10], "cmap": "magma r"}
    assert shlex.split(options(section)) == [
        "--tile-size", "224", "--overlap", "0.5", "--no-exclude-pen", "--clip", "--top-k", "5", "10", "--cmap", "magma r",
    ]
    assert options(section, only={"overlap", "cmap"}) == "--overlap 0.5 --cmap 'magma r'"
    assert options(section, exclude={"tile_size", "top_k", "cmap", "clip", "exclude_pen"}) == "--overlap 0.5"
    with pytest.raises(TypeError, match="'asmil' is a mapping"):
        options({"asmil": {"tau": 0.5}})


@pytest.mark.parametrize("section,module", [
    ("segment", "wsi_asmil.tissue.segment"), ("tiling", "wsi_asmil.features.tile"), ("split", "wsi_asmil.mil.split"),
    ("demo", "wsi_asmil.synthetic"), ("features", "wsi_asmil.features.batch"),
])
def test_each_stage_accepts_the_options_of_its_config_section(section: str, module: str) -> None:
    """A config key the CLI does not know would fail only when the job starts; catch it here."""
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "config.yaml").read_text())[section]
    text = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, check=True,
                          timeout=300).stdout
    # slides_per_job forms the batches in the workflow; no stage reads it
    for flag in shlex.split(options(config, exclude={"slides_per_job"})):
        if flag.startswith("--"):
            assert flag.replace("--no-", "--", 1) in text, f"{section}: {flag} unknown to {module}"


def test_mpp_options() -> None:
    assert mpp_options("a", {"a": 0.25}, 0.5) == "--slide-mpp 0.25 --mpp-fallback 0.5"
    assert mpp_options("b", {"a": 0.25}, None) == ""
    assert mpp_options(None, {"a": 0.25}, 0.5) == "--mpp-fallback 0.5"


def test_train_params_hold_only_the_jobs_model() -> None:
    train = {"models": ["asmil", "abmil"], "device": "auto", "threads": 2, "lr": 1e-4,
             "asmil": {"tau": 0.5}, "abmil": {"hidden": 128}}
    assert json.loads(train_params(train, "asmil")) == {"lr": 1e-4, "models": {"asmil": {"tau": 0.5}}}
