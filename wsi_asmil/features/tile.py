"""Tiling: a grid of fixed physical size over the slide, kept where the tissue mask says so.

A tile is ``tile_size`` pixels at ``target_mpp``; its level-0 extent is therefore
``tile_size * target_mpp / slide_mpp`` (a float: a 0.263 um/px slide gets 425.9 px, not 426 or
448), so two scanners give the same field of view. The grid and the tissue fractions are computed
with array operations over an integral image of the mask, never a Python loop over cells.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from wsi_asmil.core.args import add_slide_args, setup_logging
from wsi_asmil.core.io import write_image
from wsi_asmil.features import store
from wsi_asmil.slides.slide import Slide
from wsi_asmil.tissue.masks import mask_fractions, read_tissue_mask

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TileParams:
    """Tiling settings; each field is a key of config.yaml's ``tiling`` section."""

    target_mpp: float = 0.5
    tile_size: int = 224
    overlap: float = 0.0
    min_tissue_fraction: float = 0.5

    def tag(self) -> str:
        """The folder name that keeps outputs of different tilings side by side."""
        tag = f"{self.target_mpp:g}mpp_{self.tile_size}px"
        return tag + (f"_ov{self.overlap:g}" if self.overlap else "")


def grid_origins(extent_l0: float, stride_l0: float, length_l0: int) -> np.ndarray:
    """Level-0 start positions of every whole tile along one axis (float, not rounded)."""
    if extent_l0 > length_l0:
        return np.zeros(0)
    n = int(np.floor((length_l0 - extent_l0) / stride_l0 + 1e-9)) + 1
    return np.arange(n) * stride_l0


def tile_grid(
    mask: np.ndarray, mask_downsample: float, dimensions: tuple[int, int], mpp: float, params: TileParams
) -> tuple[np.ndarray, np.ndarray, float]:
    """All tiles with enough tissue: (coords (M,2) int64 level-0, tissue fraction (M,), extent)."""
    extent = params.tile_size * params.target_mpp / mpp
    stride = extent * (1.0 - params.overlap)
    xs = grid_origins(extent, stride, dimensions[0])
    ys = grid_origins(extent, stride, dimensions[1])
    gx, gy = np.meshgrid(xs, ys)
    gx, gy = gx.ravel(), gy.ravel()
    frac = mask_fractions(mask, mask_downsample, gx, gy, extent)
    keep = frac >= params.min_tissue_fraction if params.min_tissue_fraction > 0 else frac > 0
    coords = np.stack([np.round(gx[keep]), np.round(gy[keep])], axis=1).astype(np.int64)
    return coords.reshape(-1, 2), frac[keep].astype(np.float32), extent


def grid_qc(thumb: np.ndarray, downsample: float, coords: np.ndarray, extent: float) -> np.ndarray:
    """Thumbnail with kept tiles outlined, to check the grid by eye."""
    out = thumb.copy()
    side = max(1, int(round(extent / downsample)))
    for x, y in (coords / downsample).round().astype(int):
        cv2.rectangle(out, (x, y), (x + side - 1, y + side - 1), (30, 90, 220), 1)
    return out


def tile_slide(
    slide_path: str | Path,
    seg_dir: str | Path,
    out_store: str | Path,
    qc_path: str | Path,
    params: TileParams,
    mpp_override: float | None = None,
    mpp_fallback: float | None = None,
) -> dict[str, Any]:
    """Tile one slide and write its tiles store and grid QC image."""
    mask, mask_info = read_tissue_mask(Path(seg_dir) / "mask.png")
    with Slide(slide_path, mpp_override, mpp_fallback) as slide:
        coords, frac, extent = tile_grid(mask, mask_info["downsample"], slide.dimensions, slide.mpp, params)
        read_level = slide.best_level(params.target_mpp)
        attrs = {
            "slide_id": slide.slide_id,
            "mpp": slide.mpp,
            "mpp_source": slide.mpp_info.source,
            "slide_dimensions": list(slide.dimensions),
            "tile_extent": extent,
            "read_level": read_level,
            "read_downsample": slide.level_downsamples[read_level],
            **asdict(params),
        }
        thumb, ds = slide.thumbnail_at_mpp(mask_info["params"]["mpp"])
    if len(coords) == 0:
        log.warning("slide '%s': no tiles with tissue fraction >= %.2f", attrs["slide_id"], params.min_tissue_fraction)
    store.write_tiles(out_store, coords, frac, attrs)
    write_image(qc_path, grid_qc(thumb, ds, coords, extent))
    log.info(
        "slide '%s': %d tiles of %d px at %g um/px (level-0 extent %.1f px, read level %d)",
        attrs["slide_id"], len(coords), params.tile_size, params.target_mpp, extent, read_level,
    )
    return {**attrs, "n_tiles": len(coords)}


def main(argv: list[str] | None = None) -> None:
    d = TileParams()
    p = argparse.ArgumentParser(prog="python -m wsi_asmil.features.tile", description=__doc__)
    add_slide_args(p)
    p.add_argument("--seg-dir", required=True, help="output folder of the segment stage")
    p.add_argument("--out", required=True, help="tiles Zarr store to write")
    p.add_argument("--qc", required=True, help="grid QC image to write")
    p.add_argument("--target-mpp", type=float, default=d.target_mpp)
    p.add_argument("--tile-size", type=int, default=d.tile_size)
    p.add_argument("--overlap", type=float, default=d.overlap, help="fraction of a tile, 0 <= overlap < 1")
    p.add_argument("--min-tissue-fraction", type=float, default=d.min_tissue_fraction)
    args = p.parse_args(argv)
    setup_logging()
    params = TileParams(args.target_mpp, args.tile_size, args.overlap, args.min_tissue_fraction)
    tile_slide(args.slide, args.seg_dir, args.out, args.qc, params, args.slide_mpp, args.mpp_fallback)


if __name__ == "__main__":
    main()
