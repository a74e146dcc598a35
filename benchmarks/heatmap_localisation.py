"""Localisation of the training grid's scores and of the dense heatmap grid, per model, against truth.

    python benchmarks/heatmap_localisation.py RUN_DIR                     # e.g. results/ of the demo
    python benchmarks/heatmap_localisation.py RUN_DIR --draw-mpp 2 4 8    # and the cost of drawing

RUN_DIR is a finished run (``snakemake``'s out_dir) with localisation truth (the demo always has it)
and, for the dense grid, the drawn models' ``heatmaps/<model>/scores_<tiling>/`` of
``heatmap.overlap``. Nothing in RUN_DIR is written. For each model and grid it prints the means over
the slides with tumour of:

* tile level (``wsi_asmil.maps.localisation``, the numbers the report gives): Dice of the Otsu-selected
  tiles' union and of the top 10 %, tile AUC (tiles at least half tumour against the rest), and the
  share of attention on tumour;
* pixel level, the map as drawn: every pixel of the truth mask's grid (``heatmap.localisation.mpp``)
  that a tile covers takes the per-pixel mean of M x weight of its tiles (``heatmap.normalize:
  uniform`` before the log); pixel AUC of that map against the truth, and the Dice of its Otsu
  threshold over the covered pixels.

On the training grid a pixel has one tile, so its pixel map is that tile's score; on a grid of
overlap o about (1 - o)^-2 tiles average into each pixel. With ``--draw-mpp`` it also times
``wsi_asmil.maps.heatmap.draw_slide`` (PNG with tissue clip, GeoJSON and gallery) on the first
``--draw-slides`` slides at each resolution, on both grids, in a temporary folder, and reports
seconds per slide and the overlay's size. Timings on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from wsi_asmil.core.canvas import Grid, mean_values
from wsi_asmil.maps.heatmap import Style, draw_slide, load_scores
from wsi_asmil.maps.localisation import LocalisationParams, dice_iou, localise_model, otsu_threshold
from wsi_asmil.tissue.masks import read_tumour_mask

TILE_METRICS = {"dice_otsu": "tile Dice (Otsu)", "dice_topq": "tile Dice (top 10%)", "tile_auc": "tile AUC",
                "attention_in_tumour": "attention on tumour"}


def pixel_metrics(coords: np.ndarray, extent: float, scores: np.ndarray, truth: np.ndarray, downsample: float) -> dict[str, float]:
    """Pixel AUC and Otsu Dice of the per-pixel mean of M x weight on the truth's grid."""
    from sklearn.metrics import roc_auc_score

    grid = Grid(downsample, truth.shape[1], truth.shape[0])
    heat, covered = mean_values(coords, extent, scores * len(scores), grid)
    values, positive = heat[covered], truth[covered]
    auc = float(roc_auc_score(positive, values)) if 0 < positive.sum() < len(positive) else math.nan
    found = np.zeros_like(truth)
    found[covered] = values > otsu_threshold(values)
    return {"pixel_auc": auc, "pixel_dice_otsu": dice_iou(found, truth)[0]}


def grid_table(run: Path, model: str, scores_dir: Path, grid: str) -> pd.DataFrame:
    """Per-slide tile and pixel metrics of one model's scores folder."""
    truth = sorted((run / "localisation" / "truth").glob("*.png"))
    scores = sorted(scores_dir.glob("*_scores.json"))
    table = localise_model(scores, truth, LocalisationParams(), model)
    pixel = []
    for sid in table["slide_id"]:
        coords, s, meta = load_scores(scores_dir / f"{sid}_scores.csv")
        mask, side = read_tumour_mask(run / "localisation" / "truth" / f"{sid}.png",
                                      run / "localisation" / "truth" / f"{sid}.json")
        pixel.append(pixel_metrics(coords, float(meta["tile_extent"]), s, mask, float(side["downsample"]))
                     if mask.any() else {"pixel_auc": math.nan, "pixel_dice_otsu": math.nan})
    table = pd.concat([table.reset_index(drop=True), pd.DataFrame(pixel)], axis=1)
    table.insert(1, "grid", grid)
    return table


def draw_cost(run: Path, model: str, scores_dir: Path, mpps: list[float], n_slides: int) -> list[dict]:
    """Seconds per slide of the whole drawing step at each resolution, and the overlay's size."""
    rows = []
    ids = sorted(p.name.removesuffix("_scores.csv") for p in scores_dir.glob("*_scores.csv"))[:n_slides]
    with tempfile.TemporaryDirectory() as tmp:
        for mpp in mpps:
            start, shapes, tiles = time.perf_counter(), [], 0
            for sid in ids:
                out = Path(tmp) / sid
                info = draw_slide(run / "demo" / "slides" / f"{sid}.svs", scores_dir / f"{sid}_scores.csv",
                                  out.with_suffix(".png"), out_geojson=out.with_suffix(".geojson"),
                                  out_gallery=Path(f"{out}_topk.jpg"), style=Style(), mpp=mpp,
                                  tissue_mask=run / "segment" / sid / "mask.png")
                shapes.append(info["shape"][:2])
                tiles += info["n_tiles"]
            seconds = (time.perf_counter() - start) / max(1, len(ids))
            h, w = np.mean(shapes, axis=0)
            rows.append({"model": model, "grid": scores_dir.name, "mpp": mpp, "tiles/slide": tiles / max(1, len(ids)),
                         "overlay px": f"{w:.0f} x {h:.0f}", "s/slide": round(seconds, 3)})
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="a finished run's out_dir (read only)")
    p.add_argument("--models", nargs="*", default=None, help="default: every model with scores")
    p.add_argument("--draw-mpp", type=float, nargs="*", default=[], help="time drawing at these um/px")
    p.add_argument("--draw-slides", type=int, default=4, help="slides drawn per timing")
    args = p.parse_args(argv)
    run = args.run
    models = args.models or sorted(d.parent.name for d in (run / "heatmaps").glob("*/scores"))
    if not models:
        sys.exit(f"{run}: no heatmaps/<model>/scores folders (not a finished run?)")
    tables, costs = [], []
    for model in models:
        for scores_dir in [run / "heatmaps" / model / "scores", *sorted((run / "heatmaps" / model).glob("scores_*"))]:
            grid = "training" if scores_dir.name == "scores" else scores_dir.name.removeprefix("scores_")
            tables.append(grid_table(run, model, scores_dir, grid))
            if args.draw_mpp:
                costs += draw_cost(run, model, scores_dir, args.draw_mpp, args.draw_slides)
    table = pd.concat(tables, ignore_index=True)
    tumour = table[table["has_tumour"].astype(bool)]
    columns = {"n_tiles": "tiles/slide", **TILE_METRICS, "pixel_auc": "pixel AUC", "pixel_dice_otsu": "pixel Dice (Otsu)"}
    summary = tumour.groupby(["model", "grid"], sort=False)[list(columns)].mean().rename(columns=columns)
    summary.insert(0, "slides", tumour.groupby(["model", "grid"], sort=False).size())
    print(f"Localisation on {run} (means over slides with tumour; pixel metrics on the truth grid)\n")
    print(summary.round(3).reset_index().to_markdown(index=False))
    if costs:
        print("\nDrawing cost (draw_slide: PNG with tissue clip, GeoJSON, gallery; noisy on a shared machine)\n")
        print(pd.DataFrame(costs).to_markdown(index=False))


if __name__ == "__main__":
    main()
