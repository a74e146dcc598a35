"""Synthetic H&E-like whole-slide images with exact ground truth, for the demo and the tests.

Real cohorts cannot ship with the repository, yet every stage (tissue segmentation, tiling,
features, MIL training, heatmaps) needs slides whose answer is known. This module draws them:

* Each slide is an Aperio-style pyramidal tiled-JPEG TIFF (``.svs``) that OpenSlide reads
  natively (vendor ``aperio``, ``openslide.mpp-x``/``mpp-y``), so the pipeline exercises the
  same code path as for scanner output.
* Level 0 is rendered tile by tile and streamed to disk, so memory stays bounded for any size;
  the lower levels (downsamples 2, 8, 32, ...) are box means of the rendered level 0, built while
  it streams.
* Where things are is decided on a low-resolution *canvas* (``CANVAS_UM`` um per pixel, i.e. an
  integer level-0 downsample ``D``) of smooth scalar fields: tissue ``F``, tumour ``T``,
  lymphoid clusters ``L`` and stroma texture. A level-0 pixel is tissue when the bilinear
  interpolation of ``F`` at its centre is positive, and tumour when ``T`` and ``F`` both are.
  The truth masks are the very same rule evaluated at the centres of a coarser grid, so they
  are exact, not an approximation of the rendering.
* Cells (nuclei, fibres, dust) come from jittered lattices whose rows are seeded by
  ``(slide seed, population, row)``; a tile draws every item that overlaps it, so nuclei
  continue seamlessly across tile borders and the pixels do not depend on the tiling order.

Coordinates: truth-mask pixel ``(i, j)`` at downsample ``d`` covers level-0 pixels
``[j*d, (j+1)*d) x [i*d, (i+1)*d)`` and holds the rule's value at that block's centre.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from dataclasses import fields as dataclass_fields
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import tifffile
from tqdm import tqdm

from wsi_asmil.io import atomic_path

log = logging.getLogger("wsi_asmil.synthetic")

TILE = 256
CANVAS_UM = 8.0
JPEG_QUALITY = 80
MAX_LEVEL_SIDE = 1024
BIGTIFF_BYTES = 2**31
DEMO_WIDTH = 6144
DEMO_HEIGHT = 4608

_SHIFT = 4
_FIX = 1 << _SHIFT
_VERTICES = 16
_EDGE_RAMP_PX = 3.0
_TUMOUR_RAMP_UM = 12.0

_F, _T, _TEX_A, _TEX_B, _L, _COS2, _SIN2 = range(7)
_PIXEL_CHANNELS = 4

_BACKGROUND = np.array([243.0, 242.0, 246.0], np.float32)
_STROMA = np.array([236.0, 168.0, 204.0], np.float32)
_STROMA_TEX_A = np.array([-10.0, -7.5, -9.0], np.float32)
_STROMA_TEX_B = np.array([2.0, -7.0, -2.0], np.float32)
_TUMOUR_STROMA = np.array([224.0, 156.0, 207.0], np.float32)
_FIBRE_COLOURS = ((220, 136, 186), (246, 200, 225))
_INKS = {
    "blue": np.array([0.30, 0.42, 0.85], np.float32),
    "green": np.array([0.30, 0.68, 0.40], np.float32),
    "black": np.array([0.18, 0.18, 0.22], np.float32),
}


@dataclass(frozen=True)
class SlideSpec:
    """Everything that determines one synthetic slide; equal specs give identical pixels.

    Sizes are level-0 pixels at ``mpp`` um/px; cell sizes are fixed in microns, so a slide
    looks the same at the same physical resolution whatever its ``mpp``. Level downsamples are
    exact (2.0, 8.0, ...) when width and height are multiples of the largest one; multiples of
    ``TILE`` always are.
    """

    width: int
    height: int
    mpp: float = 0.25
    tumour: bool = False
    tumour_fraction: float = 0.05
    pen_marks: bool = False
    dust: bool = False
    seed: int = 0
    n_islands: int = 2
    tissue_coverage: float = 0.45

    def __post_init__(self) -> None:
        if self.width < TILE or self.height < TILE:
            raise ValueError(f"slide must be at least {TILE}x{TILE} px, got {self.width}x{self.height}")
        if not 0.05 <= self.mpp <= 4.0:
            raise ValueError(f"mpp must be within [0.05, 4], got {self.mpp}")
        if not 0.0 < self.tumour_fraction <= 0.5:
            raise ValueError(f"tumour_fraction must be within (0, 0.5], got {self.tumour_fraction}")
        if not 0.05 <= self.tissue_coverage <= 0.9:
            raise ValueError(f"tissue_coverage must be within [0.05, 0.9], got {self.tissue_coverage}")
        if not 1 <= self.n_islands <= 8:
            raise ValueError(f"n_islands must be within [1, 8], got {self.n_islands}")
        if self.seed < 0:
            raise ValueError(f"seed must be non-negative, got {self.seed}")

    @property
    def label(self) -> str:
        """The slide-level class the MIL models learn: ``tumour`` or ``normal``."""
        return "tumour" if self.tumour else "normal"


@dataclass(frozen=True)
class SlideTruth:
    """Tissue and tumour masks of a slide, exact for the rendering rule at their grid.

    ``tissue`` and ``tumour`` are boolean (rows, cols) arrays at ``downsample`` level-0 px per
    mask pixel; ``tumour`` is always inside ``tissue``.
    """

    tissue: np.ndarray
    tumour: np.ndarray
    downsample: float
    mpp: float
    width: int
    height: int

    @property
    def tissue_area_fraction(self) -> float:
        """Share of the slide covered by tissue, to sanity-check a segmenter's yield."""
        return float(self.tissue.mean())

    @property
    def tumour_fraction(self) -> float:
        """Tumour area as a fraction of tissue area: the quantity ``SlideSpec.tumour_fraction`` sets."""
        n_tissue = int(self.tissue.sum())
        return float(self.tumour.sum()) / n_tissue if n_tissue else 0.0

    def to_json(self) -> dict[str, Any]:
        """The sidecar that tells a consumer how to map mask pixels to level-0 coordinates."""
        return {
            "downsample": self.downsample,
            "mpp": self.mpp,
            "width": self.width,
            "height": self.height,
            "mask_shape": list(self.tissue.shape),
            "tissue_area_fraction": round(self.tissue_area_fraction, 6),
            "tumour_fraction": round(self.tumour_fraction, 6),
        }


