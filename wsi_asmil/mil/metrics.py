"""Slide-level classification metrics, fold summaries, and the attention-instability (PI) metric."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.metrics import f1_score, roc_auc_score


def accuracy(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray) -> float:
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return float(np.mean(y_true == y_pred)) if len(y_true) else math.nan


def f1_macro(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray, n_classes: int) -> float:
    """Unweighted mean of per-class F1 over all ``n_classes`` (CLAM/TransMIL convention).

    A class never predicted and never present scores 0, so a degenerate classifier cannot look good
    by leaving classes out.
    """
    if not len(y_true):
        return math.nan
    return float(
        f1_score(y_true, y_pred, labels=list(range(n_classes)), average="macro", zero_division=0)
    )


def f1_micro(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray, n_classes: int) -> float:
    """Micro F1, which the ASMIL/ACMIL code reports; for single-label data it equals accuracy."""
    if not len(y_true):
        return math.nan
    return float(
        f1_score(y_true, y_pred, labels=list(range(n_classes)), average="micro", zero_division=0)
    )


def auc_macro_ovr(y_true: Sequence[int] | np.ndarray, probs: np.ndarray) -> float:
    """Binary AUC on the positive class for two classes, else macro one-vs-rest AUC.

    NaN with a warning when a class is absent from ``y_true``: its AUC is undefined, and a silent
    partial average would not be comparable across folds.
    """
    y_true = np.asarray(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    n_classes = probs.shape[1]
    absent = [c for c in range(n_classes) if not np.any(y_true == c)]
    if absent:
        warnings.warn(f"AUC undefined: classes {absent} absent from the labels", RuntimeWarning, stacklevel=2)
        return math.nan
    if n_classes == 2:
        return float(roc_auc_score(y_true, probs[:, 1]))
    return float(np.mean([roc_auc_score(y_true == c, probs[:, c]) for c in range(n_classes)]))


def classification_metrics(y_true: Sequence[int] | np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """All reported slide metrics from labels and class probabilities (N, C); NaN when N = 0."""
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or len(probs) != len(y_true):
        raise ValueError(f"probs must be (N, C) with N = {len(y_true)}, got {probs.shape}")
    n_classes = probs.shape[1]
    y_pred = probs.argmax(axis=1)
    return {
        "acc": accuracy(y_true, y_pred),
        "f1_macro": f1_macro(y_true, y_pred, n_classes),
        "f1_micro": f1_micro(y_true, y_pred, n_classes),
        "auc": auc_macro_ovr(y_true, probs) if len(y_true) else math.nan,
        "n": float(len(y_true)),
    }


def summarize(folds: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean and sample std (ddof 1; 0 for a single fold) of every numeric key across folds.

    NaN and None (how metrics.json stores NaN) are left out of that key's statistics but the key is
    kept; ``n`` says how many folds contributed, so a summary over fewer folds is visible as such.
    """
    keys: list[str] = []
    for fold in folds:
        keys += [k for k, v in fold.items() if k not in keys and (v is None or _is_number(v))]
    summary = {}
    for key in keys:
        values = np.array([float(f[key]) for f in folds if _is_number(f.get(key))])
        values = values[~np.isnan(values)]
        summary[key] = {
            "mean": float(values.mean()) if len(values) else math.nan,
            "std": float(values.std(ddof=1)) if len(values) > 1 else (0.0 if len(values) else math.nan),
            "n": len(values),
        }
    return summary


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence in nats (0 <= JSD <= ln 2) between two attention vectors.

    Both are renormalised to sum to one first so float drift in the attention cannot push the value
    outside its bounds; zero entries contribute nothing (0 log 0 = 0).
    """
    p = np.asarray(p, dtype=np.float64).ravel()
    q = np.asarray(q, dtype=np.float64).ravel()
    if p.shape != q.shape:
        raise ValueError(f"attention vectors differ in length: {p.shape} vs {q.shape}")
    if np.any(p < 0) or np.any(q < 0) or p.sum() <= 0 or q.sum() <= 0:
        raise ValueError("attention vectors must be non-negative with a positive sum")
    p, q = p / p.sum(), q / q.sum()
    mid = 0.5 * (p + q)
    kl_pm = np.sum(p[p > 0] * np.log(p[p > 0] / mid[p > 0]))
    kl_qm = np.sum(q[q > 0] * np.log(q[q > 0] / mid[q > 0]))
    return float(np.clip(0.5 * (kl_pm + kl_qm), 0.0, math.log(2)))


def map_jsd(previous: np.ndarray, current: np.ndarray) -> float:
    """Mean JSD over the attention maps of one slide: rows of (R, M) arrays, one per head x token
    (ASMIL), branch (ACMIL) or the single map (ABMIL).

    Averaging per-map divergences, not comparing the maps' average, is what tells a model whose
    heads each swing from one whose swings cancel out in the mean; a 1-D vector is one map.
    """
    p = np.atleast_2d(np.asarray(previous, dtype=np.float64))
    q = np.atleast_2d(np.asarray(current, dtype=np.float64))
    if p.shape != q.shape:
        raise ValueError(f"attention maps differ in shape: {p.shape} vs {q.shape}")
    if np.any(p < 0) or np.any(q < 0) or np.any(p.sum(1) <= 0) or np.any(q.sum(1) <= 0):
        raise ValueError("attention maps must be non-negative with a positive sum")
    p, q = p / p.sum(1, keepdims=True), q / q.sum(1, keepdims=True)
    mid = 0.5 * (p + q)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl_pm = np.where(p > 0, p * np.log(p / mid), 0.0).sum(1)
        kl_qm = np.where(q > 0, q * np.log(q / mid), 0.0).sum(1)
    return float(np.clip(0.5 * (kl_pm + kl_qm), 0.0, math.log(2)).mean())


def mean_jsd(previous: Mapping[str, np.ndarray], current: Mapping[str, np.ndarray]) -> float:
    """Mean over the slides present at both epochs of :func:`map_jsd`; NaN when none are."""
    shared = [s for s in current if s in previous]
    if not shared:
        return math.nan
    return float(np.mean([map_jsd(previous[s], current[s]) for s in shared]))


#: A score map is called practically uniform when it spreads over at least this share of the
#: tiles (exp(entropy) / M) and no tile carries more than ``UNIFORM_MAX_RATIO`` x 1/M. Such a
#: model's heatmap and instability say nothing about where it looks: it does not look anywhere.
UNIFORM_MIN_EFFECTIVE = 0.9
UNIFORM_MAX_RATIO = 2.0


def effective_fraction(weights: np.ndarray) -> np.ndarray:
    """exp(entropy) / M of each row of (..., M) distributions: 1 = uniform, 1/M = one tile."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(w > 0, w * np.log(w), 0.0).sum(-1)
    return np.exp(entropy) / w.shape[-1]


