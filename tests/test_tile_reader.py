"""Reader choice (wsi_asmil.slides.tile_reader): the direct JPEG reader is used only where it agrees with
OpenSlide, gives OpenSlide's pixels, and falls back to OpenSlide tile by tile."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from conftest import write_generic_tiff

from wsi_asmil.slides.slide import Slide
from wsi_asmil.slides.tiff_jpeg import JpegTiledLevel
from wsi_asmil.slides.tile_reader import DIRECT_READER_TOLERANCE, ReadPlan, TileReader, block_means


def middle_coords(slide: Slide, n: int = 4, step: int = 300) -> np.ndarray:
    w, h = slide.level_dimensions[0]
    return np.array([[w // 2 + i * step, h // 2] for i in range(n)], dtype=np.int64)


def plan_for(slide: Slide, coords: np.ndarray, reader: str = "auto") -> ReadPlan:
    return ReadPlan.for_slide(slide, coords, field_mpp=slide.mpp, size=224, level=0, reader=reader)


def test_the_real_aperio_slide_reads_directly_with_openslides_pixels(real_slide: Path) -> None:
    with Slide(real_slide) as slide:
        coords = middle_coords(slide)
        direct, slow = plan_for(slide, coords), plan_for(slide, coords, reader="openslide")
    assert (direct.reader, slow.reader) == ("jpeg-direct", "openslide")
    assert direct.via_openslide() == slow and direct.read_size == (224, 224)
    fast_reader, slow_reader = TileReader(real_slide, direct), TileReader(real_slide, slow)
    for x, y in coords:
        ours, theirs = fast_reader.read(int(x), int(y)), slow_reader.read(int(x), int(y))
        assert ours.shape == theirs.shape == (224, 224, 3)
        # level 0 has an integer downsample: the same decoded pixels, not merely close ones
        np.testing.assert_array_equal(ours, theirs)
    assert fast_reader._direct is not None and slow_reader._direct is None


def test_a_decode_that_disagrees_is_not_trusted(real_slide: Path, ycbcr_misdecode: None) -> None:
    with Slide(real_slide) as slide:
        coords = middle_coords(slide)
        misread = JpegTiledLevel.find(slide.path, slide.level_dimensions[0])
        wrong = block_means(ReadPlan(0, 1.0, (224, 224), "jpeg-direct").read_direct(misread, *map(int, coords[2])))
        right = block_means(slide.read_rgb(0, *map(int, coords[2]), 224, 224))
        assert np.abs(wrong - right).mean() > DIRECT_READER_TOLERANCE
        assert plan_for(slide, coords).reader == "openslide"


def test_a_failed_direct_decode_falls_back_to_openslide(real_slide: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with Slide(real_slide) as slide:
        coords = middle_coords(slide)
        plan = plan_for(slide, coords)
        expected = slide.read_rgb(0, *map(int, coords[0]), 224, 224)

    def broken(*args: object) -> np.ndarray:
        raise ValueError("corrupt JPEG tile")

    reader = TileReader(real_slide, plan)
    monkeypatch.setattr(JpegTiledLevel, "read", broken)
    np.testing.assert_array_equal(reader.read(*map(int, coords[0])), expected)


def test_a_reader_pickles_without_its_handles(real_slide: Path) -> None:
    """Worker processes get a copy: handles opened before pickling must not travel with it."""
    with Slide(real_slide) as slide:
        coords = middle_coords(slide)
        plan = plan_for(slide, coords)
    reader = TileReader(real_slide, plan)
    first = reader.read(*map(int, coords[1]))
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._slide is None and clone._direct is None
    np.testing.assert_array_equal(clone.read(*map(int, coords[1])), first)


def test_a_tiff_without_jpeg_tiles_reads_through_openslide(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = write_generic_tiff(tmp_path / "zlib.tif", rng.integers(0, 255, (1024, 1024, 3), dtype=np.uint8), mpp=0.25)
    with Slide(path) as slide:
        assert plan_for(slide, middle_coords(slide, n=1)).reader == "openslide"
