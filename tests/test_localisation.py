"""Localisation metrics: thresholds, Dice/IoU against known masks, coverage and their aggregation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsi_asmil.maps.localisation import (
    TUMOUR_TILE_FRACTION,
    LocalisationParams,
    dice_iou,
    main,
    otsu_threshold,
    select_tiles,
    slide_metrics,
    summarise,
    top_q_selection,
)
from wsi_asmil.synthetic.scores import write_synthetic_scores
from wsi_asmil.tissue.annotations import TumourMask, write_tumour_mask
from wsi_asmil.tissue.masks import mask_fractions


def test_dice_and_iou_of_known_masks() -> None:
    a = np.zeros((10, 10), bool)
    b = np.zeros((10, 10), bool)
    a[:, :4] = True  # 40 px
    b[:, 2:6] = True  # 40 px, 20 shared
    dice, iou = dice_iou(a, b)
    assert dice == pytest.approx(0.5) and iou == pytest.approx(20 / 60)
    assert dice_iou(a, a) == (1.0, 1.0)
    assert dice_iou(a, np.zeros_like(a)) == (0.0, 0.0)
    assert all(math.isnan(v) for v in dice_iou(np.zeros_like(a), np.zeros_like(a)))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0, 1, allow_nan=False), min_size=2, max_size=60))
def test_otsu_maximises_the_between_class_variance(values: list[float]) -> None:
    v = np.array(values)
    t = otsu_threshold(v)
    upper = v > t

    def between(mask: np.ndarray) -> float:
        if mask.all() or not mask.any():
            return 0.0
        return mask.mean() * (1 - mask.mean()) * (v[mask].mean() - v[~mask].mean()) ** 2

    best = max((between(v > c) for c in np.unique(v)), default=0.0)
    assert between(upper) == pytest.approx(best, rel=1e-9, abs=1e-15)


def test_otsu_on_bimodal_and_flat_scores() -> None:
    v = np.r_[np.full(50, 0.01), np.full(3, 0.2)]
    assert select_tiles(v, "otsu").sum() == 3
    assert not select_tiles(np.full(10, 0.1), "otsu").any()  # flat attention localises nothing


def test_top_q_keeps_the_right_number_of_tiles() -> None:
    scores = np.arange(20, dtype=float)
    sel = top_q_selection(scores, 10.0)
    assert sel.sum() == 2 and sel[-2:].all()
    assert top_q_selection(scores, 0.1).sum() == 1  # at least one tile
    assert top_q_selection(scores, 100).all()
    with pytest.raises(ValueError, match="threshold"):
        select_tiles(scores, "median")
    with pytest.raises(ValueError, match="top_q"):
        LocalisationParams(top_q=0)


def test_tumour_tiles_use_the_tiling_rule_for_mask_coverage() -> None:
    """A tile is tumour by the same coverage rule that keeps tiles on tissue (masks.mask_fractions)."""
    rng = np.random.default_rng(0)
    truth = rng.random((30, 40)) > 0.5
    coords = rng.integers(0, 350, size=(25, 2))
    row = slide_metrics(coords, 40.0, rng.random(25), truth, 10.0)
    expected = mask_fractions(truth, 10.0, coords[:, 0], coords[:, 1], 40.0) >= TUMOUR_TILE_FRACTION
    assert 0 < expected.sum() < 25 and row["tumour_tiles"] == int(expected.sum())


def grid_slide() -> tuple[np.ndarray, float, np.ndarray, float]:
    """A 4 x 4 grid of 100-px tiles; the tumour is exactly tiles (1, 1) and (2, 1) (x, y)."""
    xs = np.arange(4) * 100
    coords = np.stack(np.meshgrid(xs, xs), -1).reshape(-1, 2)
    truth = np.zeros((40, 40), bool)  # downsample 10
    truth[10:20, 10:30] = True
    return coords, 100.0, truth, 10.0


def test_metrics_of_a_perfect_and_of_a_wrong_heatmap() -> None:
    coords, extent, truth, ds = grid_slide()
    tumour = (coords[:, 1] == 100) & np.isin(coords[:, 0], [100, 200])
    good = np.where(tumour, 0.4, 0.2 / 14)
    params = LocalisationParams("top_q", 12.5, (1, 2))
    m = slide_metrics(coords, extent, good, truth, ds, params)
    assert m["has_tumour"] and m["tumour_tiles"] == 2 and m["n_selected"] == 2
    assert m["dice"] == pytest.approx(1.0, abs=0.05) and m["dice_otsu"] == pytest.approx(1.0, abs=0.05)
    assert m["coverage_top1"] == pytest.approx(0.5, abs=0.05) and m["coverage_top2"] == pytest.approx(1.0)
    assert m["k_tumour"] == 2 and m["coverage_tumour_k"] == pytest.approx(1.0)
    assert m["tile_auc"] == 1.0 and m["attention_in_tumour"] == pytest.approx(0.8, abs=0.02)
    assert m["tumour_in_tiles"] == pytest.approx(1.0) and m["dice_oracle"] == pytest.approx(1.0, abs=0.05)
    wrong = slide_metrics(coords, extent, 1.0 - good, truth, ds, params)
    assert wrong["dice"] == 0.0 and wrong["coverage_tumour_k"] == 0.0 and wrong["tile_auc"] == 0.0
    normal = slide_metrics(coords, extent, good, np.zeros_like(truth), ds, params)
    assert not normal["has_tumour"] and normal["dice"] == 0.0 and math.isnan(normal["tile_auc"])


def test_summary_leaves_out_slides_without_tumour() -> None:
    table = pd.DataFrame({"has_tumour": [True, True, False], "dice": [0.2, 0.6, 0.0], "tile_auc": [0.9, np.nan, np.nan]})
    s = summarise(table)
    assert s["dice"]["mean"] == pytest.approx(0.4) and s["dice"]["n"] == 2
    assert s["tile_auc"] == {"mean": 0.9, "std": 0.0, "median": 0.9, "n": 1}


def test_cli_over_score_folders_and_truth_files(tmp_path: Path) -> None:
    coords, extent, truth, ds = grid_slide()
    scores_dir, truth_dir = tmp_path / "scores", tmp_path / "truth"
    tumour = (coords[:, 1] == 100) & np.isin(coords[:, 0], [100, 200])
    for sid, mask in (("tumour slide", truth), ("normal", np.zeros_like(truth)), ("unannotated", truth)):
        scores = np.where(tumour, 0.4, 0.2 / 14)
        write_synthetic_scores(scores_dir, sid, coords, scores, extent)
        if sid != "unannotated":
            write_tumour_mask(truth_dir / f"{sid}.png", truth_dir / f"{sid}.json", TumourMask(mask, ds, "test", "test"), sid, 0.25, (400, 400))
    main(["--model", "asmil", "--scores", str(scores_dir), "--truth", *map(str, sorted(truth_dir.glob("*.png"))),
          "--threshold", "top_q", "--top-q", "12.5", "--top-k", "2",
          "--out-csv", str(tmp_path / "asmil.csv"), "--out-json", str(tmp_path / "asmil.json")])
    table = pd.read_csv(tmp_path / "asmil.csv")
    assert sorted(table["slide_id"]) == ["normal", "tumour slide"]  # no truth, no row
    assert table.set_index("slide_id").loc["tumour slide", "tumour_area_mm2"] == pytest.approx(200 * 100 * 0.0625 / 1e6)
    summary = json.loads((tmp_path / "asmil.json").read_text())
    assert summary["n_tumour_slides"] == 1 and summary["metrics"]["dice"]["mean"] == pytest.approx(1.0, abs=0.05)
    assert summary["metrics"]["coverage_top2"]["mean"] == pytest.approx(1.0)
    # FROC: a 50 x 25 um tumour is isolated tumour cells, so there is no lesion to find (score null)
    # and the normal slide's detections (its two 6.4x-uniform tiles, 25 um apart: one) are false positives
    rows = table.set_index("slide_id")
    assert rows.loc["tumour slide", "froc_itc"] == 1 and rows.loc["tumour slide", "froc_lesions"] == 0
    assert rows.loc["normal", "froc_fps"] == rows.loc["normal", "froc_detections"] == 1
    assert summary["froc"]["n_lesions"] == 0 and summary["froc"]["score"] is None
    assert summary["params"]["froc_nms_um"] == 224.0 and summary["froc"]["n_slides"] == 2
