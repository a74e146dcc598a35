"""The cohort report: every fold of every model gathered into one table of metrics and predictions.

Test metrics are those of the epoch selected on validation (``test``) and of the last epoch
(``test_last``), per fold and as mean +/- std over folds, together with the attention-instability
figure (mean JSD over the last 10 epochs) that is the paper's central claim.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path
from typing import Any

import pandas as pd

from wsi_asmil.cli import setup_logging
from wsi_asmil.io import write_csv, write_json, write_text
from wsi_asmil.metrics import summarize

log = logging.getLogger(__name__)

#: Columns of the readable table, in order, with their headings.
TABLE_METRICS = {
    "acc": "accuracy",
    "f1_macro": "macro F1",
    "f1_micro": "micro F1",
    "auc": "AUC",
}


def fold_dir(models_dir: Path, model: str, fold: int) -> Path:
    return models_dir / model / f"fold{fold}"


def gather(models_dir: str | Path, models: list[str], n_folds: int) -> tuple[dict[str, Any], pd.DataFrame]:
    """Per-fold metrics and summaries per model, and all test predictions with model and fold."""
    models_dir = Path(models_dir)
    report: dict[str, Any] = {}
    frames = []
    for model in models:
        folds = []
        for k in range(n_folds):
            d = fold_dir(models_dir, model, k)
            m = json.loads((d / "metrics.json").read_text())
            folds.append({"fold": k, **m})
            pred = pd.read_csv(d / "predictions.csv")
            frames.append(pred.assign(model=model, fold=k))
        report[model] = {
            "folds": folds,
            "test": summarize([f["test"] for f in folds]),
            "test_last": summarize([f["test_last"] for f in folds]),
            "instability_last10": summarize(
                [{"jsd": f.get("instability_last10", math.nan)} for f in folds]
            )["jsd"],
        }
    predictions = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if len(predictions):
        first = ["model", "fold", "slide_id", "label", "pred"]
        predictions = predictions[first + [c for c in predictions.columns if c not in first]]
    return report, predictions


def _fmt(stat: dict[str, float]) -> str:
    if stat is None or math.isnan(stat["mean"]):
        return "n/a"
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}"


def markdown_table(report: dict[str, Any]) -> str:
    """A table a reader can paste into a paper draft: test metrics at the selected epoch."""
    head = ["model", *TABLE_METRICS.values(), "JSD (last 10 epochs)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model, r in report.items():
        cells = [_fmt(r["test"].get(k)) for k in TABLE_METRICS]
        lines.append("| " + " | ".join([model, *cells, _fmt(r["instability_last10"])]) + " |")
    n = len(next(iter(report.values()))["folds"]) if report else 0
    note = f"\nTest metrics at the epoch selected by val F1 + val AUC, mean ± std over {n} fold(s).\n"
    return "\n".join(lines) + "\n" + note


def write_report(models_dir: str | Path, models: list[str], n_folds: int, out_dir: str | Path) -> dict[str, Any]:
    report, predictions = gather(models_dir, models, n_folds)
    out = Path(out_dir)
    write_json(out / "metrics.json", report)
    write_csv(out / "predictions.csv", predictions)
    table = markdown_table(report)
    write_text(out / "metrics.md", table)
    log.info("\n%s", table)
    return report


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m wsi_asmil.report", description=__doc__)
    p.add_argument("--models-dir", required=True, help="folder holding <model>/fold<k>/")
    p.add_argument("--models", required=True, nargs="+", help="model names")
    p.add_argument("--folds", type=int, required=True)
    p.add_argument("--out-dir", required=True)
    args = p.parse_args(argv)
    setup_logging()
    write_report(args.models_dir, args.models, args.folds, args.out_dir)


if __name__ == "__main__":
    main()
