"""Attention heatmaps: where in the slide the trained model looked.

A tile's score is the model's own attention in eval mode (softmax over tiles, mean over heads and
tokens; the same definition for every model, see ``MILModel.attention_scores``). The slide is
scored by the fold model whose test set holds it, so no slide is shown through a model that trained
on it; a slide in no test set (an unlabeled one) gets the mean over all fold models.

The canvas is the slide thumbnail at ``mpp``, so memory follows the output size, not the slide.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from matplotlib import colormaps

from wsi_asmil import store
from wsi_asmil.cli import add_slide_args, setup_logging
from wsi_asmil.io import write_csv, write_image
from wsi_asmil.models.registry import load_model
from wsi_asmil.slide import Slide

log = logging.getLogger(__name__)


def folds_for(split: dict, slide_id: str, n_folds: int) -> list[int]:
    """The fold that tested the slide, or every fold when none did."""
    for k, fold in enumerate(split["folds"]):
        if slide_id in fold["test"]:
            return [k]
    return list(range(n_folds))


def score_bag(features: np.ndarray, model_paths: list[Path]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Mean attention scores (M,) and class probabilities (C,) over the given models."""
    bag = torch.from_numpy(features)
    scores, probs = [], []
    classes: list[str] = []
    for path in model_paths:
        model, ckpt = load_model(path)
        classes = ckpt["classes"]
        with torch.no_grad():
            scores.append(model.attention_scores(bag).cpu().numpy())
            probs.append(torch.softmax(model(bag)["logits"], dim=-1).cpu().numpy())
    return np.mean(scores, axis=0), np.mean(probs, axis=0), classes


def normalize(scores: np.ndarray, mode: str) -> np.ndarray:
    """Display values in [0, 1].

    ``rank``: percentile within the slide (CLAM's convention; comparable across models whatever
    their attention sharpness). ``uniform``: M x weight divided by its maximum, so 1/M-flat
    attention shows as uniform colour.
    """
    m = len(scores)
    if m == 0:
        return scores
    if mode == "rank":
        if m == 1:
            return np.ones(1)
        order = scores.argsort(kind="stable")
        ranks = np.empty(m)
        ranks[order] = np.arange(m)
        return ranks / (m - 1)
    if mode == "uniform":
        v = scores * m
        return v / v.max()
    raise ValueError(f"heatmap.normalize must be 'rank' or 'uniform', got {mode!r}")


def render(
    thumb: np.ndarray,
    downsample: float,
    coords: np.ndarray,
    extent: float,
    values: np.ndarray,
    cmap: str,
    alpha: float,
) -> np.ndarray:
    """Blend colour-mapped tile values over the thumbnail; overlapping tiles are averaged."""
    h, w = thumb.shape[:2]
    total = np.zeros((h, w), np.float32)
    count = np.zeros((h, w), np.float32)
    side = max(1, int(round(extent / downsample)))
    for (x, y), v in zip((coords / downsample).round().astype(int), values):
        total[max(y, 0) : y + side, max(x, 0) : x + side] += v
        count[max(y, 0) : y + side, max(x, 0) : x + side] += 1
    covered = count > 0
    heat = np.zeros_like(total)
    heat[covered] = total[covered] / count[covered]
    rgb = (colormaps[cmap](heat)[..., :3] * 255).astype(np.float32)
    out = thumb.astype(np.float32)
    out[covered] = (1 - alpha) * out[covered] + alpha * rgb[covered]
    return out.round().astype(np.uint8)


def heatmap_slide(
    slide_path: str | Path,
    features_store: str | Path,
    split_json: str | Path,
    models_dir: str | Path,
    out_image: str | Path,
    out_scores: str | Path,
    mpp: float = 8.0,
    normalize_mode: str = "rank",
    cmap: str = "jet",
    alpha: float = 0.5,
    mpp_override: float | None = None,
    mpp_fallback: float | None = None,
) -> pd.DataFrame:
    feats, coords, attrs = store.read_features(features_store)
    sid = attrs["slide_id"]
    split = json.loads(Path(split_json).read_text())
    folds = folds_for(split, sid, len(split["folds"]))
    with Slide(slide_path, mpp_override, mpp_fallback) as slide:
        thumb, downsample = slide.thumbnail_at_mpp(mpp)
    if len(feats) == 0:
        log.warning("slide '%s': no tiles, the heatmap is the bare thumbnail", sid)
        scores, values, probs, classes = np.zeros(0), np.zeros(0), None, []
    else:
        paths = [Path(models_dir) / f"fold{k}" / "model.pt" for k in folds]
        scores, probs, classes = score_bag(feats, paths)
        values = normalize(scores, normalize_mode)
    write_image(out_image, render(thumb, downsample, coords, attrs["tile_extent"], values, cmap, alpha))
    table = pd.DataFrame(
        {"x": coords[:, 0], "y": coords[:, 1], "score": scores, "display": values}
    )
    write_csv(out_scores, table)
    if probs is not None:
        log.info(
            "slide '%s': folds %s, probabilities %s",
            sid, folds, {c: round(float(p), 4) for c, p in zip(classes, probs)},
        )
    return table


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m wsi_asmil.heatmap", description=__doc__)
    add_slide_args(p)
    p.add_argument("--features", required=True, help="features Zarr store of the slide")
    p.add_argument("--split", required=True, help="split JSON of the run")
    p.add_argument("--models-dir", required=True, help="folder holding fold<k>/model.pt")
    p.add_argument("--out", required=True, help="heatmap PNG to write")
    p.add_argument("--scores", required=True, help="per-tile scores CSV to write")
    p.add_argument("--mpp", type=float, default=8.0, help="resolution of the image (um/px)")
    p.add_argument("--normalize", default="rank", choices=["rank", "uniform"])
    p.add_argument("--cmap", default="jet")
    p.add_argument("--alpha", type=float, default=0.5)
    args = p.parse_args(argv)
    setup_logging()
    heatmap_slide(
        args.slide, args.features, args.split, args.models_dir, args.out, args.scores,
        args.mpp, args.normalize, args.cmap, args.alpha, args.slide_mpp, args.mpp_fallback,
    )


if __name__ == "__main__":
    main()
