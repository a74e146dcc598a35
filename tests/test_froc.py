"""Lesion-level FROC (CAMELYON16 protocol), worked by hand on two slides.

Masks of 100 x 100 px at downsample 20 on 0.5 um/px slides: 10 um per mask pixel, so tumour grows
by 3.75 px (37.5 um on each side) into the evaluation mask. Tiles are 200 level-0 px (100 um).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from wsi_asmil.maps.froc import FP_RATES, FrocParams, evaluation_mask, froc, major_axis_px, slide_hits

DOWNSAMPLE, MPP, EXTENT = 20.0, 0.5, 200.0
PARAMS = FrocParams(nms_radius_um=150.0, min_score=2.0)


def tiles(centres_rc: list[tuple[int, int]]) -> np.ndarray:
    """Level-0 top-left corners of tiles centred on the given mask pixels (row, col)."""
    return np.array([[c * DOWNSAMPLE + DOWNSAMPLE / 2 - EXTENT / 2, r * DOWNSAMPLE + DOWNSAMPLE / 2 - EXTENT / 2]
                     for r, c in centres_rc])


def tumour_slide() -> np.ndarray:
    mask = np.zeros((100, 100), dtype=bool)
    mask[10:20, 10:40] = True  # lesion A: 100 x 300 um
    mask[50:52, 10:12] = True  # B: 20 um, isolated tumour cells (95 um once grown)
    mask[60:85, 60:85] = True  # lesion C: 250 x 250 um, never detected
    return mask


def test_evaluation_mask_grows_labels_and_finds_isolated_cells() -> None:
    lesions = evaluation_mask(tumour_slide(), DOWNSAMPLE * MPP)
    assert lesions.labels.max() == 3 and lesions.itc == frozenset({2}) and lesions.countable == 2
    # grown by 37.5 um: 3 px beyond the edge is in, 4 px is out
    assert lesions.labels[5, 20] == 0 and lesions.labels[7, 20] == 1 and lesions.labels[23, 20] == 0
    # holes inside a lesion are filled
    ring = np.zeros((60, 60), dtype=bool)
    ring[10:50, 10:50] = True
    ring[20:40, 20:40] = False
    assert evaluation_mask(ring, 10.0).labels[30, 30] == 1


def test_major_axis_is_the_equivalent_ellipse() -> None:
    line = np.zeros((5, 40), dtype=bool)
    line[2, 0:30] = True
    assert major_axis_px(line) == pytest.approx(4 * math.sqrt((30**2 - 1) / 12))


def test_hand_worked_froc() -> None:
    # Tumour slide: B (ITC) draws the strongest detection, which counts for nothing; A is hit
    # twice (best 4); one detection on normal tissue (6); one tile under the stopping score.
    rel = np.array([4.0, 3.5, 7.0, 6.0, 1.5])
    coords = tiles([(15, 15), (15, 35), (51, 11), (40, 90), (90, 10)])
    one = slide_hits(coords, EXTENT, rel / len(rel), tumour_slide(), DOWNSAMPLE, MPP, PARAMS)
    assert one.n_detections == 4 and one.n_lesions == 2 and one.n_itc == 1
    np.testing.assert_allclose(one.lesion_scores, [4.0, 0.0])
    np.testing.assert_allclose(one.fp_scores, [6.0])

    # Normal slide: two false positives; the third tile lies 28 um from the best and is suppressed.
    rel = np.array([5.0, 2.5, 4.0])
    coords = tiles([(20, 20), (80, 80), (22, 22)])
    two = slide_hits(coords, EXTENT, rel / len(rel), np.zeros((100, 100), bool), DOWNSAMPLE, MPP, PARAMS)
    assert two.n_detections == 2 and two.n_lesions == 0
    np.testing.assert_allclose(sorted(two.fp_scores), [2.5, 5.0])

    # Thresholds 6, 5, 4, 2.5 give (FPs/slide, sensitivity) (0.5, 0), (1, 0), (1, 0.5), (1.5, 0.5);
    # from the origin, and the best sensitivity at FP rate 1: 0, 0, 0.5, 0.5, 0.5, 0.5 at 1/4 .. 8.
    result = froc([one, two])
    np.testing.assert_allclose(result.fps_per_slide, [0.0, 0.5, 1.0, 1.5])
    np.testing.assert_allclose(result.sensitivity, [0.0, 0.0, 0.5, 0.5])
    assert [result.at_rates[r] for r in FP_RATES] == [0.0, 0.0, 0.5, 0.5, 0.5, 0.5]
    assert result.score == pytest.approx(1 / 3) and result.n_slides == 2 and result.n_lesions == 2

    # A second normal slide: FPs per slide (1/3, 0), (1, 0.5), (5/3, 0.5); at 1/2 FP, linearly
    # between the first two: 0.5 * (1/2 - 1/3) / (2/3) = 0.125.
    three = froc([one, two, two])
    assert three.at_rates[0.5] == pytest.approx(0.125) and three.score == pytest.approx((0.125 + 4 * 0.5) / 6)


def test_flat_attention_detects_nothing_and_interpolation_is_linear() -> None:
    mask = tumour_slide()
    coords = tiles([(15, 15), (40, 90)])
    flat = slide_hits(coords, EXTENT, np.array([0.5, 0.5]), mask, DOWNSAMPLE, MPP, PARAMS)
    assert flat.n_detections == 0 and froc([flat]).score == 0.0
    hit = slide_hits(tiles([(15, 15), (40, 90)]), EXTENT, np.array([0.9, 0.1]), mask, DOWNSAMPLE, MPP,
                     FrocParams(150.0, 0.15))
    # A at 1.8, an FP at 0.2 on a single slide: (0, 0.5) then (1, 0.5); at 1/4 FP: 0.5
    assert froc([hit]).at_rates[0.25] == 0.5
    normal = slide_hits(tiles([(20, 20)]), EXTENT, np.array([1.0]), np.zeros((100, 100), bool), DOWNSAMPLE, MPP,
                        PARAMS)
    assert math.isnan(froc([normal]).score)  # no lesion to find: undefined, not zero


def test_the_localisation_table_carries_the_froc_through_its_csv(tmp_path: Path) -> None:
    from wsi_asmil.core.io import write_csv
    from wsi_asmil.maps.localisation import LocalisationParams, pooled_froc, slide_metrics

    params = LocalisationParams(froc_nms_um=150.0)
    rel1, rel2 = np.array([4.0, 3.5, 7.0, 6.0, 1.5]), np.array([5.0, 2.5, 4.0])
    rows = [
        slide_metrics(tiles([(15, 15), (15, 35), (51, 11), (40, 90), (90, 10)]), EXTENT, rel1 / 5, tumour_slide(),
                      DOWNSAMPLE, params, mpp=MPP),
        slide_metrics(tiles([(20, 20), (80, 80), (22, 22)]), EXTENT, rel2 / 3, np.zeros((100, 100), bool),
                      DOWNSAMPLE, params, mpp=MPP),
    ]
    assert rows[0]["froc_found"] == 1 and rows[0]["froc_fps"] == 1 and rows[1]["froc_fps"] == 2
    write_csv(tmp_path / "loc.csv", pd.DataFrame(rows))
    result = pooled_froc(pd.read_csv(tmp_path / "loc.csv"))
    assert result is not None and result.score == pytest.approx(1 / 3)
    assert "froc_found" not in slide_metrics(tiles([(15, 15)]), EXTENT, np.ones(1), tumour_slide(), DOWNSAMPLE, params)
