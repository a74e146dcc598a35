"""Masks on a level-0-aligned grid: the tissue mask, the ground-truth tumour mask, and tile coverage.

Both masks are written as a 0/255 PNG with a JSON sidecar whose ``downsample`` maps mask pixels
to level-0 pixels (mask pixel ``(i, j)`` covers level-0 ``[j*d, (j+1)*d) x [i*d, (i+1)*d)``).
The segment stage writes the tissue mask (``<seg>/mask.png`` + ``mask.json``), the annotations
stage the tumour mask (``<truth>/<slide>.png`` + ``<slide>.json``). Every stage that reads one
reads it here, and the fraction of a tile that lies on a mask (tiling keeps tiles on tissue,
localisation calls tiles tumour) is computed by one rule, :func:`mask_fractions`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np


def read_mask_png(path: str | Path) -> np.ndarray:
    """A 0/255 mask PNG as a bool array; a missing or undecodable file is an error naming it."""
    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise FileNotFoundError(f"cannot read mask {path}")
    return mask > 0


def read_sidecar(path: str | Path) -> dict[str, Any]:
    """A mask's JSON sidecar; it must say the mask's ``downsample`` to level 0."""
    meta = json.loads(Path(path).read_text())
    if "downsample" not in meta:
        raise ValueError(f"mask sidecar {path} has no 'downsample'")
    return meta


def read_tissue_mask(mask_png: str | Path, sidecar: str | Path | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """The segment stage's tissue mask and its sidecar (``mask.json`` next to the PNG by default)."""
    side = Path(sidecar) if sidecar is not None else Path(mask_png).with_name("mask.json")
    return read_mask_png(mask_png), read_sidecar(side)


def read_tumour_mask(png: str | Path, sidecar: str | Path | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """A ground-truth tumour mask and its sidecar (the PNG's name with ``.json`` by default)."""
    side = Path(sidecar) if sidecar is not None else Path(png).with_suffix(".json")
    return read_mask_png(png), read_sidecar(side)


def mask_fractions(
    mask: np.ndarray, downsample: float, x0: np.ndarray, y0: np.ndarray, extent_l0: float
) -> np.ndarray:
    """Fraction of each tile's area that is on the mask, from an integral image (vectorised).

    ``x0``/``y0`` are level-0 origins (floats allowed); tile bounds are rounded to the nearest
    mask pixel edge and clamped, and every tile covers at least one mask pixel, so a tile smaller
    than a mask pixel takes that pixel's value.
    """
    x0 = np.asarray(x0, dtype=np.float64)
    y0 = np.asarray(y0, dtype=np.float64)
    if x0.size == 0:
        return np.zeros(0)
    h, w = mask.shape
    integral = cv2.integral(mask.astype(np.uint8))

    def bounds(origin: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
        lo = np.clip(np.floor(origin / downsample + 0.5).astype(np.int64), 0, size - 1)
        hi = np.clip(np.floor((origin + extent_l0) / downsample + 0.5).astype(np.int64), 0, size)
        return lo, np.maximum(hi, lo + 1)

    xa, xb = bounds(x0, w)
    ya, yb = bounds(y0, h)
    total = integral[yb, xb] - integral[ya, xb] - integral[yb, xa] + integral[ya, xa]
    return total / ((xb - xa) * (yb - ya))
