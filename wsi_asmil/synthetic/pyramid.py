"""The pyramid: level downsamples, and lower levels built as box means of level 0 while it streams."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np

from wsi_asmil.synthetic.render import Renderer
from wsi_asmil.synthetic.spec import TILE

log = logging.getLogger(__name__)

MAX_LEVEL_SIDE = 1024


def pyramid_downsamples(width: int, height: int) -> list[int]:
    """Level downsamples: 1, 2, 8, then x4 while the smallest level is still over ``MAX_LEVEL_SIDE``.

    Capped at ``TILE`` so every lower level is built from whole level-0 tiles as they stream.
    """
    ds = [1, 2, 8]
    while max(width, height) / ds[-1] > MAX_LEVEL_SIDE and ds[-1] * 4 <= TILE:
        ds.append(ds[-1] * 4)
    return ds


class LevelFile:
    """A lower pyramid level, assembled strip by strip in a scratch file and re-read as tiles.

    Plain file I/O instead of an in-RAM array or a memmap keeps resident memory at one strip
    even for a 100,000-px slide (dirty memmap pages would count as the process's memory).
    """

    def __init__(self, downsample: int, width: int, height: int, scratch: Path) -> None:
        self.step = TILE // downsample
        self.width, self.height = width // downsample, height // downsample
        self.strip = np.zeros((self.step, math.ceil(width / TILE) * self.step, 3), np.uint8)
        self.file = open(scratch / f"level_{downsample}.rgb", "w+b")

    def put(self, tx: int, tile: np.ndarray) -> None:
        """Box-average a level-0 tile (INTER_AREA at an integer factor) into the current strip."""
        small = cv2.resize(tile, (self.step, self.step), interpolation=cv2.INTER_AREA)
        self.strip[:, tx * self.step : (tx + 1) * self.step] = small

    def end_row(self, ty: int) -> None:
        """Append the finished strip; rows past the level's (floored) height are dropped."""
        rows = min(self.step, self.height - ty * self.step)
        if rows > 0:
            self.file.write(self.strip[:rows, : self.width].tobytes())

    def tiles(self) -> Iterator[np.ndarray]:
        """The level's tiles in tifffile's order, zero-padded at the right and bottom edges."""
        self.file.flush()
        row_bytes = self.width * 3
        for y0 in range(0, self.height, TILE):
            rows = min(TILE, self.height - y0)
            self.file.seek(y0 * row_bytes)
            strip = np.frombuffer(self.file.read(rows * row_bytes), np.uint8).reshape(rows, self.width, 3)
            for x0 in range(0, self.width, TILE):
                tile = np.zeros((TILE, TILE, 3), np.uint8)
                part = strip[:, x0 : x0 + TILE]
                tile[:rows, : part.shape[1]] = part
                yield tile

    def close(self) -> None:
        self.file.close()


def stream_level0(renderer: Renderer, levels: Sequence[LevelFile]) -> Iterator[np.ndarray]:
    """Yield level-0 tiles row by row (tifffile's order) while feeding the lower ``levels``.

    A row is closed before its last tile is yielded: tifffile stops pulling after the final
    tile, so nothing after the last ``yield`` would ever run.
    """
    spec = renderer.spec
    n_tx, n_ty = math.ceil(spec.width / TILE), math.ceil(spec.height / TILE)
    for ty in range(n_ty):
        items = renderer.row_items(ty)
        for tx in range(n_tx):
            tile = renderer.tile(items, tx, ty)
            for level in levels:
                level.put(tx, tile)
                if tx == n_tx - 1:
                    level.end_row(ty)
            yield tile
        log.debug("rendered tile row %d/%d", ty + 1, n_ty)
