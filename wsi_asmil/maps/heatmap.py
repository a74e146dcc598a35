"""Attention heatmaps: where in the slide the trained model looked, drawn unattended and memory-bounded.

Scores come from ``wsi_asmil.maps.scoring`` (one pass, shared with localisation and prediction); this
module only draws, and never imports torch. For one slide and one model it writes:

* ``<slide>.png``: the heat over the slide thumbnail, at ``mpp`` um/px (``max_edge`` caps the
  longer side). Tiles are averaged per pixel where they overlap, optionally blurred (``blur_um``)
  and clipped to the tissue mask; every other pixel is the thumbnail's, bit for bit. Scores of a
  denser tiling than training's (``heatmap.overlap``) give a finer map: each pixel is the mean of
  the (1 - overlap)^-2 tiles that cover it, so detail follows the stride, not the tile. The canvas
  is painted in bands of rows, so the working arrays stay small whatever the resolution.
* ``<slide>.geojson``: one QuPath tile per tile with ``attention``, ``attention_percentile`` and
  ``attention_x_M`` measurements (*Measure > Show measurement maps* colours them).
* ``<slide>_topk.jpg``: the k highest-scoring tiles at the tiling's resolution, ranked, with their
  scores and level-0 coordinates.
* optionally ``<slide>_overlay.tif``: a pyramidal tiled TIFF of the overlay at ``tiff_mpp`` that
  slide viewers zoom, rendered window by window (``wsi_asmil.maps.overlay_tiff``).

The canvas is the output image: memory follows the output size, never the slide's. ``--legend``
writes the colour bar that goes with a normalisation and colour map, labelled in its real units.

Normalisation for display (the same for every model, so comparisons are fair):

``uniform`` (the default)
    M x weight on a log scale centred on 1 (uniform attention): ``0.5 + log(M w) / (2 log R)``,
    clipped, with R = ``uniform_range``. Mid-colour is uniform attention, the top of the scale R
    times uniform or more, the bottom 1/R or less. It shows how concentrated the attention is: a
    flat model renders as one mid colour, and the scale means the same on every slide and model.
    M x w stays comparable on a denser tiling (a softmax over more tiles: M grows, w shrinks).
``rank``
    percentile within the slide (CLAM's convention): every slide uses the whole colour range,
    whatever the sharpness of the attention, so the top quarter of any slide is the top quarter
    of the colours even when the model barely prefers it.

The default colour map, viridis, is perceptually uniform (equal steps of value look like equal
steps of colour, and it stays ordered in grey and for colour-blind readers). Over H&E its blue to
green to yellow runs against the stain's pink and purple, and its darkest end is a blue-violet
rather than black, so low attention at ``alpha`` 0.5 still shows the tissue beneath.

A slide's outputs are one result: if drawing fails, the outputs this call already wrote are removed.
Out of memory (host memory: the canvas, the thumbnail, the TIFF's windows) becomes
:class:`HeatmapMemoryError`, naming the slide, its tiles, the overlay's size and the settings that
shrink it, as training's and feature extraction's out-of-memory errors do.
"""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from wsi_asmil.core.args import optional_float, setup_logging
from wsi_asmil.core.canvas import Grid, blend, blur_halo, colour_table, heat_window, tile_spans
from wsi_asmil.core.io import atomic_path, write_image
from wsi_asmil.core.memory import is_out_of_memory
from wsi_asmil.maps.scores import JSON_SUFFIX, read_scores, slide_id_of
from wsi_asmil.maps.tile_geojson import OBJECT_TYPES, write_tile_geojson
from wsi_asmil.slides.slide import Slide
from wsi_asmil.tissue.masks import read_tissue_mask

log = logging.getLogger(__name__)

