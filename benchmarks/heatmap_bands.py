"""Seconds and peak memory of painting a CAMELYON-sized heatmap canvas in bands or in one pass.

    python benchmarks/heatmap_bands.py                       # 4 um/px, overlap 0.5
    python benchmarks/heatmap_bands.py --mpp 2 4 8 --overlap 0 0.5 0.75

The canvas of a 100,096 x 80,128 px slide at 0.25 um/px (25 x 20 mm), tissue everywhere, 224-px
tiles at 0.5 um/px on the tiling's grid at each overlap, random scores. ``wsi_asmil.maps.heatmap.render``
paints it once with its default band size and once as a single band (the whole canvas at once, as
before banding). Peak memory is traced by ``tracemalloc`` (NumPy's allocations, beyond the canvas
itself, which both share); seconds are the process's CPU time, steadier than wall time on a shared
machine.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np

from wsi_asmil.features.tile import TileParams, tile_grid
from wsi_asmil.maps.heatmap import BAND_PIXELS, render

WIDTH, HEIGHT, MPP = 100_096, 80_128, 0.25


def measure(mpp: float, overlap: float, band_pixels: int) -> tuple[int, float, float]:
    """(tiles, CPU seconds, peak MiB beyond the thumbnail) of one render."""
    mask = np.ones((HEIGHT // 64, WIDTH // 64), bool)
    coords, _, extent = tile_grid(mask, 64.0, (WIDTH, HEIGHT), MPP, TileParams(0.5, 224, overlap, 0.5))
    values = np.random.default_rng(0).random(len(coords))
    ds = mpp / MPP
    thumb = np.zeros((int(np.ceil(HEIGHT / ds)), int(np.ceil(WIDTH / ds)), 3), np.uint8)
    tracemalloc.start()
    start = time.process_time()
    render(thumb, ds, coords, extent, values, "viridis", 0.5, band_pixels=band_pixels)
    seconds = time.process_time() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return len(coords), seconds, peak / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mpp", type=float, nargs="+", default=[4.0])
    p.add_argument("--overlap", type=float, nargs="+", default=[0.5])
    args = p.parse_args()
    print("| um/px | canvas px | overlap | tiles | banded: CPU s, peak MiB | one pass: CPU s, peak MiB |")
    print("|---|---|---|---|---|---|")
    for mpp in args.mpp:
        w, h = int(np.ceil(WIDTH * MPP / mpp)), int(np.ceil(HEIGHT * MPP / mpp))
        for overlap in args.overlap:
            n, s_band, m_band = measure(mpp, overlap, BAND_PIXELS)
            _, s_one, m_one = measure(mpp, overlap, w * h)
            print(f"| {mpp:g} | {w:,} x {h:,} | {overlap:g} | {n:,} | {s_band:.1f}, {m_band:.0f} | {s_one:.1f}, {m_one:.0f} |")


if __name__ == "__main__":
    main()
