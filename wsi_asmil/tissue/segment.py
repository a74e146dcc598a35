"""Tissue segmentation: which parts of the glass hold tissue.

Classical and fast: stained tissue is saturated, glass, dust and background are not. Everything
is done on a low-resolution image chosen by mpp (not by pyramid index), and every size parameter
is physical (um, um^2) so the same config works for 20x and 40x scanners.
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
from wsi_asmil.core.io import write_image, write_json
from wsi_asmil.slides.slide import Slide

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SegmentParams:
    """Segmentation settings; each field is a key of config.yaml's ``segment`` section."""

    mpp: float = 8.0
    threshold: str | int = "otsu"
    min_saturation: int = 15
    median_um: float = 24.0
    close_um: float = 24.0
    min_area_um2: float = 20000.0
    min_hole_area_um2: float = 4000.0
    exclude_pen: bool = True
    exclude_dark: bool = True
    dark_value: int = 40


@dataclass
class Segmentation:
    mask: np.ndarray
    downsample: float
    contours: list[np.ndarray]
    hierarchy: list[list[np.ndarray]]
    threshold: float
    excluded: np.ndarray


def _odd(n: float) -> int:
    k = max(1, int(round(n)))
    return k if k % 2 else k + 1


def pen_mask(hsv: np.ndarray) -> np.ndarray:
    """Blue and green ink: hues H&E never produces (OpenCV hue scale 0-180)."""
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    blue = (h >= 95) & (h <= 130) & (s > 60)
    green = (h >= 35) & (h <= 90) & (s > 50)
    return (blue | green) & (v > 20)


