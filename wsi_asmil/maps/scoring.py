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

Memory is bounded by a chunk of tiles, not by the slide. Every model here computes a tile's attention
logits from that tile alone; only the softmax over tiles is global, and everything after it (the
classifier, ASMIL's value projection and aggregator) sees the attention-pooled vectors, never the
tiles. So features are read from the Zarr store ``chunk_tiles`` rows at a time, and per model and
chunk only the logits (a few floats per tile, kept for the scores) and an online log-sum-exp with a
rescaled running weighted sum (as in flash attention) survive. The result equals the whole-bag
computation to float rounding (``tests/test_scoring.py``). Models declare that split themselves
(:class:`~wsi_asmil.mil.models.base.SoftmaxPooling`); one without it is scored on the whole bag.

An out-of-memory error becomes a message naming the slide, its tile count, the device and the
settings to change (``wsi_asmil.core.memory.oom_guard``), and the slide gets no outputs.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from wsi_asmil.core.args import setup_logging
from wsi_asmil.core.devices import resolve_device
from wsi_asmil.core.memory import BagMemoryError, oom_guard
from wsi_asmil.core.run_layout import fold_checkpoint
from wsi_asmil.features import store
from wsi_asmil.maps.scores import write_scores
from wsi_asmil.mil.models.base import MILModel, splits_at_softmax
from wsi_asmil.mil.models.registry import load_model

log = logging.getLogger(__name__)

FOLD_MODES = ("test", "ensemble")

#: Tiles read and scored at a time: one Zarr row chunk, 8 MiB of float32 features at D = 512.
DEFAULT_CHUNK_TILES = store.ROWS_PER_CHUNK


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


class FoldModels:
    """The fold checkpoints of one model, each loaded once per process and kept on ``device``."""

    def __init__(self, models_dir: str | Path, device: torch.device | str = "cpu") -> None:
        self.models_dir = Path(models_dir)
        self.device = torch.device(device)
        self._cache: dict[int, tuple[MILModel, dict[str, Any]]] = {}

    def path(self, fold: int) -> Path:
        return fold_checkpoint(self.models_dir, fold)

    def loaded(self, fold: int) -> MILModel | None:
        """Fold ``fold``'s model if it is loaded already (never loads it)."""
        return self._cache[fold][0] if fold in self._cache else None

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


# --- chunked scoring ------------------------------------------------------------------------------


class SoftmaxPool:
    """``sum_i softmax(l)_i v_i`` over tiles that arrive in chunks, for R rows of logits at once.

    An online log-sum-exp: a running maximum ``m``, a running sum ``s = sum_i exp(l_i - m)`` and a
    running weighted sum ``a = sum_i exp(l_i - m) v_i``, both rescaled by ``exp(m_old - m_new)``
    when a chunk raises the maximum, so nothing overflows however sharp the attention. At the end
    ``a / s`` is the softmax-pooled vector and ``m + log s`` the normaliser that turns each kept
    logit into its softmax weight. The logits (R floats per tile) are kept on the host for the
    per-tile scores; the tiles' values are not.
    """

    def __init__(self) -> None:
        self.max: torch.Tensor | None = None
        self.sum: torch.Tensor | None = None
        self.acc: torch.Tensor | None = None
        self.logits: list[torch.Tensor] = []

    def add(self, logits: torch.Tensor, values: torch.Tensor) -> None:
        """One chunk: ``logits`` (R, c) and the tiles' values (c, D)."""
        logits = logits.float()
        new_max = logits.amax(dim=-1)
        if self.max is not None:
            new_max = torch.maximum(self.max, new_max)
        e = torch.exp(logits - new_max[:, None])
        part_sum, part_acc = e.sum(dim=-1), e @ values.float()
        if self.max is None:
            self.sum, self.acc = part_sum, part_acc
        else:
            scale = torch.exp(self.max - new_max)
            self.sum = self.sum * scale + part_sum
            self.acc = self.acc * scale[:, None] + part_acc
        self.max = new_max
        self.logits.append(logits.cpu())

    def pooled(self) -> torch.Tensor:
        """The softmax-pooled values (R, D)."""
        if self.acc is None or self.sum is None:
            raise ValueError("empty bag: no tiles were added")
        return self.acc / self.sum[:, None]

    def weights_mean(self) -> torch.Tensor:
        """Each tile's softmax weight averaged over the R rows (M,), on the host."""
        if self.max is None or self.sum is None:
            raise ValueError("empty bag: no tiles were added")
        lse = (self.max + torch.log(self.sum)).cpu()[:, None]
        return torch.cat([torch.exp(chunk - lse).mean(dim=0) for chunk in self.logits])


class ModelScorer:
    """One model's attention scores and class probabilities over a bag fed in row chunks.

    Equal to ``model.attention_scores(bag)`` and ``softmax(model(bag)["logits"])`` on the whole
    bag, in eval mode. Models that do not split at their softmax over tiles
    (:func:`~wsi_asmil.mil.models.base.splits_at_softmax`) gather the chunks and run whole.
    """

    def __init__(self, model: MILModel) -> None:
        self.model = model
        self.chunked = splits_at_softmax(model)
        self.pool = SoftmaxPool()
        self.whole: list[torch.Tensor] = []

    @torch.no_grad()
    def add(self, chunk: torch.Tensor) -> None:
        if not self.chunked:
            self.whole.append(chunk)
            return
        with self.model.evaluating():
            logits, values = self.model.pooling_terms(chunk)
            self.pool.add(logits, values)

    @torch.no_grad()
    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        """(scores (M,), probabilities (C,)) as float64."""
        with self.model.evaluating():
            if not self.chunked:
                bag = torch.cat(self.whole)
                self.whole = []
                scores = self.model.attention_scores(bag)
                logits = self.model(bag)["logits"]
            else:
                scores = self.pool.weights_mean()
                logits = self.model.logits_from_pooled(self.pool.pooled())
        probs = torch.softmax(logits.float(), dim=-1)
        return scores.float().cpu().numpy().astype(np.float64), probs.cpu().numpy().astype(np.float64)


def iter_chunks(features: Any, chunk_tiles: int, device: torch.device) -> Iterator[torch.Tensor]:
    """Float32 row chunks of ``features`` (an array or a lazy Zarr array) on ``device``."""
    if chunk_tiles < 1:
        raise ValueError(f"chunk_tiles must be >= 1, got {chunk_tiles}")
    for start in range(0, features.shape[0], chunk_tiles):
        rows = np.ascontiguousarray(features[start : start + chunk_tiles], dtype=np.float32)
        yield torch.from_numpy(rows).to(device)


@torch.no_grad()
def score_bag(
    features: Any, folds: Sequence[int], models: FoldModels, chunk_tiles: int = DEFAULT_CHUNK_TILES,
) -> SlideScores:
    """Score one bag (M, D) with each fold model; an empty bag gets no scores and no probabilities.

    ``features`` is anything sliced by rows (a NumPy array or ``store.lazy_features``): it is read
    once, ``chunk_tiles`` rows at a time, and every fold model takes each chunk in turn.
    """
    classes: list[str] = []
    scorers = []
    for k in folds:
        model, ckpt = models.get(k)
        if classes and list(ckpt["classes"]) != classes:
            raise ValueError(f"fold {k} has classes {ckpt['classes']}, other folds {classes}")
        classes = list(ckpt["classes"])
        scorers.append(ModelScorer(model))
    n, n_tiles = len(folds), features.shape[0]
    if n_tiles == 0:
        return SlideScores(list(folds), classes, np.zeros((n, 0)), np.full((n, len(classes)), np.nan))
    for scorer in scorers:
        if not scorer.chunked:
            log.warning("model %s has no chunked scoring: its whole bag of %d tiles is held at once",
                        type(scorer.model).__name__, n_tiles)
    for chunk in iter_chunks(features, chunk_tiles, models.device):
        for scorer in scorers:
            scorer.add(chunk)
    per_fold, probs = zip(*(scorer.finish() for scorer in scorers))
    return SlideScores(list(folds), classes, np.stack(per_fold), np.stack(probs))


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
    """``<slide>_scores.csv`` and ``<slide>_scores.json`` (``wsi_asmil.maps.scores``); returns the record."""
    table = pd.DataFrame({"x": coords[:, 0], "y": coords[:, 1], "score": result.scores})
    if len(result.folds) > 1:
        for k, row in zip(result.folds, result.per_fold):
            table[f"score_fold{k}"] = row
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
    write_scores(out_dir, table, record)
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
    chunk_tiles: int = DEFAULT_CHUNK_TILES,
) -> list[dict[str, Any]]:
    """Score every slide's features store; writes the per-slide CSV and JSON and returns the records.

    Fold models are loaded once for the whole list, and each slide's features are read
    ``chunk_tiles`` rows at a time, so memory is the models, one chunk and a few numbers per tile,
    whatever the slide's size and the cohort's. Out of memory raises
    ``wsi_asmil.core.memory.BagMemoryError`` naming the slide and what to change; that slide has no outputs.
    """
    if chunk_tiles < 1:
        raise ValueError(f"chunk_tiles must be >= 1, got {chunk_tiles}")
    split = json.loads(Path(split_json).read_text()) if split_json else None
    dev = resolve_device(device)
    models = FoldModels(models_dir, dev)
    model_name = model_name or Path(models_dir).name
    out = Path(out_dir)
    records = []
    for path in features_stores:
        folds = choose_folds(fold_mode, store_slide_id(path), n_folds, split)
        records.append(score_store(path, folds, models, out, model_name, fold_mode, chunk_tiles)[0])
    return records


