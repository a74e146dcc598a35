"""The report's zoomable viewer: Deep Zoom pyramids of a slide and its heat overlays, and the page.

Per slide (``python -m wsi_asmil.report.viewer pyramids``) one folder holds:

* ``slide.dzi`` + ``slide_files/``: the slide at ``slide_mpp`` (JPEG tiles);
* ``heat_<model>.dzi`` + files per model: the heat at ``overlay_mpp`` (PNG RGBA tiles), coloured
  exactly as the static heatmap (``heatmap.normalize`` and ``canvas.colour_table``, tiles averaged
  where they overlap, the same blur and tissue clip), opaque on shown pixels and transparent
  elsewhere: the viewer's opacity slider does the blending that ``heatmap.alpha`` does in the PNG;
* ``layers.json``: the layers' inline tile sources, the slide's size and resolution and, where
  ground truth exists, the tumour outline as SVG path data (drawn as a vector, white edged black).

Every layer is rendered window by window (``wsi_asmil.maps.deepzoom``), so memory follows a block of
tiles whatever the slide's size, and the folder appears complete or not at all.

``python -m wsi_asmil.report.viewer sample`` picks the slides (the report's choice, ``report.choose_sample``)
and ``python -m wsi_asmil.report.viewer page`` writes ``viewer.html`` beside the report's ``index.html``, with
OpenSeadragon copied from the vendored copy (``wsi_asmil.report.vendor``) into ``viewer/openseadragon/``.
The page inlines every descriptor, so it opens from ``file://`` without a server or a network.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import cv2
import numpy as np

from wsi_asmil.core.args import optional_float, setup_logging
from wsi_asmil.core.canvas import Grid, colour_table, lookup_mask, mean_values, smooth
from wsi_asmil.core.io import atomic_path, write_json, write_text
from wsi_asmil.maps.deepzoom import Pyramid, Render, write_dzi
from wsi_asmil.maps.heatmap import (
    NORMALIZE_MODES,
    Style,
    load_scores,
    normalize,
)
from wsi_asmil.report import html as H
from wsi_asmil.slides.slide import RegionReadError, Slide
from wsi_asmil.tissue.masks import read_tissue_mask, read_tumour_mask

log = logging.getLogger(__name__)

#: Largest side, in pixels of the pyramid level read, of one slide read: bounds a read's memory
#: where the slide's coarsest level is much finer than a coarse pyramid level.
MAX_READ = 4096
#: Reach of OpenCV's float Gaussian kernel in sigmas (its radius is 4 sigma): a window rendered
#: with this halo equals the same pixels of a larger window.
BLUR_REACH = 4
SLIDES_FOLDER = "viewer/slides"
OSD_FOLDER = "viewer/openseadragon"


# --- layer renderers -----------------------------------------------------------------------------


def slide_renderer(slide: Slide) -> Render:
    """Windows of the slide at any downsample, read from its best level in bounded pieces.

    A piece that cannot be decoded is glass-white and logged, as thumbnails treat it."""

    def render(grid: Grid) -> np.ndarray:
        target = grid.downsample * slide.mpp
        level = slide.best_level(target)
        step = max(1, int(MAX_READ // max(1.0, target / slide.level_mpp(level))))
        out = np.empty((grid.height, grid.width, 3), np.uint8)
        for y in range(0, grid.height, step):
            for x in range(0, grid.width, step):
                w, h = min(step, grid.width - x), min(step, grid.height - y)
                x0, y0 = round((grid.x0 + x) * grid.downsample), round((grid.y0 + y) * grid.downsample)
                try:
                    out[y : y + h, x : x + w] = slide.read_at_mpp(x0, y0, target, (w, h), level=level)
                except RegionReadError as exc:
                    log.warning("%s; shown as background in the viewer", exc)
                    out[y : y + h, x : x + w] = 255
        return out

    return render


def heat_renderer(coords: np.ndarray, extent: float, values: np.ndarray, lut: np.ndarray, slide_mpp: float,
                  blur_um: float = 0.0, tissue: np.ndarray | None = None, tissue_ds: float | None = None) -> Render:
    """RGBA windows of the heat: ``lut`` colours where tiles (on tissue) are, transparent elsewhere.

    ``values`` are display values in [0, 1] (``heatmap.normalize``); the blur is ``blur_um`` at every
    level, computed over a halo so windows join without seams."""
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    x_end, y_end = coords[:, 0] + extent, coords[:, 1] + extent

    def render(grid: Grid) -> np.ndarray:
        d = grid.downsample
        sigma = blur_um / (d * slide_mpp)
        halo = math.ceil(BLUR_REACH * sigma) + 1 if sigma > 0 else 0
        out = np.zeros((grid.height, grid.width, 4), np.uint8)
        near = ((coords[:, 0] < (grid.x0 + grid.width + halo + 1) * d) & (x_end > (grid.x0 - halo - 1) * d)
                & (coords[:, 1] < (grid.y0 + grid.height + halo + 1) * d) & (y_end > (grid.y0 - halo - 1) * d))
        if not near.any():
            return out
        heat, covered = mean_values(coords[near], extent, values[near], grid.expanded(halo))
        heat = smooth(heat, covered, sigma)
        inner = (slice(halo, halo + grid.height), slice(halo, halo + grid.width))
        heat, covered = heat[inner], covered[inner]
        if tissue is not None:
            covered = covered & lookup_mask(tissue, float(tissue_ds), grid)
        idx = np.clip(np.rint(heat[covered] * 255), 0, 255).astype(np.uint8)
        out[covered, :3] = lut[idx]
        out[covered, 3] = 255
        return out

    return render


def outline_path(mask: np.ndarray, mask_ds: float) -> str:
    """The outline of a mask as SVG path data in level-0 pixels (one closed subpath per contour).

    Drawn as a vector over the slide with a stroke of constant screen width, it stays crisp at
    every zoom, where a raster outline would grow thick and blurred past its own resolution.
    Vertices are the centres of the mask's border pixels."""
    contours, _ = cv2.findContours(np.ascontiguousarray(mask, dtype=np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    parts = []
    for contour in contours:
        points = (contour.reshape(-1, 2) + 0.5) * mask_ds
        parts.append("M" + " L".join(f"{x:.0f} {y:.0f}" for x, y in points) + " Z")
    return " ".join(parts)


# --- one slide's pyramids -----------------------------------------------------------------------


def pyramid_at(slide_size: tuple[int, int], slide_mpp: float, mpp: float) -> Pyramid:
    """The Deep Zoom geometry of the whole slide at ``mpp`` um/px (never finer than the scan)."""
    d = max(1.0, mpp / slide_mpp)
    return Pyramid(max(1, math.ceil(slide_size[0] / d)), max(1, math.ceil(slide_size[1] / d)), d)


def build_slide(
    slide_path: str | Path,
    out_dir: str | Path,
    scores: Mapping[str, str | Path],
    *,
    style: Style | None = None,
    slide_mpp: float = 1.0,
    overlay_mpp: float = 2.0,
    quality: int = 80,
    tissue_mask: str | Path | None = None,
    truth_png: str | Path | None = None,
    mpp_override: float | None = None,
    mpp_fallback: float | None = None,
) -> dict[str, Any]:
    """Write one slide's viewer folder (see the module docstring); returns its ``layers.json``.

    ``scores`` maps each model to its ``<slide>_scores.csv``; ``truth_png`` is the localisation
    stage's tumour mask (its ``.json`` beside it gives the downsample)."""
    out_dir = Path(out_dir)
    style = style or Style()
    lut = colour_table(style.cmap)
    tissue = tissue_ds = None
    if style.clip_to_tissue and tissue_mask:
        tissue, tissue_info = read_tissue_mask(tissue_mask)
        tissue_ds = float(tissue_info["downsample"])
    with Slide(slide_path, mpp_override, mpp_fallback) as slide, atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        if slide_mpp < slide.mpp:
            log.info("slide '%s': viewer.slide_mpp %g is finer than the scan; using %g", slide.slide_id, slide_mpp, slide.mpp)
        base = pyramid_at(slide.dimensions, slide.mpp, slide_mpp)
        over = pyramid_at(slide.dimensions, slide.mpp, max(overlay_mpp, base.downsample * slide.mpp))
        layers = []
        source, n = write_dzi(tmp, "slide", base, slide_renderer(slide), "jpeg", quality=quality)
        layers.append({"kind": "slide", "name": "slide", "source": source})
        log.info("slide '%s': slide layer %dx%d px at %.3g um/px, %d tiles",
                 slide.slide_id, base.width, base.height, base.downsample * slide.mpp, n)
        for model, csv in scores.items():
            coords, raw, meta = load_scores(csv)
            values = normalize(raw, style.normalize, style.uniform_range)
            render = heat_renderer(coords, float(meta["tile_extent"]), values, lut, slide.mpp,
                                   style.blur_um, tissue, tissue_ds)
            source, n = write_dzi(tmp, f"heat_{model}", over, render, "png")
            layers.append({"kind": "heat", "name": model, "source": source})
            log.info("slide '%s': %s heat layer %dx%d px, %d tiles", slide.slide_id, model, over.width, over.height, n)
        if truth_png is not None:
            truth, side = read_tumour_mask(truth_png)
            layers.append({"kind": "truth", "name": "truth", "path": outline_path(truth, float(side["downsample"]))})
        record = {"slide_id": slide.slide_id, "mpp": slide.mpp, "slide_dimensions": list(slide.dimensions),
                  "slide_layer_mpp": base.downsample * slide.mpp, "overlay_mpp": over.downsample * slide.mpp,
                  "layers": layers}
        (tmp / "layers.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


# --- which slides, and the page ------------------------------------------------------------------


def choose_slides(candidates: Sequence[str], n: int, truth_dir: str | Path | None, split_json: str | Path | None) -> list[str]:
    """The report's heatmap sample (``report.choose_sample``) from the same inputs, so the viewer
    shows the slides the report shows."""
    from wsi_asmil.report.build import choose_sample, slide_labels

    area = {}
    if truth_dir is not None:
        for s in candidates:
            side = Path(truth_dir) / f"{s}.json"
            if side.is_file():
                area[s] = float(json.loads(side.read_text()).get("tumour_area_um2", 0.0))
    return choose_sample(sorted(set(candidates)), n, area, slide_labels(split_json))


PAGE_CSS = """
html,body{margin:0;height:100%;font-family:system-ui,-apple-system,"Segoe UI",sans-serif;font-size:14px;color:#222}
#bar{display:flex;flex-wrap:wrap;gap:.4em 1.2em;align-items:center;padding:.4em .8em;background:#f4f4f4;border-bottom:1px solid #ccc}
#bar label{white-space:nowrap}#osd{position:absolute;top:var(--bar,3em);bottom:0;left:0;right:0;background:#fff}
#bar img{height:2.6em;vertical-align:middle}.note{color:#555}
"""

PAGE_JS = """
const viewer = OpenSeadragon({id: "osd", prefixUrl: OSD + "/images/", drawer: "canvas", showNavigator: true,
  maxZoomPixelRatio: 4, visibilityRatio: 0.5, animationTime: 0.6});
const state = {tiles: {}, drawn: {}, failed: 0, ready: false, outline: 0};
const bar = document.getElementById("bar"), select = document.getElementById("slide");
const layersBox = document.getElementById("layers"), opacity = document.getElementById("opacity");
const SVG = "http://www.w3.org/2000/svg";
// The truth outline: one SVG over the viewer whose group follows the image; strokes keep their
// screen width at any zoom (non-scaling-stroke).
const svg = document.createElementNS(SVG, "svg"), group = document.createElementNS(SVG, "g");
svg.setAttribute("style", "position:absolute;left:0;top:0;width:100%;height:100%;pointer-events:none");
svg.append(group);
viewer.canvas.append(svg);
function publish() {
  document.body.dataset.tiles = JSON.stringify(state.tiles);
  document.body.dataset.drawn = JSON.stringify(state.drawn);
  document.body.dataset.failed = String(state.failed);
  document.body.dataset.ready = state.ready ? "1" : "0";
  document.body.dataset.outline = String(state.outline);
}
let current = null, tiled = [];
function layerOf(item) { return tiled[viewer.world.getIndexOfItem(item)] || null; }
function shown(layer) {
  const box = document.getElementById("show-" + layer.name);
  return layer.kind === "slide" || (box !== null && box.checked);
}
function placeOutline() {
  const item = viewer.world.getItemAt(0);
  if (!item) return;
  // the slide layer's pixels are level-0 pixels times its width over the slide's
  const origin = item.imageToViewerElementCoordinates(new OpenSeadragon.Point(0, 0));
  const right = item.imageToViewerElementCoordinates(new OpenSeadragon.Point(item.source.dimensions.x, 0));
  const scale = (right.x - origin.x) / (item.source.dimensions.x * current.slide_layer_mpp / current.mpp);
  group.setAttribute("transform", `translate(${origin.x} ${origin.y}) scale(${scale})`);
}
function drawOutline() {
  group.replaceChildren();
  state.outline = 0;
  const truth = current.layers.find(layer => layer.kind === "truth");
  if (!truth || !shown(truth)) return;
  for (const [colour, width] of [["black", 4], ["white", 2]]) {
    const path = document.createElementNS(SVG, "path");
    path.setAttribute("d", truth.path);
    path.setAttribute("style", `fill:none;stroke:${colour};stroke-width:${width};vector-effect:non-scaling-stroke`);
    group.append(path);
  }
  state.outline = (truth.path.match(/M/g) || []).length;
  placeOutline();
}
function applyOpacity() {
  tiled.forEach((layer, i) => {
    viewer.world.getItemAt(i).setOpacity(!shown(layer) ? 0 : layer.kind === "heat" ? Number(opacity.value) : 1);
  });
  drawOutline(); publish();
}
function openSlide(index) {
  current = SLIDES[index];
  tiled = current.layers.filter(layer => layer.kind !== "truth");
  state.tiles = {}; state.drawn = {}; state.failed = 0; state.ready = false;
  group.replaceChildren(); state.outline = 0; publish();
  layersBox.replaceChildren();
  let firstHeat = true;
  for (const layer of current.layers) {
    if (layer.kind === "slide") continue;
    const label = document.createElement("label"), box = document.createElement("input");
    box.type = "checkbox"; box.id = "show-" + layer.name;
    box.checked = layer.kind === "truth" || firstHeat;
    if (layer.kind === "heat") firstHeat = false;
    box.addEventListener("change", applyOpacity);
    label.append(box, " " + (layer.kind === "truth" ? "truth outline" : layer.name));
    layersBox.append(label);
  }
  viewer.open(tiled.map(layer => {
    const source = structuredClone(layer.source);
    source.Image.Url = current.base + source.Image.Url;
    return {tileSource: source, x: 0, y: 0, width: 1,
            opacity: !shown(layer) ? 0 : layer.kind === "heat" ? Number(opacity.value) : 1};
  }));
}
viewer.addHandler("open", () => { drawOutline(); publish(); });
viewer.addHandler("update-viewport", placeOutline);
viewer.addHandler("tile-loaded", e => {
  const layer = layerOf(e.tiledImage);
  if (layer) { state.tiles[layer.name] = (state.tiles[layer.name] || 0) + 1; publish(); }
});
viewer.addHandler("tile-drawn", e => {
  const layer = layerOf(e.tiledImage);
  if (layer) { state.drawn[layer.name] = (state.drawn[layer.name] || 0) + 1; publish(); }
});
viewer.addHandler("tile-load-failed", () => { state.failed++; publish(); });
viewer.world.addHandler("add-item", e => e.item.addHandler("fully-loaded-change", () => {
  let all = true;
  for (let i = 0; i < viewer.world.getItemCount(); i++) {
    const item = viewer.world.getItemAt(i);
    if (item.getOpacity() > 0 && !item.getFullyLoaded()) all = false;
  }
  state.ready = all; publish();
}));
SLIDES.forEach((s, i) => select.add(new Option(s.label, String(i))));
select.addEventListener("change", () => openSlide(Number(select.value)));
opacity.addEventListener("input", applyOpacity);
new ResizeObserver(() => document.documentElement.style.setProperty("--bar", bar.offsetHeight + "px")).observe(bar);
if (SLIDES.length) openSlide(0);
"""


def _url_path(*parts: str) -> str:
    return "/".join(quote(p, safe="") for p in parts)


def page_html(slides: Sequence[Mapping[str, Any]], alpha: float, legend_png: bytes | None = None) -> str:
    """The viewer page; ``slides`` are ``layers.json`` records with ``base`` (folder URL) and ``label``."""
    data = json.dumps(list(slides), ensure_ascii=True).replace("</", "<\\/")
    legend = f"<img alt='colour bar' src='{H.png_data_uri(legend_png)}'>" if legend_png else ""
    note = "" if slides else "<span class='note'>No slide has a heatmap.</span>"
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'><title>wsi-asmil viewer</title>"
        f"<style>{PAGE_CSS}</style><script src='{OSD_FOLDER}/openseadragon.min.js'></script></head><body>"
        "<div id='bar'><a href='index.html'>report</a>"
        f"<label>slide <select id='slide'></select></label>{note}<span id='layers'></span>"
        f"<label>opacity <input id='opacity' type='range' min='0' max='1' step='0.05' value='{alpha:g}'></label>"
        f"{legend}</div><div id='osd'></div>"
        f"<script>const OSD = {json.dumps(OSD_FOLDER)}; const SLIDES = {data};\n{PAGE_JS}</script></body></html>\n"
    )


def write_page(report_dir: str | Path, slide_ids: Sequence[str], *, alpha: float = 0.5,
               labels: Mapping[str, str] | None = None, legend: str | Path | None = None) -> Path:
    """``viewer.html`` in ``report_dir`` over the slide folders under ``viewer/slides/``, with
    OpenSeadragon copied beside it; returns the page's path."""
    from wsi_asmil.report.vendor import copy_into

    report_dir = Path(report_dir)
    slides = []
    for sid in slide_ids:
        folder = report_dir / SLIDES_FOLDER / sid
        record = json.loads((folder / "layers.json").read_text())
        label = (labels or {}).get(sid, "")
        record.update(base=_url_path(*SLIDES_FOLDER.split("/"), sid) + "/", label=f"{sid} ({label})" if label else sid)
        slides.append(record)
    copy_into(report_dir / OSD_FOLDER)
    legend_png = Path(legend).read_bytes() if legend is not None and Path(legend).is_file() else None
    page = report_dir / "viewer.html"
    write_text(page, page_html(slides, alpha, legend_png))
    return page


# --- command line --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m wsi_asmil.report.viewer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sample", help="choose the slides (the report's heatmap sample)")
    s.add_argument("--candidates", nargs="*", default=[], help="slides with heatmaps")
    s.add_argument("--n", type=int, required=True, help="how many (heatmap.report_sample)")
    s.add_argument("--truth-dir", default=None, help="localisation/truth (tumour areas)")
    s.add_argument("--split", default=None, help="split JSON (labels)")
    s.add_argument("--inventory", default=None, help="inventory CSV: only the slides it could open are candidates")
    s.add_argument("--out", required=True, help="JSON list of slide ids to write")
    b = sub.add_parser("pyramids", help="one slide's Deep Zoom folder")
    b.add_argument("--slide", required=True, help="slide file (or DICOM folder)")
    b.add_argument("--slide-mpp", type=optional_float, default=None, help="per-slide mpp override (label table)")
    b.add_argument("--mpp-fallback", type=optional_float, default=None, help="config mpp_fallback")
    b.add_argument("--scores", nargs="*", default=[], help="MODEL=<slide>_scores.csv, one per model")
    b.add_argument("--tissue-mask", default=None, help="segment mask.png (mask.json beside it)")
    b.add_argument("--truth", default=None, help="localisation truth <slide>.png (.json beside it)")
    b.add_argument("--out-dir", required=True)
    b.add_argument("--viewer-mpp", type=float, default=1.0, help="slide layer resolution (um/px)")
    b.add_argument("--overlay-mpp", type=float, default=2.0, help="heat layers' resolution (um/px)")
    b.add_argument("--quality", type=int, default=80, help="JPEG quality of the slide tiles")
    b.add_argument("--normalize", default="rank", choices=NORMALIZE_MODES)
    b.add_argument("--uniform-range", type=float, default=10.0)
    b.add_argument("--cmap", default="jet")
    b.add_argument("--blur-um", type=float, default=0.0)
    b.add_argument("--clip-to-tissue", action=argparse.BooleanOptionalAction, default=True)
    g = sub.add_parser("page", help="viewer.html and OpenSeadragon in the report folder")
    g.add_argument("--report-dir", required=True)
    g.add_argument("--sample", required=True, help="the sample JSON of `sample`")
    g.add_argument("--alpha", type=float, default=0.5, help="initial heat opacity (heatmap.alpha)")
    g.add_argument("--split", default=None, help="split JSON (labels shown with the slide ids)")
    g.add_argument("--legend", default=None, help="heatmaps/legend.png")
    args = p.parse_args(argv)
    setup_logging()
    if args.command == "sample":
        candidates = args.candidates
        if args.inventory:
            from wsi_asmil.slides.inventory import usable_ids

            usable = usable_ids(args.inventory)
            candidates = [s for s in candidates if s in usable]
        chosen = choose_slides(candidates, args.n, args.truth_dir, args.split)
        write_json(args.out, chosen)
        log.info("viewer slides: %s", chosen)
    elif args.command == "pyramids":
        scores = {}
        for item in args.scores:
            model, sep, path = item.partition("=")
            if not sep or not model or not path:
                p.error(f"--scores takes MODEL=PATH, got {item!r}")
            scores[model] = path
        style = Style(args.normalize, args.cmap, 1.0, args.blur_um, args.clip_to_tissue, args.uniform_range)
        build_slide(args.slide, args.out_dir, scores, style=style, slide_mpp=args.viewer_mpp,
                    overlay_mpp=args.overlay_mpp, quality=args.quality, tissue_mask=args.tissue_mask,
                    truth_png=args.truth, mpp_override=args.slide_mpp, mpp_fallback=args.mpp_fallback)
    else:
        from wsi_asmil.report.build import slide_labels

        ids = json.loads(Path(args.sample).read_text())
        write_page(args.report_dir, ids, alpha=args.alpha, labels=slide_labels(args.split), legend=args.legend)


if __name__ == "__main__":
    main()
