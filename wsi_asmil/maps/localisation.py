"""How well attention finds the tumour: heatmap-vs-truth metrics per slide, aggregated per model.

The ASMIL paper claims its attention covers tumour regions more completely than ABMIL's. These
metrics test that wherever a ground-truth tumour mask exists (the demo cohort always has one).
All are computed on the truth mask's grid, from the raw per-tile attention scores (display
normalisation plays no part: top-q is rank-based, Otsu is scale-free):

``dice``, ``iou``
    of the *thresholded heatmap* (the union of the selected tiles) against the tumour mask, with
    the configured rule: ``top_q`` (the q percent highest-scoring tiles, at least one) or ``otsu``
    (Otsu's threshold on the slide's scores: peaked attention selects few tiles). Both rules are
    always computed as ``dice_topq``/``iou_topq`` and ``dice_otsu``/``iou_otsu``.
``coverage_top<k>``
    the fraction of the tumour area covered by the k highest-scoring tiles;
    ``coverage_tumour_k`` uses k = the number of tiles the tumour area would fill, so slides with
    small and large tumours are comparable ("given as many tiles as the tumour needs").
``tile_auc``
    ROC AUC of the scores for telling tumour tiles (at least half tumour) from the others.
``attention_in_tumour``
    the share of the slide's attention mass that falls on tumour (sum of score x tile tumour
    fraction; attention sums to 1).
``dice_oracle``, ``tumour_in_tiles``
    the ceilings set by the tiling: the Dice of selecting exactly the tumour tiles, and the
    fraction of the tumour inside any tile at all.
``froc_*``
    the slide's part of the lesion-level FROC (CAMELYON16 protocol, :mod:`wsi_asmil.maps.froc`):
    detections taken from its attention, lesions and isolated-tumour-cell clusters in its truth,
    lesions found, false positives, and the scores of each (``froc_lesion_scores``,
    ``froc_fp_scores``), from which :func:`pooled_froc` draws the FROC curve of every slide of a
    model at once. FROC is pooled over slides, normal ones included: it has no per-slide value.

Slides without tumour get a row (``has_tumour`` false) but are left out of the aggregates, where
Dice is undefined.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from wsi_asmil.core.args import setup_logging
from wsi_asmil.core.canvas import Grid, coverage_count
from wsi_asmil.core.io import write_csv, write_json
from wsi_asmil.maps.froc import FP_RATES, Froc, FrocParams, SlideHits, froc, slide_hits
from wsi_asmil.maps.scores import JSON_SUFFIX, read_scores, slide_id_of
from wsi_asmil.tissue.masks import mask_fractions, read_tumour_mask

log = logging.getLogger(__name__)

THRESHOLD_RULES = ("top_q", "otsu")
#: A tile counts as a tumour tile when at least this fraction of it is tumour.
TUMOUR_TILE_FRACTION = 0.5
#: The metrics aggregated per model (mean, std, median over slides with tumour).
SUMMARY_METRICS = (
    "dice", "iou", "dice_topq", "iou_topq", "dice_otsu", "iou_otsu", "coverage_tumour_k",
    "tile_auc", "attention_in_tumour", "dice_oracle", "tumour_in_tiles",
)


@dataclass(frozen=True)
class LocalisationParams:
    """The configurable parts: the headline threshold rule, q for top-q, the k of coverage and how
    FROC takes detections from a heatmap."""

    threshold: str = "otsu"
    top_q: float = 10.0
    top_k: tuple[int, ...] = (5, 10)
    froc_nms_um: float = FrocParams.nms_radius_um
    froc_min_score: float = FrocParams.min_score

    @property
    def froc(self) -> FrocParams:
        return FrocParams(self.froc_nms_um, self.froc_min_score)

    def __post_init__(self) -> None:
        FrocParams(self.froc_nms_um, self.froc_min_score)  # raises on bad FROC settings
        if self.threshold not in THRESHOLD_RULES:
            raise ValueError(f"threshold must be one of {THRESHOLD_RULES}, got {self.threshold!r}")
        if not 0 < self.top_q <= 100:
            raise ValueError(f"top_q must be a percentage in (0, 100], got {self.top_q}")
        if any(k < 1 for k in self.top_k):
            raise ValueError(f"top_k values must be >= 1, got {self.top_k}")


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of a 1-D sample, exact (every split of the sorted values is tried).

    Returns ``t`` such that ``values > t`` is the upper class; with all values equal there is no
    split and ``t`` is the maximum, so nothing is selected (flat attention localises nothing).
    """
    v = np.sort(np.asarray(values, dtype=np.float64).reshape(-1))
    n = len(v)
    if n == 0:
        return math.inf
    distinct = np.nonzero(np.diff(v) > 0)[0]  # split after these indices
    if len(distinct) == 0:
        return float(v[-1])
    csum = np.cumsum(v)
    n0 = distinct + 1.0
    n1 = n - n0
    mu0 = csum[distinct] / n0
    mu1 = (csum[-1] - csum[distinct]) / n1
    between = n0 * n1 * (mu0 - mu1) ** 2
    best = distinct[int(np.argmax(between))]
    return float(v[best])


