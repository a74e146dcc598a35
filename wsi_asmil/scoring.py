"""Per-tile attention scores and slide probabilities from trained fold models.

One scoring pass serves heatmaps, localisation metrics and prediction, so all three see the very
same numbers. A tile's score is the model's own attention in eval mode (softmax over tiles, mean
over heads and tokens; ``MILModel.attention_scores``), the same definition for every model type.

Which fold models score a slide (``fold_mode``):

* ``test``: the fold whose test set holds the slide, so no slide is shown through a model that
  trained on it; a slide in no test set (an unlabeled one) gets the ensemble of every fold.
* ``ensemble``: the mean over every fold model (scores and probabilities).
* a fold number ``k``: that fold's model only.

Outputs per slide, next to each other in ``out_dir``: ``<slide>_scores.csv`` (``x, y`` level-0
top-left, ``score``; with several models also ``score_fold<k>``) and ``<slide>_scores.json``
(folds used, class probabilities per fold and their mean, the prediction, and the tile geometry
that drawing needs, so drawing never has to open the features store or load torch).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from wsi_asmil import store
from wsi_asmil.cli import setup_logging
from wsi_asmil.io import write_csv, write_json
from wsi_asmil.models.base import MILModel
from wsi_asmil.models.registry import load_model

log = logging.getLogger(__name__)

FOLD_MODES = ("test", "ensemble")


def parse_fold_mode(text: str | int) -> str | int:
    """``test``, ``ensemble`` or a fold number (as given on a command line or in the config)."""
    if isinstance(text, int) or (isinstance(text, str) and text.strip().isdigit()):
        return int(text)
    if text not in FOLD_MODES:
        raise ValueError(f"fold must be one of {FOLD_MODES} or a fold number, got {text!r}")
    return text


def choose_folds(fold_mode: str | int, slide_id: str, n_folds: int, split: dict[str, Any] | None) -> list[int]:
    """The fold models that score ``slide_id`` (see the module docstring)."""
    if isinstance(fold_mode, int):
        if not 0 <= fold_mode < n_folds:
            raise ValueError(f"fold {fold_mode} does not exist: the run has folds 0..{n_folds - 1}")
        return [fold_mode]
    if fold_mode == "ensemble":
        return list(range(n_folds))
    if fold_mode == "test":
        if split is None:
            raise ValueError("fold mode 'test' needs the run's split JSON")
        for k, fold in enumerate(split["folds"][:n_folds]):
            if slide_id in fold["test"]:
                return [k]
        return list(range(n_folds))
    raise ValueError(f"fold must be one of {FOLD_MODES} or a fold number, got {fold_mode!r}")


def resolve_device(device: str) -> torch.device:
    """``auto`` is CUDA when present; asking for CUDA without it is an error, not a silent CPU run."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available")
    return dev


class FoldModels:
    """The fold checkpoints of one model, each loaded once per process and kept on ``device``."""

    def __init__(self, models_dir: str | Path, device: torch.device | str = "cpu") -> None:
        self.models_dir = Path(models_dir)
        self.device = torch.device(device)
        self._cache: dict[int, tuple[MILModel, dict[str, Any]]] = {}

    def path(self, fold: int) -> Path:
        return self.models_dir / f"fold{fold}" / "model.pt"

    def get(self, fold: int) -> tuple[MILModel, dict[str, Any]]:
        if fold not in self._cache:
            p = self.path(fold)
            if not p.is_file():
                raise FileNotFoundError(f"no model checkpoint {p} (fold {fold} not trained?)")
            self._cache[fold] = load_model(p, map_location=self.device)
        return self._cache[fold]


@dataclass
class SlideScores:
    """Attention and probabilities of one slide under one or more fold models."""

    folds: list[int]
    classes: list[str]
    per_fold: np.ndarray  # (n_folds, M) attention, each row sums to 1
    probs_per_fold: np.ndarray  # (n_folds, C)

    @property
    def scores(self) -> np.ndarray:
        """Mean attention over the fold models (still sums to 1)."""
        return self.per_fold.mean(axis=0) if len(self.per_fold) else np.zeros(0)

    @property
    def probs(self) -> np.ndarray:
        return self.probs_per_fold.mean(axis=0)


@torch.no_grad()
def score_bag(features: np.ndarray, folds: Sequence[int], models: FoldModels) -> SlideScores:
    """Score one bag (M, D) with each fold model; an empty bag gets no scores and no probabilities."""
    classes: list[str] = []
    per_fold, probs = [], []
    if len(features) == 0:
        for k in folds:
            classes = list(models.get(k)[1]["classes"])
        n = len(folds)
        return SlideScores(list(folds), classes, np.zeros((n, 0)), np.full((n, len(classes)), np.nan))
    bag = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)).to(models.device)
    for k in folds:
        model, ckpt = models.get(k)
        if classes and list(ckpt["classes"]) != classes:
            raise ValueError(f"fold {k} has classes {ckpt['classes']}, other folds {classes}")
        classes = list(ckpt["classes"])
        per_fold.append(model.attention_scores(bag).float().cpu().numpy())
        probs.append(torch.softmax(model(bag)["logits"].float(), dim=-1).cpu().numpy())
    return SlideScores(list(folds), classes, np.stack(per_fold).astype(np.float64), np.stack(probs).astype(np.float64))


