"""Deep Zoom (DZI) pyramids written block by block from a window-rendering callback.

A Deep Zoom image of ``width`` x ``height`` px has levels ``0 .. L`` with ``L = ceil(log2(max
side))``; level ``l`` is the image at ``1 / 2**(L - l)`` scale (sizes rounded up), cut into
``tile_size`` squares numbered ``<col>_<row>`` from the top left, each extended by ``overlap``
pixels into its neighbours where they exist (so edge tiles are smaller). Files:
``<name>.dzi`` (the XML descriptor) and ``<name>_files/<level>/<col>_<row>.<format>``.

No step holds the image: every level is rendered by the caller's ``render(grid)`` one block of
tiles at a time (a :class:`wsi_asmil.core.canvas.Grid` window at the level's downsample, so a slide
reader, a heat overlay and a mask outline all render any window at any resolution the same way),
then cut into tiles and encoded. Memory follows ``block_tiles``, never the image. The pyramid
appears complete or not at all: it is written into a temporary folder renamed into place.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

import cv2
import numpy as np

from wsi_asmil.core.canvas import Grid

DZI_NS = "http://schemas.microsoft.com/deepzoom/2008"
FORMATS = ("jpeg", "png")

#: A window renderer: pixels (height, width, 3 RGB or 4 RGBA) of ``grid``, uint8.
Render = Callable[[Grid], np.ndarray]


@dataclass(frozen=True)
class Pyramid:
    """The geometry of a Deep Zoom image whose full-resolution level is ``downsample`` x level 0."""

    width: int
    height: int
    downsample: float = 1.0
    tile_size: int = 254
    overlap: int = 1

    def __post_init__(self) -> None:
        if self.width < 1 or self.height < 1:
            raise ValueError(f"a Deep Zoom image needs at least 1 x 1 px, got {self.width} x {self.height}")
        if self.tile_size < 1 or self.overlap < 0:
            raise ValueError(f"tile_size must be >= 1 and overlap >= 0, got {self.tile_size}, {self.overlap}")

    @property
    def max_level(self) -> int:
        return math.ceil(math.log2(max(self.width, self.height)))

    @property
    def levels(self) -> range:
        return range(self.max_level + 1)

    def level_size(self, level: int) -> tuple[int, int]:
        """(width, height) of ``level``: the full size divided by ``2**(max_level - level)``, rounded up."""
        scale = 2 ** (self.max_level - level)
        return -(-self.width // scale), -(-self.height // scale)

    def tile_grid(self, level: int) -> tuple[int, int]:
        """(columns, rows) of tiles at ``level``."""
        w, h = self.level_size(level)
        return -(-w // self.tile_size), -(-h // self.tile_size)

    def tile_box(self, level: int, col: int, row: int) -> tuple[int, int, int, int]:
        """Half-open pixel box ``(x0, y0, x1, y1)`` of a tile in its level, overlap included."""
        w, h = self.level_size(level)
        t, o = self.tile_size, self.overlap
        x0 = col * t - (o if col > 0 else 0)
        y0 = row * t - (o if row > 0 else 0)
        return x0, y0, min((col + 1) * t + o, w), min((row + 1) * t + o, h)

    def level_grid(self, level: int) -> Grid:
        """The whole of ``level`` as a canvas grid over the slide's level-0 pixels."""
        w, h = self.level_size(level)
        return Grid(self.downsample * 2 ** (self.max_level - level), w, h)

    def blocks(self, level: int, block_tiles: int) -> Iterator[tuple[range, range]]:
        """Row-major blocks of at most ``block_tiles`` x ``block_tiles`` tiles: (columns, rows)."""
        cols, rows = self.tile_grid(level)
        for r0 in range(0, rows, block_tiles):
            for c0 in range(0, cols, block_tiles):
                yield range(c0, min(c0 + block_tiles, cols)), range(r0, min(r0 + block_tiles, rows))

    def descriptor(self, fmt: str) -> dict[str, Any]:
        """The DZI descriptor as OpenSeadragon's inline tile-source object (without ``Url``).

        Inlined in the page, it spares the viewer an XHR for the .dzi file, which browsers refuse
        on ``file://``."""
        return {"Image": {"xmlns": DZI_NS, "Format": fmt, "Overlap": str(self.overlap),
                          "TileSize": str(self.tile_size),
                          "Size": {"Width": str(self.width), "Height": str(self.height)}}}

    def dzi_xml(self, fmt: str) -> str:
        return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Image xmlns={quoteattr(DZI_NS)} Format={quoteattr(fmt)} '
                f'Overlap="{self.overlap}" TileSize="{self.tile_size}">\n'
                f'  <Size Width="{self.width}" Height="{self.height}"/>\n</Image>\n')


def _encode(pixels: np.ndarray, fmt: str, quality: int) -> bytes:
    if fmt == "jpeg":
        if pixels.ndim != 3 or pixels.shape[2] != 3:
            raise ValueError(f"JPEG tiles need RGB pixels, got shape {pixels.shape}")
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    else:
        code = cv2.COLOR_RGBA2BGRA if pixels.shape[2] == 4 else cv2.COLOR_RGB2BGR
        ok, buf = cv2.imencode(".png", cv2.cvtColor(pixels, code), [cv2.IMWRITE_PNG_COMPRESSION, 6])
    if not ok:
        raise RuntimeError(f"{fmt} encoding of a {pixels.shape} tile failed")
    return buf.tobytes()


def write_tiles(pyramid: Pyramid, render: Render, files_dir: Path, fmt: str, *, quality: int = 80,
                block_tiles: int = 8) -> int:
    """Render every level into ``files_dir/<level>/<col>_<row>.<ext>``; returns the tile count."""
    if fmt not in FORMATS:
        raise ValueError(f"Deep Zoom tile format must be one of {FORMATS}, got {fmt!r}")
    ext = "jpeg" if fmt == "jpeg" else "png"
    n = 0
    for level in pyramid.levels:
        out = files_dir / str(level)
        out.mkdir(parents=True)
        whole = pyramid.level_grid(level)
        for cols, rows in pyramid.blocks(level, block_tiles):
            bx0, by0, _, _ = pyramid.tile_box(level, cols[0], rows[0])
            _, _, bx1, by1 = pyramid.tile_box(level, cols[-1], rows[-1])
            window = Grid(whole.downsample, bx1 - bx0, by1 - by0, bx0, by0)
            pixels = render(window)
            if pixels.shape[:2] != window.shape:
                raise ValueError(f"render returned {pixels.shape[:2]} for a window of {window.shape}")
            for row in rows:
                for col in cols:
                    x0, y0, x1, y1 = pyramid.tile_box(level, col, row)
                    tile = np.ascontiguousarray(pixels[y0 - by0 : y1 - by0, x0 - bx0 : x1 - bx0])
                    (out / f"{col}_{row}.{ext}").write_bytes(_encode(tile, fmt, quality))
                    n += 1
    return n


def write_dzi(directory: Path, name: str, pyramid: Pyramid, render: Render, fmt: str, *, quality: int = 80,
              block_tiles: int = 8) -> tuple[dict[str, Any], int]:
    """Write ``name.dzi`` and ``name_files/`` into ``directory`` (which the caller writes atomically);
    returns the inline descriptor, its ``Url`` relative to ``directory``, and the tile count."""
    n = write_tiles(pyramid, render, directory / f"{name}_files", fmt, quality=quality, block_tiles=block_tiles)
    (directory / f"{name}.dzi").write_text(pyramid.dzi_xml(fmt))
    source = pyramid.descriptor(fmt)
    source["Image"]["Url"] = f"{name}_files/"
    return source, n
