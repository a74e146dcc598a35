from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import physical_pattern, write_generic_tiff

from wsi_asmil.slides.slide import Slide, SlideError, discover_slides


def test_real_slide_metadata(real_slide: Path) -> None:
    with Slide(real_slide) as s:
        assert s.vendor == "aperio"
        assert s.mpp == pytest.approx(0.499)
        assert s.mpp_info.source == "openslide"
        assert s.dimensions == (2220, 2967)
        assert s.level_count == 1
        assert s.best_level(0.5) == 0


@pytest.mark.parametrize("target_mpp,size", [(0.5, 224), (1.0, 224), (0.25, 64), (2.0, 37)])
def test_read_at_mpp_returns_exact_size(real_slide: Path, target_mpp: float, size: int) -> None:
    with Slide(real_slide) as s:
        tile = s.read_at_mpp(1000, 1200, target_mpp, size)
    assert tile.shape == (size, size, 3)
    assert tile.dtype == np.uint8
    assert tile.std() > 5  # tissue, not a blank read


def test_same_field_of_view_across_scanners(tmp_path: Path) -> None:
    """A 0.263 um/px and a 0.25 um/px scan of the same scene give the same 0.5 um/px tile."""
    a = write_generic_tiff(tmp_path / "a.tif", physical_pattern(1600, 1600, 0.25), mpp=0.25)
    b = write_generic_tiff(tmp_path / "b.tif", physical_pattern(1521, 1521, 0.263), mpp=0.263)
    with Slide(a) as sa, Slide(b) as sb:
        # the same physical origin (100 um, 120 um) in each slide's level-0 pixels
        ta = sa.read_at_mpp(round(100 / 0.25), round(120 / 0.25), 0.5, 224)
        tb = sb.read_at_mpp(round(100 / 0.263), round(120 / 0.263), 0.5, 224)
        naive = sb.read_rgb(0, round(100 / 0.263), round(120 / 0.263), 448, 448)[::2, ::2]
    diff = np.abs(ta.astype(float) - tb.astype(float)).mean()
    naive_diff = np.abs(ta.astype(float) - naive[:224, :224].astype(float)).mean()
    assert diff < 8, diff
    assert naive_diff > 2 * diff  # reading a fixed 448 px would show a 5% larger field


def test_mpp_from_tiff_resolution(tmp_path: Path) -> None:
    path = write_generic_tiff(tmp_path / "res.tif", physical_pattern(512, 512, 0.5), mpp=0.5)
    with Slide(path) as s:
        assert s.mpp == pytest.approx(0.5, rel=1e-4)
        assert s.mpp_info.source in ("openslide", "tiff-resolution")


def test_missing_mpp_is_a_clear_error_and_overrides_work(tmp_path: Path) -> None:
    path = write_generic_tiff(tmp_path / "no mpp.tif", physical_pattern(512, 512, 0.5))
    with pytest.raises(SlideError) as err:
        Slide(path)
    message = str(err.value)
    assert "'no mpp'" in message and "'mpp' column" in message and "mpp_fallback" in message
    with Slide(path, mpp_override=0.42) as s:
        assert (s.mpp, s.mpp_info.source) == (0.42, "label-table")
    with Slide(path, mpp_fallback=0.3) as s:
        assert (s.mpp, s.mpp_info.source) == (0.3, "config.mpp_fallback")
    with Slide(path, mpp_override=0.42, mpp_fallback=0.3) as s:
        assert s.mpp == 0.42  # the per-slide value wins over the global fallback


@pytest.mark.parametrize("content", [b"", b"this is not a slide\n" * 50])
def test_unreadable_files_name_the_slide(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "broken slide.svs"
    path.write_bytes(content)
    with pytest.raises(SlideError, match="broken slide"):
        Slide(path)


def test_pyramid_levels_chosen_by_mpp(demo_slides: dict[str, Path]) -> None:
    with Slide(next(iter(demo_slides.values()))) as s:
        assert s.mpp == pytest.approx(0.25)
        assert s.level_count >= 3
        assert s.level_downsamples[1] == pytest.approx(2.0)
        assert s.best_level(0.5) == 1
        assert s.best_level(0.49) == 0  # never upsample from a coarser level
        assert s.best_level(0.3) == 0
        assert s.level_mpp(s.best_level(100.0)) == pytest.approx(s.level_mpp(s.level_count - 1))
        # reading at the 2x level equals reading level 0 and resizing, up to JPEG noise (which
        # a slight blur removes); a one-pixel shift would not pass
        a = s.read_at_mpp(1024, 1024, 0.5, 128).astype(np.float32)
        b = s.read_at_mpp(1024, 1024, 0.5, 128, level=0).astype(np.float32)
        shifted = s.read_at_mpp(1026, 1024, 0.5, 128, level=0).astype(np.float32)
    blur = lambda im: cv2.GaussianBlur(im, (5, 5), 1.0)  # noqa: E731
    assert np.abs(blur(a) - blur(b)).mean() < 4
    assert np.abs(blur(a) - blur(shifted)).mean() > 2 * np.abs(blur(a) - blur(b)).mean()


def test_thumbnail_is_blockwise_consistent(real_slide: Path) -> None:
    with Slide(real_slide) as s:
        one, ds = s.thumbnail_at_mpp(4.0)
        many, ds2 = s.thumbnail_at_mpp(4.0, block=37)
    assert one.shape == many.shape and ds == ds2
    assert ds == pytest.approx(4.0 / 0.499, rel=0.01)
    assert np.abs(one.astype(float) - many.astype(float)).mean() < 2


def test_discover_slides(tmp_path: Path) -> None:
    for name in ["a.svs", "b c.ndpi", "d.TIF", "notes.txt", "image.png", ".hidden.svs"]:
        (tmp_path / name).write_bytes(b"x")
    dicom = tmp_path / "dicom slide"
    dicom.mkdir()
    (dicom / "level0.dcm").write_bytes(b"x")
    (tmp_path / "empty folder").mkdir()
    found, ignored = discover_slides(tmp_path)
    assert sorted(found) == ["a", "b c", "d", "dicom slide"]
    assert sorted(p.name for p in ignored) == ["image.png", "notes.txt"]
    (tmp_path / "a.tif").write_bytes(b"x")
    with pytest.raises(SlideError, match="'a'"):
        discover_slides(tmp_path)