@dataclass(frozen=True)
class _Kind:
    """A population of blobs (nuclei or dust) placed on a jittered lattice."""

    name: str
    stream: int
    spacing_um: float
    jitter: float
    semi_major_um: tuple[float, float]
    aspect: tuple[float, float]
    irregularity: float
    colour: tuple[float, float, float]
    colour_sd: float


_STROMA_NUCLEI = _Kind("stroma", 1, 15.0, 1.0, (2.5, 4.0), (0.35, 0.9), 0.06, (118, 68, 150), 12)
_LYMPHOCYTES = _Kind("lymph", 2, 5.8, 0.9, (2.3, 3.1), (0.8, 1.0), 0.05, (62, 36, 108), 8)
_TUMOUR_NUCLEI = _Kind("tumour", 3, 11.5, 0.7, (5.0, 8.0), (0.6, 0.95), 0.14, (84, 42, 124), 18)
_DUST = _Kind("dust", 4, 90.0, 1.0, (1.5, 7.0), (0.4, 1.0), 0.3, (92, 90, 96), 22)
_FIBRE_STREAM = 5
_FIBRE_SPACING_UM = 9.0
_LAYOUT_STREAM = 0
_NOISE_STREAM = 6
_NOWHERE = -1.0e4


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale_px: float) -> np.ndarray:
    """Unit-variance noise with structure at ~``scale_px`` (cubic upsampling: cheap on big canvases)."""
    h, w = shape
    step = max(float(scale_px), 1.0)
    gh, gw = int(math.ceil(h / step)) + 3, int(math.ceil(w / step)) + 3
    coarse = rng.standard_normal((gh, gw)).astype(np.float32)
    fine = cv2.resize(coarse, (int(round(gw * step)), int(round(gh * step))), interpolation=cv2.INTER_CUBIC)
    off = int(step)
    out = fine[off : off + h, off : off + w]
    return ((out - out.mean()) / max(float(out.std()), 1e-6)).astype(np.float32)


def _normalise_to_distance(raw: np.ndarray) -> np.ndarray:
    """Rescale a field so its slope at the zero crossing is ~1 per canvas pixel.

    Rendering then turns it into a soft edge of a known width in level-0 pixels.
    """
    gy, gx = np.gradient(raw)
    slope = np.hypot(gx, gy)
    near = np.abs(raw) <= np.quantile(np.abs(raw), 0.03)
    g = float(np.median(slope[near])) if near.any() else 1.0
    return (raw / max(g, 1e-6)).astype(np.float32)


def _canvas_grid(shape: tuple[int, int], cs: float) -> tuple[np.ndarray, np.ndarray]:
    """Micron coordinates of canvas pixel centres, as broadcastable column and row vectors."""
    h, w = shape
    ys = ((np.arange(h, dtype=np.float32) + 0.5) * cs)[:, None]
    xs = ((np.arange(w, dtype=np.float32) + 0.5) * cs)[None, :]
    return ys, xs


def _tissue_field(spec: SlideSpec, rng: np.random.Generator, shape: tuple[int, int], cs: float) -> np.ndarray:
    """Islands as unions of random ellipses roughened by smooth noise; zero level set = tissue edge.

    The threshold is a quantile, so the covered area equals ``tissue_coverage`` whatever
    the random overlap of ellipses.
    """
    ys, xs = _canvas_grid(shape, cs)
    w_um, h_um = spec.width * spec.mpp, spec.height * spec.mpp
    along_x = w_um >= h_um
    slot_um, cross_um = (w_um, h_um) if along_x else (h_um, w_um)
    radius = min(
        math.sqrt(spec.tissue_coverage * w_um * h_um / (spec.n_islands * math.pi)),
        0.4 * slot_um / spec.n_islands,
        0.4 * cross_um,
    )
    raw = np.full(shape, -np.inf, np.float32)
    for k in range(spec.n_islands):
        slot = (k + rng.uniform(0.3, 0.7)) / spec.n_islands
        cross = rng.uniform(0.4, 0.6)
        cx, cy = (slot * w_um, cross * h_um) if along_x else (cross * w_um, slot * h_um)
        for _ in range(int(rng.integers(3, 7))):
            ex, ey = cx + rng.normal(0, 0.35 * radius), cy + rng.normal(0, 0.35 * radius)
            a = radius * rng.uniform(0.5, 0.9)
            b = a * rng.uniform(0.45, 0.9)
            th = rng.uniform(0, math.pi)
            c, s = math.cos(th), math.sin(th)
            u = ((xs - ex) * c + (ys - ey) * s) / a
            v = (-(xs - ex) * s + (ys - ey) * c) / b
            np.maximum(raw, 1.0 - (u * u + v * v), out=raw)
    raw += 0.35 * _smooth_noise(rng, shape, 0.25 * radius / cs)
    raw += 0.12 * _smooth_noise(rng, shape, 0.06 * radius / cs)
    margin = 0.06 * min(w_um, h_um)
    edge = np.minimum(np.minimum(xs, w_um - xs), np.minimum(ys, h_um - ys))
    raw -= 10.0 * np.clip(1.0 - edge / margin, 0.0, None) ** 2
    raw -= np.quantile(raw, 1.0 - spec.tissue_coverage)
    return _normalise_to_distance(raw)


def _pick_points(rng: np.random.Generator, allowed: np.ndarray, n: int, cs: float) -> np.ndarray:
    """``n`` random micron positions at canvas pixels where ``allowed`` holds (none if it never does)."""
    idx = np.flatnonzero(allowed)
    if idx.size == 0:
        return np.empty((0, 2))
    chosen = rng.choice(idx, size=n, replace=True)
    rows, cols = np.divmod(chosen, allowed.shape[1])
    jitter = rng.uniform(-0.5, 0.5, (n, 2))
    return np.stack([cols + 0.5 + jitter[:, 0], rows + 0.5 + jitter[:, 1]], axis=1) * cs


