"""Fine heatmaps from overlapping tiles and honest colour scales (issue 14, parts 1 and 2).

The geometry is checked on a synthetic slide whose truth is a known rectangle: tiles from the real
tiling code, each scored by the fraction of it inside the rectangle (a perfect tile classifier),
averaged per pixel and thresholded at one half.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from wsi_asmil.core.canvas import Grid, colour_table, coverage_count, lookup_mask, mean_values
from wsi_asmil.features.tile import TileParams, tile_grid
from wsi_asmil.maps.heatmap import Style, draw_slide, legend_ticks, normalize, render
from wsi_asmil.slides.slide import Slide
from wsi_asmil.synthetic.scores import write_synthetic_scores

#: The synthetic slide: 640 x 640 level-0 px at 0.5 um/px, all tissue; tiles of 32 px.
SIZE, MPP, TILE = 640, 0.5, 32
#: The truth, level-0 [x0, x1) x [y0, y1): its edges sit near the middle of the training grid's tiles.
TRUTH = (206, 143, 430, 465)


def tiles(overlap: float) -> tuple[np.ndarray, float]:
    mask = np.ones((SIZE // 8, SIZE // 8), bool)
    coords, _, extent = tile_grid(mask, 8.0, (SIZE, SIZE), MPP, TileParams(MPP, TILE, overlap, 0.5))
    return coords, extent


def truth_fraction(coords: np.ndarray, extent: float) -> np.ndarray:
    """Each tile's share inside TRUTH: the score of a perfect tile classifier."""
    x0, y0, x1, y1 = TRUTH
    wx = np.clip(np.minimum(coords[:, 0] + extent, x1) - np.maximum(coords[:, 0], x0), 0, None)
    wy = np.clip(np.minimum(coords[:, 1] + extent, y1) - np.maximum(coords[:, 1], y0), 0, None)
    return wx * wy / extent**2


def recovered(overlap: float, ds: float = 2.0) -> tuple[tuple[float, float, float, float], float, float]:
    """The rectangle found by the per-pixel mean at ``ds``, its worst edge error (level-0 px), and
    its Dice against the truth."""
    coords, extent = tiles(overlap)
    grid = Grid.covering(SIZE, SIZE, ds)
    mean, covered = mean_values(coords, extent, truth_fraction(coords, extent), grid)
    found = covered & (mean >= 0.5)
    rows, cols = np.nonzero(found.any(axis=1))[0], np.nonzero(found.any(axis=0))[0]
    box = (cols[0] * ds, rows[0] * ds, (cols[-1] + 1) * ds, (rows[-1] + 1) * ds)
    yy, xx = (np.mgrid[: grid.height, : grid.width] + 0.5) * ds
    x0, y0, x1, y1 = TRUTH
    truth = (xx >= x0) & (xx < x1) & (yy >= y0) & (yy < y1)
    dice = 2 * (found & truth).sum() / (found.sum() + truth.sum())
    return box, max(abs(a - b) for a, b in zip(box, TRUTH)), dice


def test_overlapping_tiles_recover_the_edge_within_a_stride_and_finer_than_the_training_grid() -> None:
    _, sparse_error, sparse_dice = recovered(0.0)
    for overlap in (0.5, 0.75):
        stride = TILE * (1 - overlap)
        box, error, dice = recovered(overlap)
        assert error <= stride, (overlap, box)
        assert error < sparse_error and dice > sparse_dice, (overlap, error, sparse_error, dice, sparse_dice)
    # The non-overlapping grid misses by about half a tile here: the test can tell them apart.
    assert sparse_error >= TILE / 2 - 2


def test_dense_grid_reuses_the_tiling_and_covers_the_same_tissue() -> None:
    sparse, extent = tiles(0.0)
    dense, dense_extent = tiles(0.5)
    assert dense_extent == extent and len(dense) > 3 * len(sparse)
    grid = Grid.covering(SIZE, SIZE, 2.0)
    assert np.array_equal(coverage_count(sparse, extent, grid) > 0, coverage_count(dense, extent, grid) > 0)


# --- honest colours ----------------------------------------------------------------------------------


def softmax_weights(logits: np.ndarray) -> np.ndarray:
    """Attention as scoring computes it (a float32 softmax), so the test meets its rounding."""
    return torch.softmax(torch.as_tensor(logits, dtype=torch.float32), dim=0).double().numpy()


