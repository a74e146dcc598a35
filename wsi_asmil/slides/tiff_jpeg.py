"""Direct reads of a JPEG-tiled TIFF pyramid level: the fast path of feature extraction.

OpenSlide's ``read_region`` costs far more than the JPEG decode it wraps (on the 16-core GPU
machine it caps near 4k tiles/s where the cores decode about 32k JPEG tiles/s). For the formats
that are plain tiled TIFF underneath (Aperio SVS, generic tiled TIFF) this module reads a level's
own compressed tiles by their byte offsets and decodes them with OpenCV, caching decoded tiles so
neighbouring reads in slide order decode each file tile about once.

It is only a faster route to the same pixels: :meth:`JpegTiledLevel.find` accepts a level only when
the file's tile decoded here equals OpenSlide's pixels for the same region, so a colour-space or
table quirk of some scanner falls back to OpenSlide instead of producing different features.
Everything else (MRXS, NDPI, DICOM, non-JPEG TIFF) always uses OpenSlide.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from pathlib import Path

import cv2
import numpy as np
import tifffile

log = logging.getLogger(__name__)

_JPEG = 7
_PHOTOMETRIC_RGB = 2
_PHOTOMETRIC_YCBCR = 6
#: An Adobe APP14 segment with transform 0: tells libjpeg the three components are R, G, B.
#: TIFF says so with Photometric=RGB, which a bare JPEG stream cannot carry (Aperio writes RGB
#: JPEG tiles without any marker, so a decoder left alone would treat them as YCbCr).
_ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"
_SOI = b"\xff\xd8"


class JpegTiledLevel:
    """One level of a JPEG-tiled TIFF, read in level pixels with a small decoded-tile cache.

    The file descriptor is opened lazily and per process, so an instance can be pickled into
    DataLoader workers, each of which then reads with its own descriptor.
    """

    def __init__(
        self,
        path: str | Path,
        size: tuple[int, int],
        tile: tuple[int, int],
        offsets: np.ndarray,
        counts: np.ndarray,
        header: bytes,
        cache_tiles: int = 256,
    ) -> None:
        self.path = str(path)
        self.width, self.height = size
        self.tile_w, self.tile_h = tile
        self.cols = -(-self.width // self.tile_w)
        self.offsets = offsets
        self.counts = counts
        self.header = header
        self.cache_tiles = cache_tiles
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._fd: int | None = None
        self._pid = -1

    @classmethod
    def find(cls, path: str | Path, level_size: tuple[int, int]) -> "JpegTiledLevel | None":
        """The TIFF page holding a level of ``level_size`` (w, h) as 8-bit RGB JPEG tiles, or None."""
        try:
            with tifffile.TiffFile(path) as tf:
                for page in tf.pages:
                    if not isinstance(page, tifffile.TiffPage) or not page.is_tiled:
                        continue
                    if (page.imagewidth, page.imagelength) != tuple(level_size):
                        continue
                    if (
                        page.compression != _JPEG
                        or page.photometric not in (_PHOTOMETRIC_RGB, _PHOTOMETRIC_YCBCR)
                        or page.samplesperpixel != 3
                        or page.bitspersample != 8
                        or page.planarconfig != 1
                        or page.imagedepth != 1
                    ):
                        return None
                    tables = bytes(page.jpegtables or b"")
                    # Stream = SOI [+ Adobe RGB marker] [+ tables without SOI/EOI] + tile without SOI.
                    header = _SOI
                    if page.photometric == _PHOTOMETRIC_RGB:
                        header += _ADOBE_RGB
                    if tables:
                        header += tables[2:-2]
                    return cls(
                        path,
                        (page.imagewidth, page.imagelength),
                        (page.tilewidth, page.tilelength),
                        np.asarray(page.dataoffsets, dtype=np.int64),
                        np.asarray(page.databytecounts, dtype=np.int64),
                        header,
                    )
        except (tifffile.TiffFileError, OSError, ValueError):
            return None
        return None

    def _descriptor(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd = os.open(self.path, os.O_RDONLY)
            self._pid = os.getpid()
            self._cache.clear()
        return self._fd

    def decode(self, row: int, col: int) -> np.ndarray:
        """The file tile at (row, col) as RGB uint8 (tile_h, tile_w, 3); an absent tile is white."""
        key = row * self.cols + col
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        count = int(self.counts[key])
        if count == 0:
            rgb = np.full((self.tile_h, self.tile_w, 3), 255, dtype=np.uint8)
        else:
            data = os.pread(self._descriptor(), count, int(self.offsets[key]))
            stream = np.frombuffer(self.header + data[2:], dtype=np.uint8)
            bgr = cv2.imdecode(stream, cv2.IMREAD_COLOR)
            if bgr is None or bgr.shape[:2] != (self.tile_h, self.tile_w):
                raise ValueError(f"{self.path}: JPEG tile {key} (row {row}, col {col}) cannot be decoded")
            rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        self._cache[key] = rgb
        if len(self._cache) > self.cache_tiles:
            self._cache.popitem(last=False)
        return rgb

    def read(self, x: int, y: int, width: int, height: int) -> np.ndarray:
        """RGB uint8 (height, width, 3) at level pixel (x, y); outside the level is white (glass)."""
        out = np.full((height, width, 3), 255, dtype=np.uint8)
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, self.width), min(y + height, self.height)
        if x0 >= x1 or y0 >= y1:
            return out
        self._descriptor()
        for row, col in self.tiles_under(x0, y0, x1 - x0, y1 - y0):
            tx, ty = col * self.tile_w, row * self.tile_h
            tile = self.decode(row, col)
            ax, ay = max(x0, tx), max(y0, ty)
            bx, by = min(x1, tx + self.tile_w), min(y1, ty + self.tile_h)
            out[ay - y : by - y, ax - x : bx - x] = tile[ay - ty : by - ty, ax - tx : bx - tx]
        return out

    def tiles_under(self, x: int, y: int, width: int, height: int) -> list[tuple[int, int]]:
        """(row, col) of every file tile a region inside the level overlaps, in file order."""
        rows = range(y // self.tile_h, (y + height - 1) // self.tile_h + 1)
        cols = range(x // self.tile_w, (x + width - 1) // self.tile_w + 1)
        return [(r, c) for r in rows for c in cols]

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None
        self._cache.clear()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_fd=None, _pid=-1, _cache=OrderedDict())
        return state
