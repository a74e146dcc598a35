"""Cohort splits: stratified k-fold cross-validation, or the fixed split of the label table.

Written once per cohort as JSON so every fold's training job, the report and the heatmaps agree on
which slide was tested by which model (a slide is only ever scored by a model that never saw it).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import StratifiedKFold, train_test_split

from wsi_asmil.core.args import setup_logging
from wsi_asmil.core.io import write_json
from wsi_asmil.slides.cohort import LabelTableError, read_labels
from wsi_asmil.slides.inventory import usable_ids

log = logging.getLogger(__name__)


def kfold_splits(
    ids: list[str], labels: list[str], n_folds: int, val_fraction: float, seed: int
) -> list[dict[str, list[str]]]:
    """Each slide is tested exactly once; validation is a stratified slice of the rest."""
    counts = {c: labels.count(c) for c in sorted(set(labels))}
    too_few = {c: n for c, n in counts.items() if n < n_folds}
    if too_few:
        raise LabelTableError(
            f"split.folds = {n_folds} needs at least {n_folds} slides per class; too few in {too_few} "
            "(lower split.folds or add slides)"
        )
    ids_arr, y = np.array(ids), np.array(labels)
    folds = []
    skf = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for k, (rest, test) in enumerate(skf.split(ids_arr, y)):
        rest_ids, rest_y = ids_arr[rest], y[rest]
        n_val = int(round(val_fraction * len(rest)))
        if n_val == 0:
            train, val = rest_ids, np.array([], dtype=str)
        else:
            n_val = max(n_val, len(counts))
            try:
                train, val = train_test_split(
                    rest_ids, test_size=n_val, stratify=rest_y, random_state=seed + k
                )
            except ValueError:
                train, val = train_test_split(rest_ids, test_size=n_val, random_state=seed + k)
        folds.append({"train": sorted(train.tolist()), "val": sorted(val.tolist()), "test": sorted(ids_arr[test].tolist())})
    return folds


def fixed_split(ids: list[str], splits: list[str]) -> list[dict[str, list[str]]]:
    fold: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for sid, part in zip(ids, splits):
        if part not in fold:
            raise LabelTableError(f"split.mode 'fixed' needs a split value for every labeled slide; '{sid}' has none")
        fold[part].append(sid)
    if not fold["train"] or not fold["test"]:
        raise LabelTableError("split.mode 'fixed' needs at least one train and one test slide")
    return [{k: sorted(v) for k, v in fold.items()}]


def make_split(
    labels_csv: str | Path,
    mode: str,
    n_folds: int,
    val_fraction: float,
    seed: int,
    usable: set[str] | None = None,
) -> dict[str, Any]:
    """Folds over the labeled slides; with ``usable`` (the inventory), unreadable slides are left out."""
    df = read_labels(labels_csv)
    df = df[df["label"] != ""]
    if usable is not None:
        dropped = sorted(set(df["slide_id"]) - usable)
        if dropped:
            log.warning("left out of the split, unreadable (see the inventory): %s", ", ".join(dropped))
        df = df[df["slide_id"].isin(usable)]
    ids, labels = df["slide_id"].tolist(), df["label"].tolist()
    if mode == "kfold":
        folds = kfold_splits(ids, labels, n_folds, val_fraction, seed)
    elif mode == "fixed":
        if "split" not in df.columns:
            raise LabelTableError(f"split.mode 'fixed' needs a 'split' column in {labels_csv}")
        folds = fixed_split(ids, df["split"].tolist())
    else:
        raise ValueError(f"split.mode must be 'kfold' or 'fixed', got {mode!r}")
    return {
        "mode": mode,
        "seed": seed,
        "classes": sorted(set(labels)),
        "labels": dict(zip(ids, labels)),
        "folds": folds,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m wsi_asmil.mil.split", description=__doc__)
    p.add_argument("--labels", required=True, help="label table CSV")
    p.add_argument("--out", required=True, help="split JSON to write")
    p.add_argument("--mode", default="kfold", choices=["kfold", "fixed"])
    p.add_argument("--folds", type=int, default=4, help="as split.folds in config.yaml")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--inventory", default=None, help="inventory CSV: slides it marks unusable are left out")
    args = p.parse_args(argv)
    setup_logging()
    usable = usable_ids(args.inventory) if args.inventory else None
    split = make_split(args.labels, args.mode, args.folds, args.val_fraction, args.seed, usable)
    write_json(args.out, split)
    for k, f in enumerate(split["folds"]):
        log.info("fold %d: %d train, %d val, %d test", k, len(f["train"]), len(f["val"]), len(f["test"]))


if __name__ == "__main__":
    main()