def _tumour_field(
    spec: SlideSpec, rng: np.random.Generator, tissue: np.ndarray, cs: float
) -> np.ndarray:
    """Irregular tumour blobs deep inside tissue, thresholded to cover ``tumour_fraction`` of it.

    Normal slides get a constant, far-negative field: no tumour anywhere, and every tissue
    pixel counts as far from tumour (where lymphoid clusters may go).
    """
    shape = tissue.shape
    inside = tissue > 0
    if not spec.tumour or not inside.any():
        return np.full(shape, _NOWHERE, np.float32)
    ys, xs = _canvas_grid(shape, cs)
    n_blobs = 1 + int(rng.random() < 0.5)
    area = spec.tumour_fraction * inside.sum() * cs * cs
    sigma = math.sqrt(area / (n_blobs * math.pi))
    warp_x = 0.3 * sigma * _smooth_noise(rng, shape, sigma / cs)
    warp_y = 0.3 * sigma * _smooth_noise(rng, shape, sigma / cs)
    deep = inside & (tissue >= np.quantile(tissue[inside], 0.5))
    raw = np.zeros(shape, np.float32)
    for cx, cy in _pick_points(rng, deep, n_blobs, cs):
        d2 = (xs + warp_x - cx) ** 2 + (ys + warp_y - cy) ** 2
        raw += rng.uniform(0.75, 1.0) * np.exp(-d2 / (2 * sigma * sigma))
    raw *= 1.0 + 0.12 * _smooth_noise(rng, shape, 0.5 * sigma / cs)
    raw -= np.quantile(raw[inside], 1.0 - spec.tumour_fraction)
    return _normalise_to_distance(raw)


def _lymphoid_field(
    rng: np.random.Generator, tissue: np.ndarray, tumour: np.ndarray, cs: float
) -> np.ndarray:
    """Dense lymphocyte aggregates in normal tissue, so 'crowded dark nuclei' alone is not tumour."""
    shape = tissue.shape
    allowed = (tissue > 2) & (tumour < -4)
    tissue_mm2 = float((tissue > 0).sum()) * cs * cs / 1e6
    n_clusters = int(np.clip(round(3 * tissue_mm2), 2, 400))
    out = np.full(shape, -1.0, np.float32)
    for cx, cy in _pick_points(rng, allowed, n_clusters, cs):
        r = rng.uniform(30.0, 75.0)
        stretch = rng.uniform(0.6, 1.0)
        win = 1.6 * r / cs
        r0, r1 = int(max(cy / cs - win, 0)), int(min(cy / cs + win + 1, shape[0]))
        c0, c1 = int(max(cx / cs - win, 0)), int(min(cx / cs + win + 1, shape[1]))
        yy = (np.arange(r0, r1, dtype=np.float32)[:, None] + 0.5) * cs - cy
        xx = (np.arange(c0, c1, dtype=np.float32)[None, :] + 0.5) * cs - cx
        bumpy = 1.0 + 0.15 * rng.standard_normal((r1 - r0, c1 - c0)).astype(np.float32)
        val = bumpy - (xx * xx + (yy / stretch) ** 2) / (r * r)
        np.maximum(out[r0:r1, c0:c1], val, out=out[r0:r1, c0:c1])
    return out


@dataclass(frozen=True)
class _Stroke:
    """A pen-mark polyline in level-0 fixed-point coordinates with its ink transmission."""

    points: np.ndarray
    thickness: int
    ink: np.ndarray
    bbox: tuple[int, int, int, int]


def _pen_strokes(spec: SlideSpec, rng: np.random.Generator) -> list[_Stroke]:
    """One or two thick curved marker lines, like annotations drawn on the coverslip."""
    if not spec.pen_marks:
        return []
    strokes = []
    min_um = min(spec.width, spec.height) * spec.mpp
    for _ in range(int(rng.integers(1, 3))):
        ctrl = rng.uniform(0.1, 0.9, (3, 2)) * (spec.width, spec.height)
        t = np.linspace(0.0, 1.0, 64)[:, None]
        curve = (1 - t) ** 2 * ctrl[0] + 2 * (1 - t) * t * ctrl[1] + t * t * ctrl[2]
        thickness = int(round(float(np.clip(0.03 * min_um, 25.0, 400.0)) / spec.mpp))
        ink = _INKS[str(rng.choice(sorted(_INKS)))]
        half = thickness // 2 + 2
        lo, hi = curve.min(axis=0) - half, curve.max(axis=0) + half
        bbox = (int(lo[0]), int(lo[1]), int(math.ceil(hi[0])), int(math.ceil(hi[1])))
        strokes.append(_Stroke(np.round(curve * _FIX).astype(np.int64), thickness, ink, bbox))
    return strokes


def _mask_downsample(mpp: float) -> int:
    """Level-0 pixels per canvas pixel: an integer, so masks tile level 0 exactly."""
    return max(1, int(round(CANVAS_UM / mpp)))