def store_slide_id(path: str | Path) -> str:
    """The slide id a store is filed under (its directory name without ``.zarr``)."""
    name = Path(path).name
    return name[: -len(".zarr")] if name.endswith(".zarr") else name


def _geometry(attrs: dict[str, Any]) -> dict[str, Any]:
    keys = ("tile_extent", "target_mpp", "tile_size", "mpp", "slide_dimensions", "overlap", "encoder", "weights")
    return {k: attrs.get(k) for k in keys}


def write_slide_scores(
    out_dir: Path, slide_id: str, model_name: str, fold_mode: str | int, coords: np.ndarray,
    result: SlideScores, attrs: dict[str, Any],
) -> dict[str, Any]:
    """``<slide>_scores.csv`` and ``<slide>_scores.json``; returns the JSON record."""
    table = pd.DataFrame({"x": coords[:, 0], "y": coords[:, 1], "score": result.scores})
    if len(result.folds) > 1:
        for k, row in zip(result.folds, result.per_fold):
            table[f"score_fold{k}"] = row
    write_csv(out_dir / f"{slide_id}_scores.csv", table)
    has_probs = len(coords) > 0
    mean = result.probs if has_probs else None
    record: dict[str, Any] = {
        "slide_id": slide_id,
        "model": model_name,
        "fold_mode": fold_mode,
        "folds": result.folds,
        "classes": result.classes,
        "n_tiles": int(len(coords)),
        "probs": {c: float(p) for c, p in zip(result.classes, mean)} if has_probs else None,
        "pred": result.classes[int(np.argmax(mean))] if has_probs else None,
        "probs_per_fold": {
            str(k): {c: float(p) for c, p in zip(result.classes, row)}
            for k, row in zip(result.folds, result.probs_per_fold)
        } if has_probs else None,
        # Share of fold models whose own prediction equals the ensemble's: 1.0 = unanimous.
        "agreement": float(np.mean(result.probs_per_fold.argmax(axis=1) == int(np.argmax(mean)))) if has_probs else None,
        **_geometry(attrs),
    }
    write_json(out_dir / f"{slide_id}_scores.json", record)
    return record


def score_slides(
    features_stores: Sequence[str | Path],
    models_dir: str | Path,
    n_folds: int,
    out_dir: str | Path,
    fold_mode: str | int = "test",
    split_json: str | Path | None = None,
    device: str = "auto",
    model_name: str | None = None,
) -> list[dict[str, Any]]:
    """Score every slide's features store; writes the per-slide CSV and JSON and returns the records.

    Fold models are loaded once for the whole list, and features are read one slide at a time, so
    memory is one slide's bag plus the models whatever the cohort size.
    """
    split = json.loads(Path(split_json).read_text()) if split_json else None
    dev = resolve_device(device)
    models = FoldModels(models_dir, dev)
    model_name = model_name or Path(models_dir).name
    out = Path(out_dir)
    records = []
    for path in features_stores:
        sid = store_slide_id(path)
        feats, coords, attrs = store.read_features(path)
        folds = choose_folds(fold_mode, sid, n_folds, split)
        result = score_bag(feats, folds, models)
        if len(feats) == 0:
            log.warning("slide '%s': no tiles, so no attention and no prediction", sid)
        record = write_slide_scores(out, sid, model_name, fold_mode, coords, result, attrs)
        log.info("slide '%s': %d tiles, folds %s, probabilities %s", sid, len(coords), folds, record["probs"])
        records.append(record)
    return records


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m wsi_asmil.scoring", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", required=True, nargs="+", help="features Zarr stores, one per slide")
    p.add_argument("--models-dir", required=True, help="folder holding fold<k>/model.pt of one model")
    p.add_argument("--model-name", default=None, help="name recorded in the outputs (default: the folder name)")
    p.add_argument("--folds", type=int, required=True, help="number of folds the run trained")
    p.add_argument("--fold", type=parse_fold_mode, default="test", help="test, ensemble or a fold number")
    p.add_argument("--split", default=None, help="split JSON of the run (needed by --fold test)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--out-dir", required=True, help="folder for <slide>_scores.csv and .json")
    args = p.parse_args(argv)
    setup_logging()
    score_slides(args.features, args.models_dir, args.folds, args.out_dir, args.fold, args.split,
                 args.device, args.model_name)


if __name__ == "__main__":
    main()
