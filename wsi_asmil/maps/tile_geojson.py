"""Tiles with their scores as GeoJSON that QuPath imports as tile objects carrying measurements.

Drag the file onto the slide in QuPath (0.4 or later) and colour the tiles by ``attention`` with
*Measure > Show measurement maps*. Each tile is one ``Feature`` with a closed ``Polygon`` in
level-0 pixels (QuPath's image coordinates) and ``properties`` ``{"objectType": "tile",
"measurements": {"attention": ..., ...}}``; ``objectType`` may also be ``detection``.

The file is streamed feature by feature (a CAMELYON slide has 10^5 tiles) and written atomically.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from wsi_asmil.core.io import atomic_path

OBJECT_TYPES = ("tile", "detection")


def _ring(x: float, y: float, e: float) -> list[list[float]]:
    # Counter-clockwise in a y-up frame (RFC 7946 for exterior rings), closed.
    pts = [(x, y), (x + e, y), (x + e, y + e), (x, y + e), (x, y)]
    return [[round(px, 2), round(py, 2)] for px, py in pts]


def write_tile_geojson(
    path: str | Path,
    coords: np.ndarray,
    extent: float,
    measurements: Mapping[str, np.ndarray],
    object_type: str = "tile",
) -> None:
    """One Feature per tile (level-0 square of side ``extent``), each with every measurement."""
    if object_type not in OBJECT_TYPES:
        raise ValueError(f"objectType must be one of {OBJECT_TYPES}, got {object_type!r}")
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    columns = {name: np.asarray(v, dtype=np.float64).reshape(-1) for name, v in measurements.items()}
    for name, v in columns.items():
        if len(v) != len(coords):
            raise ValueError(f"measurement {name!r} has {len(v)} values for {len(coords)} tiles")
        if not np.isfinite(v).all():
            raise ValueError(f"measurement {name!r} holds non-finite values (GeoJSON cannot carry NaN)")
    names = list(columns)
    matrix = np.stack([columns[n] for n in names], axis=1) if names else np.zeros((len(coords), 0))
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write('{"type": "FeatureCollection", "features": [')
        for i, ((x, y), row) in enumerate(zip(coords, matrix)):
            feature = {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [_ring(float(x), float(y), float(extent))]},
                "properties": {
                    "objectType": object_type,
                    "measurements": {n: float(v) for n, v in zip(names, row)},
                },
            }
            fh.write(("\n" if i == 0 else ",\n") + json.dumps(feature, allow_nan=False, ensure_ascii=False))
        fh.write("\n]}\n")