NORMALIZE_MODES = ("rank", "uniform")
#: Output pixels painted at a time. A band's working arrays (counts, sums, means, masks and the
#: blend's float copies) cost about 70 bytes a pixel, so a CAMELYON-sized canvas at 4 um/px with
#: 158k dense tiles peaks near 150 MiB beside the image instead of 1.4 GiB in one pass
#: (benchmarks/heatmap_bands.py); the image itself is 3 bytes a pixel.
BAND_PIXELS = 1 << 20


class HeatmapMemoryError(RuntimeError):
    """Drawing a slide's heatmap does not fit in host memory; the message says what to change."""


def _memory_advice(mpp: float, out_mpp: float | None, max_edge: int | None, tiff_mpp: float | None) -> str:
    at = f"at {out_mpp:.3g} um/px" if out_mpp is not None else f"at heatmap.mpp {mpp:g} um/px or coarser"
    tiff = f"; the pyramidal TIFF's: raise heatmap.tiff_mpp (now {tiff_mpp:g}) or set it to null" if tiff_mpp else ""
    return (
        f"The overlay's memory follows its size {at}, not the slide's: raise heatmap.mpp (now {mpp:g}) or "
        f"set heatmap.max_edge (now {max_edge if max_edge else 'null'}; for example 8000){tiff}; or run fewer "
        "jobs at once (snakemake --cores, or more mem_mb per job on a cluster)"
    )


@dataclass(frozen=True)
class Style:
    """How values become colour: the same for every model of a run."""

    normalize: str = "uniform"
    cmap: str = "viridis"
    alpha: float = 0.5
    blur_um: float = 0.0
    clip_to_tissue: bool = True
    uniform_range: float = 10.0


def normalize(scores: np.ndarray, mode: str, uniform_range: float = 10.0) -> np.ndarray:
    """Display values in [0, 1] (see the module docstring for the two modes)."""
    scores = np.asarray(scores, dtype=np.float64)
    m = len(scores)
    if mode not in NORMALIZE_MODES:
        raise ValueError(f"heatmap.normalize must be one of {NORMALIZE_MODES}, got {mode!r}")
    if m == 0:
        return scores
    if mode == "rank":
        if m == 1:
            return np.ones(1)
        # Ties share their mean rank, so equal scores get equal colours.
        order = scores.argsort(kind="stable")
        ranks = np.empty(m)
        ranks[order] = np.arange(m)
        _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
        if (counts > 1).any():
            sums = np.bincount(inverse, weights=ranks)
            ranks = sums[inverse] / counts[inverse]
        return ranks / (m - 1)
    if uniform_range <= 1:
        raise ValueError(f"heatmap.uniform_range must be > 1, got {uniform_range}")
    with np.errstate(divide="ignore"):
        rel = np.log(np.maximum(scores * m, 0.0)) / (2.0 * math.log(uniform_range))
    return np.clip(0.5 + rel, 0.0, 1.0)


