"""Ground-truth tumour regions from the formats pathologists deliver, as a mask on a known grid.

Localisation metrics need the truth as a boolean mask aligned with the slide. Four sources:

* **GeoJSON** (QuPath export: a FeatureCollection, a list of Features, or one Feature/geometry):
  ``Polygon`` and ``MultiPolygon`` features, holes respected. The class is
  ``properties.classification.name`` (or ``.names``, or a plain string), else ``properties.name``.
* **ASAP XML** (CAMELYON16/17): ``<Annotation PartOfGroup=...>`` polygons; CAMELYON16's group
  ``_2`` marks non-tumour regions inside tumour annotations and is subtracted by default.
* **Mask images**: PNG/JPEG/BMP, or TIFF including pyramidal level-0 masks such as CAMELYON's
  (the smallest pyramid level at least as fine as the output grid is read, and only the pixels
  the grid samples, so a 100k x 80k mask never has to fit in memory). Non-zero is tumour; the mask
  spans the whole slide, whatever its resolution.
* **The demo cohort's truth** (``<id>.json`` with ``mask_shape`` next to ``<id>_tumour.png``),
  exact for the synthetic renderer.

Class filters (case-insensitive; a trailing ``*`` matches any suffix): polygons whose class is in
``exclude`` are subtracted; of the rest, those whose class is in ``include`` are tumour, or all of
them when ``include`` is empty. The mask is written as ``<out>.png`` (0/255) with a JSON sidecar
holding its level-0 ``downsample``, so every consumer maps it back to the slide the same way.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from wsi_asmil.core.args import add_slide_args, setup_logging
from wsi_asmil.core.canvas import Grid, lookup_mask
from wsi_asmil.core.io import write_image, write_json
from wsi_asmil.tissue.masks import read_mask_png

log = logging.getLogger(__name__)

#: Candidate annotation file names for a slide, in order of preference.
ANNOTATION_PATTERNS = (
    "{id}.geojson", "{id}.json", "{id}.xml", "{id}_mask.tif", "{id}_mask.tiff", "{id}_mask.png",
    "{id}_tumour.png", "{id}.tif", "{id}.tiff", "{id}.png",
)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DEFAULT_EXCLUDE = ("_2", "exclusion", "ignore*")

Polygon = list[np.ndarray]  # exterior ring then holes, each (K, 2) level-0 float


class AnnotationError(ValueError):
    """An annotation file cannot be used; the message names the file and the problem."""


def find_annotation(folder: str | Path, slide_id: str) -> Path | None:
    """The first file in ``folder`` that annotates ``slide_id`` (see ``ANNOTATION_PATTERNS``)."""
    folder = Path(folder)
    for pattern in ANNOTATION_PATTERNS:
        p = folder / pattern.format(id=slide_id)
        if p.is_file():
            return p
    return None


def _matches(name: str | None, patterns: Sequence[str]) -> bool:
    if name is None:
        return False
    low = name.strip().lower()
    return any(fnmatch.fnmatchcase(low, p.strip().lower()) for p in patterns)


def _class_of(props: dict[str, Any] | None) -> str | None:
    if not props:
        return None
    c = props.get("classification")
    if isinstance(c, dict):
        if c.get("name"):
            return str(c["name"])
        if c.get("names"):
            return ": ".join(str(n) for n in c["names"])
    elif isinstance(c, str):
        return c
    name = props.get("name")
    return str(name) if name is not None else None


def _polygons_of_geometry(geom: dict[str, Any] | None, where: str) -> list[Polygon]:
    if not geom:
        return []
    kind = geom.get("type")
    try:
        if kind == "Polygon":
            return [[np.asarray(r, dtype=np.float64)[:, :2] for r in geom["coordinates"]]]
        if kind == "MultiPolygon":
            return [[np.asarray(r, dtype=np.float64)[:, :2] for r in poly] for poly in geom["coordinates"]]
        if kind == "GeometryCollection":
            return [p for g in geom.get("geometries", []) for p in _polygons_of_geometry(g, where)]
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise AnnotationError(f"{where}: malformed {kind} coordinates ({exc})") from exc
    log.info("%s: ignoring a %s geometry (only areas count as tumour)", where, kind)
    return []


def read_geojson_polygons(path: str | Path, include: Sequence[str] = (), exclude: Sequence[str] = DEFAULT_EXCLUDE) -> tuple[list[Polygon], list[Polygon]]:
    """(tumour polygons, excluded polygons) of a GeoJSON annotation file, in level-0 pixels."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise AnnotationError(f"{path}: not valid JSON ({exc})") from exc
    if isinstance(obj, list):
        feats = obj
    elif isinstance(obj, dict) and obj.get("type") == "FeatureCollection":
        feats = obj.get("features", [])
    elif isinstance(obj, dict) and obj.get("type") == "Feature":
        feats = [obj]
    elif isinstance(obj, dict) and "coordinates" in obj:
        feats = [{"type": "Feature", "geometry": obj, "properties": {}}]
    else:
        raise AnnotationError(f"{path}: not GeoJSON (expected a FeatureCollection, Feature or geometry)")
    tumour: list[Polygon] = []
    excluded: list[Polygon] = []
    skipped: set[str] = set()
    for i, f in enumerate(feats):
        if not isinstance(f, dict):
            raise AnnotationError(f"{path}: feature {i} is not an object")
        cls = _class_of(f.get("properties"))
        polys = _polygons_of_geometry(f.get("geometry"), f"{path} feature {i}")
        if _matches(cls, exclude):
            excluded += polys
        elif not include or _matches(cls, include):
            tumour += polys
        elif polys:
            skipped.add(str(cls))
    _warn_if_filtered_out(path, tumour, skipped, include)
    return tumour, excluded


