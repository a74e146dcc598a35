"""Whole-slide reading: the one place that knows a slide's pyramid, its mpp and how to read it.

Everything downstream speaks microns per pixel (mpp), never pyramid indices or magnifications,
so a 0.263 um/px scanner and a 0.25 um/px scanner give the same physical field of view.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import openslide

#: Extensions discovered as slides in a slides directory; a DICOM slide is a folder of .dcm files.
SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".svslide")

#: A level counts as "at" the target resolution when within this relative tolerance, so a 0.2501
#: um/px level serves 0.25 um/px requests instead of forcing a read of the level above.
MPP_TOLERANCE = 0.02

#: Side (level pixels) of the pieces a thumbnail block is re-read in when the block holds an
#: undecodable tile: the common TIFF tile size, so each piece touches one tile.
PATCHWORK_PIECE = 256

log = logging.getLogger(__name__)

class SlideError(RuntimeError):
    """A slide cannot be used; the message names the slide and what to do."""


class RegionReadError(SlideError):
    """One region of an otherwise readable slide cannot be decoded (a corrupt JPEG tile, a
    truncated strip). The slide's handle has been reopened, so the next read works."""

    def __init__(self, message: str, level: int, x0: int, y0: int, width: int, height: int) -> None:
        super().__init__(message, level, x0, y0, width, height)  # all in args: picklable
        self.level, self.x0, self.y0, self.width, self.height = level, x0, y0, width, height

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class MppSource:
    """Where a slide's mpp came from, recorded in every store for provenance."""

    mpp: float
    source: str


def slide_id_of(path: str | os.PathLike[str]) -> str:
    """The slide id is the file name without its slide extension (DICOM: the folder name)."""
    p = Path(path)
    return p.name if p.is_dir() else p.stem


def _mpp_from_properties(props: Mapping[str, str]) -> float | None:
    for key in (openslide.PROPERTY_NAME_MPP_X, openslide.PROPERTY_NAME_MPP_Y):
        value = props.get(key)
        if value is not None:
            try:
                mpp = float(value)
            except ValueError:
                continue
            if mpp > 0 and math.isfinite(mpp):
                return mpp
    return None


def _mpp_from_tiff_resolution(props: Mapping[str, str]) -> float | None:
    """TIFF XResolution with ResolutionUnit centimetre (or inch) gives pixels per unit length."""
    res = props.get("tiff.XResolution")
    unit = props.get("tiff.ResolutionUnit")
    if res is None or unit is None:
        return None
    try:
        px_per_unit = float(res)
    except ValueError:
        return None
    if px_per_unit <= 0:
        return None
    um_per_unit = {"centimeter": 1e4, "inch": 25400.0}.get(unit)
    if um_per_unit is None:
        return None
    mpp = um_per_unit / px_per_unit
    # A resolution of 1 px/unit (or 72/96 dpi) is a writer's default, not a measurement.
    return mpp if 0.05 <= mpp <= 50 else None


