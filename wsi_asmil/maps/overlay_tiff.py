"""A zoomable heatmap: the overlay as a pyramidal tiled TIFF, rendered one TIFF tile at a time.

At 1 um/px a CAMELYON slide's overlay is 25k x 20k px (1.5 GB as RGB); no step here holds more
than one tile (plus a blur halo) of it. Each TIFF tile reads its own piece of the slide at the
level's resolution, paints the tiles that touch it and is JPEG-compressed as it streams out.

Levels halve the resolution until the longer side fits in 1024 px; they follow level 0 in the
main IFD chain (as Aperio files do) with resolution tags in centimetres, so OpenSlide, QuPath and
this package's ``Slide`` read the physical scale.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tifffile

from wsi_asmil.core.canvas import Grid, blend, blur_halo, colour_table, heat_window
from wsi_asmil.core.io import atomic_path
from wsi_asmil.slides.slide import Slide

TIFF_TILE = 512
SMALLEST_LEVEL = 1024


def level_mpps(width_um: float, height_um: float, mpp: float) -> list[float]:
    """Resolutions of the pyramid: ``mpp``, doubled until the longer side fits SMALLEST_LEVEL px."""
    levels = [mpp]
    while max(width_um, height_um) / levels[-1] > SMALLEST_LEVEL:
        levels.append(levels[-1] * 2)
    return levels


def _tiles(
    slide: Slide, grid: Grid, coords: np.ndarray, extent: float, values: np.ndarray,
    lut: np.ndarray, alpha: float, sigma_px: float, tissue: np.ndarray | None, tissue_ds: float | None,
) -> Iterator[np.ndarray]:
    """Row-major TIFF tiles of the overlay at ``grid``'s resolution, each TIFF_TILE square."""
    d = grid.downsample
    level_mpp = d * slide.mpp
    halo = blur_halo(sigma_px)
    x_end = coords[:, 0] + extent
    y_end = coords[:, 1] + extent
    for ty in range(0, grid.height, TIFF_TILE):
        band = (coords[:, 1] < (ty + TIFF_TILE + halo + 1) * d) & (y_end > (ty - halo - 1) * d)
        for tx in range(0, grid.width, TIFF_TILE):
            window = Grid(d, TIFF_TILE, TIFF_TILE, tx, ty)
            base = slide.read_at_mpp(int(round(tx * d)), int(round(ty * d)), level_mpp, TIFF_TILE)
            near = band & (coords[:, 0] < (tx + TIFF_TILE + halo + 1) * d) & (x_end > (tx - halo - 1) * d)
            if near.any():
                heat, show = heat_window(coords[near], extent, values[near], window, sigma_px=sigma_px,
                                         tissue=tissue, tissue_downsample=tissue_ds)
                base = blend(base, heat, show, lut, alpha)
            # Outside the slide (right and bottom edge tiles) is glass-white, not whatever was read.
            if tx + TIFF_TILE > grid.width or ty + TIFF_TILE > grid.height:
                base = base.copy()
                base[max(0, grid.height - ty):, :] = 255
                base[:, max(0, grid.width - tx):] = 255
            yield base


def write_overlay_tiff(
    path: str | Path, slide: Slide, coords: np.ndarray, extent: float, values: np.ndarray, style,
    mpp: float, tissue: np.ndarray | None = None, tissue_ds: float | None = None,
) -> list[tuple[int, int]]:
    """Write the pyramidal overlay atomically; returns the (width, height) of every level."""
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    w0, h0 = slide.dimensions
    lut = colour_table(style.cmap)
    sizes = []
    mpps = level_mpps(w0 * slide.mpp, h0 * slide.mpp, mpp)
    bigtiff = (w0 * slide.mpp / mpp) * (h0 * slide.mpp / mpp) * 3 > 2**31
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tw:
        for i, level_mpp in enumerate(mpps):
            grid = Grid.covering(w0, h0, level_mpp / slide.mpp)
            sigma = style.blur_um / level_mpp
            tw.write(
                _tiles(slide, grid, coords, extent, values, lut, style.alpha, sigma, tissue, tissue_ds),
                shape=(grid.height, grid.width, 3),
                dtype=np.uint8,
                tile=(TIFF_TILE, TIFF_TILE),
                photometric="rgb",
                compression="jpeg",
                compressionargs={"level": 85},
                resolution=(1e4 / level_mpp, 1e4 / level_mpp),
                resolutionunit="CENTIMETER",
                subfiletype=0 if i == 0 else 1,
                description=f"wsi-asmil attention overlay, {level_mpp:g} um/px" if i == 0 else None,
                metadata=None,
            )
            sizes.append((grid.width, grid.height))
    return sizes