def _warn_if_filtered_out(path: Path, tumour: list[Polygon], skipped: set[str], include: Sequence[str]) -> None:
    """An annotation whose every polygon the class filter drops is more often a config slip than a
    slide without tumour: say so in the job's log."""
    if not tumour and skipped:
        log.warning(
            "%s: no polygon of the tumour classes %s; polygons of class(es) %s were left out "
            "(check heatmap.localisation.include)", path, list(include), sorted(skipped),
        )


def read_asap_polygons(path: str | Path, include: Sequence[str] = (), exclude: Sequence[str] = DEFAULT_EXCLUDE) -> tuple[list[Polygon], list[Polygon]]:
    """(tumour polygons, excluded polygons) of an ASAP XML file (CAMELYON), in level-0 pixels."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise AnnotationError(f"{path}: not valid XML ({exc})") from exc
    tumour: list[Polygon] = []
    excluded: list[Polygon] = []
    skipped: set[str] = set()
    for i, ann in enumerate(root.iter("Annotation")):
        kind = (ann.get("Type") or "Polygon").lower()
        if kind not in ("polygon", "spline", "rectangle"):
            log.info("%s: ignoring annotation %d of type %s", path, i, kind)
            continue
        points = []
        for c in ann.iter("Coordinate"):
            try:
                points.append((float(c.get("Order", len(points))), float(c.get("X")), float(c.get("Y"))))
            except (TypeError, ValueError) as exc:
                raise AnnotationError(f"{path}: annotation {i} has a bad coordinate {c.attrib}") from exc
        if len(points) < 3:
            continue
        ring = np.asarray(sorted(points), dtype=np.float64)[:, 1:]
        cls = ann.get("PartOfGroup") or ann.get("Name")
        if _matches(cls, exclude):
            excluded.append([ring])
        elif not include or _matches(cls, include):
            tumour.append([ring])
        else:
            skipped.add(str(cls))
    _warn_if_filtered_out(path, tumour, skipped, include)
    return tumour, excluded


def _polygon_spans(rings: Sequence[np.ndarray], height: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scan-line spans ``(row, col0, col1)`` of one polygon (rings in grid pixel units, even-odd rule).

    Row ``r`` is sampled at its centre ``r + 0.5``; an edge counts for rows whose centre lies in
    ``[y_min, y_max)``, so a vertex is crossed once and every row has an even number of crossings.
    A span covers the columns whose centres lie in ``[x_a, x_b)``.
    """
    segs = []
    for r in rings:
        r = np.asarray(r, dtype=np.float64)
        if len(r) < 3:
            continue
        if not np.array_equal(r[0], r[-1]):
            r = np.vstack([r, r[:1]])
        segs.append(np.hstack([r[:-1], r[1:]]))
    empty = np.zeros(0, np.int64)
    if not segs:
        return empty, empty, empty
    x0, y0, x1, y1 = np.vstack(segs).T
    keep = y0 != y1
    x0, y0, x1, y1 = x0[keep], y0[keep], x1[keep], y1[keep]
    lo = np.clip(np.ceil(np.minimum(y0, y1) - 0.5), 0, height).astype(np.int64)
    hi = np.clip(np.ceil(np.maximum(y0, y1) - 0.5), 0, height).astype(np.int64)
    n = np.maximum(hi - lo, 0)
    if n.sum() == 0:
        return empty, empty, empty
    edge = np.repeat(np.arange(len(n)), n)
    rows = lo[edge] + (np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n))
    xc = x0[edge] + (rows + 0.5 - y0[edge]) * (x1[edge] - x0[edge]) / (y1[edge] - y0[edge])
    order = np.lexsort((xc, rows))
    rows, xc = rows[order], xc[order]
    first = np.r_[0, np.nonzero(np.diff(rows))[0] + 1]
    pos = np.arange(len(rows)) - np.repeat(first, np.diff(np.r_[first, len(rows)]))
    a, b = pos % 2 == 0, pos % 2 == 1
    return rows[a], np.ceil(xc[a] - 0.5).astype(np.int64), np.ceil(xc[b] - 0.5).astype(np.int64)


