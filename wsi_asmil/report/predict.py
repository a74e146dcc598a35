"""Inference on new slides: the table of slide probabilities, without labels and without retraining.

New slides (those of the cohort without a label, and every slide of ``predict.slides_dir``) go
through the same segmentation, tiling and features as training slides; ``wsi_asmil.maps.scoring``
then runs every fold model (the ensemble: probabilities and attention averaged) or a chosen
fold's, writing per-slide scores that heatmaps are drawn from. This module gathers those records
into ``predict/predictions.csv``, one row per slide and model:

``slide_id, path, model, status, message, n_tiles, folds, pred, prob_<class>..., agreement``

``agreement`` is the share of fold models whose own prediction matches the ensemble's (1.0:
unanimous). Slides the inventory could not open are listed with ``status`` ``error`` and the
reason, and slides without tissue with ``status`` ``empty``, so a missing prediction is never
silent.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from wsi_asmil.core.args import setup_logging
from wsi_asmil.core.io import write_csv
from wsi_asmil.maps.scores import JSON_SUFFIX, read_meta

log = logging.getLogger(__name__)

FIRST = ["slide_id", "path", "model", "status", "message", "n_tiles", "folds", "pred"]


def gather_predictions(
    scores_dirs: Sequence[str | Path], inventories: Sequence[str | Path] = (), slide_ids: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Rows from every ``<slide>_scores.json`` in ``scores_dirs``, plus the unusable ``slide_ids``."""
    rows = []
    models = []
    for d in scores_dirs:
        for p in sorted(Path(d).glob(f"*{JSON_SUFFIX}")):
            r = read_meta(p)
            models.append(r["model"])
            row = {
                "slide_id": r["slide_id"], "model": r["model"], "n_tiles": r["n_tiles"],
                "folds": ";".join(map(str, r["folds"])), "pred": r["pred"] or "", "agreement": r["agreement"],
                "status": "ok" if r["probs"] else "empty",
                "message": "" if r["probs"] else "no tissue tiles: nothing to predict from",
            }
            for c, v in (r["probs"] or {c: None for c in r["classes"]}).items():
                row[f"prob_{c}"] = v
            rows.append(row)
    paths: dict[str, str] = {}
    wanted = None if slide_ids is None else set(slide_ids)
    for inv in inventories:
        table = pd.read_csv(inv, dtype={"slide_id": str}, keep_default_na=False)
        for r in table.itertuples():
            if wanted is not None and r.slide_id not in wanted:
                continue
            paths[r.slide_id] = r.path
            if r.status != "ok":
                for m in dict.fromkeys(models) or [""]:
                    rows.append({"slide_id": r.slide_id, "model": m, "status": "error", "message": r.message, "n_tiles": 0})
    frame = pd.DataFrame(rows)
    if not len(frame):
        return pd.DataFrame(columns=FIRST)
    frame["path"] = frame["slide_id"].map(paths).fillna("")
    frame = frame.sort_values(["slide_id", "model"], kind="stable").reset_index(drop=True)
    return frame[[c for c in FIRST if c in frame.columns] + [c for c in frame.columns if c not in FIRST]]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m wsi_asmil.report.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scores", nargs="+", required=True, help="scores folders of wsi_asmil.maps.scoring (one per model)")
    p.add_argument("--inventory", nargs="*", default=[], help="inventory CSVs (paths and unusable slides)")
    p.add_argument("--slides", nargs="*", default=None, help="the slide ids to predict (others in the inventories are ignored)")
    p.add_argument("--out", required=True, help="predictions CSV to write")
    args = p.parse_args(argv)
    setup_logging()
    table = gather_predictions(args.scores, args.inventory, args.slides)
    write_csv(args.out, table)
    ok = table[table["status"] == "ok"] if len(table) else table
    log.info("%d prediction(s) for %d slide(s); %d row(s) without a prediction",
             len(ok), ok["slide_id"].nunique() if len(ok) else 0, len(table) - len(ok))


if __name__ == "__main__":
    main()
