"""Tests for the synthetic cohort generator: file format, ground truth, determinism, atomicity."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import cv2
import numpy as np
import openslide
import pytest

from wsi_asmil import synthetic
from wsi_asmil.synthetic import SlideSpec, SlideTruth
from wsi_asmil.synthetic.render import Renderer

W, H = 2048, 1536
TUMOUR_SPEC = SlideSpec(W, H, tumour=True, tumour_fraction=0.06, pen_marks=True, dust=True, seed=11)
NORMAL_SPEC = SlideSpec(W, H, tumour=False, dust=True, seed=12, n_islands=1)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, SlideSpec, SlideTruth]]:
    """The two slides most tests read, rendered once per module to keep the file fast."""
    out = tmp_path_factory.mktemp("slides")
    slides = {}
    for name, spec in (("tumour", TUMOUR_SPEC), ("normal", NORMAL_SPEC)):
        path = out / f"{name}.svs"
        slides[name] = (path, spec, synthetic.write_slide(path, spec))
    return slides


def _read_level(slide: openslide.OpenSlide, level: int) -> np.ndarray:
    return np.asarray(slide.read_region((0, 0), level, slide.level_dimensions[level]).convert("RGB"))


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum()) / float((a | b).sum())


def _lowest_level_hsv(path: Path) -> tuple[np.ndarray, int]:
    with openslide.OpenSlide(path) as slide:
        level = slide.level_count - 1
        return cv2.cvtColor(_read_level(slide, level), cv2.COLOR_RGB2HSV), int(slide.level_downsamples[level])


def _pen_pixels(hsv: np.ndarray) -> np.ndarray:
    """Blue/green ink by hue, black ink by darkness: what a real segmenter must reject anyway."""
    return ((hsv[..., 0] > 35) & (hsv[..., 0] < 130) & (hsv[..., 1] > 40)) | (hsv[..., 2] < 60)


@pytest.mark.parametrize("name", ["tumour", "normal"])
def test_openslide_reads_an_aperio_pyramid(written, name: str) -> None:
    path, spec, _ = written[name]
    with openslide.OpenSlide(path) as slide:
        assert slide.properties["openslide.vendor"] == "aperio"
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(spec.mpp)
        assert float(slide.properties["openslide.mpp-y"]) == pytest.approx(spec.mpp)
        assert slide.properties["openslide.objective-power"] == "40"
        assert slide.level_dimensions[0] == (W, H)
        assert slide.level_downsamples == (1.0, 2.0, 8.0)
        assert slide.level_dimensions[1:] == ((W // 2, H // 2), (W // 8, H // 8))


def test_pyramid_grows_with_slide_size() -> None:
    assert synthetic.pyramid_downsamples(6144, 4608) == [1, 2, 8]
    assert synthetic.pyramid_downsamples(100_000, 80_000) == [1, 2, 8, 32, 128]


def test_lower_levels_are_level0_downsampled(written) -> None:
    path, _, _ = written["tumour"]
    with openslide.OpenSlide(path) as slide:
        level0 = _read_level(slide, 0)
        for level in range(1, slide.level_count):
            size = slide.level_dimensions[level]
            expected = cv2.resize(level0, size, interpolation=cv2.INTER_AREA).astype(np.int16)
            diff = np.abs(_read_level(slide, level).astype(np.int16) - expected)
            assert diff.mean() < 4.0, f"level {level} differs from level 0 by {diff.mean():.2f} on average"


def test_truth_masks_cover_the_slide_at_their_downsample(written) -> None:
    _, spec, truth = written["tumour"]
    assert truth.downsample == 32.0  # 8 um/px at 0.25 um/px
    assert truth.tissue.shape == (math.ceil(H / 32), math.ceil(W / 32))
    assert truth.tumour.shape == truth.tissue.shape
    assert (truth.width, truth.height, truth.mpp) == (W, H, spec.mpp)
    assert 0.3 < truth.tissue_area_fraction < 0.6


def test_tumour_covers_the_requested_fraction_inside_tissue(written) -> None:
    _, spec, truth = written["tumour"]
    assert truth.tumour.any()
    assert not (truth.tumour & ~truth.tissue).any()
    assert truth.tumour_fraction == pytest.approx(spec.tumour_fraction, rel=0.15)


def test_tumour_fraction_follows_the_spec() -> None:
    low = synthetic.slide_truth(SlideSpec(W, H, tumour=True, tumour_fraction=0.03, seed=5))
    high = synthetic.slide_truth(SlideSpec(W, H, tumour=True, tumour_fraction=0.10, seed=5))
    assert low.tumour_fraction == pytest.approx(0.03, rel=0.2)
    assert high.tumour_fraction == pytest.approx(0.10, rel=0.2)


def test_normal_slide_has_an_empty_tumour_mask(written) -> None:
    _, _, truth = written["normal"]
    assert truth.tissue.any()
    assert not truth.tumour.any()
    assert truth.tumour_fraction == 0.0


def test_returned_truth_equals_slide_truth(written) -> None:
    _, spec, truth = written["tumour"]
    again = synthetic.slide_truth(spec)
    np.testing.assert_array_equal(truth.tissue, again.tissue)
    np.testing.assert_array_equal(truth.tumour, again.tumour)
    same_grid = synthetic.slide_truth(spec, downsample=32)
    np.testing.assert_array_equal(truth.tissue, same_grid.tissue)


def test_saturation_otsu_recovers_the_tissue_mask(written) -> None:
    """A plain saturation threshold at the lowest level must agree with the truth, pen excluded."""
    for name in ("tumour", "normal"):
        path, spec, _ = written[name]
        hsv, downsample = _lowest_level_hsv(path)
        _, seg = cv2.threshold(hsv[..., 1], 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        pen = _pen_pixels(hsv)
        truth = synthetic.slide_truth(spec, downsample=downsample)
        assert truth.tissue.shape == seg.shape
        assert _iou((seg > 0) & ~pen, truth.tissue & ~pen) >= 0.95


def test_tumour_region_is_rendered_darker_than_normal_tissue(written) -> None:
    """The pixels must follow the truth: tumour (crowded hyperchromatic nuclei) is darker."""
    path, spec, _ = written["tumour"]
    hsv, downsample = _lowest_level_hsv(path)
    truth = synthetic.slide_truth(spec, downsample=downsample)
    value = hsv[..., 2].astype(float)
    clean = ~_pen_pixels(hsv)
    tumour, normal = truth.tumour & clean, truth.tissue & ~truth.tumour & clean
    assert tumour.sum() > 100
    assert value[tumour].mean() < value[normal].mean() - 20


def test_normal_slides_also_have_dense_dark_clusters(written) -> None:
    """Lymphoid aggregates exist without tumour, so 'crowded dark nuclei' alone cannot be the label."""
    path, _, _ = written["normal"]
    with openslide.OpenSlide(path) as slide:
        hsv = cv2.cvtColor(_read_level(slide, 1), cv2.COLOR_RGB2HSV)
    dark = (hsv[..., 2] < 140).astype(np.float32)
    assert cv2.blur(dark, (32, 32)).max() > 0.45


def test_same_seed_gives_identical_pixels_and_other_seed_does_not(written, tmp_path: Path) -> None:
    path, spec, _ = written["tumour"]
    again = synthetic.write_slide(tmp_path / "again.svs", spec)
    other = synthetic.write_slide(tmp_path / "other.svs", SlideSpec(W, H, tumour=True, seed=spec.seed + 1))
    assert again.tissue.shape == other.tissue.shape
    with openslide.OpenSlide(path) as a, openslide.OpenSlide(tmp_path / "again.svs") as b:
        for level in range(a.level_count):
            np.testing.assert_array_equal(_read_level(a, level), _read_level(b, level))
    assert path.read_bytes() == (tmp_path / "again.svs").read_bytes()
    with openslide.OpenSlide(path) as a, openslide.OpenSlide(tmp_path / "other.svs") as c:
        assert not np.array_equal(_read_level(a, 2), _read_level(c, 2))


def test_other_mpp_is_recorded_and_keeps_the_canvas_in_microns(tmp_path: Path) -> None:
    spec = SlideSpec(1024, 768, mpp=0.5, tumour=True, seed=3)
    truth = synthetic.write_slide(tmp_path / "half.svs", spec)
    assert truth.downsample == 16.0
    assert truth.tissue.shape == (48, 64)
    with openslide.OpenSlide(tmp_path / "half.svs") as slide:
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.5)
        assert slide.properties["openslide.objective-power"] == "20"


def test_failed_write_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    real_tile = Renderer.tile

    def failing_tile(self, items, tx, ty):
        calls["n"] += 1
        if calls["n"] > 5:
            raise RuntimeError("killed mid-slide")
        return real_tile(self, items, tx, ty)

    monkeypatch.setattr(Renderer, "tile", failing_tile)
    with pytest.raises(RuntimeError, match="killed mid-slide"):
        synthetic.write_slide(tmp_path / "broken.svs", SlideSpec(1024, 768, seed=1))
    assert list(tmp_path.iterdir()) == []


def test_write_truth_round_trips_masks_and_sidecar(written, tmp_path: Path) -> None:
    _, spec, truth = written["tumour"]
    paths = synthetic.write_truth(tmp_path, "demo_x", truth, spec)
    assert paths["tissue"] == tmp_path / "demo_x_tissue.png"
    tissue = cv2.imread(str(paths["tissue"]), cv2.IMREAD_UNCHANGED)
    tumour = cv2.imread(str(paths["tumour"]), cv2.IMREAD_UNCHANGED)
    assert tissue.dtype == np.uint8 and set(np.unique(tissue)) <= {0, 255}
    np.testing.assert_array_equal(tissue > 0, truth.tissue)
    np.testing.assert_array_equal(tumour > 0, truth.tumour)
    meta = json.loads(paths["json"].read_text())
    assert meta["downsample"] == 32.0 and meta["mpp"] == 0.25
    assert (meta["width"], meta["height"]) == (W, H)
    assert meta["label"] == "tumour"
    assert meta["tumour_fraction"] == pytest.approx(truth.tumour_fraction, abs=1e-5)


def test_demo_slide_ids_are_stable() -> None:
    assert synthetic.demo_slide_ids(3) == ["demo_000", "demo_001", "demo_002"]
    assert synthetic.demo_slide_ids(0) == []


def test_demo_specs_are_balanced_deterministic_and_tile_aligned() -> None:
    specs = synthetic.demo_specs(24, seed=0)
    assert specs == synthetic.demo_specs(24, seed=0)
    assert specs != synthetic.demo_specs(24, seed=1)
    assert sum(s.tumour for s in specs) == 12
    assert all(s.width % synthetic.TILE == 0 and s.height % synthetic.TILE == 0 for s in specs)
    assert all(5500 <= s.width <= 6700 and 4000 <= s.height <= 5000 for s in specs)
    assert len({s.seed for s in specs}) == 24
    for flag in ("pen_marks", "dust"):
        assert {s.tumour for s in specs if getattr(s, flag)} == {True, False}
    assert all(0.03 <= s.tumour_fraction <= 0.08 for s in specs)


@pytest.mark.parametrize(
    "kwargs",
    [{"width": 100}, {"mpp": 0.0}, {"tumour_fraction": 0.9}, {"n_islands": 0}, {"seed": -1}],
)
def test_invalid_specs_are_rejected(kwargs: dict) -> None:
    args = {"width": 1024, "height": 1024, **kwargs}
    with pytest.raises(ValueError):
        SlideSpec(**args)


def test_write_cohort_layout_and_labels(tmp_path: Path) -> None:
    out = synthetic.write_cohort(tmp_path / "cohort", n_slides=4, seed=3, width=1024, height=768)
    ids = synthetic.demo_slide_ids(4)
    with open(out / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows == [{"slide_id": i, "label": "tumour" if k % 2 == 0 else "normal"} for k, i in enumerate(ids)]
    for slide_id, row in zip(ids, rows):
        with openslide.OpenSlide(out / "slides" / f"{slide_id}.svs") as slide:
            assert slide.properties["openslide.vendor"] == "aperio"
        tumour = cv2.imread(str(out / "truth" / f"{slide_id}_tumour.png"), cv2.IMREAD_GRAYSCALE)
        assert (tumour.max() == 255) == (row["label"] == "tumour")
        meta = json.loads((out / "truth" / f"{slide_id}.json").read_text())
        assert meta["label"] == row["label"]
    leftovers = [p for p in out.rglob("*") if p.name.startswith(".")]
    assert leftovers == []


def test_cli_help_and_small_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        synthetic.main(["--help"])
    assert exc.value.code == 0
    assert "--n-slides" in capsys.readouterr().out
    argv = ["--out", str(tmp_path), "--n-slides", "2", "--width", "512", "--height", "512", "--seed", "4"]
    assert synthetic.main(argv) == 0
    assert sorted(p.name for p in (tmp_path / "slides").iterdir()) == ["demo_000.svs", "demo_001.svs"]
