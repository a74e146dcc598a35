"""Tests' reader of the tile GeoJSON the heatmap stage writes: checked the way QuPath reads it.

The package only writes these files; reading them back is a test's job, so it lives here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from wsi_asmil.maps.tile_geojson import OBJECT_TYPES


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
