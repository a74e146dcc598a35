"""Where things are: the low-resolution canvas fields of a slide and its pen strokes.

The canvas (``CANVAS_UM`` um per pixel, an integer level-0 downsample) holds smooth scalar
fields, stacked in ``Layout.fields`` in the channel order ``F`` (tissue), ``T`` (tumour),
``TEX_A``/``TEX_B`` (stroma texture), ``L`` (lymphoid clusters) and ``COS2``/``SIN2`` (doubled
fibre angle); the first ``PIXEL_CHANNELS`` are the ones a tile's pixels sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from wsi_asmil.synthetic.sampling import bilinear
from wsi_asmil.synthetic.spec import SlideSpec, SlideTruth

CANVAS_UM = 8.0

# Level-0 drawing coordinates are fixed point with SHIFT fractional bits (OpenCV's ``shift``).
SHIFT = 4
FIX = 1 << SHIFT

F, T, TEX_A, TEX_B, L, COS2, SIN2 = range(7)
PIXEL_CHANNELS = 4

_INKS = {
    "blue": np.array([0.30, 0.42, 0.85], np.float32),
    "green": np.array([0.30, 0.68, 0.40], np.float32),
    "black": np.array([0.18, 0.18, 0.22], np.float32),
}
# RNG streams of a slide seed: layout 0, cell populations 1-4 and fibres 5 (cells), pixel noise 6 (render).
_LAYOUT_STREAM = 0
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
        strokes.append(_Stroke(np.round(curve * FIX).astype(np.int64), thickness, ink, bbox))
    return strokes


def _mask_downsample(mpp: float) -> int:
    """Level-0 pixels per canvas pixel: an integer, so masks tile level 0 exactly."""
    return max(1, int(round(CANVAS_UM / mpp)))


class Layout:
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
            f, t = self.fields[F], self.fields[T]
        else:
            rows = math.ceil(self.spec.height / d)
            cols = math.ceil(self.spec.width / d)
            v = (np.arange(rows) + 0.5) * d / self.downsample - 0.5
            u = (np.arange(cols) + 0.5) * d / self.downsample - 0.5
            f, t = bilinear(self.fields[[F, T]], u, v)
        tissue = f > 0
        return SlideTruth(
            tissue=tissue,
            tumour=(t > 0) & tissue,
            downsample=float(d),
            mpp=self.spec.mpp,
            width=self.spec.width,
            height=self.spec.height,
        )