class Slide:
    """An open whole-slide image with physical-size-aware reads.

    ``mpp_override`` (the label table's ``mpp`` column) and ``mpp_fallback`` (the config's
    ``mpp_fallback``) are consulted only when the file itself carries no resolution.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        mpp_override: float | None = None,
        mpp_fallback: float | None = None,
    ) -> None:
        self.path = Path(path)
        self.slide_id = slide_id_of(self.path)
        #: Level-0 boxes ``(x0, y0, width, height)`` that thumbnails filled as background because
        #: they could not be decoded; empty for a healthy slide.
        self.unreadable_regions: list[tuple[int, int, int, int]] = []
        if not self.path.exists():
            raise SlideError(f"slide '{self.slide_id}': file {self.path} does not exist")
        if self.path.is_file() and self.path.stat().st_size == 0:
            raise SlideError(f"slide '{self.slide_id}': file {self.path} is empty (0 bytes)")
        try:
            self._osr = self._open()
        except (openslide.OpenSlideError, ValueError, OSError) as exc:
            raise SlideError(
                f"slide '{self.slide_id}': OpenSlide cannot read {self.path} ({exc}); "
                "the file is truncated, corrupt or not a supported slide format"
            ) from exc
        self.mpp_info = self._resolve_mpp(mpp_override, mpp_fallback)

    def _open(self) -> openslide.OpenSlide:
        return openslide.OpenSlide(str(self.path))

    def reopen(self) -> None:
        """A fresh OpenSlide handle: after a failed decode OpenSlide answers every later read of
        the same handle with the same error, so a handle is reopened after each failure."""
        try:
            self._osr.close()
        except Exception:  # the old handle is in an error state; closing it may fail too
            pass
        self._osr = self._open()

    def _resolve_mpp(self, override: float | None, fallback: float | None) -> MppSource:
        props = dict(self._osr.properties)
        mpp = _mpp_from_properties(props)
        if mpp is not None:
            return MppSource(mpp, "openslide")
        mpp = _mpp_from_tiff_resolution(props)
        if mpp is not None:
            return MppSource(mpp, "tiff-resolution")
        if override is not None and not (isinstance(override, float) and math.isnan(override)):
            return MppSource(float(override), "label-table")
        if fallback is not None:
            return MppSource(float(fallback), "config.mpp_fallback")
        raise SlideError(
            f"slide '{self.slide_id}': no microns-per-pixel in {self.path} (no OpenSlide mpp "
            "property, no TIFF resolution tags). Supply it either as an 'mpp' column for this "
            "slide in the label table, or as 'mpp_fallback' in config.yaml."
        )

    @property
    def mpp(self) -> float:
        return self.mpp_info.mpp

    @property
    def dimensions(self) -> tuple[int, int]:
        return self._osr.dimensions

    @property
    def level_count(self) -> int:
        return self._osr.level_count

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self._osr.level_dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._osr.level_downsamples

    @property
    def vendor(self) -> str | None:
        return self._osr.properties.get(openslide.PROPERTY_NAME_VENDOR)

    def level_mpp(self, level: int) -> float:
        return self.mpp * self.level_downsamples[level]

    def best_level(self, target_mpp: float) -> int:
        """The coarsest level that is still at least as fine as ``target_mpp`` (within tolerance).

        Reading coarser than the target would need upsampling, which invents detail; reading
        much finer wastes decode time, so we take the closest level from the fine side.
        """
        limit = target_mpp * (1 + MPP_TOLERANCE)
        best = 0
        for level in range(self.level_count):
            if self.level_mpp(level) <= limit:
                best = level
        return best

    def read_rgb(self, level: int, x0: int, y0: int, width: int, height: int) -> np.ndarray:
        """RGB uint8 region at a pyramid level; ``x0, y0`` are level-0 coordinates.

        Transparent pixels (outside the scanned area) are composited on white, as glass is.
        A region that cannot be decoded raises :class:`RegionReadError` naming the slide, the
        level and the level-0 box; the handle is reopened so the next read works.
        """
        try:
            region = self._osr.read_region((int(x0), int(y0)), level, (width, height))
        except openslide.OpenSlideError as exc:
            self.reopen()
            ds = self.level_downsamples[level]
            raise RegionReadError(
                f"slide '{self.slide_id}': cannot decode level {level} region at level-0 "
                f"({int(x0)}, {int(y0)}) size {width}x{height} of {self.path} ({exc})",
                level, int(x0), int(y0), int(round(width * ds)), int(round(height * ds)),
            ) from exc
        rgba = np.asarray(region)
        rgb = rgba[..., :3].copy()
        alpha = rgba[..., 3]
        if (alpha < 255).any():
            a = alpha[..., None].astype(np.float32) / 255.0
            rgb = (rgb * a + 255.0 * (1 - a)).astype(np.uint8)
        return rgb

    def read_at_mpp(
        self, x0: int, y0: int, target_mpp: float, size: int | tuple[int, int], level: int | None = None
    ) -> np.ndarray:
        """Exactly ``size`` pixels at ``target_mpp`` starting at level-0 ``(x0, y0)``.

        Reads at the best level and resizes with area interpolation, so the field of view is the
        physical one asked for whatever the scanner's native resolution.
        """
        out_w, out_h = (size, size) if isinstance(size, int) else size
        level = self.best_level(target_mpp) if level is None else level
        scale = target_mpp / self.level_mpp(level)
        read_w = max(1, int(round(out_w * scale)))
        read_h = max(1, int(round(out_h * scale)))
        region = self.read_rgb(level, x0, y0, read_w, read_h)
        if (read_w, read_h) == (out_w, out_h):
            return region
        interp = cv2.INTER_AREA if scale > 1 else cv2.INTER_LINEAR
        return cv2.resize(region, (out_w, out_h), interpolation=interp)

    def thumbnail_at_mpp(self, target_mpp: float, block: int = 1024) -> tuple[np.ndarray, float]:
        """The whole slide at (about) ``target_mpp``; returns the image and its exact downsample.

        Built block by block from the best level, so memory is bounded by the output image even
        for a single-level gigapixel TIFF. The output size is rounded to whole pixels, so the exact
        level-0 downsample is returned for mapping pixels back to level-0 coordinates.
        """
        w0, h0 = self.dimensions
        ds = target_mpp / self.mpp
        out_w, out_h = max(1, int(round(w0 / ds))), max(1, int(round(h0 / ds)))
        level = self.best_level(target_mpp)
        lw, lh = self.level_dimensions[level]
        sx, sy = lw / out_w, lh / out_h
        out = np.empty((out_h, out_w, 3), dtype=np.uint8)
        for oy in range(0, out_h, block):
            bh = min(block, out_h - oy)
            ly0, ly1 = int(round(oy * sy)), min(lh, max(int(round((oy + bh) * sy)), int(round(oy * sy)) + 1))
            for ox in range(0, out_w, block):
                bw = min(block, out_w - ox)
                lx0 = int(round(ox * sx))
                lx1 = min(lw, max(int(round((ox + bw) * sx)), lx0 + 1))
                region = self._read_rgb_patchwork(level, lx0, ly0, lx1 - lx0, ly1 - ly0)
                out[oy : oy + bh, ox : ox + bw] = cv2.resize(
                    region, (bw, bh), interpolation=cv2.INTER_AREA
                )
        return out, w0 / out_w

    def _read_rgb_patchwork(self, level: int, lx0: int, ly0: int, width: int, height: int) -> np.ndarray:
        """A region given in *level* pixels; where it cannot be decoded, the undecodable pieces
        (on the level's 256-px grid, the usual TIFF tile size) are filled white (background) and
        recorded in :attr:`unreadable_regions`, so one corrupt tile does not lose the slide."""
        ds = self.level_downsamples[level]
        try:
            return self.read_rgb(level, int(lx0 * ds), int(ly0 * ds), width, height)
        except RegionReadError:
            pass
        out = np.full((height, width, 3), 255, dtype=np.uint8)
        piece = PATCHWORK_PIECE
        for py in range(ly0 - ly0 % piece, ly0 + height, piece):
            for px in range(lx0 - lx0 % piece, lx0 + width, piece):
                ax, ay = max(px, lx0), max(py, ly0)
                bx, by = min(px + piece, lx0 + width), min(py + piece, ly0 + height)
                try:
                    region = self.read_rgb(level, int(ax * ds), int(ay * ds), bx - ax, by - ay)
                except RegionReadError as exc:
                    box = (exc.x0, exc.y0, exc.width, exc.height)
                    self.unreadable_regions.append(box)
                    log.warning(
                        "slide '%s': level %d region at level-0 (%d, %d) size %dx%d cannot be "
                        "decoded; treated as background", self.slide_id, level, *box,
                    )
                    continue
                out[ay - ly0 : by - ly0, ax - lx0 : bx - lx0] = region
        return out

    def close(self) -> None:
        self._osr.close()

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def discover_slides(slides_dir: str | os.PathLike[str]) -> tuple[dict[str, Path], list[Path]]:
    """Map slide id -> path for every slide in ``slides_dir``; also return the files ignored.

    A folder holding .dcm files is one DICOM slide. Duplicate ids (``a.svs`` and ``a.tif``) are an
    error because every output is keyed by the id.
    """
    root = Path(slides_dir)
    if not root.is_dir():
        raise SlideError(f"slides_dir {root} is not a directory")
    found: dict[str, Path] = {}
    ignored: list[Path] = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            if any(f.suffix.lower() == ".dcm" for f in entry.iterdir()):
                candidate = entry
            else:
                continue
        elif entry.suffix.lower() in SLIDE_EXTENSIONS:
            candidate = entry
        else:
            ignored.append(entry)
            continue
        sid = slide_id_of(candidate)
        if sid in found:
            raise SlideError(
                f"slide id '{sid}' is used by two files in {root}: {found[sid].name} and "
                f"{candidate.name}; rename one"
            )
        found[sid] = candidate
    braces = [sid for sid in found if "{" in sid or "}" in sid]
    if braces:
        # Snakemake reads braces in a path as a wildcard; any other character works.
        raise SlideError(
            f"slide id(s) with '{{' or '}}' in {root}: {', '.join(map(repr, braces))}; Snakemake reads "
            "braces in file names as wildcards: rename these files (and their label table rows)"
        )
    return found, ignored