def rasterise(polygons: Sequence[Polygon], grid: Grid) -> np.ndarray:
    """Boolean mask of the union of ``polygons`` on ``grid``: a pixel is in when its centre is.

    Each polygon is filled by scan lines with the even-odd rule over its rings (holes, and islands
    inside holes, come out right); polygons are then united, so overlaps never cancel whatever the
    file order. Exact at any downsample, O(edges x rows crossed).
    """
    h, w = grid.shape
    all_rows, all_c0, all_c1 = [], [], []
    origin = np.array([grid.x0, grid.y0], dtype=np.float64)
    for poly in polygons:
        rings = [np.asarray(r, dtype=np.float64)[:, :2] / grid.downsample - origin for r in poly if len(r) >= 3]
        rows, c0, c1 = _polygon_spans(rings, h)
        all_rows.append(rows)
        all_c0.append(c0)
        all_c1.append(c1)
    if not all_rows or not sum(len(r) for r in all_rows):
        return np.zeros((h, w), dtype=bool)
    rows = np.concatenate(all_rows)
    c0 = np.clip(np.concatenate(all_c0), 0, w)
    c1 = np.clip(np.concatenate(all_c1), 0, w)
    keep = c1 > c0
    rows, c0, c1 = rows[keep], c0[keep], c1[keep]
    stride = w + 1
    diff = np.bincount(np.r_[rows * stride + c0, rows * stride + c1],
                       weights=np.r_[np.ones(len(rows)), -np.ones(len(rows))], minlength=h * stride)
    return np.cumsum(diff.reshape(h, stride), axis=1)[:, :w] > 0.5


def _tiff_mask(path: Path, slide_width: int, grid: Grid) -> np.ndarray:
    import tifffile
    import zarr

    with tifffile.TiffFile(path) as tif:
        levels = tif.series[0].levels
        # The coarsest level that still samples the grid at least once per output pixel.
        chosen = 0
        for i, lvl in enumerate(levels):
            if lvl.shape[1] * grid.downsample >= slide_width * 0.999:
                chosen = i
        lvl = levels[chosen]
        h, w = lvl.shape[:2]
        mask_ds = slide_width / w
        store = tif.aszarr(level=chosen)
        arr = zarr.open_array(store, mode="r") if not isinstance(store, zarr.Array) else store
        d = grid.downsample
        cols = np.floor((np.arange(grid.x0, grid.x0 + grid.width) + 0.5) * d / mask_ds).astype(np.int64)
        rows = np.floor((np.arange(grid.y0, grid.y0 + grid.height) + 0.5) * d / mask_ds).astype(np.int64)
        col_ok = (cols >= 0) & (cols < w)
        row_ok = (rows >= 0) & (rows < h)
        out = np.zeros(grid.shape, dtype=bool)
        if col_ok.any() and row_ok.any():
            sub = arr.oindex[rows[row_ok], cols[col_ok]] if arr.ndim == 2 else arr.oindex[rows[row_ok], cols[col_ok], 0]
            out[np.ix_(row_ok, col_ok)] = np.asarray(sub) > 0
        return out


def read_mask_image(path: str | Path, slide_size: tuple[int, int], grid: Grid) -> np.ndarray:
    """A mask image spanning the whole slide, sampled onto ``grid`` (non-zero = tumour)."""
    path = Path(path)
    w0, h0 = slide_size
    if path.suffix.lower() in (".tif", ".tiff"):
        try:
            return _tiff_mask(path, w0, grid)
        except AnnotationError:
            raise
        except Exception as exc:  # tifffile raises many types for foreign files
            raise AnnotationError(f"{path}: cannot read the TIFF mask ({exc})") from exc
    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise AnnotationError(f"{path}: cannot read the mask image")
    mask_ds = w0 / img.shape[1]
    if abs(img.shape[0] * mask_ds - h0) > 2 * mask_ds:
        raise AnnotationError(
            f"{path}: mask {img.shape[1]}x{img.shape[0]} does not have the slide's aspect ratio ({w0}x{h0})"
        )
    return lookup_mask(img > 0, mask_ds, grid)


