from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib import colormaps

from wsi_asmil.heatmap import folds_for, normalize, render
from wsi_asmil.report import write_report


def test_rank_normalisation() -> None:
    np.testing.assert_allclose(normalize(np.array([0.1, 0.7, 0.2]), "rank"), [0.0, 1.0, 0.5])
    assert normalize(np.array([1.0]), "rank").tolist() == [1.0]
    np.testing.assert_allclose(normalize(np.array([0.25, 0.5, 0.25]), "uniform"), [0.5, 1.0, 0.5])
    with pytest.raises(ValueError, match="heatmap.normalize"):
        normalize(np.array([1.0]), "zscore")


def test_hottest_pixel_is_the_top_scored_tile() -> None:
    thumb = np.full((100, 100, 3), 255, np.uint8)
    coords = np.array([[0, 0], [400, 0], [0, 400], [400, 400]])  # level 0, downsample 8, extent 400
    values = normalize(np.array([0.1, 0.4, 0.2, 0.3]), "rank")
    out = render(thumb, 8.0, coords, 400.0, values, "gray", 1.0)
    assert out[:50, 50:].min() == 255 and out[:50, :50].max() == 0  # 'gray': 1 is white, 0 black
    assert np.unravel_index(out[..., 0].argmax(), out.shape[:2])[1] >= 50


def test_overlap_is_averaged_and_uncovered_pixels_untouched() -> None:
    thumb = np.full((40, 60, 3), 100, np.uint8)
    coords = np.array([[0, 0], [100, 0]])  # extent 200 at downsample 10: columns 0-19 and 10-29
    out = render(thumb, 10.0, coords, 200.0, np.array([0.0, 1.0]), "gray", 1.0)
    assert out[5, 5, 0] == 0 and out[5, 25, 0] == 255
    mid = round(255 * colormaps["gray"](0.5)[0])
    assert abs(int(out[5, 15, 0]) - mid) <= 1  # the shared columns show the mean
    assert (out[25:, :] == 100).all() and (out[:, 30:] == 100).all()


def test_single_tile_slide() -> None:
    out = render(np.zeros((10, 10, 3), np.uint8), 4.0, np.array([[8, 8]]), 16.0, normalize(np.array([1.0]), "rank"), "jet", 0.5)
    assert out[3, 3].any() and not out[0, 0].any()


def test_scoring_uses_the_fold_that_tested_the_slide() -> None:
    split = {"folds": [{"test": ["a"]}, {"test": ["b"]}]}
    assert folds_for(split, "b", 2) == [1]
    assert folds_for(split, "new slide", 2) == [0, 1]  # unlabeled: the ensemble


def test_report_mean_and_std_over_folds(tmp_path: Path) -> None:
    for k, (acc, auc) in enumerate([(0.5, 0.6), (1.0, float("nan"))]):
        d = tmp_path / "models" / "asmil" / f"fold{k}"
        d.mkdir(parents=True)
        test = {"acc": acc, "f1_macro": acc, "f1_micro": acc, "auc": auc}
        (d / "metrics.json").write_text(json.dumps({"selected_epoch": 3, "test": test, "test_last": test, "instability_last10": 0.1 * (k + 1)}))
        pd.DataFrame({"slide_id": [f"s{k}"], "label": ["tumour"], "pred": ["tumour"], "prob_normal": [0.2], "prob_tumour": [0.8]}).to_csv(d / "predictions.csv", index=False)
    report = write_report(tmp_path / "models", ["asmil"], 2, tmp_path / "report")
    acc = report["asmil"]["test"]["acc"]
    assert acc["mean"] == 0.75 and acc["std"] == pytest.approx(math.sqrt(0.125))
    assert report["asmil"]["test"]["auc"]["n"] == 1  # the undefined AUC is left out, visibly
    assert report["asmil"]["instability_last10"]["mean"] == pytest.approx(0.15)
    preds = pd.read_csv(tmp_path / "report" / "predictions.csv")
    assert preds.columns[:5].tolist() == ["model", "fold", "slide_id", "label", "pred"] and len(preds) == 2
    table = (tmp_path / "report" / "metrics.md").read_text()
    assert "| asmil | 0.750 ± 0.354 |" in table
