"""The per-tile renderer: H&E-like level-0 tiles drawn from a slide's layout and cells."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from wsi_asmil.synthetic.cells import (
    DUST,
    FIBRE_SPACING_UM,
    LYMPHOCYTES,
    STROMA_NUCLEI,
    TUMOUR_NUCLEI,
    Blobs,
    Kind,
    accept,
    blob_rows,
    bounding_boxes,
    fibre_rows,
    lattice_rows,
    nucleoli,
    polygons,
)
from wsi_asmil.synthetic.layout import COS2, FIX, PIXEL_CHANNELS, SHIFT, SIN2, TEX_A, TEX_B, F, Layout, T
from wsi_asmil.synthetic.sampling import bilinear, sample
from wsi_asmil.synthetic.spec import TILE, SlideSpec

_EDGE_RAMP_PX = 3.0
_TUMOUR_RAMP_UM = 12.0
_NOISE_STREAM = 6

_BACKGROUND = np.array([243.0, 242.0, 246.0], np.float32)
_STROMA = np.array([236.0, 168.0, 204.0], np.float32)
_STROMA_TEX_A = np.array([-10.0, -7.5, -9.0], np.float32)
_STROMA_TEX_B = np.array([2.0, -7.0, -2.0], np.float32)
_TUMOUR_STROMA = np.array([224.0, 156.0, 207.0], np.float32)
_FIBRE_COLOURS = ((220, 136, 186), (246, 200, 225))


@dataclass(frozen=True)
class _Items:
    """Everything one tile row may draw, in a drawing order that does not depend on the tile.

    Polygons and polylines are absolute level-0 coordinates in ``SHIFT``-bit fixed point, so
    a tile only subtracts its origin and an item straddling a border is drawn identically on
    both sides. ``*_bbox`` rows are level-0 ``x0, y0, x1, y1`` (inclusive, AA margin included).
    """

    polys: np.ndarray
    colours: list[tuple[int, int, int]]
    poly_bbox: np.ndarray
    fibres: np.ndarray
    fibre_group: np.ndarray
    fibre_bbox: np.ndarray


class Renderer:
    """Draws level-0 tiles of one slide from its layout."""

    def __init__(self, spec: SlideSpec, layout: Layout) -> None:
        self.spec = spec
        self.layout = layout
        rng = np.random.default_rng([spec.seed, _NOISE_STREAM])
        lum = rng.standard_normal((2 * TILE, 2 * TILE, 1))
        noise = (lum + 0.35 * rng.standard_normal((2 * TILE, 2 * TILE, 3))).astype(np.float32)
        self.noise_tissue, self.noise_background = 5.5 * noise, 2.0 * noise
        self.background = np.empty((TILE, TILE, 3), np.uint8)
        self.background[:] = _BACKGROUND.astype(np.uint8)
        self.fibre_px = max(1, int(round(0.5 / spec.mpp)))
        self.kinds = (STROMA_NUCLEI, LYMPHOCYTES, TUMOUR_NUCLEI) + ((DUST,) if spec.dust else ())

    def _blobs(self, kind: Kind, y0: int, y1: int) -> Blobs:
        extent = kind.semi_major_um[1] * (1 + 2 * kind.irregularity) / self.spec.mpp + 2
        rows = lattice_rows(kind.spacing_um / self.spec.mpp, extent, y0, y1, self.spec.height)
        blobs = blob_rows(kind, self.spec, rows)
        at = sample(self.layout.fields, self.layout.downsample, blobs.x, blobs.y)
        return blobs.subset(accept(kind, at, blobs.u))

    def _fibres(self, y0: int, y1: int) -> tuple[np.ndarray, np.ndarray]:
        """Short wavy collagen streaks following a smooth orientation field, sparse in tumour.

        Returns (N, 4, 2) fixed-point polylines and each one's colour group.
        """
        mpp = self.spec.mpp
        rows = lattice_rows(FIBRE_SPACING_UM / mpp, 20.0 / mpp, y0, y1, self.spec.height)
        x, y, u, length, dtheta, bend, group = fibre_rows(self.spec, rows)
        at = sample(self.layout.fields, self.layout.downsample, x, y)
        keep = (at[F] > 0) & np.where(at[T] > 0, u < 0.25, u < 0.8)
        theta = 0.5 * np.arctan2(at[SIN2], at[COS2])[keep] + dtheta[keep]
        x, y, length, bend = x[keep], y[keep], length[keep], bend[keep]
        s = np.array([-0.5, -1 / 6, 1 / 6, 0.5])[None, :] * length[:, None]
        perp = bend[:, None] * length[:, None] * (1 - (2 * s / length[:, None]) ** 2)
        c, sn = np.cos(theta)[:, None], np.sin(theta)[:, None]
        px = x[:, None] + s * c - perp * sn
        py = y[:, None] + s * sn + perp * c
        return np.round(np.stack([px, py], axis=2) * FIX).astype(np.int64), group[keep]

    def row_items(self, ty: int) -> _Items:
        """All items of tile row ``ty``, generated once and shared by the row's tiles."""
        y0, y1 = ty * TILE, (ty + 1) * TILE
        stroma, lymph, tumour, *dust = (self._blobs(k, y0, y1) for k in self.kinds)
        blobs = [stroma, lymph, tumour, nucleoli(tumour, self.spec), *dust]
        polys = np.concatenate([polygons(b) for b in blobs])
        colours = np.concatenate([b.colour for b in blobs])
        fibres, group = self._fibres(y0, y1)
        return _Items(
            polys=polys,
            colours=[tuple(c) for c in np.round(colours).astype(int).tolist()],
            poly_bbox=bounding_boxes(polys, 2),
            fibres=fibres,
            fibre_group=group,
            fibre_bbox=bounding_boxes(fibres, self.fibre_px + 2),
        )

    def _fields(self, x0: int, y0: int) -> np.ndarray:
        d = self.layout.downsample
        u = (x0 + np.arange(TILE) + 0.5) / d - 0.5
        v = (y0 + np.arange(TILE) + 0.5) / d - 0.5
        return bilinear(self.layout.fields[:PIXEL_CHANNELS], u, v)

    def _stroma(self, f: np.ndarray, items: _Items, origin: np.ndarray, x0: int, y0: int) -> np.ndarray:
        """Pink stroma with low-frequency tone variation, a purpler tint in tumour, and fibres.

        Per-channel OpenCV arithmetic: an order of magnitude faster than numpy broadcasting here.
        """
        tumour = None
        if self.spec.tumour:
            ramp = self.layout.downsample * self.spec.mpp / _TUMOUR_RAMP_UM
            tumour = np.clip(0.5 + f[T] * ramp, 0.0, 1.0)
        chans = []
        for c in range(3):
            chan = cv2.addWeighted(
                f[TEX_A], float(_STROMA_TEX_A[c]), f[TEX_B], float(_STROMA_TEX_B[c]), float(_STROMA[c])
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
                cv2.polylines(out, lines, False, colour, self.fibre_px, cv2.LINE_AA, SHIFT)
        return out

    def tile(self, items: _Items, tx: int, ty: int) -> np.ndarray:
        """The (TILE, TILE, 3) uint8 level-0 tile at column ``tx``, row ``ty``."""
        x0, y0 = tx * TILE, ty * TILE
        origin = np.array([x0 * FIX, y0 * FIX], np.int64)
        f = self._fields(x0, y0)
        alpha = np.clip(0.5 + f[F] * (self.layout.downsample / _EDGE_RAMP_PX), 0.0, 1.0)
        if alpha.max() > 0:
            out = cv2.blendLinear(self._stroma(f, items, origin, x0, y0), self.background, alpha, 1.0 - alpha)
        else:
            out = self.background.copy()
        for i in _overlapping(items.poly_bbox, x0, y0):
            poly = (items.polys[i] - origin).astype(np.int32)
            cv2.fillPoly(out, [poly], items.colours[i], cv2.LINE_AA, SHIFT)
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
            cv2.polylines(mask, [pts], False, 255, stroke.thickness, cv2.LINE_AA, SHIFT)
            cover = mask.astype(np.float32)[..., None] * (0.85 / 255.0)
            img[:] = np.clip(img * (1.0 - cover * (1.0 - stroke.ink)) + 0.5, 0, 255).astype(np.uint8)


def _overlapping(bbox: np.ndarray, x0: int, y0: int) -> np.ndarray:
    """Indices (in drawing order) of boxes that touch the tile at ``x0, y0``."""
    hit = (bbox[:, 2] >= x0) & (bbox[:, 0] < x0 + TILE) & (bbox[:, 3] >= y0) & (bbox[:, 1] < y0 + TILE)
    return np.flatnonzero(hit)