def score_store(
    path: str | Path, folds: Sequence[int], models: FoldModels, out_dir: Path, model_name: str,
    fold_mode: str | int, chunk_tiles: int = DEFAULT_CHUNK_TILES,
) -> tuple[dict[str, Any], np.ndarray, SlideScores]:
    """Score one features store with ``folds`` and write its scores files; returns (the record,
    the tiles' coords, the scores). Out of memory raises a BagMemoryError naming the slide."""
    sid = store_slide_id(path)
    group = store.open_store(path)
    coords, attrs = group["coords"][:], dict(group.attrs)

    def advice() -> str:  # at error time: which models had loaded
        whole = any(not splits_at_softmax(m) for m in map(models.loaded, folds) if m is not None)
        return scoring_advice(models.device, chunk_tiles, whole)

    with oom_guard("scoring", sid, len(coords), models.device, advice):
        result = score_bag(store.lazy_features(path), folds, models, chunk_tiles)
        if len(coords) == 0:
            log.warning("slide '%s': no tiles, so no attention and no prediction", sid)
        record = write_slide_scores(out_dir, sid, model_name, fold_mode, coords, result, attrs)
    log.info("slide '%s': %d tiles, folds %s, probabilities %s", sid, len(coords), list(folds), record["probs"])
    return record, coords, result