def tissue_threshold(saturation: np.ndarray, params: SegmentParams) -> float:
    """Otsu on the saturation histogram, never below ``min_saturation``.

    On a blank slide Otsu splits background noise in two; the floor keeps that noise out.
    """
    if params.threshold == "otsu":
        t, _ = cv2.threshold(saturation, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        return float(max(t, params.min_saturation))
    return float(params.threshold)


def segment_image(rgb: np.ndarray, mpp: float, params: SegmentParams) -> tuple[np.ndarray, list, float, np.ndarray]:
    """Segment an RGB image at ``mpp`` um/px; returns (mask, polygons, threshold, excluded)."""
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    sat = cv2.medianBlur(hsv[..., 1], _odd(params.median_um / mpp))
    t = tissue_threshold(sat, params)
    mask = sat > t
    excluded = np.zeros_like(mask)
    if params.exclude_pen:
        pen = cv2.dilate(pen_mask(hsv).astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
        excluded |= pen
    if params.exclude_dark:
        excluded |= cv2.medianBlur(hsv[..., 2], _odd(params.median_um / mpp)) < params.dark_value
    mask &= ~excluded
    k = _odd(params.close_um / mpp)
    mask = cv2.morphologyEx(
        mask.astype(np.uint8), cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    )
    polygons = filter_contours(mask, mpp, params)
    clean = np.zeros(mask.shape, np.uint8)
    for outer, holes in polygons:
        cv2.drawContours(clean, [outer], -1, 1, thickness=cv2.FILLED)
        if holes:
            cv2.drawContours(clean, holes, -1, 0, thickness=cv2.FILLED)
    return clean.astype(bool), polygons, t, excluded


def filter_contours(
    mask: np.ndarray, mpp: float, params: SegmentParams
) -> list[tuple[np.ndarray, list[np.ndarray]]]:
    """Keep tissue pieces and holes above their minimum physical areas.

    Small pieces are dust or debris; small holes are gaps between cells that belong to the tissue.
    """
    contours, hierarchy = cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None:
        return []
    px_area = mpp * mpp
    hierarchy = hierarchy[0]
    polygons = []
    for i, (_, _, first_child, parent) in enumerate(hierarchy):
        if parent != -1:
            continue
        if cv2.contourArea(contours[i]) * px_area < params.min_area_um2:
            continue
        holes = []
        child = first_child
        while child != -1:
            if cv2.contourArea(contours[child]) * px_area >= params.min_hole_area_um2:
                holes.append(contours[child])
            child = hierarchy[child][0]
        polygons.append((contours[i], holes))
    return polygons


def to_geojson(polygons: list, downsample: float, slide_id: str) -> dict[str, Any]:
    """Tissue polygons in level-0 pixel coordinates, as QuPath imports annotations."""
    features = []
    for outer, holes in polygons:
        rings = []
        for ring in [outer, *holes]:
            pts = (ring.reshape(-1, 2).astype(np.float64) * downsample).round(1).tolist()
            if len(pts) < 3:
                continue
            rings.append(pts + [pts[0]])
        if rings:
            features.append(
                {
                    "type": "Feature",
                    "geometry": {"type": "Polygon", "coordinates": rings},
                    "properties": {
                        "objectType": "annotation",
                        "classification": {"name": "Tissue", "color": [0, 160, 0]},
                        "slide_id": slide_id,
                    },
                }
            )
    return {"type": "FeatureCollection", "features": features}


def qc_overlay(rgb: np.ndarray, mask: np.ndarray, excluded: np.ndarray) -> np.ndarray:
    """Thumbnail with tissue outlined in green and excluded artefacts tinted red."""
    out = rgb.copy()
    out[excluded] = (0.5 * out[excluded] + [127, 0, 0]).astype(np.uint8)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(out, contours, -1, (0, 170, 0), thickness=max(1, max(rgb.shape[:2]) // 400))
    return out


def segment_slide(
    slide_path: str | Path,
    out_dir: str | Path,
    params: SegmentParams,
    mpp_override: float | None = None,
    mpp_fallback: float | None = None,
) -> dict[str, Any]:
    """Segment one slide and write ``mask.png``, ``mask.json``, ``tissue.geojson``, ``qc.jpg``."""
    out = Path(out_dir)
    with Slide(slide_path, mpp_override, mpp_fallback) as slide:
        thumb, downsample = slide.thumbnail_at_mpp(params.mpp)
        mask_mpp = slide.mpp * downsample
        mask, polygons, t, excluded = segment_image(thumb, mask_mpp, params)
        info = {
            "slide_id": slide.slide_id,
            "downsample": downsample,
            "mask_mpp": mask_mpp,
            "mpp": slide.mpp,
            "mpp_source": slide.mpp_info.source,
            "dimensions": list(slide.dimensions),
            "threshold": t,
            "tissue_fraction": float(mask.mean()),
            "tissue_area_mm2": float(mask.sum() * mask_mpp**2 / 1e6),
            "n_pieces": len(polygons),
            "unreadable_regions": [list(box) for box in slide.unreadable_regions],
            "params": asdict(params),
        }
    if info["unreadable_regions"]:
        log.warning("slide '%s': %d undecodable region(s) treated as background (listed in mask.json)",
                    info["slide_id"], len(info["unreadable_regions"]))
    if not mask.any():
        log.warning("slide '%s': no tissue found; its tile set will be empty", info["slide_id"])
    write_image(out / "mask.png", mask.astype(np.uint8) * 255)
    write_json(out / "tissue.geojson", to_geojson(polygons, downsample, info["slide_id"]))
    write_image(out / "qc.jpg", qc_overlay(thumb, mask, excluded))
    write_json(out / "mask.json", info)
    log.info(
        "slide '%s': %.1f%% tissue (%.2f mm^2, %d pieces) at %.2f um/px, threshold %.0f",
        info["slide_id"], 100 * info["tissue_fraction"], info["tissue_area_mm2"],
        len(polygons), mask_mpp, t,
    )
    return info


def params_from_args(args: argparse.Namespace) -> SegmentParams:
    threshold = args.threshold if args.threshold == "otsu" else int(args.threshold)
    return SegmentParams(
        mpp=args.mpp, threshold=threshold, min_saturation=args.min_saturation,
        median_um=args.median_um, close_um=args.close_um, min_area_um2=args.min_area_um2,
        min_hole_area_um2=args.min_hole_area_um2, exclude_pen=args.exclude_pen,
        exclude_dark=args.exclude_dark, dark_value=args.dark_value,
    )


def main(argv: list[str] | None = None) -> None:
    d = SegmentParams()
    p = argparse.ArgumentParser(prog="python -m wsi_asmil.tissue.segment", description=__doc__)
    add_slide_args(p)
    p.add_argument("--out-dir", required=True, help="folder for mask.png, mask.json, tissue.geojson, qc.jpg")
    p.add_argument("--mpp", type=float, default=d.mpp, help="resolution of the mask (um/px)")
    p.add_argument("--threshold", default=d.threshold, help="'otsu' or a saturation value 0-255")
    p.add_argument("--min-saturation", type=int, default=d.min_saturation)
    p.add_argument("--median-um", type=float, default=d.median_um)
    p.add_argument("--close-um", type=float, default=d.close_um)
    p.add_argument("--min-area-um2", type=float, default=d.min_area_um2)
    p.add_argument("--min-hole-area-um2", type=float, default=d.min_hole_area_um2)
    p.add_argument("--exclude-pen", action=argparse.BooleanOptionalAction, default=d.exclude_pen)
    p.add_argument("--exclude-dark", action=argparse.BooleanOptionalAction, default=d.exclude_dark)
    p.add_argument("--dark-value", type=int, default=d.dark_value)
    args = p.parse_args(argv)
    setup_logging()
    segment_slide(args.slide, args.out_dir, params_from_args(args), args.slide_mpp, args.mpp_fallback)


if __name__ == "__main__":
    main()