class _Layout:
    """The canvas fields and pen strokes of one slide: where everything is, at low resolution."""

    def __init__(self, spec: SlideSpec) -> None:
        self.spec = spec
        self.downsample = _mask_downsample(spec.mpp)
        cs = self.downsample * spec.mpp
        shape = (math.ceil(spec.height / self.downsample), math.ceil(spec.width / self.downsample))
        rng = np.random.default_rng([spec.seed, _LAYOUT_STREAM])
        tissue = _tissue_field(spec, rng, shape, cs)
        tumour = _tumour_field(spec, rng, tissue, cs)
        lymph = _lymphoid_field(rng, tissue, tumour, cs)
        angle = math.pi * _smooth_noise(rng, shape, 150.0 / cs)
        self.fields = np.stack(
            [
                tissue,
                tumour,
                np.clip(_smooth_noise(rng, shape, 60.0 / cs), -2.5, 2.5),
                np.clip(_smooth_noise(rng, shape, 20.0 / cs), -2.5, 2.5),
                lymph,
                np.cos(2 * angle),
                np.sin(2 * angle),
            ]
        ).astype(np.float32)
        self.strokes = _pen_strokes(spec, rng)

    def truth(self, downsample: int | None = None) -> SlideTruth:
        """Masks at ``downsample`` (default: the canvas itself, where the fields are exact)."""
        d = downsample or self.downsample
        if d == self.downsample:
            f, t = self.fields[_F], self.fields[_T]
        else:
            rows = math.ceil(self.spec.height / d)
            cols = math.ceil(self.spec.width / d)
            v = (np.arange(rows) + 0.5) * d / self.downsample - 0.5
            u = (np.arange(cols) + 0.5) * d / self.downsample - 0.5
            f, t = _bilinear(self.fields[[_F, _T]], u, v)
        tissue = f > 0
        return SlideTruth(
            tissue=tissue,
            tumour=(t > 0) & tissue,
            downsample=float(d),
            mpp=self.spec.mpp,
            width=self.spec.width,
            height=self.spec.height,
        )