# --- out of memory -----------------------------------------------------------------------------------


def scoring_advice(device: torch.device, chunk_tiles: int, whole: bool = False) -> str:
    """What to change when scoring runs out of memory on ``device`` (the config key first).

    ``whole``: a fold model has no chunked path (it does not split at its softmax), so its whole
    bag is held.
    """
    if whole:
        held, chunk = "a model that scores the whole bag at once (no chunked path)", ""
    else:
        held = f"{chunk_tiles} tiles at a time"
        chunk = f", or lower --chunk-tiles of python -m wsi_asmil.maps.scoring (now {chunk_tiles})"
    if device.type == "cuda":
        return (
            f"Scoring holds the fold models and {held} on the GPU: set heatmap.device: cpu (host memory is "
            f"usually larger), or free the GPU (another process may hold it){chunk}"
        )
    return (
        f"Scoring holds the fold models and {held} in host memory (heatmap.device: {device}): run fewer "
        f"jobs at once (snakemake --cores, or more mem_mb per job on a cluster){chunk}"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m wsi_asmil.maps.scoring", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", required=True, nargs="+", help="features Zarr stores, one per slide")
    p.add_argument("--models-dir", required=True, help="folder holding fold<k>/model.pt of one model")
    p.add_argument("--model-name", default=None, help="name recorded in the outputs (default: the folder name)")
    p.add_argument("--folds", type=int, required=True, help="number of folds the run trained")
    p.add_argument("--fold", type=parse_fold_mode, default="test", help="test, ensemble or a fold number")
    p.add_argument("--split", default=None, help="split JSON of the run (needed by --fold test)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--out-dir", required=True, help="folder for <slide>_scores.csv and .json")
    p.add_argument("--chunk-tiles", type=int, default=DEFAULT_CHUNK_TILES,
                   help="tiles read and scored at a time (memory, not results, depends on it)")
    args = p.parse_args(argv)
    setup_logging()
    try:
        score_slides(args.features, args.models_dir, args.folds, args.out_dir, args.fold, args.split,
                     args.device, args.model_name, args.chunk_tiles)
    except BagMemoryError as exc:
        log.error("%s", exc)  # the message says what to change; no CUDA traceback
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
