"""The on-disk layout of per-slide Zarr stores: the one place that knows it.

Two kinds of store exist, both Zarr format 3 directories written atomically:

``tiles/<tiling>/<slide>.zarr``
    ``coords``           (M, 2) int64, level-0 top-left x, y of each tile
    ``tissue_fraction``  (M,)   float32, fraction of the tile covered by the tissue mask
    attrs: ``kind="tiles"``, slide_id, mpp (level-0 um/px), target_mpp, tile_size (px at
    target_mpp), tile_extent (level-0 px, float), read_level, read_downsample, overlap,
    min_tissue_fraction, slide_dimensions, wsi_asmil_version, created.

``features/<tiling>/<encoder>/<slide>.zarr``
    ``features``  (M, D) float16, chunked by rows
    ``coords``    (M, 2) int64, identical to the tiles store's coords
    attrs: ``kind="features"``, the tiles store's attrs plus encoder, weights, input_size,
    norm_mean, norm_std, feature_dim.
    ``tile_truth`` (M,) int8, optional: per-tile ground truth of synthetic feature cohorts
    (:mod:`wsi_asmil.synthetic.witness`), in row order; read it with :func:`read_tile_truth`.

A slide without tissue has M = 0 and is still a complete store: training skips it with a warning.

While a features store is being built it lives at a hidden sibling, ``.<slide>.zarr.partial``,
with a ``progress.json`` beside its arrays (see :class:`PartialFeatures`); readers never see it.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from wsi_asmil import __version__
from wsi_asmil.core.disk import disk_errors_named
from wsi_asmil.core.io import atomic_path, write_json
from wsi_asmil.core.run_id import store_pointer

ROWS_PER_CHUNK = 4096
#: Name of the optional per-tile truth array of a features store (see :func:`read_tile_truth`).
TILE_TRUTH = "tile_truth"


def provenance() -> dict[str, Any]:
    """Version, time and host of the job; inside a workflow run also ``run_id`` and ``manifest``,
    the run's manifest file (see :mod:`wsi_asmil.pipeline.provenance`)."""
    return {
        "wsi_asmil_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        **store_pointer(),
    }


def _row_chunks(n_rows: int, n_cols: int) -> tuple[int, int]:
    return (max(1, min(ROWS_PER_CHUNK, n_rows)), max(1, n_cols))


def write_tiles(
    path: str | os.PathLike[str],
    coords: np.ndarray,
    tissue_fraction: np.ndarray,
    attrs: dict[str, Any],
) -> None:
    """Write a tiles store atomically."""
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    tissue_fraction = np.asarray(tissue_fraction, dtype=np.float32).reshape(-1)
    if len(coords) != len(tissue_fraction):
        raise ValueError("coords and tissue_fraction must have the same length")
    with atomic_path(path) as tmp:
        root = zarr.open_group(tmp, mode="w", zarr_format=3)
        root.create_array("coords", data=coords, chunks=_row_chunks(len(coords), 2))
        root.create_array(
            "tissue_fraction", data=tissue_fraction, chunks=(_row_chunks(len(coords), 1)[0],)
        )
        root.attrs.update({"kind": "tiles", **attrs, **provenance()})


class _RowWriter:
    def __init__(self, array: zarr.Array) -> None:
        self.array = array
        self.written = 0

    def write(self, start: int, rows: np.ndarray) -> None:
        self.array[start : start + len(rows)] = rows.astype(np.float16)
        self.written += len(rows)


@contextmanager
def feature_writer(
    path: str | os.PathLike[str], coords: np.ndarray, dim: int, attrs: dict[str, Any]
) -> Iterator[_RowWriter]:
    """Build a features store at a temporary path; it appears at ``path`` only when every row is in.

    Rows arrive in batches from the encoder. A store with fewer rows written than coords is an
    error, never a silently zero-filled result.
    """
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    with atomic_path(path) as tmp:
        root = zarr.open_group(tmp, mode="w", zarr_format=3)
        root.create_array("coords", data=coords, chunks=_row_chunks(len(coords), 2))
        array = root.create_array(
            "features",
            shape=(len(coords), dim),
            dtype="float16",
            chunks=_row_chunks(len(coords), dim),
            fill_value=0,
        )
        root.attrs.update({"kind": "features", "feature_dim": dim, **attrs, **provenance()})
        writer = _RowWriter(array)
        yield writer
        if writer.written != len(coords):
            raise RuntimeError(f"{path}: wrote {writer.written} of {len(coords)} feature rows")