def _lerp_index(coords: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Neighbour indices (edge-clamped) and weight of the upper one for linear interpolation."""
    i0 = np.floor(coords).astype(np.int64)
    frac = (coords - i0).astype(np.float32)
    return np.clip(i0, 0, n - 1), np.clip(i0 + 1, 0, n - 1), frac


def _bilinear(fields: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Fields (C, h, w) sampled on the grid ``v x u`` of canvas coordinates: (C, len(v), len(u)).

    Columns first on the few canvas rows involved, then whole-row gathers: plain numpy, no
    BLAS, whose threads can stall for milliseconds per tile on a busy 2-core machine.
    """
    ua, ub, fu = _lerp_index(u, fields.shape[2])
    va, vb, fv = _lerp_index(v, fields.shape[1])
    lo, hi = int(va.min()), int(vb.max())
    crop = fields[:, lo : hi + 1]
    left = crop[:, :, ua]
    cols = left + (crop[:, :, ub] - left) * fu
    top, out = cols[:, va - lo], cols[:, vb - lo]
    out -= top
    out *= fv[:, None]
    out += top
    return out


def _sample(fields: np.ndarray, downsample: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Fields (C, h, w) at level-0 positions ``x, y`` (px) under the same bilinear rule: (C, N)."""
    ua, ub, fu = _lerp_index(x / downsample - 0.5, fields.shape[2])
    va, vb, fv = _lerp_index(y / downsample - 0.5, fields.shape[1])
    top = fields[:, va, ua] * (1 - fu) + fields[:, va, ub] * fu
    bottom = fields[:, vb, ua] * (1 - fu) + fields[:, vb, ub] * fu
    return top * (1 - fv) + bottom * fv


@dataclass(frozen=True)
class _Items:
    """Everything one tile row may draw, in a drawing order that does not depend on the tile.

    Polygons and polylines are absolute level-0 coordinates in ``_SHIFT``-bit fixed point, so
    a tile only subtracts its origin and an item straddling a border is drawn identically on
    both sides. ``*_bbox`` rows are level-0 ``x0, y0, x1, y1`` (inclusive, AA margin included).
    """

    polys: np.ndarray
    colours: list[tuple[int, int, int]]
    poly_bbox: np.ndarray
    fibres: np.ndarray
    fibre_group: np.ndarray
    fibre_bbox: np.ndarray


@dataclass(frozen=True)
class _Blobs:
    """Candidate blobs of some lattice rows, before thinning by region."""

    x: np.ndarray
    y: np.ndarray
    a: np.ndarray
    b: np.ndarray
    theta: np.ndarray
    harmonics: np.ndarray
    colour: np.ndarray
    u: np.ndarray
    extra: np.ndarray

    def subset(self, keep: np.ndarray) -> _Blobs:
        return _Blobs(*(getattr(self, f.name)[keep] for f in dataclass_fields(self)))


def _lattice_rows(spacing_px: float, extent_px: float, y0: int, y1: int, height: int) -> range:
    """Lattice rows whose (jittered) points can reach the level-0 band ``[y0, y1)``."""
    n_rows = int(math.ceil(height / spacing_px))
    lo = max(0, int(math.floor((y0 - extent_px) / spacing_px)) - 1)
    hi = min(n_rows, int(math.ceil((y1 + extent_px) / spacing_px)) + 1)
    return range(lo, hi)


def _jittered_row(
    rng: np.random.Generator, row: int, spacing_px: float, jitter: float, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """One lattice row: one candidate per cell, displaced within ``jitter`` of a cell."""
    n = int(math.ceil(width / spacing_px))
    x = (np.arange(n) + 0.5 + rng.uniform(-jitter / 2, jitter / 2, n)) * spacing_px
    y = (row + 0.5 + rng.uniform(-jitter / 2, jitter / 2, n)) * spacing_px
    return x, y


def _blob_rows(kind: _Kind, spec: SlideSpec, rows: range) -> _Blobs:
    """Candidates of ``rows``; each row's RNG is seeded by (slide seed, population, row)."""
    spacing = kind.spacing_um / spec.mpp
    parts = []
    for row in rows:
        rng = np.random.default_rng([spec.seed, kind.stream, row])
        x, y = _jittered_row(rng, row, spacing, kind.jitter, spec.width)
        n = x.size
        a = rng.uniform(*kind.semi_major_um, n) / spec.mpp
        tone = rng.standard_normal((n, 1)) * 0.8 + rng.standard_normal((n, 3)) * 0.35
        amplitudes = rng.uniform(-1, 1, (n, 2)) * kind.irregularity
        parts.append(
            (
                x,
                y,
                a,
                a * rng.uniform(*kind.aspect, n),
                rng.uniform(0.0, math.pi, n),
                np.concatenate([amplitudes, rng.uniform(0, 2 * math.pi, (n, 2))], axis=1),
                np.clip(np.asarray(kind.colour) + kind.colour_sd * tone, 0, 255),
                rng.random(n),
                rng.random((n, 3)),
            )
        )
    if not parts:
        return _Blobs(*(np.empty((0,) + shape) for shape in ((), (), (), (), (), (4,), (3,), (), (3,))))
    return _Blobs(*(np.concatenate(col) for col in zip(*parts)))


def _fibre_rows(spec: SlideSpec, rows: range) -> tuple[np.ndarray, ...]:
    """Fibre candidates of ``rows``: x, y, u, length (px), angle jitter, bend, colour group."""
    spacing = _FIBRE_SPACING_UM / spec.mpp
    parts = []
    for row in rows:
        rng = np.random.default_rng([spec.seed, _FIBRE_STREAM, row])
        x, y = _jittered_row(rng, row, spacing, 1.0, spec.width)
        n = x.size
        parts.append(
            (
                x,
                y,
                rng.random(n),
                rng.uniform(12.0, 35.0, n) / spec.mpp,
                rng.normal(0.0, 0.3, n),
                rng.uniform(-0.25, 0.25, n),
                (rng.random(n) > 0.6).astype(np.int64),
            )
        )
    if not parts:
        return tuple(np.empty(0, np.int64 if k == 6 else np.float64) for k in range(7))
    return tuple(np.concatenate(col) for col in zip(*parts))


def _accept(kind: _Kind, at: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Thin candidates by the region at their centre: this is what makes regions look different.

    Lymphocytes also scatter sparsely through all tissue, tumour included, as in real sections.
    """
    tissue, tumour, lymph = at[_F] > 0, at[_T] > 0, at[_L] > 0
    if kind.name == "stroma":
        return tissue & ~tumour & ~lymph & (u < 0.55)
    if kind.name == "lymph":
        return tissue & ((lymph & ~tumour & (u < 0.85)) | (u < 0.03))
    if kind.name == "tumour":
        return tissue & tumour & (u < 0.92)
    return u < 0.3


def _nucleoli(tumour: _Blobs, spec: SlideSpec) -> _Blobs:
    """Prominent dark nucleoli in about half of the tumour nuclei, off-centre like real ones."""
    keep = tumour.extra[:, 0] < 0.5
    t = tumour.subset(keep)
    ang = t.extra[:, 1] * 2 * math.pi
    off = t.extra[:, 2] * 0.4 * t.b
    radius = (0.7 + 0.4 * t.extra[:, 2]) / spec.mpp
    return _Blobs(
        x=t.x + off * np.cos(ang),
        y=t.y + off * np.sin(ang),
        a=radius,
        b=radius,
        theta=t.theta,
        harmonics=np.zeros_like(t.harmonics),
        colour=np.clip(t.colour * 0.55, 0, 255),
        u=t.u,
        extra=t.extra,
    )


def _polygons(blobs: _Blobs) -> np.ndarray:
    """Irregular ellipses as (N, V, 2) fixed-point vertices; two harmonics give lobulated outlines."""
    t = np.linspace(0.0, 2 * math.pi, _VERTICES, endpoint=False)[None, :]
    h = blobs.harmonics
    r = 1.0 + h[:, :1] * np.cos(2 * t + h[:, 2:3]) + h[:, 1:2] * np.cos(3 * t + h[:, 3:4])
    lx, ly = blobs.a[:, None] * r * np.cos(t), blobs.b[:, None] * r * np.sin(t)
    c, s = np.cos(blobs.theta)[:, None], np.sin(blobs.theta)[:, None]
    px = blobs.x[:, None] + lx * c - ly * s
    py = blobs.y[:, None] + lx * s + ly * c
    return np.round(np.stack([px, py], axis=2) * _FIX).astype(np.int64)


def _bbox(points: np.ndarray, margin: int) -> np.ndarray:
    """Inclusive level-0 bounding boxes of fixed-point point sets (N, V, 2), padded by ``margin``."""
    if points.shape[0] == 0:
        return np.empty((0, 4), np.int64)
    lo = points.min(axis=1) // _FIX - margin
    hi = points.max(axis=1) // _FIX + 1 + margin
    return np.concatenate([lo, hi], axis=1)


class _Renderer:
    """Draws level-0 tiles of one slide from its layout."""

    def __init__(self, spec: SlideSpec, layout: _Layout) -> None:
        self.spec = spec
        self.layout = layout
        rng = np.random.default_rng([spec.seed, _NOISE_STREAM])
        lum = rng.standard_normal((2 * TILE, 2 * TILE, 1))
        noise = (lum + 0.35 * rng.standard_normal((2 * TILE, 2 * TILE, 3))).astype(np.float32)
        self.noise_tissue, self.noise_background = 5.5 * noise, 2.0 * noise
        self.background = np.empty((TILE, TILE, 3), np.uint8)
        self.background[:] = _BACKGROUND.astype(np.uint8)
        self.fibre_px = max(1, int(round(0.5 / spec.mpp)))
        self.kinds = (_STROMA_NUCLEI, _LYMPHOCYTES, _TUMOUR_NUCLEI) + ((_DUST,) if spec.dust else ())

    def _blobs(self, kind: _Kind, y0: int, y1: int) -> _Blobs:
        extent = kind.semi_major_um[1] * (1 + 2 * kind.irregularity) / self.spec.mpp + 2
        rows = _lattice_rows(kind.spacing_um / self.spec.mpp, extent, y0, y1, self.spec.height)
        blobs = _blob_rows(kind, self.spec, rows)
        at = _sample(self.layout.fields, self.layout.downsample, blobs.x, blobs.y)
        return blobs.subset(_accept(kind, at, blobs.u))

    def _fibres(self, y0: int, y1: int) -> tuple[np.ndarray, np.ndarray]:
        """Short wavy collagen streaks following a smooth orientation field, sparse in tumour.

        Returns (N, 4, 2) fixed-point polylines and each one's colour group.
        """
        mpp = self.spec.mpp
        rows = _lattice_rows(_FIBRE_SPACING_UM / mpp, 20.0 / mpp, y0, y1, self.spec.height)
        x, y, u, length, dtheta, bend, group = _fibre_rows(self.spec, rows)
        at = _sample(self.layout.fields, self.layout.downsample, x, y)
        keep = (at[_F] > 0) & np.where(at[_T] > 0, u < 0.25, u < 0.8)
        theta = 0.5 * np.arctan2(at[_SIN2], at[_COS2])[keep] + dtheta[keep]
        x, y, length, bend = x[keep], y[keep], length[keep], bend[keep]
        s = np.array([-0.5, -1 / 6, 1 / 6, 0.5])[None, :] * length[:, None]
        perp = bend[:, None] * length[:, None] * (1 - (2 * s / length[:, None]) ** 2)
        c, sn = np.cos(theta)[:, None], np.sin(theta)[:, None]
        px = x[:, None] + s * c - perp * sn
        py = y[:, None] + s * sn + perp * c
        return np.round(np.stack([px, py], axis=2) * _FIX).astype(np.int64), group[keep]

    def row_items(self, ty: int) -> _Items:
        """All items of tile row ``ty``, generated once and shared by the row's tiles."""
        y0, y1 = ty * TILE, (ty + 1) * TILE
        stroma, lymph, tumour, *dust = (self._blobs(k, y0, y1) for k in self.kinds)
        blobs = [stroma, lymph, tumour, _nucleoli(tumour, self.spec), *dust]
        polys = np.concatenate([_polygons(b) for b in blobs])
        colours = np.concatenate([b.colour for b in blobs])
        fibres, group = self._fibres(y0, y1)
        return _Items(
            polys=polys,
            colours=[tuple(c) for c in np.round(colours).astype(int).tolist()],
            poly_bbox=_bbox(polys, 2),
            fibres=fibres,
            fibre_group=group,
            fibre_bbox=_bbox(fibres, self.fibre_px + 2),
        )

    def _fields(self, x0: int, y0: int) -> np.ndarray:
        d = self.layout.downsample
        u = (x0 + np.arange(TILE) + 0.5) / d - 0.5
        v = (y0 + np.arange(TILE) + 0.5) / d - 0.5
        return _bilinear(self.layout.fields[:_PIXEL_CHANNELS], u, v)

    def _stroma(self, f: np.ndarray, items: _Items, origin: np.ndarray, x0: int, y0: int) -> np.ndarray:
        """Pink stroma with low-frequency tone variation, a purpler tint in tumour, and fibres.

        Per-channel OpenCV arithmetic: an order of magnitude faster than numpy broadcasting here.
        """
        tumour = None
        if self.spec.tumour:
            ramp = self.layout.downsample * self.spec.mpp / _TUMOUR_RAMP_UM
            tumour = np.clip(0.5 + f[_T] * ramp, 0.0, 1.0)
        chans = []
        for c in range(3):
            chan = cv2.addWeighted(
                f[_TEX_A], float(_STROMA_TEX_A[c]), f[_TEX_B], float(_STROMA_TEX_B[c]), float(_STROMA[c])
            )
            if tumour is not None:
                chan = cv2.scaleAdd(tumour, float(_TUMOUR_STROMA[c] - _STROMA[c]), chan)
            chans.append(chan)
        out = cv2.convertScaleAbs(cv2.merge(chans))
        fibres = _overlapping(items.fibre_bbox, x0, y0)
        for g, colour in enumerate(_FIBRE_COLOURS):
            group = fibres[items.fibre_group[fibres] == g]
            lines = [(p - origin).astype(np.int32) for p in items.fibres[group]]
            if lines:
                cv2.polylines(out, lines, False, colour, self.fibre_px, cv2.LINE_AA, _SHIFT)
        return out

    def tile(self, items: _Items, tx: int, ty: int) -> np.ndarray:
        """The (TILE, TILE, 3) uint8 level-0 tile at column ``tx``, row ``ty``."""
        x0, y0 = tx * TILE, ty * TILE
        origin = np.array([x0 * _FIX, y0 * _FIX], np.int64)
        f = self._fields(x0, y0)
        alpha = np.clip(0.5 + f[_F] * (self.layout.downsample / _EDGE_RAMP_PX), 0.0, 1.0)
        if alpha.max() > 0:
            out = cv2.blendLinear(self._stroma(f, items, origin, x0, y0), self.background, alpha, 1.0 - alpha)
        else:
            out = self.background.copy()
        for i in _overlapping(items.poly_bbox, x0, y0):
            poly = (items.polys[i] - origin).astype(np.int32)
            cv2.fillPoly(out, [poly], items.colours[i], cv2.LINE_AA, _SHIFT)
        self._pen(out, x0, y0, origin)
        # A different window of one noise texture per tile: cheap, and no visible repetition.
        oy, ox = (ty * 151 + tx * 37 + self.spec.seed) % TILE, (tx * 97 + ty * 61) % TILE
        window = (slice(oy, oy + TILE), slice(ox, ox + TILE))
        noise = cv2.blendLinear(self.noise_tissue[window], self.noise_background[window], alpha, 1.0 - alpha)
        return cv2.add(out, noise, dtype=cv2.CV_8U)

    def _pen(self, img: np.ndarray, x0: int, y0: int, origin: np.ndarray) -> None:
        """Translucent ink: multiplies what is underneath, as marker on a coverslip does."""
        for stroke in self.layout.strokes:
            bx0, by0, bx1, by1 = stroke.bbox
            if bx1 < x0 or by1 < y0 or bx0 >= x0 + TILE or by0 >= y0 + TILE:
                continue
            mask = np.zeros((TILE, TILE), np.uint8)
            pts = (stroke.points - origin).astype(np.int32)
            cv2.polylines(mask, [pts], False, 255, stroke.thickness, cv2.LINE_AA, _SHIFT)
            cover = mask.astype(np.float32)[..., None] * (0.85 / 255.0)
            img[:] = np.clip(img * (1.0 - cover * (1.0 - stroke.ink)) + 0.5, 0, 255).astype(np.uint8)


def _overlapping(bbox: np.ndarray, x0: int, y0: int) -> np.ndarray:
    """Indices (in drawing order) of boxes that touch the tile at ``x0, y0``."""
    hit = (bbox[:, 2] >= x0) & (bbox[:, 0] < x0 + TILE) & (bbox[:, 3] >= y0) & (bbox[:, 1] < y0 + TILE)
    return np.flatnonzero(hit)


def pyramid_downsamples(width: int, height: int) -> list[int]:
    """Level downsamples: 1, 2, 8, then x4 while the smallest level is still over ``MAX_LEVEL_SIDE``.

    Capped at ``TILE`` so every lower level is built from whole level-0 tiles as they stream.
    """
    ds = [1, 2, 8]
    while max(width, height) / ds[-1] > MAX_LEVEL_SIDE and ds[-1] * 4 <= TILE:
        ds.append(ds[-1] * 4)
    return ds


class _LevelFile:
    """A lower pyramid level, assembled strip by strip in a scratch file and re-read as tiles.

    Plain file I/O instead of an in-RAM array or a memmap keeps resident memory at one strip
    even for a 100,000-px slide (dirty memmap pages would count as the process's memory).
    """

    def __init__(self, downsample: int, width: int, height: int, scratch: Path) -> None:
        self.step = TILE // downsample
        self.width, self.height = width // downsample, height // downsample
        self.strip = np.zeros((self.step, math.ceil(width / TILE) * self.step, 3), np.uint8)
        self.file = open(scratch / f"level_{downsample}.rgb", "w+b")

    def put(self, tx: int, tile: np.ndarray) -> None:
        """Box-average a level-0 tile (INTER_AREA at an integer factor) into the current strip."""
        small = cv2.resize(tile, (self.step, self.step), interpolation=cv2.INTER_AREA)
        self.strip[:, tx * self.step : (tx + 1) * self.step] = small

    def end_row(self, ty: int) -> None:
        """Append the finished strip; rows past the level's (floored) height are dropped."""
        rows = min(self.step, self.height - ty * self.step)
        if rows > 0:
            self.file.write(self.strip[:rows, : self.width].tobytes())

    def tiles(self) -> Iterator[np.ndarray]:
        """The level's tiles in tifffile's order, zero-padded at the right and bottom edges."""
        self.file.flush()
        row_bytes = self.width * 3
        for y0 in range(0, self.height, TILE):
            rows = min(TILE, self.height - y0)
            self.file.seek(y0 * row_bytes)
            strip = np.frombuffer(self.file.read(rows * row_bytes), np.uint8).reshape(rows, self.width, 3)
            for x0 in range(0, self.width, TILE):
                tile = np.zeros((TILE, TILE, 3), np.uint8)
                part = strip[:, x0 : x0 + TILE]
                tile[:rows, : part.shape[1]] = part
                yield tile

    def close(self) -> None:
        self.file.close()


def _stream_level0(renderer: _Renderer, levels: Sequence[_LevelFile]) -> Iterator[np.ndarray]:
    """Yield level-0 tiles row by row (tifffile's order) while feeding the lower ``levels``.

    A row is closed before its last tile is yielded: tifffile stops pulling after the final
    tile, so nothing after the last ``yield`` would ever run.
    """
    spec = renderer.spec
    n_tx, n_ty = math.ceil(spec.width / TILE), math.ceil(spec.height / TILE)
    for ty in range(n_ty):
        items = renderer.row_items(ty)
        for tx in range(n_tx):
            tile = renderer.tile(items, tx, ty)
            for level in levels:
                level.put(tx, tile)
                if tx == n_tx - 1:
                    level.end_row(ty)
            yield tile
        log.debug("rendered tile row %d/%d", ty + 1, n_ty)


def _aperio_description(spec: SlideSpec, level_width: int, level_height: int) -> str:
    """The ImageDescription OpenSlide's Aperio driver recognises ('Aperio' prefix, ``|key = value``)."""
    w, h = spec.width, spec.height
    head = f"Aperio Image Library v12.0.15\r\n{w}x{h} [0,0 {w}x{h}] ({TILE}x{TILE})"
    if (level_width, level_height) != (w, h):
        head += f" -> {level_width}x{level_height}"
    mag = max(1, int(round(10.0 / spec.mpp)))
    return f"{head} JPEG/RGB Q={JPEG_QUALITY}|AppMag = {mag}|MPP = {spec.mpp:.4f}|ScanScope ID = SYNTHETIC"


_TIFF_OPTIONS: dict[str, Any] = {
    "tile": (TILE, TILE),
    "photometric": "rgb",
    "compression": "jpeg",
    "compressionargs": {"level": JPEG_QUALITY},
    "metadata": None,
    "subfiletype": 0,
}


def slide_truth(spec: SlideSpec, downsample: int | None = None) -> SlideTruth:
    """Ground-truth masks without rendering: cheap, and identical to what ``write_slide`` returns.

    ``downsample`` evaluates the rendering rule on another grid (e.g. a pyramid level) so a
    segmentation can be scored at its own resolution.
    """
    return _Layout(spec).truth(downsample)


def write_slide(path: str | os.PathLike[str], spec: SlideSpec) -> SlideTruth:
    """Render ``spec`` to an Aperio-style pyramidal ``.svs`` at ``path`` (atomically) and return its truth.

    Level 0 streams tile by tile; lower levels go through scratch files next to the output,
    so memory stays bounded (a few hundred MB) for slides of any size.
    """
    final = Path(path)
    layout = _Layout(spec)
    renderer = _Renderer(spec, layout)
    bigtiff = spec.width * spec.height * 3 >= BIGTIFF_BYTES
    with ExitStack() as stack:
        tmp = stack.enter_context(atomic_path(final))
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=final.parent, prefix=".scratch-")))
        levels = []
        for d in pyramid_downsamples(spec.width, spec.height)[1:]:
            levels.append(_LevelFile(d, spec.width, spec.height, scratch))
            stack.callback(levels[-1].close)
        with tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tw:
            tw.write(
                _stream_level0(renderer, levels),
                shape=(spec.height, spec.width, 3),
                dtype=np.uint8,
                description=_aperio_description(spec, spec.width, spec.height),
                **_TIFF_OPTIONS,
            )
            for level in levels:
                tw.write(
                    level.tiles(),
                    shape=(level.height, level.width, 3),
                    dtype=np.uint8,
                    description=_aperio_description(spec, level.width, level.height),
                    **_TIFF_OPTIONS,
                )
    return layout.truth()