def _sidecar_mask(path: Path, meta: dict[str, Any], grid: Grid) -> np.ndarray:
    """``<id>_tumour.png`` beside a sidecar that gives its level-0 ``downsample`` (the demo's truth)."""
    png = path.with_name(f"{meta.get('slide_id', path.stem)}_tumour.png")
    try:
        mask = read_mask_png(png)
    except FileNotFoundError as exc:
        raise AnnotationError(f"{path}: the tumour mask it describes is missing or unreadable ({png})") from exc
    return lookup_mask(mask, float(meta["downsample"]), grid)


@dataclass(frozen=True)
class TumourMask:
    """A slide's tumour mask on a level-0-aligned grid, with where it came from."""

    mask: np.ndarray
    downsample: float
    source: str
    kind: str

    def area_um2(self, mpp: float) -> float:
        return float(self.mask.sum()) * (self.downsample * mpp) ** 2


def load_tumour_mask(
    path: str | Path,
    slide_size: tuple[int, int],
    downsample: float,
    include: Sequence[str] = (),
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
) -> TumourMask:
    """The tumour mask of any supported annotation file on the whole-slide grid at ``downsample``."""
    path = Path(path)
    grid = Grid.covering(slide_size[0], slide_size[1], downsample)
    suffix = path.suffix.lower()
    if suffix in (".geojson", ".json"):
        if suffix == ".json":
            try:
                meta = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise AnnotationError(f"{path}: not valid JSON ({exc})") from exc
            if isinstance(meta, dict) and "mask_shape" in meta and "downsample" in meta:
                return TumourMask(_sidecar_mask(path, meta, grid), downsample, str(path), "synthetic")
        tumour, excluded = read_geojson_polygons(path, include, exclude)
        kind = "geojson"
    elif suffix == ".xml":
        tumour, excluded = read_asap_polygons(path, include, exclude)
        kind = "asap-xml"
    elif suffix in IMAGE_SUFFIXES:
        return TumourMask(read_mask_image(path, slide_size, grid), downsample, str(path), "mask-image")
    else:
        raise AnnotationError(f"{path}: unsupported annotation format (GeoJSON, ASAP XML or a mask image)")
    mask = rasterise(tumour, grid)
    if excluded:
        mask &= ~rasterise(excluded, grid)
    log.info("%s: %d tumour and %d excluded polygon(s)", path, len(tumour), len(excluded))
    return TumourMask(mask, downsample, str(path), kind)


def write_tumour_mask(out_png: str | Path, out_json: str | Path, truth: TumourMask, slide_id: str, mpp: float, slide_size: tuple[int, int]) -> None:
    """The mask as a 0/255 PNG plus a sidecar with its downsample and tumour area."""
    write_image(out_png, truth.mask.astype(np.uint8) * 255)
    write_json(out_json, {
        "slide_id": slide_id,
        "downsample": truth.downsample,
        "mpp": mpp,
        "slide_dimensions": list(slide_size),
        "mask_shape": list(truth.mask.shape),
        "tumour_area_um2": truth.area_um2(mpp),
        "source": truth.source,
        "format": truth.kind,
    })


def main(argv: list[str] | None = None) -> None:
    from wsi_asmil.slides.slide import Slide

    p = argparse.ArgumentParser(prog="python -m wsi_asmil.tissue.annotations", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_slide_args(p)
    p.add_argument("--annotation", required=True, help="GeoJSON, ASAP XML, mask image or demo truth JSON")
    p.add_argument("--mpp", type=float, default=8.0, help="resolution of the output mask (um/px)")
    p.add_argument("--include", nargs="*", default=[], help="classes that are tumour (empty: all not excluded)")
    p.add_argument("--exclude", nargs="*", default=list(DEFAULT_EXCLUDE), help="classes subtracted from tumour")
    p.add_argument("--out", required=True, help="mask PNG to write (a .json sidecar goes next to it)")
    p.add_argument("--out-json", default=None, help="sidecar path (default: the PNG's with .json)")
    args = p.parse_args(argv)
    setup_logging()
    with Slide(args.slide, args.slide_mpp, args.mpp_fallback) as slide:
        size, mpp, sid = slide.dimensions, slide.mpp, slide.slide_id
    truth = load_tumour_mask(args.annotation, size, args.mpp / mpp, args.include, args.exclude)
    out_json = args.out_json or str(Path(args.out).with_suffix(".json"))
    write_tumour_mask(args.out, out_json, truth, sid, mpp, size)
    log.info("slide '%s': tumour area %.4f mm2 from %s", sid, truth.area_um2(mpp) / 1e6, args.annotation)


if __name__ == "__main__":
    main()