class PartialFeatures:
    """A features store under construction at a hidden scratch path, resumable chunk by chunk.

    Rows land one whole Zarr chunk at a time (no chunk is ever rewritten in part). After each
    chunk, ``progress.json`` is replaced atomically with the number of final rows, the rows whose
    tiles could not be decoded, and a fingerprint of everything that determines the rows (tiles,
    encoder, weights, precision, reader). A killed job leaves the scratch behind; the next run with
    the same fingerprint continues after the last finished chunk, any other run starts over. So a
    resumed store equals an uninterrupted one, and nothing at the final path looks complete early.
    """

    PROGRESS = "progress.json"

    def __init__(
        self, final: str | os.PathLike[str], coords: np.ndarray, dim: int, attrs: dict[str, Any], fingerprint: str
    ) -> None:
        self.final = Path(final)
        self.path = self.scratch_for(self.final)
        self.coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        self.dim = dim
        self.attrs = attrs
        self.fingerprint = fingerprint
        resumed = self._resume()
        if resumed is not None:
            self.array, self.rows_done, self.failed = resumed
        else:
            self._start()
        self.resumed_from = self.rows_done

    def _start(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with disk_errors_named(self.path):
            root = zarr.open_group(self.path, mode="w", zarr_format=3)
            root.create_array("coords", data=self.coords, chunks=_row_chunks(len(self.coords), 2))
            self.array = root.create_array(
                "features",
                shape=(len(self.coords), self.dim),
                dtype="float16",
                chunks=_row_chunks(len(self.coords), self.dim),
                fill_value=0,
            )
        self.rows_done, self.failed = 0, []
        self._save_progress()

    @staticmethod
    def scratch_for(final: str | os.PathLike[str]) -> Path:
        final = Path(final)
        return final.with_name(f".{final.name}.partial")

    @property
    def chunk_rows(self) -> int:
        return int(self.array.chunks[0])

    def _resume(self) -> tuple[zarr.Array, int, list[int]] | None:
        """(features array, rows done, failed rows) of a scratch store this run may continue."""
        try:
            progress = json.loads((self.path / self.PROGRESS).read_text())
            if progress.get("fingerprint") != self.fingerprint:
                return None
            array = zarr.open_group(self.path, mode="r+")["features"]
            return array, int(progress["rows_done"]), [int(i) for i in progress["failed"]]
        except (OSError, ValueError, KeyError, AttributeError):
            return None

    def _save_progress(self) -> None:
        write_json(
            self.path / self.PROGRESS,
            {"fingerprint": self.fingerprint, "rows_done": self.rows_done, "failed": self.failed},
        )

    def write_chunk(self, start: int, rows: np.ndarray, failed: list[int]) -> None:
        """Write rows ``start:start+len(rows)``: exactly the next whole chunk (or the tail)."""
        if start != self.rows_done or (len(rows) != self.chunk_rows and start + len(rows) != len(self.coords)):
            raise ValueError(f"{self.path}: chunk at row {start} ({len(rows)} rows) out of order")
        # On a full disk this names the scratch and leaves it as it is (progress.json never counts a
        # chunk that did not land); the features stage then removes it to give the space back.
        with disk_errors_named(self.path):
            self.array[start : start + len(rows)] = rows.astype(np.float16)
        self.rows_done += len(rows)
        self.failed += failed
        self._save_progress()

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def finish(self) -> None:
        """Publish the final store: the scratch renamed when every tile was read, otherwise a copy
        without the failed rows (in row chunks, so memory stays bounded)."""
        if self.rows_done != len(self.coords):
            raise RuntimeError(f"{self.final}: {self.rows_done} of {len(self.coords)} feature rows written")
        extra = {
            "kind": "features",
            "feature_dim": self.dim,
            **self.attrs,
            **provenance(),
            "n_failed_tiles": len(self.failed),
            "failed_coords": self.coords[self.failed].tolist(),
        }
        if not self.failed:
            (self.path / self.PROGRESS).unlink()
            zarr.open_group(self.path, mode="r+").attrs.update(extra)
            with atomic_path(self.final) as tmp:
                os.rename(self.path, tmp)
            return
        keep = np.ones(len(self.coords), dtype=bool)
        keep[self.failed] = False
        with feature_writer(self.final, self.coords[keep], self.dim, extra) as writer:
            pos = 0
            for start in range(0, len(self.coords), self.chunk_rows):
                stop = start + self.chunk_rows
                part = self.array[start:stop][keep[start:stop]]
                writer.write(pos, part)
                pos += len(part)
        self.discard()


def open_store(path: str | os.PathLike[str]) -> zarr.Group:
    """Open a complete store read-only, with a clear error for a missing or foreign one."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"no store at {p}")
    return zarr.open_group(p, mode="r")


def read_tiles(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Return (coords (M,2) int64, tissue_fraction (M,), attrs) of a tiles store."""
    g = open_store(path)
    return g["coords"][:], g["tissue_fraction"][:], dict(g.attrs)


def read_features(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Return (features (M,D) float32, coords (M,2) int64, attrs) of a features store."""
    g = open_store(path)
    return g["features"][:].astype(np.float32), g["coords"][:], dict(g.attrs)


def read_bag(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray | None]:
    """(features (M, D) float32, per-tile truth (M,) int8 or None) of a features store: what
    training reads of a slide, with one open and no coords (streamed training reads it every epoch)."""
    g = open_store(path)
    try:
        truth = np.asarray(g[TILE_TRUTH][:], dtype=np.int8)
    except KeyError:
        truth = None
    return g["features"][:].astype(np.float32), truth


def lazy_features(path: str | os.PathLike[str]) -> zarr.Array:
    """The features array without reading it, for callers that slice rows."""
    return open_store(path)["features"]


def read_tile_truth(path: str | os.PathLike[str]) -> np.ndarray | None:
    """The per-tile truth (M,) int8 of a features store, in row order; None when it has none."""
    g = open_store(path)
    if TILE_TRUTH not in g.array_keys():
        return None
    return np.asarray(g[TILE_TRUTH][:], dtype=np.int8)