def _write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _png(mask: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", mask.astype(np.uint8) * 255)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def write_truth(
    truth_dir: str | os.PathLike[str], slide_id: str, truth: SlideTruth, spec: SlideSpec
) -> dict[str, Path]:
    """Write ``<id>_tissue.png``, ``<id>_tumour.png`` (uint8 0/255) and ``<id>.json``, each atomically."""
    out = Path(truth_dir)
    paths = {
        "tissue": out / f"{slide_id}_tissue.png",
        "tumour": out / f"{slide_id}_tumour.png",
        "json": out / f"{slide_id}.json",
    }
    _write_bytes(paths["tissue"], _png(truth.tissue))
    _write_bytes(paths["tumour"], _png(truth.tumour))
    meta = {"slide_id": slide_id, "label": spec.label, **truth.to_json(), "spec": asdict(spec)}
    _write_bytes(paths["json"], (json.dumps(meta, indent=2) + "\n").encode())
    return paths


def read_truth(truth_dir: str | os.PathLike[str], slide_id: str) -> SlideTruth:
    """The ground truth written by :func:`write_truth`, for scoring segmentation and heatmaps."""
    out = Path(truth_dir)
    meta = json.loads((out / f"{slide_id}.json").read_text())
    masks = {}
    for name in ("tissue", "tumour"):
        mask = cv2.imread(str(out / f"{slide_id}_{name}.png"), cv2.IMREAD_GRAYSCALE)
        if mask is None:
            raise FileNotFoundError(f"no {name} truth mask for slide '{slide_id}' in {out}")
        masks[name] = mask > 0
    return SlideTruth(
        masks["tissue"], masks["tumour"], meta["downsample"], meta["mpp"], meta["width"], meta["height"]
    )