def top_q_selection(scores: np.ndarray, q: float) -> np.ndarray:
    """The ceil(q% of M) highest-scoring tiles (at least one; ties broken by tile order)."""
    m = len(scores)
    sel = np.zeros(m, dtype=bool)
    if m:
        k = max(1, int(math.ceil(m * q / 100.0 - 1e-9)))
        sel[np.argsort(-scores, kind="stable")[:k]] = True
    return sel


def top_k_selection(scores: np.ndarray, k: int) -> np.ndarray:
    sel = np.zeros(len(scores), dtype=bool)
    sel[np.argsort(-scores, kind="stable")[: min(k, len(scores))]] = True
    return sel


def select_tiles(scores: np.ndarray, rule: str, top_q: float = 10.0) -> np.ndarray:
    """Which tiles the thresholded heatmap keeps under ``rule`` (``top_q`` or ``otsu``)."""
    if rule == "top_q":
        return top_q_selection(scores, top_q)
    if rule == "otsu":
        return scores > otsu_threshold(scores)
    raise ValueError(f"threshold must be one of {THRESHOLD_RULES}, got {rule!r}")


def dice_iou(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Dice and IoU of two boolean masks; NaN when both are empty (nothing to find, nothing found)."""
    inter = float(np.logical_and(pred, truth).sum())
    a, b = float(pred.sum()), float(truth.sum())
    union = a + b - inter
    if a + b == 0:
        return math.nan, math.nan
    return 2 * inter / (a + b), inter / union


def _auc(scores: np.ndarray, positive: np.ndarray) -> float:
    if positive.all() or not positive.any():
        return math.nan
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(positive, scores))


def slide_metrics(
    coords: np.ndarray, extent: float, scores: np.ndarray, truth: np.ndarray, downsample: float,
    params: LocalisationParams = LocalisationParams(), mpp: float | None = None,
) -> dict[str, Any]:
    """Every localisation metric of one slide (see the module docstring); the FROC columns only
    with the slide's ``mpp``, which the protocol's physical sizes need."""
    scores = np.asarray(scores, dtype=np.float64)
    truth = np.asarray(truth, dtype=bool)
    h, w = truth.shape
    grid = Grid(downsample, w, h)
    n_truth = int(truth.sum())
    row: dict[str, Any] = {"n_tiles": len(scores), "tumour_px": n_truth, "has_tumour": n_truth > 0}

    def union(select: np.ndarray) -> np.ndarray:
        return coverage_count(coords, extent, grid, select) > 0 if len(scores) else np.zeros_like(truth)

    def covered(select: np.ndarray) -> float:
        return float(np.logical_and(union(select), truth).sum()) / n_truth if n_truth else math.nan

    c = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    frac = mask_fractions(truth, downsample, c[:, 0], c[:, 1], extent)
    tumour_tiles = frac >= TUMOUR_TILE_FRACTION
    row["tumour_tiles"] = int(tumour_tiles.sum())
    for rule, suffix in (("top_q", "topq"), ("otsu", "otsu")):
        sel = select_tiles(scores, rule, params.top_q)
        row[f"dice_{suffix}"], row[f"iou_{suffix}"] = dice_iou(union(sel), truth)
        row[f"n_{suffix}"] = int(sel.sum())
    head = "topq" if params.threshold == "top_q" else "otsu"
    row["threshold"] = params.threshold if params.threshold == "otsu" else f"top_q={params.top_q:g}%"
    row["dice"], row["iou"], row["n_selected"] = row[f"dice_{head}"], row[f"iou_{head}"], row[f"n_{head}"]
    for k in params.top_k:
        row[f"coverage_top{k}"] = covered(top_k_selection(scores, k))
    tile_px = ((extent / downsample) ** 2) if extent else math.nan
    k_star = max(1, int(math.ceil(n_truth / tile_px))) if n_truth and tile_px > 0 else 0
    row["k_tumour"] = k_star
    row["coverage_tumour_k"] = covered(top_k_selection(scores, k_star)) if k_star else math.nan
    row["tile_auc"] = _auc(scores, tumour_tiles)
    row["attention_in_tumour"] = float(np.sum(scores * frac)) if n_truth and len(scores) else math.nan
    row["dice_oracle"] = dice_iou(union(tumour_tiles), truth)[0] if n_truth else math.nan
    row["tumour_in_tiles"] = covered(np.ones(len(scores), dtype=bool)) if len(scores) else (0.0 if n_truth else math.nan)
    if mpp is not None:
        row.update(froc_columns(slide_hits(coords, extent, scores, truth, downsample, mpp, params.froc)))
    return row


def _join(values: np.ndarray) -> str:
    return " ".join(f"{v:.6g}" for v in values)


def froc_columns(hits: SlideHits) -> dict[str, Any]:
    """A slide's FROC counts and scores as table columns (scores space-separated)."""
    return {
        "froc_detections": hits.n_detections, "froc_lesions": hits.n_lesions, "froc_itc": hits.n_itc,
        "froc_found": int((hits.lesion_scores > 0).sum()), "froc_fps": len(hits.fp_scores),
        "froc_lesion_scores": _join(hits.lesion_scores), "froc_fp_scores": _join(hits.fp_scores),
    }


def _split(cell: Any) -> np.ndarray:
    """A scores cell back to numbers: a CSV reader makes a lone score a number and none NaN."""
    if isinstance(cell, str):
        return np.array([float(v) for v in cell.split()], dtype=np.float64)
    return np.zeros(0) if cell is None or pd.isna(cell) else np.array([float(cell)])


def pooled_froc(table: pd.DataFrame) -> Froc | None:
    """The FROC of every slide in ``table`` (one model's rows), None without the FROC columns."""
    if "froc_lesion_scores" not in table.columns or not len(table):
        return None
    hits = [SlideHits(_split(r.froc_lesion_scores), _split(r.froc_fp_scores), int(r.froc_detections),
                      int(r.froc_lesions), int(r.froc_itc)) for r in table.itertuples()]
    return froc(hits)


def froc_summary(result: Froc | None) -> dict[str, Any] | None:
    """The FROC score, its sensitivities and the curve, for JSON."""
    if result is None:
        return None
    return {
        "score": result.score,
        "sensitivity_at": {f"{r:g}": result.at_rates[r] for r in FP_RATES},
        "fps_per_slide": result.fps_per_slide.tolist(), "sensitivity": result.sensitivity.tolist(),
        "n_slides": result.n_slides, "n_lesions": result.n_lesions,
    }


def summarise(table: pd.DataFrame, metrics: Sequence[str] = SUMMARY_METRICS) -> dict[str, dict[str, float]]:
    """Mean, std (ddof 1), median and n of each metric over the slides with tumour (NaNs left out)."""
    rows = table[table["has_tumour"].astype(bool)] if len(table) else table
    out: dict[str, dict[str, float]] = {}
    for m in [*metrics, *sorted(c for c in table.columns if c.startswith("coverage_top"))]:
        if m not in rows.columns:
            continue
        v = pd.to_numeric(rows[m], errors="coerce").dropna().to_numpy(dtype=np.float64)
        out[m] = {
            "mean": float(v.mean()) if len(v) else math.nan,
            "std": float(v.std(ddof=1)) if len(v) > 1 else (0.0 if len(v) else math.nan),
            "median": float(np.median(v)) if len(v) else math.nan,
            "n": int(len(v)),
        }
    return out


def localise_model(
    scores_json: Sequence[str | Path], truth_png: Sequence[str | Path], params: LocalisationParams,
    model: str,
) -> pd.DataFrame:
    """Per-slide metrics of one model: scores ``<id>_scores.json`` (+ .csv) matched to truth ``<id>.png``."""
    truth_by_id = {Path(p).stem: Path(p) for p in truth_png}
    rows = []
    for sj in scores_json:
        sid = slide_id_of(sj)
        if sid not in truth_by_id:
            continue
        scores = read_scores(sj)
        mask, side = read_tumour_mask(truth_by_id[sid])
        row = slide_metrics(scores.coords, scores.tile_extent, scores.scores, mask, float(side["downsample"]), params,
                            mpp=float(scores.meta["mpp"]))
        row["tumour_area_mm2"] = float(side.get("tumour_area_um2", math.nan)) / 1e6
        rows.append({"model": model, "slide_id": sid, **row})
    missing = sorted(set(truth_by_id) - {slide_id_of(p) for p in scores_json})
    if missing:
        log.warning("%s: truth without scores for %d slide(s): %s", model, len(missing), ", ".join(missing[:10]))
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m wsi_asmil.maps.localisation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model name written into the outputs")
    p.add_argument("--scores", nargs="+", required=True,
                   help="<slide>_scores.json files (the .csv beside each), or folders holding them")
    p.add_argument("--truth", nargs="*", default=[], help="<slide>.png tumour masks (a .json sidecar beside each)")
    p.add_argument("--threshold", choices=THRESHOLD_RULES, default="otsu")
    p.add_argument("--top-q", type=float, default=10.0, help="percent of tiles kept by the top_q rule")
    p.add_argument("--top-k", type=int, nargs="*", default=[5, 10], help="k of coverage_top<k>")
    p.add_argument("--froc-nms-um", type=float, default=LocalisationParams.froc_nms_um,
                   help="FROC: detections closer than this (um) to a better one are suppressed")
    p.add_argument("--froc-min-score", type=float, default=LocalisationParams.froc_min_score,
                   help="FROC: the lowest detection score, attention relative to uniform (a x M)")
    p.add_argument("--out-csv", required=True)
    p.add_argument("--out-json", required=True)
    args = p.parse_args(argv)
    setup_logging()
    params = LocalisationParams(args.threshold, args.top_q, tuple(args.top_k), args.froc_nms_um, args.froc_min_score)
    scores = [q for p in map(Path, args.scores) for q in (sorted(p.glob(f"*{JSON_SUFFIX}")) if p.is_dir() else [p])]
    table = localise_model(scores, args.truth, params, args.model)
    write_csv(args.out_csv, table)
    summary = {"model": args.model, "params": {"threshold": params.threshold, "top_q": params.top_q,
               "top_k": list(params.top_k), "froc_nms_um": params.froc_nms_um,
               "froc_min_score": params.froc_min_score}, "n_slides": int(len(table)),
               "n_tumour_slides": int(table["has_tumour"].sum()) if len(table) else 0,
               "metrics": summarise(table), "froc": froc_summary(pooled_froc(table))}
    write_json(args.out_json, summary)
    for m in ("dice", "iou", "coverage_tumour_k", "tile_auc", "attention_in_tumour"):
        s = summary["metrics"].get(m)
        if s:
            log.info("%s %s: %.3f ± %.3f (n=%d)", args.model, m, s["mean"], s["std"], s["n"])
    if summary["froc"]:
        log.info("%s FROC %.3f over %d slides, %d lesions", args.model, summary["froc"]["score"],
                 summary["froc"]["n_slides"], summary["froc"]["n_lesions"])


if __name__ == "__main__":
    main()
