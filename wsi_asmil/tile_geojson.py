"""Tiles with their scores as GeoJSON that QuPath imports as tile objects carrying measurements.

Drag the file onto the slide in QuPath (0.4 or later) and colour the tiles by ``attention`` with
*Measure > Show measurement maps*. Each tile is one ``Feature`` with a closed ``Polygon`` in
level-0 pixels (QuPath's image coordinates) and ``properties`` ``{"objectType": "tile",
"measurements": {"attention": ..., ...}}``; ``objectType`` may also be ``detection``.

The file is streamed feature by feature (a CAMELYON slide has 10^5 tiles) and written atomically.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from wsi_asmil.io import atomic_path

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


def validate_tile_geojson(obj: Any) -> None:
    """Raise ``ValueError`` naming the first problem unless ``obj`` is a tile FeatureCollection.

    Checks what QuPath and RFC 7946 need: a FeatureCollection of Features, each a Polygon whose
    rings are closed lists of at least four finite [x, y] positions, with an ``objectType`` and a
    ``measurements`` object of finite numbers.
    """
    if not isinstance(obj, dict) or obj.get("type") != "FeatureCollection":
        raise ValueError("not a GeoJSON FeatureCollection")
    feats = obj.get("features")
    if not isinstance(feats, list):
        raise ValueError("FeatureCollection without a 'features' list")
    for i, f in enumerate(feats):
        where = f"feature {i}"
        if not isinstance(f, dict) or f.get("type") != "Feature":
            raise ValueError(f"{where}: not a Feature")
        geom = f.get("geometry")
        if not isinstance(geom, dict) or geom.get("type") != "Polygon":
            raise ValueError(f"{where}: geometry is not a Polygon")
        rings = geom.get("coordinates")
        if not isinstance(rings, list) or not rings:
            raise ValueError(f"{where}: Polygon without rings")
        for ring in rings:
            if not isinstance(ring, list) or len(ring) < 4:
                raise ValueError(f"{where}: a ring needs at least 4 positions")
            for pos in ring:
                if not (isinstance(pos, list) and len(pos) == 2 and all(
                    isinstance(c, (int, float)) and math.isfinite(c) for c in pos
                )):
                    raise ValueError(f"{where}: bad position {pos!r}")
            if ring[0] != ring[-1]:
                raise ValueError(f"{where}: ring is not closed")
        props = f.get("properties")
        if not isinstance(props, dict):
            raise ValueError(f"{where}: no properties object")
        if props.get("objectType") not in OBJECT_TYPES:
            raise ValueError(f"{where}: objectType {props.get('objectType')!r} not in {OBJECT_TYPES}")
        meas = props.get("measurements")
        if not isinstance(meas, dict) or not all(
            isinstance(k, str) and isinstance(v, (int, float)) and math.isfinite(v) for k, v in meas.items()
        ):
            raise ValueError(f"{where}: measurements must map names to finite numbers")


def read_tile_geojson(path: str | Path) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Validate and read back ``(top-left corners (M, 2), sides (M,), measurements)``."""
    obj = json.loads(Path(path).read_text(encoding="utf-8"))
    validate_tile_geojson(obj)
    feats = obj["features"]
    corners = np.zeros((len(feats), 2))
    sides = np.zeros(len(feats))
    names: list[str] = list(feats[0]["properties"]["measurements"]) if feats else []
    values = {n: np.zeros(len(feats)) for n in names}
    for i, f in enumerate(feats):
        ring = np.asarray(f["geometry"]["coordinates"][0], dtype=np.float64)
        corners[i] = ring.min(axis=0)
        sides[i] = (ring.max(axis=0) - ring.min(axis=0)).max()
        for n in names:
            values[n][i] = f["properties"]["measurements"][n]
    return corners, sides, values
