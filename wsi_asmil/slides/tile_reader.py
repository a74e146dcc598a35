"""Which reader a slide's tiles come through, decided once per slide, in one place.

:class:`~wsi_asmil.slides.slide.Slide` (OpenSlide) reads every format; :mod:`wsi_asmil.slides.tiff_jpeg` reads
the JPEG tiles of a plain tiled TIFF level directly, several times faster. The direct reader is only
a faster route to the same pixels, so a slide uses it only where its decode of a sample tile agrees
with OpenSlide's within :data:`DIRECT_READER_TOLERANCE`; anything else (another scanner's colour
quirk, a level that is not JPEG-tiled, MRXS, NDPI, DICOM) reads through OpenSlide. The choice is a
:class:`ReadPlan`, a small picklable value, and :class:`TileReader` carries it out inside each
worker process.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from wsi_asmil.slides.slide import RegionReadError, Slide
from wsi_asmil.slides.tiff_jpeg import JpegTiledLevel

log = logging.getLogger(__name__)

#: Mean absolute difference (8-bit levels) between 8 x 8-pixel block means of the direct JPEG
#: reader's tile and OpenSlide's, above which the direct reader is not trusted for a slide. A wrong
#: colour space or table differs by tens of levels. Block means, because where a level's downsample
#: is not an integer (4.0002 on many scanners) OpenSlide places a level-0 origin at a fractional
#: level pixel and resamples, while the direct reader starts at the nearest whole pixel: up to half
#: a pixel apart, which moves single pixels of textured tissue by several levels but block means
#: by a fraction of one.
DIRECT_READER_TOLERANCE = 1.5

ReaderName = Literal["jpeg-direct", "openslide"]


@dataclass(frozen=True)
class ReadPlan:
    """How a slide's tiles are read: level, raw size at that level and the reader to use.

    The raw read covers the tile's physical field at the read level; the consumer resizes it to its
    own input size when the two differ, so both readers hand over identical pixels.
    """

    level: int
    downsample: float
    read_size: tuple[int, int]
    reader: ReaderName

    @classmethod
    def for_slide(
        cls, slide: Slide, coords: np.ndarray, field_mpp: float, size: int, level: int, reader: str
    ) -> "ReadPlan":
        """The plan for tiles of ``size`` px at ``field_mpp``; ``reader`` is ``auto`` or ``openslide``.

        ``auto`` tries the direct reader on the middle tile of ``coords`` against OpenSlide.
        """
        scale = field_mpp / slide.level_mpp(level)
        side = max(1, int(round(size * scale)))
        plan = cls(level, float(slide.level_downsamples[level]), (side, side), "openslide")
        if reader == "auto" and len(coords):
            direct = JpegTiledLevel.find(slide.path, slide.level_dimensions[level])
            if direct is not None and plan._agrees(direct, slide, coords[len(coords) // 2]):
                return cls(plan.level, plan.downsample, plan.read_size, "jpeg-direct")
        return plan

    def via_openslide(self) -> "ReadPlan":
        """The same plan through OpenSlide (benchmarks compare the two)."""
        return ReadPlan(self.level, self.downsample, self.read_size, "openslide")

    def _agrees(self, direct: JpegTiledLevel, slide: Slide, xy: np.ndarray) -> bool:
        try:
            ours = block_means(self.read_direct(direct, int(xy[0]), int(xy[1])))
            theirs = block_means(slide.read_rgb(self.level, int(xy[0]), int(xy[1]), *self.read_size))
        except (RegionReadError, ValueError, OSError) as exc:
            log.info("slide '%s': direct JPEG reads not used (%s)", slide.slide_id, exc)
            return False
        diff = float(np.abs(ours - theirs).mean())
        if diff > DIRECT_READER_TOLERANCE:
            log.warning(
                "slide '%s': direct JPEG decode differs from OpenSlide by %.1f levels on average; "
                "reading through OpenSlide", slide.slide_id, diff,
            )
            return False
        return True

    def read_direct(self, direct: JpegTiledLevel, x0: int, y0: int) -> np.ndarray:
        """The tile at level-0 ``(x0, y0)`` from the direct reader, starting at the nearest whole pixel."""
        lx, ly = int(round(x0 / self.downsample)), int(round(y0 / self.downsample))
        return direct.read(lx, ly, *self.read_size)


def block_means(rgb: np.ndarray, block: int = 8) -> np.ndarray:
    """Means of ``block`` x ``block`` pixel blocks: the scale at which the two readers must agree."""
    h, w = (rgb.shape[0] // block) * block, (rgb.shape[1] // block) * block
    return rgb[:h, :w].reshape(h // block, block, w // block, block, 3).astype(np.float32).mean(axis=(1, 3))


class TileReader:
    """uint8 (h, w, 3) tiles of one slide by level-0 origin, through the plan's reader.

    Handles (OpenSlide, or the direct reader's file descriptor) open on the first read: they do not
    survive pickling, so each worker process opens its own.
    """

    def __init__(
        self,
        slide_path: str | Path,
        plan: ReadPlan,
        mpp_override: float | None = None,
        mpp_fallback: float | None = None,
    ) -> None:
        self.slide_path = str(slide_path)
        self.plan = plan
        self.mpp_override = mpp_override
        self.mpp_fallback = mpp_fallback
        self._slide: Slide | None = None
        self._direct: JpegTiledLevel | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_slide": None, "_direct": None}

    def _open(self) -> Slide:
        self._slide = Slide(self.slide_path, self.mpp_override, self.mpp_fallback)
        if self.plan.reader == "jpeg-direct":
            self._direct = JpegTiledLevel.find(self.slide_path, self._slide.level_dimensions[self.plan.level])
        return self._slide

    def read(self, x: int, y: int) -> np.ndarray:
        """The tile at level-0 ``(x, y)``; raises :class:`RegionReadError` naming the region when
        OpenSlide cannot decode it (a direct decode failure falls back to OpenSlide first)."""
        slide = self._slide or self._open()
        if self._direct is not None:
            try:
                return self.plan.read_direct(self._direct, x, y)
            except ValueError:
                pass  # let OpenSlide decide, and name the region, when the direct decode fails
        return slide.read_rgb(self.plan.level, x, y, *self.plan.read_size)
