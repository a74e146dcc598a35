"""Bilinear sampling of canvas fields: the one rule that both the truth masks and the pixels follow."""

from __future__ import annotations

import numpy as np


def _lerp_index(coords: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Neighbour indices (edge-clamped) and weight of the upper one for linear interpolation."""
    i0 = np.floor(coords).astype(np.int64)
    frac = (coords - i0).astype(np.float32)
    return np.clip(i0, 0, n - 1), np.clip(i0 + 1, 0, n - 1), frac


def bilinear(fields: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
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


def sample(fields: np.ndarray, downsample: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Fields (C, h, w) at level-0 positions ``x, y`` (px) under the same bilinear rule: (C, N)."""
    ua, ub, fu = _lerp_index(x / downsample - 0.5, fields.shape[2])
    va, vb, fv = _lerp_index(y / downsample - 0.5, fields.shape[1])
    top = fields[:, va, ua] * (1 - fu) + fields[:, va, ub] * fu
    bottom = fields[:, vb, ua] * (1 - fu) + fields[:, vb, ub] * fu
    return top * (1 - fv) + bottom * fv
