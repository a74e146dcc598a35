"""Painting per-tile values onto an output pixel grid: the memory-bounded core of heatmaps.

A *grid* is a window of output pixels over a slide at a fixed level-0 downsample. Everything here
costs memory in proportion to the window, never to the slide: a CAMELYON slide (100k x 80k px)
at 8 um/px is a 3k x 2.5k window, and a pyramidal overlay at 1 um/px is rendered window by window.

Tiles are level-0 squares ``[x, x + extent) x [y, y + extent)``. A tile covers the output pixels
``[round((x - 1) / d), round((x + extent + 1) / d))`` (at least one). Tiling stores whole-pixel
origins of a fractional stride, so neighbours may miss each other by up to one level-0 pixel; the
one-pixel tolerance makes tiles that touch in level-0 touch on the grid too (no seams of background
between them; the at most one shared pixel is averaged like any overlap).

Overlapping tiles are averaged with a 2-D difference array (one scatter of four corners per tile
and two cumulative sums), which is O(tiles + pixels) instead of O(tiles x tile area).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class Grid:
    """A window of ``width`` x ``height`` output pixels starting at output pixel ``(x0, y0)``.

    Output pixel ``(i, j)`` of the whole grid covers level-0 ``[j*d, (j+1)*d) x [i*d, (i+1)*d)``
    with ``d = downsample``; the window holds rows ``y0 .. y0+height`` and columns ``x0 .. x0+width``.
    """

    downsample: float
    width: int
    height: int
    x0: int = 0
    y0: int = 0

    def __post_init__(self) -> None:
        if not self.downsample > 0:
            raise ValueError(f"downsample must be positive, got {self.downsample}")
        if self.width < 1 or self.height < 1:
            raise ValueError(f"grid must be at least 1 x 1 px, got {self.width} x {self.height}")

    @property
    def shape(self) -> tuple[int, int]:
        return self.height, self.width

    def expanded(self, margin: int) -> "Grid":
        """The same grid with ``margin`` extra pixels on every side (for filters that need a halo)."""
        return Grid(self.downsample, self.width + 2 * margin, self.height + 2 * margin, self.x0 - margin, self.y0 - margin)

    @classmethod
    def covering(cls, width0: int, height0: int, downsample: float) -> "Grid":
        """The whole slide of level-0 size ``width0`` x ``height0`` (partial last pixels included)."""
        return cls(downsample, max(1, int(np.ceil(width0 / downsample))), max(1, int(np.ceil(height0 / downsample))))


def tile_spans(coords: np.ndarray, extent: float, grid: Grid) -> np.ndarray:
    """Half-open pixel spans ``(x0, y0, x1, y1)`` (M, 4) of each tile in the window's coordinates.

    Not clipped: spans may lie partly or wholly outside the window.
    """
    c = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    d = grid.downsample
    start = np.rint((c - 1.0) / d).astype(np.int64)
    end = np.maximum(np.rint((c + extent + 1.0) / d).astype(np.int64), start + 1)
    origin = np.array([grid.x0, grid.y0], dtype=np.int64)
    return np.concatenate([start - origin, end - origin], axis=1)


def in_window(spans: np.ndarray, grid: Grid) -> np.ndarray:
    """Which spans overlap the window (bool, M)."""
    return (spans[:, 0] < grid.width) & (spans[:, 2] > 0) & (spans[:, 1] < grid.height) & (spans[:, 3] > 0)


def _paint(spans: np.ndarray, weights: np.ndarray, shape: tuple[int, int], dtype: type) -> np.ndarray:
    """Sum of ``weights`` over every span covering each pixel, via a difference array."""
    h, w = shape
    x0 = np.clip(spans[:, 0], 0, w)
    y0 = np.clip(spans[:, 1], 0, h)
    x1 = np.clip(spans[:, 2], 0, w)
    y1 = np.clip(spans[:, 3], 0, h)
    keep = (x1 > x0) & (y1 > y0)
    x0, y0, x1, y1, weights = x0[keep], y0[keep], x1[keep], y1[keep], weights[keep]
    stride = w + 1
    index = np.concatenate([y0 * stride + x0, y0 * stride + x1, y1 * stride + x0, y1 * stride + x1])
    signed = np.concatenate([weights, -weights, -weights, weights]).astype(np.float64)
    diff = np.bincount(index, weights=signed, minlength=(h + 1) * stride).reshape(h + 1, stride)
    if dtype is not np.float64:
        diff = np.rint(diff).astype(dtype)
    np.cumsum(diff, axis=0, out=diff)
    np.cumsum(diff, axis=1, out=diff)
    return diff[:h, :w]


def coverage_count(coords: np.ndarray, extent: float, grid: Grid, select: np.ndarray | None = None) -> np.ndarray:
    """How many (selected) tiles cover each pixel of the window (int32, height x width)."""
    spans = tile_spans(coords, extent, grid)
    if select is not None:
        spans = spans[np.asarray(select, dtype=bool)]
    return _paint(spans, np.ones(len(spans)), grid.shape, np.int32)


def mean_values(coords: np.ndarray, extent: float, values: np.ndarray, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel, the mean value of the tiles covering it (float32) and whether any does (bool).

    Overlapping tiles are averaged, so an overlap of 0.5 shows the same field as no overlap with
    finer detail, instead of a checkerboard of whichever tile was drawn last.
    """
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    spans = tile_spans(coords, extent, grid)
    if len(spans) != len(values):
        raise ValueError(f"{len(spans)} tiles but {len(values)} values")
    inside = in_window(spans, grid)
    spans, values = spans[inside], values[inside]
    count = _paint(spans, np.ones(len(spans)), grid.shape, np.int32)
    covered = count > 0
    total = _paint(spans, values, grid.shape, np.float64)
    mean = np.zeros(grid.shape, np.float32)
    mean[covered] = total[covered] / count[covered]
    return mean, covered


