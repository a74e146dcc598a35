"""A fold's bags: its part of the split, held in memory or streamed from the features stores."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsi_asmil.core.memory import oom_guard
from wsi_asmil.mil.bag_source import (
    Bag,
    BagSource,
    InMemoryBags,
    SlideEntry,
    StreamingBags,
    check_dtype,
    choose_source,
    feature_dtype,
    label_index,
    read_host_bag,
    scan_slides,
)

logger = logging.getLogger(__name__)

SPLIT_PARTS = ("train", "val", "test")


@dataclass(frozen=True)
class FoldData:
    """The bags of a fold's parts (a :class:`BagSource` each, or plain lists of bags), and how
    they are held: ``source`` is :func:`choose_source`'s decision, None for hand-made folds."""

    classes: list[str]
    bags: dict[str, Sequence[Bag] | BagSource]
    skipped: list[str]
    in_dim: int
    source: dict[str, Any] | None = None


def load_split(
    split: str | os.PathLike[str] | Mapping[str, Any], fold: int
) -> tuple[list[str], dict[str, str], dict[str, list[str]]]:
    """(classes, labels, {"train", "val", "test": slide ids}) of ``fold`` in a split file or dict."""
    data = split if isinstance(split, Mapping) else json.loads(Path(split).read_text())
    folds = data["folds"]
    if not 0 <= fold < len(folds):
        raise ValueError(f"fold {fold} out of range: the split has {len(folds)} folds")
    parts = {name: list(folds[fold].get(name, [])) for name in SPLIT_PARTS}
    return list(data["classes"]), dict(data["labels"]), parts


def load_bags(
    features_dir: str | os.PathLike[str],
    slide_ids: Sequence[str],
    labels: Mapping[str, str],
    classes: Sequence[str],
    device: torch.device,
    dtype: torch.dtype | None = None,
    tile_truth: Mapping[str, np.ndarray] | None = None,
) -> tuple[list[Bag], list[str]]:
    """Read each slide's features once onto ``device``; returns (bags, skipped empty slides).

    ``dtype`` defaults to :func:`feature_dtype`. Each bag is copied to the device once, here;
    training and evaluation then never move features between host and device.

    Per-tile truth, for the attention metrics only (never for training), comes from
    ``tile_truth`` (slide id -> values in row order, positive where > 0) or else from the store's
    own ``tile_truth`` array (the witness benchmark writes one); without either it is None.

    A slide without tissue (M = 0) has no attention distribution and no prediction, so it is left
    out of training and of every metric, with a warning rather than an error: one empty slide must
    not stop a cohort.
    """
    dtype = feature_dtype(device) if dtype is None else dtype
    check_dtype(dtype)
    bags, skipped = [], []
    for slide_id in slide_ids:
        label = label_index(slide_id, labels, classes)
        truth = tile_truth.get(slide_id) if tile_truth is not None else None
        features, truth = read_host_bag(Path(features_dir) / f"{slide_id}.zarr", slide_id, dtype, truth)
        if features.shape[0] == 0:
            logger.warning("slide %s has no tiles (M = 0): skipped", slide_id)
            skipped.append(slide_id)
            continue
        loaded = sum(int(b.features.shape[0]) for b in bags) + features.shape[0]
        with oom_guard(
            "loading the features of", slide_id, features.shape[0], device,
            f"Every bag of the fold is kept on the device ({loaded} tiles so far, "
            f"{features.shape[1]}-d): lower train.memory_budget (for example 0) to stream the bags "
            "from disk instead, or set train.device: cpu, or free the GPU",
        ):
            features_t = torch.from_numpy(features).to(device)
        bags.append(Bag(slide_id, label, features_t, torch.tensor(label, device=device), truth))
    return bags, skipped


def load_fold(
    features_dir: str | os.PathLike[str],
    split: str | os.PathLike[str] | Mapping[str, Any],
    fold: int,
    device: torch.device,
    dtype: torch.dtype | None = None,
    tile_truth: Mapping[str, np.ndarray] | None = None,
    memory_budget: float | str = "auto",
) -> FoldData:
    """The bags of one fold on ``device``: in memory when the fold's features fit
    ``memory_budget`` (no per-epoch I/O), else streamed from their stores (bounded memory).

    Both give the same results; :func:`~wsi_asmil.mil.bag_source.choose_source` says which and why,
    from the stores' metadata alone.
    """
    classes, labels, parts = load_split(split, fold)
    dtype = feature_dtype(device) if dtype is None else dtype
    check_dtype(dtype)
    entries: dict[str, list[SlideEntry]] = {}
    skipped: list[str] = []
    for part, ids in parts.items():
        entries[part], part_skipped = scan_slides(features_dir, ids, labels, classes)
        skipped += [s for s in part_skipped if s not in skipped]
    if not entries["train"]:
        raise ValueError(f"fold {fold} has no non-empty training slide")
    dims = {e.dim for group in entries.values() for e in group}
    if len(dims) != 1:
        raise ValueError(f"feature dimensions differ between slides: {sorted(dims)}")
    source = choose_source([e for group in entries.values() for e in group], device, dtype, memory_budget)
    logger.info("fold %d: features %s: %s", fold, "in memory" if source["mode"] == "memory" else "streamed from disk",
                source["reason"])
    bags: dict[str, Sequence[Bag] | BagSource] = {}
    for part, group in entries.items():
        if source["mode"] == "stream":
            bags[part] = StreamingBags(group, device, dtype, tile_truth)
            continue
        ids = [e.slide_id for e in group]
        bags[part] = InMemoryBags(load_bags(features_dir, ids, labels, classes, device, dtype, tile_truth)[0], group)
    return FoldData(classes, bags, skipped, dims.pop(), source)
