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


def mean_jsd(previous: Mapping[str, np.ndarray], current: Mapping[str, np.ndarray]) -> float:
    """Mean JSD over the slides present at both epochs; NaN when none are."""
    shared = [s for s in current if s in previous]
    if not shared:
        return math.nan
    return float(np.mean([js_divergence(previous[s], current[s]) for s in shared]))


def instability_curve(per_epoch: Sequence[Mapping[str, np.ndarray]]) -> list[float]:
    """JSD between consecutive epochs in the given (numeric) order: entry e compares e and e+1."""
    return [mean_jsd(a, b) for a, b in zip(per_epoch[:-1], per_epoch[1:])]


def last_mean(values: Sequence[float], n: int = 10) -> float:
    """Mean of the last ``n`` finite values (the paper's 'instability over the last 10 epochs')."""
    finite = [v for v in values if not math.isnan(v)][-n:]
    return float(np.mean(finite)) if finite else math.nan
