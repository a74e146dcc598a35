"""Nuclei, dust and collagen fibres: seeded jittered-lattice point processes, thinned by region.

Each lattice row's RNG is seeded by ``(slide seed, population, row)``, so any band of rows can be
generated on its own and items continue seamlessly across tile borders.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from dataclasses import fields as dataclass_fields

import numpy as np

from wsi_asmil.synthetic.layout import FIX, F, L, T
from wsi_asmil.synthetic.spec import SlideSpec

_VERTICES = 16


@dataclass(frozen=True)
class Kind:
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


STROMA_NUCLEI = Kind("stroma", 1, 15.0, 1.0, (2.5, 4.0), (0.35, 0.9), 0.06, (118, 68, 150), 12)
LYMPHOCYTES = Kind("lymph", 2, 5.8, 0.9, (2.3, 3.1), (0.8, 1.0), 0.05, (62, 36, 108), 8)
TUMOUR_NUCLEI = Kind("tumour", 3, 11.5, 0.7, (5.0, 8.0), (0.6, 0.95), 0.14, (84, 42, 124), 18)
DUST = Kind("dust", 4, 90.0, 1.0, (1.5, 7.0), (0.4, 1.0), 0.3, (92, 90, 96), 22)
_FIBRE_STREAM = 5
FIBRE_SPACING_UM = 9.0


@dataclass(frozen=True)
class Blobs:
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

    def subset(self, keep: np.ndarray) -> Blobs:
        return Blobs(*(getattr(self, f.name)[keep] for f in dataclass_fields(self)))


def lattice_rows(spacing_px: float, extent_px: float, y0: int, y1: int, height: int) -> range:
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


def blob_rows(kind: Kind, spec: SlideSpec, rows: range) -> Blobs:
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
        return Blobs(*(np.empty((0,) + shape) for shape in ((), (), (), (), (), (4,), (3,), (), (3,))))
    return Blobs(*(np.concatenate(col) for col in zip(*parts)))


def fibre_rows(spec: SlideSpec, rows: range) -> tuple[np.ndarray, ...]:
    """Fibre candidates of ``rows``: x, y, u, length (px), angle jitter, bend, colour group."""
    spacing = FIBRE_SPACING_UM / spec.mpp
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


def accept(kind: Kind, at: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Thin candidates by the region at their centre: this is what makes regions look different.

    Lymphocytes also scatter sparsely through all tissue, tumour included, as in real sections.
    """
    tissue, tumour, lymph = at[F] > 0, at[T] > 0, at[L] > 0
    if kind.name == "stroma":
        return tissue & ~tumour & ~lymph & (u < 0.55)
    if kind.name == "lymph":
        return tissue & ((lymph & ~tumour & (u < 0.85)) | (u < 0.03))
    if kind.name == "tumour":
        return tissue & tumour & (u < 0.92)
    return u < 0.3


def nucleoli(tumour: Blobs, spec: SlideSpec) -> Blobs:
    """Prominent dark nucleoli in about half of the tumour nuclei, off-centre like real ones."""
    keep = tumour.extra[:, 0] < 0.5
    t = tumour.subset(keep)
    ang = t.extra[:, 1] * 2 * math.pi
    off = t.extra[:, 2] * 0.4 * t.b
    radius = (0.7 + 0.4 * t.extra[:, 2]) / spec.mpp
    return Blobs(
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


def polygons(blobs: Blobs) -> np.ndarray:
    """Irregular ellipses as (N, V, 2) fixed-point vertices; two harmonics give lobulated outlines."""
    t = np.linspace(0.0, 2 * math.pi, _VERTICES, endpoint=False)[None, :]
    h = blobs.harmonics
    r = 1.0 + h[:, :1] * np.cos(2 * t + h[:, 2:3]) + h[:, 1:2] * np.cos(3 * t + h[:, 3:4])
    lx, ly = blobs.a[:, None] * r * np.cos(t), blobs.b[:, None] * r * np.sin(t)
    c, s = np.cos(blobs.theta)[:, None], np.sin(blobs.theta)[:, None]
    px = blobs.x[:, None] + lx * c - ly * s
    py = blobs.y[:, None] + lx * s + ly * c
    return np.round(np.stack([px, py], axis=2) * FIX).astype(np.int64)


def bounding_boxes(points: np.ndarray, margin: int) -> np.ndarray:
    """Inclusive level-0 bounding boxes of fixed-point point sets (N, V, 2), padded by ``margin``."""
    if points.shape[0] == 0:
        return np.empty((0, 4), np.int64)
    lo = points.min(axis=1) // FIX - margin
    hi = points.max(axis=1) // FIX + 1 + margin
    return np.concatenate([lo, hi], axis=1)
