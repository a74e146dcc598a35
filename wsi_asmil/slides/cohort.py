"""The cohort: which slides exist, which have labels, and every way a label table can be wrong.

Checked once, when the workflow starts, so a typo in row 812 fails in a second with the row named
instead of after hours of feature extraction.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

log = logging.getLogger(__name__)

SPLIT_VALUES = ("train", "val", "test")


class LabelTableError(ValueError):
    """The label table is unusable; the message names the file and the offending rows."""


def _rows(df: pd.DataFrame, mask: pd.Series, limit: int = 10) -> str:
    bad = df[mask]
    lines = [f"  row {i + 2}: {r.to_dict()}" for i, r in bad.head(limit).iterrows()]
    more = f"\n  ... and {len(bad) - limit} more" if len(bad) > limit else ""
    return "\n".join(lines) + more


def read_labels(path: str | Path) -> pd.DataFrame:
    """Read and validate ``slide_id,label[,split][,mpp]``; a blank label means unlabeled.

    Row numbers in messages are 1-based file lines (the header is line 1).
    """
    path = Path(path)
    if not path.is_file():
        raise LabelTableError(f"label table {path} does not exist (config key 'labels')")
    df = pd.read_csv(path, dtype={"slide_id": str, "label": str, "split": str}, keep_default_na=False)
    df.columns = [c.strip() for c in df.columns]
    missing = {"slide_id", "label"} - set(df.columns)
    if missing:
        raise LabelTableError(
            f"label table {path}: missing column(s) {sorted(missing)}; found {list(df.columns)}"
        )
    extra = set(df.columns) - {"slide_id", "label", "split", "mpp"}
    if extra:
        log.warning("label table %s: ignoring column(s) %s", path, sorted(extra))
    df["slide_id"] = df["slide_id"].str.strip()
    df["label"] = df["label"].str.strip()
    empty_id = df["slide_id"] == ""
    if empty_id.any():
        raise LabelTableError(f"label table {path}: empty slide_id in\n{_rows(df, empty_id)}")
    dup = df["slide_id"].duplicated(keep=False)
    if dup.any():
        raise LabelTableError(f"label table {path}: duplicate slide_id in\n{_rows(df, dup)}")
    if "split" in df.columns:
        df["split"] = df["split"].str.strip().str.lower()
        bad = ~df["split"].isin((*SPLIT_VALUES, ""))
        if bad.any():
            raise LabelTableError(
                f"label table {path}: split must be one of {SPLIT_VALUES} or empty, got\n{_rows(df, bad)}"
            )
    if "mpp" in df.columns:
        mpp = pd.to_numeric(df["mpp"].replace("", float("nan")), errors="coerce")
        bad = (df["mpp"].astype(str).str.strip() != "") & ~(mpp > 0)
        if bad.any():
            raise LabelTableError(f"label table {path}: mpp must be a positive number, got\n{_rows(df, bad)}")
        df["mpp"] = mpp
    return df


@dataclass
class Cohort:
    """Slides on disk matched to the label table."""

    slides: dict[str, Path]
    labels: dict[str, str]
    mpp: dict[str, float] = field(default_factory=dict)
    unlabeled: list[str] = field(default_factory=list)

    @property
    def labeled_ids(self) -> list[str]:
        return sorted(self.labels)


def match_cohort(labels_path: str | Path, slides: dict[str, Path]) -> Cohort:
    """Join the table to the slides found on disk.

    A labeled slide missing on disk is an error (a typo or a failed copy would silently shrink
    the cohort); a slide on disk without a label is kept for prediction and reported.
    """
    df = read_labels(labels_path)
    missing = df[(df["label"] != "") & ~df["slide_id"].isin(list(slides))]
    if len(missing):
        listed = ", ".join(repr(s) for s in missing["slide_id"].head(20))
        raise LabelTableError(
            f"label table {labels_path}: {len(missing)} labeled slide(s) not found in slides_dir: "
            f"{listed}{' ...' if len(missing) > 20 else ''}"
        )
    labeled = df[df["label"] != ""]
    labels = dict(zip(labeled["slide_id"], labeled["label"]))
    unlabeled = sorted(set(slides) - set(labels))
    if unlabeled:
        log.warning(
            "%d slide(s) in slides_dir have no label and are not used for training: %s",
            len(unlabeled), ", ".join(unlabeled[:10]) + (" ..." if len(unlabeled) > 10 else ""),
        )
    mpp = {}
    if "mpp" in df.columns:
        mpp = {s: float(m) for s, m in zip(df["slide_id"], df["mpp"]) if not math.isnan(m)}
    return Cohort(slides={s: slides[s] for s in sorted(slides)}, labels=labels, mpp=mpp, unlabeled=unlabeled)


def check_split_feasible(cohort: Cohort, labels_path: str | Path, mode: str, n_folds: int) -> None:
    """Fail at start-up, not hours later in the split job, when the labeled slides cannot fill the
    folds: every class needs at least ``n_folds`` slides for ``kfold``; ``fixed`` needs a split
    value for every labeled slide and at least one train and one test slide.

    Slides the inventory later finds unreadable are left out again by the split job, which then
    repeats this check on what remains.
    """
    if mode == "kfold":
        by_class: dict[str, list[str]] = {}
        for slide_id, label in sorted(cohort.labels.items()):
            by_class.setdefault(label, []).append(slide_id)
        too_few = {c: ids for c, ids in by_class.items() if len(ids) < n_folds}
        if too_few:
            listed = "\n".join(f"  class {c!r}: {len(ids)} slide(s): {', '.join(map(repr, ids))}" for c, ids in sorted(too_few.items()))
            raise LabelTableError(
                f"label table {labels_path}: split.folds = {n_folds} needs at least {n_folds} labeled "
                f"slides per class; too few in\n{listed}\n(lower split.folds, or add slides of that class)"
            )
    elif mode == "fixed" and cohort.labels:
        df = read_labels(labels_path)
        labeled = df[df["label"] != ""]
        if "split" not in labeled.columns:
            raise LabelTableError(f"label table {labels_path}: split.mode 'fixed' needs a 'split' column")
        bad = labeled["split"] == ""
        if bad.any():
            raise LabelTableError(
                f"label table {labels_path}: split.mode 'fixed' needs a split value (train/val/test) "
                f"for every labeled slide; missing in\n{_rows(labeled, bad)}"
            )
        parts = set(labeled["split"])
        if not {"train", "test"} <= parts:
            raise LabelTableError(
                f"label table {labels_path}: split.mode 'fixed' needs at least one 'train' and one "
                f"'test' slide; found {sorted(parts)}"
            )
