"""The notebook API: docs/api.md's example runs as written, and what it makes is what the stages make."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from wsi_asmil.maps.scores import read_scores
from wsi_asmil.maps.scoring import score_slides
from wsi_asmil.mil.models import build_model, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "api.md"


def example_code() -> str:
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)
    assert len(blocks) == 1, "docs/api.md has one example"
    return blocks[0]


def fake_run_models(root: Path, folds: int = 2) -> Path:
    """A model folder laid out as a run's ``models/asmil`` (untrained weights: the API, not the model, is tested)."""
    models = root / "results" / "models" / "asmil"
    for k in range(folds):
        model = build_model("asmil", 1280, 2, n_tokens=2)
        save_checkpoint(models / f"fold{k}" / "model.pt", model, model_name="asmil", model_kwargs={"n_tokens": 2},
                        classes=["normal", "tumour"], in_dim=1280, epoch=1, params={})
    return models


def test_the_documented_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "data").symlink_to(REPO / "tests" / "data")
    models = fake_run_models(tmp_path)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(example_code(), str(PAGE), "exec"), namespace)
    out = capsys.readouterr().out
    assert "cmu_small_region (2220, 2967)" in out and "asmil folds [0, 1] ASMIL" in out

    work = tmp_path / "work" / "cmu"
    for name in ("segment/mask.png", "segment/qc.jpg", "tiles/cmu_small_region_qc.jpg", "heatmap.png", "tiles.geojson"):
        assert (work / name).is_file(), name
    scores = namespace["scores"]
    assert len(scores.scores) > 20 and scores.coords.shape == (len(scores.scores), 2)
    assert scores.scores.sum() == pytest.approx(1.0) and set(scores.probs) == {"normal", "tumour"}

    # The API's scores are the scoring stage's, file for file, and its reader accepts them.
    stage = score_slides([work / "features" / "cmu_small_region.zarr"], models, 2, tmp_path / "stage", fold_mode="ensemble", device="cpu")
    written = read_scores(scores.json)
    assert written.meta["probs"] == stage[0]["probs"] and written.meta["n_tiles"] == len(scores.scores)
    np.testing.assert_allclose(written.scores, read_scores(tmp_path / "stage" / "cmu_small_region_scores.json").scores)


def test_a_folder_without_checkpoints_is_named(tmp_path: Path) -> None:
    from wsi_asmil import api

    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        api.load_models(tmp_path)