def smooth(values: np.ndarray, covered: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian blur of ``values`` using only covered pixels (normalised convolution).

    Uncovered background does not pull the edge of the tissue towards zero: each pixel's blurred
    value is a weighted mean of covered neighbours only.
    """
    if sigma_px <= 0:
        return values
    weight = covered.astype(np.float32)
    num = cv2.GaussianBlur(values.astype(np.float32) * weight, (0, 0), sigma_px, borderType=cv2.BORDER_CONSTANT)
    den = cv2.GaussianBlur(weight, (0, 0), sigma_px, borderType=cv2.BORDER_CONSTANT)
    out = np.zeros_like(num)
    np.divide(num, den, out=out, where=den > 1e-6)
    return np.where(covered, out, values).astype(np.float32)


def blur_halo(sigma_px: float) -> int:
    """Pixels a window needs on each side so that its blur equals the whole canvas's.

    OpenCV's Gaussian kernel for float images reaches ``4 sigma`` (rounded up to an odd size).
    """
    return math.ceil(4.0 * sigma_px) + 1 if sigma_px > 0 else 0


def heat_window(
    coords: np.ndarray, extent: float, values: np.ndarray, window: Grid, *, sigma_px: float = 0.0,
    tissue: np.ndarray | None = None, tissue_downsample: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The heat of one window of the canvas and where it shows: (values (float32), show (bool)).

    Overlapping tiles are averaged per pixel, blurred over covered pixels only (with a halo, so
    windows rendered one by one join without seams), and shown only on covered pixels, and with
    ``tissue`` only on tissue. Memory follows the window, so a canvas of any size can be painted
    band by band or tile by tile.
    """
    halo = blur_halo(sigma_px)
    heat, covered = mean_values(coords, extent, values, window.expanded(halo))
    heat = smooth(heat, covered, sigma_px)
    if halo:
        inner = (slice(halo, halo + window.height), slice(halo, halo + window.width))
        heat, covered = heat[inner], covered[inner]
    if tissue is not None:
        covered = covered & lookup_mask(tissue, float(tissue_downsample), window)
    return heat, covered


def lookup_mask(mask: np.ndarray, mask_downsample: float, grid: Grid) -> np.ndarray:
    """Resample a boolean level-0-aligned mask onto the window by pixel centres (nearest).

    ``mask`` pixel ``(i, j)`` covers level-0 ``[j*m, (j+1)*m) x [i*m, (i+1)*m)``; each window pixel
    takes the mask pixel under its centre (outside the mask: False). Works for any ratio of the two
    downsamples, so a tissue mask at 8 um/px clips an overlay at 1 or 32 um/px alike.
    """
    if mask_downsample <= 0:
        raise ValueError(f"mask downsample must be positive, got {mask_downsample}")
    d = grid.downsample
    cols = np.floor((np.arange(grid.x0, grid.x0 + grid.width) + 0.5) * d / mask_downsample).astype(np.int64)
    rows = np.floor((np.arange(grid.y0, grid.y0 + grid.height) + 0.5) * d / mask_downsample).astype(np.int64)
    col_ok = (cols >= 0) & (cols < mask.shape[1])
    row_ok = (rows >= 0) & (rows < mask.shape[0])
    out = np.zeros(grid.shape, dtype=bool)
    if col_ok.any() and row_ok.any():
        sub = np.asarray(mask)[np.ix_(rows[row_ok], cols[col_ok])]
        out[np.ix_(row_ok, col_ok)] = sub.astype(bool)
    return out


def colour_table(cmap: str) -> np.ndarray:
    """A 256-entry RGB uint8 lookup table of a matplotlib colour map (unknown names fail clearly)."""
    from matplotlib import colormaps  # imported here: the workflow imports this package at parse time

    try:
        cm = colormaps[cmap]
    except KeyError:
        raise ValueError(f"heatmap.cmap: unknown matplotlib colour map {cmap!r}") from None
    return (cm(np.linspace(0.0, 1.0, 256))[:, :3] * 255).round().astype(np.uint8)


def blend(base: np.ndarray, values: np.ndarray, show: np.ndarray, lut: np.ndarray, alpha: float) -> np.ndarray:
    """Colour ``values`` in [0, 1] through ``lut`` and mix them into ``base`` where ``show``.

    Works on the shown pixels only, in uint8 lookups and float32 mixing, so a large canvas needs a
    few bytes per pixel rather than matplotlib's float64 RGBA image.
    """
    out = np.array(base, dtype=np.uint8, copy=True)
    if not show.any():
        return out
    idx = np.clip(np.rint(values[show] * 255), 0, 255).astype(np.uint8)
    mixed = (1.0 - alpha) * out[show].astype(np.float32) + alpha * lut[idx].astype(np.float32)
    out[show] = np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
    return out