def instance_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC of tile scores for the positive tiles; NaN when a bag has only one kind."""
    positive = np.asarray(positive, dtype=bool)
    if positive.all() or not positive.any():
        return math.nan
    return float(roc_auc_score(positive, np.asarray(scores, dtype=np.float64)))


def attention_summary(
    maps: np.ndarray, logits: np.ndarray, positive: np.ndarray | None = None
) -> dict[str, float]:
    """What one slide's attention does, from its maps (R, M) and their pre-softmax logits (R, M).

    ``effective_fraction``: of the score map (mean of the maps, what heatmaps show);
    ``map_effective_fraction``: mean over the individual maps (a head may be sharp while the mean
    is flat); ``top_ratio``: the score map's largest weight times M (1 = uniform); ``logit_spread``:
    standard deviation of the logits over tiles, mean over maps (how far from uniform the softmax
    can be at all); with per-tile truth ``positive`` (witness or tumour tiles), ``positive_mass``,
    the share of the score map on them, and ``instance_auc`` of the score map.
    """
    maps = np.atleast_2d(np.asarray(maps, dtype=np.float64))
    logits = np.atleast_2d(np.asarray(logits, dtype=np.float64))
    score = maps.mean(0)
    score = score / score.sum()
    m = score.shape[0]
    out = {
        "effective_fraction": float(effective_fraction(score)),
        "map_effective_fraction": float(effective_fraction(maps).mean()),
        "top_ratio": float(score.max() * m),
        "logit_spread": float(logits.std(axis=-1).mean()),
        "positive_mass": math.nan,
        "instance_auc": math.nan,
    }
    if positive is not None:
        positive = np.asarray(positive, dtype=bool)
        if positive.shape != (m,):
            raise ValueError(f"per-tile truth has shape {positive.shape}, the bag {m} tiles")
        out["positive_mass"] = float(score[positive].sum()) if positive.any() else math.nan
        out["instance_auc"] = instance_auc(score, positive)
    return out


def is_practically_uniform(summary: Mapping[str, float]) -> bool:
    """Whether an :func:`attention_summary` (or a mean of them) describes flat attention."""
    return (
        summary["effective_fraction"] >= UNIFORM_MIN_EFFECTIVE
        and summary["top_ratio"] <= UNIFORM_MAX_RATIO
    )


def last_mean(values: Sequence[float], n: int = 10) -> float:
    """Mean of the last ``n`` finite values (the paper's 'instability over the last 10 epochs')."""
    finite = [v for v in values if not math.isnan(v)][-n:]
    return float(np.mean(finite)) if finite else math.nan
