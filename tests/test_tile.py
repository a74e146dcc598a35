from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from wsi_asmil.features import store
from wsi_asmil.features.tile import TileParams, grid_origins, tile_grid, tile_slide
from wsi_asmil.slides.slide import Slide
from wsi_asmil.tissue.segment import SegmentParams, segment_slide


def test_extent_is_physical_not_rounded() -> None:
    mask = np.ones((100, 100), bool)
    _, _, extent_263 = tile_grid(mask, 16.0, (1600, 1600), 0.263, TileParams())
    _, _, extent_25 = tile_grid(mask, 16.0, (1600, 1600), 0.25, TileParams())
    assert extent_263 == pytest.approx(224 * 0.5 / 0.263)  # 425.86, not 426 or 448
    assert extent_25 == 448.0


def test_grid_keeps_only_tissue_tiles() -> None:
    # level 0: 4480 x 2240 at 0.25 um/px -> 10 x 5 tiles of 448 px; the mask covers the left half
    mask = np.zeros((140, 280), bool)
    mask[:, :140] = True
    coords, frac, extent = tile_grid(mask, 16.0, (4480, 2240), 0.25, TileParams())
    assert extent == 448
    assert len(coords) == 5 * 5
    assert coords[:, 0].max() + extent <= 2240
    assert np.all(frac == 1.0)
    # slide order: row-major, the order tiles are stored in the file
    assert np.all(np.diff(coords[:, 1] * 10**6 + coords[:, 0]) > 0)


def test_min_tissue_fraction_and_overlap() -> None:
    mask = np.zeros((140, 280), bool)
    mask[:, :126] = True  # the fifth tile column is 14/28 = half tissue
    few, _, _ = tile_grid(mask, 16.0, (4480, 2240), 0.25, TileParams(min_tissue_fraction=0.6))
    more, frac, _ = tile_grid(mask, 16.0, (4480, 2240), 0.25, TileParams(min_tissue_fraction=0.5))
    assert len(few) == 20 and len(more) == 25
    assert sorted(set(np.round(frac, 3))) == [0.5, 1.0]
    ov, _, _ = tile_grid(mask, 16.0, (4480, 2240), 0.25, TileParams(overlap=0.5))
    assert len(ov) > 3 * len(few)


def test_grid_origins_whole_tiles_only() -> None:
    assert grid_origins(100.0, 100.0, 1000).tolist() == [0, 100, 200, 300, 400, 500, 600, 700, 800, 900]
    assert len(grid_origins(100.0, 100.0, 999)) == 9
    assert len(grid_origins(2000.0, 2000.0, 999)) == 0


def test_tile_real_slide(real_slide: Path, tmp_path: Path) -> None:
    segment_slide(real_slide, tmp_path / "seg", SegmentParams())
    info = tile_slide(real_slide, tmp_path / "seg", tmp_path / "t.zarr", tmp_path / "grid.png", TileParams())
    coords, frac, attrs = store.read_tiles(tmp_path / "t.zarr")
    assert len(coords) == info["n_tiles"] > 20
    assert attrs["kind"] == "tiles" and attrs["slide_id"] == "cmu_small_region"
    assert attrs["tile_extent"] == pytest.approx(224 * 0.5 / 0.499)
    assert attrs["read_level"] == 0 and attrs["mpp"] == pytest.approx(0.499)
    assert np.all(frac >= 0.5)
    assert coords.min() >= 0
    assert np.all(coords[:, 0] + attrs["tile_extent"] <= 2220 + 1)
    assert np.all(coords[:, 1] + attrs["tile_extent"] <= 2967 + 1)
    with Slide(real_slide) as s:
        tiles = [s.read_at_mpp(x, y, 0.5, 224) for x, y in coords[:10]]
    assert all(t.std() > 10 for t in tiles)  # tiles hold tissue
    assert (tmp_path / "grid.png").stat().st_size > 0


def test_no_tissue_gives_an_empty_store(real_slide: Path, tmp_path: Path) -> None:
    segment_slide(real_slide, tmp_path / "seg", SegmentParams(threshold=255))
    info = tile_slide(real_slide, tmp_path / "seg", tmp_path / "t.zarr", tmp_path / "grid.png", TileParams())
    coords, frac, _ = store.read_tiles(tmp_path / "t.zarr")
    assert info["n_tiles"] == 0 and coords.shape == (0, 2) and frac.shape == (0,)


def test_tag_keeps_tilings_apart() -> None:
    assert TileParams().tag() == "0.5mpp_224px"
    assert TileParams(target_mpp=0.25, tile_size=256, overlap=0.25).tag() == "0.25mpp_256px_ov0.25"
