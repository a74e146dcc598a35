"""The one rule for how much of a tile lies on a mask, and the mask readers."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsi_asmil.tissue.masks import mask_fractions, read_tissue_mask, read_tumour_mask


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    downsample=st.sampled_from([4.0, 8.0, 16.0]),
    extent=st.sampled_from([32.0, 64.0, 128.0]),
)
def test_mask_fraction_equals_brute_force(seed: int, downsample: float, extent: float) -> None:
    """When tiles align with mask pixels the integral image gives the exact covered fraction."""
    rng = np.random.default_rng(seed)
    mask = rng.random((40, 50)) < 0.4
    side = int(extent / downsample)
    xs = np.arange(0, 50 - side + 1) * downsample
    ys = np.arange(0, 40 - side + 1) * downsample
    gx, gy = (a.ravel() for a in np.meshgrid(xs, ys))
    fast = mask_fractions(mask, downsample, gx, gy, extent)
    slow = [mask[int(y / downsample) : int(y / downsample) + side, int(x / downsample) : int(x / downsample) + side].mean() for x, y in zip(gx, gy)]
    np.testing.assert_allclose(fast, slow)


def test_tiles_smaller_than_a_mask_pixel_take_its_value() -> None:
    mask = np.array([[True, False], [False, True]])
    frac = mask_fractions(mask, 100.0, np.array([10.0, 110.0, 150.0]), np.array([10.0, 10.0, 160.0]), 20.0)
    np.testing.assert_array_equal(frac, [1.0, 0.0, 1.0])
    assert mask_fractions(mask, 100.0, np.zeros(0), np.zeros(0), 20.0).shape == (0,)


def test_readers_name_the_missing_file_and_need_a_downsample(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="mask.png"):
        read_tissue_mask(tmp_path / "mask.png")
    cv2.imwrite(str(tmp_path / "t.png"), np.array([[0, 255]], np.uint8))
    (tmp_path / "t.json").write_text('{"mpp": 8}')
    with pytest.raises(ValueError, match="downsample"):
        read_tumour_mask(tmp_path / "t.png")
    (tmp_path / "t.json").write_text('{"downsample": 4.0}')
    mask, side = read_tumour_mask(tmp_path / "t.png")
    assert mask.tolist() == [[False, True]] and side["downsample"] == 4.0