@pytest.mark.parametrize("overlap", [0.0, 0.5, 0.75])
def test_flat_attention_renders_as_one_mid_colour_on_any_grid(overlap: float) -> None:
    coords, extent = tiles(overlap)
    values = normalize(softmax_weights(np.zeros(len(coords))), "uniform")
    thumb = np.random.default_rng(0).integers(0, 256, (SIZE // 4, SIZE // 4, 3), dtype=np.uint8)
    out = render(thumb, 4.0, coords, extent, values, "viridis", 1.0)
    shown = coverage_count(coords, extent, Grid.covering(SIZE, SIZE, 4.0)) > 0
    colours = np.unique(out[shown], axis=0)
    assert len(colours) == 1 and np.array_equal(colours[0], colour_table("viridis")[128])


def test_peaked_attention_spans_the_scale_and_rank_paints_any_model_red() -> None:
    coords, _ = tiles(0.5)
    logits = -np.linalg.norm(coords - coords.mean(axis=0), axis=1) / 40.0
    peaked = normalize(softmax_weights(logits), "uniform")
    assert peaked.max() == 1.0 and peaked.min() < 0.25
    # Rank gives a nearly flat model (top tile 1.02 x uniform) the whole colour range; uniform does not.
    nearly_flat = softmax_weights(logits * 0.002)
    assert nearly_flat.max() * len(nearly_flat) < 1.03
    assert normalize(nearly_flat, "rank").max() == 1.0
    assert np.abs(normalize(nearly_flat, "uniform") - 0.5).max() < 0.01


def test_background_and_non_tissue_pixels_are_the_thumbnail_bit_for_bit() -> None:
    coords, extent = tiles(0.5)
    coords = coords[coords[:, 0] < 400]  # the right of the slide has no tiles
    thumb = np.random.default_rng(1).integers(0, 256, (SIZE // 4, SIZE // 4, 3), dtype=np.uint8)
    tissue = np.zeros((SIZE // 16, SIZE // 16), bool)
    tissue[5:30, 3:25] = True  # at downsample 16
    values = np.random.default_rng(2).random(len(coords))
    out = render(thumb, 4.0, coords, extent, values, "viridis", 0.5, tissue=tissue, tissue_downsample=16.0,
                 band_pixels=500)
    grid = Grid.covering(SIZE, SIZE, 4.0)
    show = (coverage_count(coords, extent, grid) > 0) & lookup_mask(tissue, 16.0, grid)
    assert np.array_equal(out[~show], thumb[~show])
    assert (out[show] != thumb[show]).any(axis=1).mean() > 0.9


def test_rendering_in_bands_equals_one_pass_with_blur() -> None:
    coords, extent = tiles(0.75)
    values = np.random.default_rng(3).random(len(coords))
    thumb = np.full((SIZE // 2, SIZE // 2, 3), 90, np.uint8)
    whole = render(thumb, 2.0, coords, extent, values, "viridis", 0.6, blur_px=3.0, band_pixels=10**9)
    banded = render(thumb, 2.0, coords, extent, values, "viridis", 0.6, blur_px=3.0, band_pixels=7 * SIZE // 2)
    assert np.array_equal(whole, banded)


@pytest.mark.parametrize("r", [10.0, 4.0, 100.0])
def test_colour_bar_labels_are_the_real_units_of_the_scale(r: float) -> None:
    pos, labels, title = legend_ticks("uniform", r)
    times_uniform = np.array([1 / r, r**-0.5, 1.0, r**0.5, r])  # M x weight of five tiles
    np.testing.assert_allclose(normalize(times_uniform / 5, "uniform", r), pos, atol=1e-12)
    root = f"{r ** 0.5:.3g}"
    assert labels == [f"≤1/{r:.3g}×", f"1/{root}×", "1× uniform", f"{root}×", f"≥{r:.3g}×"]
    assert "uniform" in title and "log" in title
    assert legend_ticks("rank")[1] == ["0", "25", "50", "75", "100"]
    with pytest.raises(ValueError, match="heatmap.normalize"):
        legend_ticks("jet")


def test_the_defaults_are_the_honest_scale() -> None:
    assert Style().normalize == "uniform" and Style().cmap == "viridis"


def test_draw_slide_keeps_the_background_of_a_real_slide(real_slide: Path, tmp_path: Path) -> None:
    with Slide(real_slide) as s:
        w, h = s.dimensions
        mpp = s.mpp
        thumb, ds = s.thumbnail_at_mpp(4.0)
    extent = 128.0 * 0.5 / mpp
    xs = np.round(np.arange(0, w - extent + 1, extent / 2))
    ys = np.round(np.arange(0, h - extent + 1, extent / 2))
    coords = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2).astype(np.int64)
    scores = softmax_weights(np.random.default_rng(4).normal(size=len(coords)))
    write_synthetic_scores(tmp_path, "s", coords, scores, extent, tile_size=128, mpp=mpp)
    mask = np.zeros((int(np.ceil(h / 32)), int(np.ceil(w / 32))), np.uint8)
    mask[: mask.shape[0] // 2, : mask.shape[1] // 2] = 255  # the top-left quarter is "tissue"
    cv2.imwrite(str(tmp_path / "mask.png"), mask)
    (tmp_path / "mask.json").write_text(json.dumps({"downsample": 32.0}))
    draw_slide(real_slide, tmp_path / "s_scores.csv", tmp_path / "s.png", tissue_mask=tmp_path / "mask.png", mpp=4.0)
    image = cv2.cvtColor(cv2.imread(str(tmp_path / "s.png")), cv2.COLOR_BGR2RGB)
    assert image.shape == thumb.shape
    tissue = lookup_mask(mask > 0, 32.0, Grid(ds, thumb.shape[1], thumb.shape[0]))
    assert np.array_equal(image[~tissue], thumb[~tissue])
    assert (image[tissue] != thumb[tissue]).any(axis=1).mean() > 0.9
