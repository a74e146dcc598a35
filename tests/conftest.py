"""Shared fixtures: the real CC0 slide and small slides the tests write themselves."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import tifffile
import yaml

if TYPE_CHECKING:
    from wsi_asmil.synthetic.witness import WitnessSpec

DATA = Path(__file__).parent / "data"
REAL_SLIDE = DATA / "cmu_small_region.svs"
#: config.yaml's features section: what workflow runs that leave the encoder unset use (the demo's
#: encoder, weights and so its feature folder ``features/<tiling>/<encoder>/``).
CONFIG_FEATURES = yaml.safe_load((Path(__file__).parents[1] / "config.yaml").read_text())["features"]


def write_generic_tiff(path: Path, rgb: np.ndarray, mpp: float | None = None) -> Path:
    """A single-level tiled TIFF; with ``mpp`` it carries resolution tags in centimetres."""
    kwargs = {}
    if mpp is not None:
        kwargs = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    tifffile.imwrite(path, rgb, tile=(256, 256), photometric="rgb", compression="zlib", **kwargs)
    return path


def physical_pattern(width: int, height: int, mpp: float) -> np.ndarray:
    """An image whose content is a function of microns, not pixels: the same scene at any mpp."""
    x = (np.arange(width) + 0.5) * mpp
    y = (np.arange(height) + 0.5) * mpp
    xx, yy = np.meshgrid(x, y)
    r = 128 + 100 * np.sin(2 * np.pi * xx / 40.0)
    g = 128 + 100 * np.sin(2 * np.pi * yy / 55.0)
    b = 128 + 100 * np.sin(2 * np.pi * (xx + yy) / 90.0)
    return np.stack([r, g, b], axis=-1).round().astype(np.uint8)


def witness_fold(root: Path, spec: WitnessSpec, n_train: int, n_val: int) -> tuple[Path, dict]:
    """A witness cohort written under ``root`` and a one-fold split of its bags in id order: the first
    ``n_train`` train, the next ``n_val`` validate, the rest test. Returns (features folder, split)."""
    import pandas as pd

    from wsi_asmil.synthetic.witness import write_witness_cohort

    write_witness_cohort(root, spec, progress=False)
    table = pd.read_csv(root / "labels.csv", dtype=str)
    ids, labels = table["slide_id"].tolist(), dict(zip(table["slide_id"], table["label"]))
    fold = {"train": ids[:n_train], "val": ids[n_train : n_train + n_val], "test": ids[n_train + n_val :]}
    return root / "features", {"classes": sorted(set(labels.values())), "labels": labels, "folds": [fold]}


@pytest.fixture
def ycbcr_misdecode(monkeypatch: pytest.MonkeyPatch) -> None:
    """The direct JPEG reader decodes Aperio's RGB tiles as YCbCr (their APP14 marker dropped):
    a scanner quirk it would get wrong, tens of levels off OpenSlide."""
    from wsi_asmil.slides import tiff_jpeg
    from wsi_asmil.slides.tiff_jpeg import JpegTiledLevel

    find = JpegTiledLevel.find

    def without_rgb_marker(*args: object) -> JpegTiledLevel | None:
        level = find(*args)
        if level is not None:
            level.header = level.header.replace(tiff_jpeg._ADOBE_RGB, b"")
        return level

    monkeypatch.setattr(JpegTiledLevel, "find", staticmethod(without_rgb_marker))


@pytest.fixture(scope="session")
def real_slide() -> Path:
    return REAL_SLIDE


@pytest.fixture(scope="session")
def demo_slides(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three small synthetic slides (tumour, normal with pen marks, tumour), with ground truth."""
    from wsi_asmil.synthetic import write_cohort

    out = tmp_path_factory.mktemp("demo")
    write_cohort(out, n_slides=3, seed=3, width=3072, height=2304, mpp=0.25)
    return {p.stem: p for p in sorted((out / "slides").glob("*.svs"))}