def demo_slide_ids(n_slides: int) -> list[str]:
    """Deterministic slide names, known before any file exists (the Snakefile needs them at parse time)."""
    return [f"demo_{i:03d}" for i in range(n_slides)]


def _round_to_tile(x: float) -> int:
    return max(TILE, int(round(x / TILE)) * TILE)


def demo_specs(
    n_slides: int,
    seed: int = 0,
    width: int = DEMO_WIDTH,
    height: int = DEMO_HEIGHT,
    mpp: float = 0.25,
) -> list[SlideSpec]:
    """The demo cohort: alternating tumour/normal, sizes within ~8% rounded to whole tiles.

    Pen marks (every third slide) and dust (two in four) fall on both classes equally, so
    artefacts carry no label signal; tumour fractions vary within 3-8% of tissue.
    """
    specs = []
    for i in range(n_slides):
        rng = np.random.default_rng([seed, i])
        specs.append(
            SlideSpec(
                width=_round_to_tile(width * rng.uniform(0.92, 1.08)),
                height=_round_to_tile(height * rng.uniform(0.92, 1.08)),
                mpp=mpp,
                tumour=i % 2 == 0,
                tumour_fraction=round(float(rng.uniform(0.03, 0.08)), 4),
                pen_marks=i % 3 == 1,
                dust=i % 4 < 2,
                seed=int(rng.integers(2**31)),
                n_islands=int(rng.integers(1, 4)),
                tissue_coverage=round(float(rng.uniform(0.4, 0.55)), 3),
            )
        )
    return specs


