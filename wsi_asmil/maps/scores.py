"""One slide's scores under one model: the file pair every later stage reads, written and read here only.

``<slide>_scores.csv`` holds one row per tile (level-0 ``x``, ``y``, the attention ``score``, and
``score_fold<k>`` per fold model when several were averaged); ``<slide>_scores.json`` holds the
slide's prediction and the tile geometry. Scoring writes them (with torch); drawing, localisation,
prediction tables and the report read them (without torch) through :func:`read_scores`, which
refuses a file that lacks a field instead of guessing a default, and names the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from wsi_asmil.core.io import write_csv, write_json

CSV_SUFFIX = "_scores.csv"
JSON_SUFFIX = "_scores.json"
#: Fields every scores JSON carries; a reader that finds one missing fails, naming the file.
REQUIRED = (
    "slide_id", "model", "fold_mode", "folds", "classes", "n_tiles", "probs", "pred", "probs_per_fold",
    "agreement", "tile_extent", "target_mpp", "tile_size", "mpp", "slide_dimensions",
)


class ScoresFormatError(ValueError):
    """A scores file is missing, incomplete or inconsistent with its partner; the message names it."""


def scores_paths(out_dir: str | Path, slide_id: str) -> tuple[Path, Path]:
    """The CSV and JSON a slide's scores are written to."""
    return Path(out_dir) / f"{slide_id}{CSV_SUFFIX}", Path(out_dir) / f"{slide_id}{JSON_SUFFIX}"


def slide_id_of(path: str | Path) -> str:
    """The slide a scores file belongs to, from its name."""
    name = Path(path).name
    for suffix in (JSON_SUFFIX, CSV_SUFFIX):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    raise ScoresFormatError(f"{path}: not a scores file (expected a name ending in {JSON_SUFFIX} or {CSV_SUFFIX})")


@dataclass(frozen=True)
class Scores:
    """A slide's tiles with their attention, and the slide-level record (``meta``, the JSON)."""

    coords: np.ndarray  # (M, 2) int64 level-0 top-left corners
    scores: np.ndarray  # (M,) float64 attention, sums to 1 over the slide
    meta: dict[str, Any]

    @property
    def slide_id(self) -> str:
        return str(self.meta["slide_id"])

    @property
    def tile_extent(self) -> float:
        """Level-0 side of a tile in pixels (not rounded)."""
        return float(self.meta["tile_extent"])


def write_scores(out_dir: str | Path, table: pd.DataFrame, record: dict[str, Any]) -> None:
    """Both files of one slide, as one result: if either cannot be written, neither is left (not
    even an older one, which would no longer match its partner)."""
    missing = [k for k in REQUIRED if k not in record]
    if missing:
        raise ScoresFormatError(f"scores record of slide '{record.get('slide_id')}' lacks {missing}")
    paths = scores_paths(out_dir, record["slide_id"])
    try:
        write_csv(paths[0], table)
        write_json(paths[1], record)
    except BaseException:
        for path in paths:
            path.unlink(missing_ok=True)
        raise


def read_meta(json_path: str | Path) -> dict[str, Any]:
    """The slide-level record of a scores JSON, checked for every required field."""
    path = Path(json_path)
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise ScoresFormatError(f"{path}: scores file missing") from None
    except json.JSONDecodeError as exc:
        raise ScoresFormatError(f"{path}: not valid JSON ({exc})") from exc
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise ScoresFormatError(f"{path}: lacks {', '.join(missing)} (written by an older or other tool? re-run scoring)")
    return meta


def read_scores(json_path: str | Path) -> Scores:
    """Tiles, attention and record of one slide, from its JSON and the CSV beside it."""
    path = Path(json_path)
    meta = read_meta(path)
    csv_path = path.with_name(f"{slide_id_of(path)}{CSV_SUFFIX}")
    try:
        table = pd.read_csv(csv_path)
    except FileNotFoundError:
        raise ScoresFormatError(f"{csv_path}: scores table missing (its record {path} exists)") from None
    absent = [c for c in ("x", "y", "score") if c not in table.columns]
    if absent:
        raise ScoresFormatError(f"{csv_path}: no column(s) {absent}")
    if len(table) != meta["n_tiles"]:
        raise ScoresFormatError(f"{csv_path}: {len(table)} tiles, but {path} says {meta['n_tiles']}")
    coords = table[["x", "y"]].to_numpy(dtype=np.int64)
    return Scores(coords, table["score"].to_numpy(dtype=np.float64), meta)