def render(
    thumb: np.ndarray,
    downsample: float,
    coords: np.ndarray,
    extent: float,
    values: np.ndarray,
    cmap: str,
    alpha: float,
    *,
    tissue: np.ndarray | None = None,
    tissue_downsample: float | None = None,
    blur_px: float = 0.0,
    grid: Grid | None = None,
    band_pixels: int = BAND_PIXELS,
) -> np.ndarray:
    """Blend colour-mapped tile values over ``thumb`` (the image of ``grid``, default the whole slide).

    Overlapping tiles are averaged per pixel; with ``tissue`` the heat shows only on tissue;
    ``blur_px`` is a Gaussian sigma in output pixels that mixes covered pixels only. Pixels without
    heat keep ``thumb``'s values exactly. The canvas is painted in bands of about ``band_pixels``
    pixels (with a blur halo, so bands join without seams and equal a single pass).
    """
    h, w = thumb.shape[:2]
    grid = grid or Grid(downsample, w, h)
    if grid.shape != (h, w):
        raise ValueError(f"thumbnail is {w}x{h} but the grid is {grid.width}x{grid.height}")
    out = np.array(thumb, dtype=np.uint8, copy=True)
    if len(values) == 0:
        return out
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    lut = colour_table(cmap)
    spans = tile_spans(coords, extent, grid)
    halo = blur_halo(blur_px)
    rows = max(1, band_pixels // w)
    for y in range(0, h, rows):
        band = Grid(grid.downsample, w, min(rows, h - y), grid.x0, grid.y0 + y)
        near = (spans[:, 1] < y + band.height + halo) & (spans[:, 3] > y - halo)
        if not near.any():
            continue
        heat, show = heat_window(coords[near], extent, values[near], band, sigma_px=blur_px,
                                 tissue=tissue, tissue_downsample=tissue_downsample)
        out[y : y + band.height] = blend(out[y : y + band.height], heat, show, lut, alpha)
    return out


def output_mpp(slide_size_um: tuple[float, float], mpp: float, max_edge: int | None) -> float:
    """The overlay resolution: ``mpp``, coarsened so the longer side is at most ``max_edge`` px."""
    if max_edge is None:
        return mpp
    return max(mpp, max(slide_size_um) / max_edge)


def measurements(scores: np.ndarray) -> dict[str, np.ndarray]:
    """The per-tile numbers exported to QuPath: raw, percentile within the slide, and x M."""
    return {
        "attention": scores,
        "attention_percentile": normalize(scores, "rank") * 100.0,
        "attention_x_M": scores * len(scores),
    }


def topk_gallery(slide: Slide, coords: np.ndarray, scores: np.ndarray, k: int, target_mpp: float, tile_size: int, columns: int = 4) -> np.ndarray:
    """The k highest-scoring tiles side by side, each captioned with rank, score and position."""
    order = np.argsort(-scores, kind="stable")[: max(0, k)]
    cell, bar = int(tile_size), 22
    if len(order) == 0:
        return np.full((bar, cell, 3), 255, np.uint8)
    cols = min(columns, len(order))
    rows = int(math.ceil(len(order) / cols))
    sheet = np.full((rows * (cell + bar), cols * cell, 3), 255, np.uint8)
    scale = max(0.3, min(0.45, cell / 560))
    for n, i in enumerate(order):
        r, c = divmod(n, cols)
        y, x = r * (cell + bar), c * cell
        sheet[y : y + cell, x : x + cell] = slide.read_at_mpp(int(coords[i, 0]), int(coords[i, 1]), target_mpp, cell)
        text = f"#{n + 1} {scores[i]:.4g} ({int(coords[i, 0])},{int(coords[i, 1])})"
        cv2.putText(sheet, text, (x + 3, y + cell + 15), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return sheet


def legend_ticks(mode: str, uniform_range: float = 10.0) -> tuple[list[float], list[str], str]:
    """Positions in [0, 1], labels and the axis title of the colour bar of ``mode``.

    ``uniform`` is labelled in its real unit, times the uniform weight 1/M: 1/R, 1/sqrt(R), 1,
    sqrt(R), R, the ends marked as bounds because values beyond them are clipped.
    """
    pos = [0.0, 0.25, 0.5, 0.75, 1.0]
    if mode == "rank":
        return pos, ["0", "25", "50", "75", "100"], "attention percentile within the slide"
    if mode == "uniform":
        r, root = uniform_range, math.sqrt(uniform_range)
        labels = [f"≤1/{r:.3g}×", f"1/{root:.3g}×", "1× uniform", f"{root:.3g}×", f"≥{r:.3g}×"]
        return pos, labels, "attention / uniform attention (M × weight, log scale)"
    raise ValueError(f"heatmap.normalize must be one of {NORMALIZE_MODES}, got {mode!r}")


def write_legend(path: str | Path, mode: str, cmap: str, uniform_range: float = 10.0) -> None:
    """A horizontal colour bar saying what the colours of a heatmap mean, in real units."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    pos, labels, title = legend_ticks(mode, uniform_range)
    lut = colour_table(cmap) / 255.0
    fig, ax = plt.subplots(figsize=(5.2, 0.9), dpi=120)
    ax.imshow(np.linspace(0, 1, 256)[None, :], aspect="auto", cmap=ListedColormap(lut), extent=(0, 1, 0, 1))
    ax.set_yticks([])
    ax.set_xticks(pos, labels)
    ax.set_xlabel(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png")
    plt.close(fig)


def load_scores(scores_csv: str | Path, scores_json: str | Path | None = None) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(coords (M, 2), scores (M,), scoring record) of a slide, read by ``wsi_asmil.maps.scores``."""
    scores = read_scores(scores_json or Path(scores_csv).with_name(f"{slide_id_of(scores_csv)}{JSON_SUFFIX}"))
    return scores.coords, scores.scores, scores.meta


def draw_slide(
    slide_path: str | Path,
    scores_csv: str | Path,
    out_image: str | Path,
    *,
    scores_json: str | Path | None = None,
    out_geojson: str | Path | None = None,
    out_gallery: str | Path | None = None,
    out_tiff: str | Path | None = None,
    style: Style = Style(),
    mpp: float = 4.0,
    max_edge: int | None = None,
    tissue_mask: str | Path | None = None,
    tissue_meta: str | Path | None = None,
    top_k: int = 8,
    object_type: str = "tile",
    tiff_mpp: float | None = None,
    mpp_override: float | None = None,
    mpp_fallback: float | None = None,
) -> dict[str, Any]:
    """Every output of one slide's heatmap; returns a small summary for the log.

    On any failure the outputs already written by this call are removed; out of memory raises
    :class:`HeatmapMemoryError` (see the module docstring).
    """
    coords, scores, meta = load_scores(scores_csv, scores_json)
    written: list[Path] = []  # outputs in place, removed if a later step fails
    overlay: dict[str, Any] = {}  # the overlay's size once known, for an out-of-memory message
    try:
        extent = float(meta["tile_extent"])
        values = normalize(scores, style.normalize, style.uniform_range)
        tissue = tissue_ds = None
        if style.clip_to_tissue and tissue_mask is not None:
            tissue, tissue_info = read_tissue_mask(tissue_mask, tissue_meta)
            tissue_ds = float(tissue_info["downsample"])
        with Slide(slide_path, mpp_override, mpp_fallback) as slide:
            w0, h0 = slide.dimensions
            out_mpp = output_mpp((w0 * slide.mpp, h0 * slide.mpp), mpp, max_edge)
            overlay.update(mpp=out_mpp, width=round(w0 * slide.mpp / out_mpp), height=round(h0 * slide.mpp / out_mpp))
            thumb, ds = slide.thumbnail_at_mpp(out_mpp)
            image = render(thumb, ds, coords, extent, values, style.cmap, style.alpha, tissue=tissue,
                           tissue_downsample=tissue_ds, blur_px=style.blur_um / (ds * slide.mpp))
            write_image(out_image, image)
            written.append(Path(out_image))
            if out_gallery is not None:
                target = float(meta["target_mpp"])
                size = int(meta["tile_size"])
                write_image(out_gallery, topk_gallery(slide, coords, scores, top_k, target, size))
                written.append(Path(out_gallery))
            if out_tiff is not None:
                from wsi_asmil.maps.overlay_tiff import write_overlay_tiff

                write_overlay_tiff(out_tiff, slide, coords, extent, values, style, tiff_mpp or out_mpp, tissue, tissue_ds)
                written.append(Path(out_tiff))
        if out_geojson is not None:
            write_tile_geojson(out_geojson, coords, extent, measurements(scores), object_type)
            written.append(Path(out_geojson))
    except BaseException as exc:
        for path in written:
            path.unlink(missing_ok=True)
        if not isinstance(exc, Exception) or not is_out_of_memory(exc):
            raise
        sid = meta["slide_id"]
        size = f", an overlay of {overlay['width']}x{overlay['height']} px" if overlay else ""
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        tiff = (tiff_mpp or overlay.get("mpp")) if out_tiff is not None else None
        raise HeatmapMemoryError(
            f"out of memory on the host drawing the heatmap of slide '{sid}', {len(scores)} tiles{size} "
            f"({exc.__class__.__name__}: {first}). {_memory_advice(mpp, overlay.get('mpp'), max_edge, tiff)}"
        ) from exc
    if len(scores) == 0:
        log.warning("slide '%s': no tiles, the heatmap is the bare thumbnail", meta.get("slide_id"))
    log.info("slide '%s' (%s): %d tiles, overlay %dx%d px at %.3g um/px",
             meta.get("slide_id"), meta.get("model"), len(scores), image.shape[1], image.shape[0], ds * slide.mpp)
    return {"n_tiles": len(scores), "shape": image.shape, "downsample": ds}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m wsi_asmil.maps.heatmap", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slide", default=None, help="slide file (or DICOM folder)")
    p.add_argument("--slide-mpp", type=optional_float, default=None, help="per-slide mpp override (label table)")
    p.add_argument("--mpp-fallback", type=optional_float, default=None, help="config mpp_fallback")
    p.add_argument("--scores", help="<slide>_scores.csv from wsi_asmil.maps.scoring (the .json beside it)")
    p.add_argument("--out", help="overlay PNG to write")
    p.add_argument("--geojson", default=None, help="QuPath tile GeoJSON to write")
    p.add_argument("--gallery", default=None, help="top-k tile gallery (JPEG/PNG) to write")
    p.add_argument("--tiff", default=None, help="pyramidal TIFF overlay to write (with --tiff-mpp)")
    p.add_argument("--tissue-mask", default=None, help="segment mask.png (mask.json beside it)")
    p.add_argument("--legend", default=None, help="write the colour-bar legend here (alone, or with a slide)")
    p.add_argument("--mpp", type=float, default=4.0, help="overlay resolution in um/px")
    p.add_argument("--max-edge", type=optional_float, default=None, help="cap on the overlay's longer side (px)")
    p.add_argument("--normalize", default="uniform", choices=NORMALIZE_MODES)
    p.add_argument("--uniform-range", type=float, default=10.0, help="R of the uniform scale (R x uniform = top)")
    p.add_argument("--cmap", default="viridis")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--blur-um", type=float, default=0.0, help="Gaussian blur sigma in um (0 = none)")
    p.add_argument("--clip-to-tissue", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--top-k", type=int, default=8, help="tiles in the gallery")
    p.add_argument("--geojson-object", default="tile", choices=OBJECT_TYPES)
    p.add_argument("--tiff-mpp", type=optional_float, default=None, help="resolution of the TIFF overlay (um/px)")
    args = p.parse_args(argv)
    setup_logging()
    if args.legend is None and args.slide is None:
        p.error("give --slide with --scores and --out, or --legend")
    if args.legend is not None:
        write_legend(args.legend, args.normalize, args.cmap, args.uniform_range)
    if args.slide is None:
        return
    if not (args.scores and args.out):
        p.error("--slide needs --scores and --out")
    style = Style(args.normalize, args.cmap, args.alpha, args.blur_um, args.clip_to_tissue, args.uniform_range)
    try:
        draw_slide(
            args.slide, args.scores, args.out, out_geojson=args.geojson, out_gallery=args.gallery,
            out_tiff=args.tiff, style=style, mpp=args.mpp,
            max_edge=int(args.max_edge) if args.max_edge else None, tissue_mask=args.tissue_mask,
            top_k=args.top_k, object_type=args.geojson_object, tiff_mpp=args.tiff_mpp,
            mpp_override=args.slide_mpp, mpp_fallback=args.mpp_fallback,
        )
    except HeatmapMemoryError as exc:  # the message says what to change; no traceback
        log.error("%s", exc)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