def _write_one(out_dir: Path, slide_id: str, spec: SlideSpec) -> str:
    truth = write_slide(out_dir / "slides" / f"{slide_id}.svs", spec)
    write_truth(out_dir / "truth", slide_id, truth, spec)
    return slide_id


def _labels_csv(ids: Sequence[str], specs: Sequence[SlideSpec]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["slide_id", "label"])
    writer.writerows((i, s.label) for i, s in zip(ids, specs))
    return buf.getvalue().encode()


def write_cohort(
    out_dir: str | os.PathLike[str],
    n_slides: int = 24,
    seed: int = 0,
    width: int = DEMO_WIDTH,
    height: int = DEMO_HEIGHT,
    mpp: float = 0.25,
    workers: int = 1,
) -> Path:
    """Write ``slides/<id>.svs``, ``truth/<id>_{tissue,tumour}.png``, ``truth/<id>.json`` and ``labels.csv``.

    ``labels.csv`` is written last, so its presence means the cohort is complete.
    """
    out = Path(out_dir)
    ids, specs = demo_slide_ids(n_slides), demo_specs(n_slides, seed, width, height, mpp)
    with tqdm(total=n_slides, unit="slide", desc="synthetic slides") as bar:
        if workers <= 1:
            for slide_id, spec in zip(ids, specs):
                _write_one(out, slide_id, spec)
                bar.update()
        else:
            with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
                futures = [pool.submit(_write_one, out, i, s) for i, s in zip(ids, specs)]
                for fut in as_completed(futures):
                    log.debug("wrote %s", fut.result())
                    bar.update()
    _write_bytes(out / "labels.csv", _labels_csv(ids, specs))
    log.info("wrote %d synthetic slides to %s", n_slides, out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: ``python -m wsi_asmil.synthetic --out DIR``."""
    parser = argparse.ArgumentParser(
        prog="python -m wsi_asmil.synthetic",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Write a deterministic synthetic cohort of Aperio-style slides with ground truth.",
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--n-slides", type=int, default=24, help="number of slides")
    parser.add_argument("--seed", type=int, default=0, help="cohort seed")
    parser.add_argument("--width", type=int, default=DEMO_WIDTH, help="nominal level-0 width in px")
    parser.add_argument("--height", type=int, default=DEMO_HEIGHT, help="nominal level-0 height in px")
    parser.add_argument("--mpp", type=float, default=0.25, help="level-0 microns per pixel")
    parser.add_argument("--workers", type=int, default=1, help="parallel processes")
    parser.add_argument("--log-level", default="INFO", help="logging level")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    write_cohort(args.out, args.n_slides, args.seed, args.width, args.height, args.mpp, args.workers)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
