"""Compare every model and the ASMIL ablations on one cohort's features, fold by fold.

    python benchmarks/compare_models.py --features-dir results/features/0.5mpp_224px/resnet18 \
        --labels results/demo/labels.csv --folds 5 --epochs 20 --out results/compare

Prints (and writes ``comparison.md``) test macro F1, AUC and accuracy at the selected epoch,
mean ± std over folds, and the attention instability (mean JSD over the last 10 epochs) for: ABMIL,
ACMIL, TransMIL, ABMIL + Anchor/NSF, ASMIL with the EMA anchor (paper) and the frozen random anchor
(released code), and ASMIL without the anchor, without NSF and without token dropout.

Every variant trains from the same seed. The anchor rows of ASMIL (frozen random anchor, beta 0,
softmax target) differ from the paper row only in the anchor term: the frozen random anchor is drawn
from its own random stream, so token dropout makes the same choices in all of them.
``--variants`` reruns some rows only (labels as in the table, e.g. ``--variants TransMIL ACMIL``).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

from wsi_asmil.metrics import summarize
from wsi_asmil.split import make_split
from wsi_asmil.train import train_fold

VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "ABMIL": ("abmil", {}),
    "ACMIL": ("acmil", {}),
    "TransMIL": ("transmil", {}),
    "ABMIL + Anchor/NSF": ("abmil_anchor", {}),
    "ASMIL (ema anchor, paper)": ("asmil", {}),
    "ASMIL (frozen_random anchor, released code)": ("asmil", {"anchor_mode": "frozen_random"}),
    "ASMIL without anchor (beta 0)": ("asmil", {"beta": 0.0}),
    "ASMIL without NSF (softmax target)": ("asmil", {"target": "softmax"}),
    "ASMIL without token dropout": ("asmil", {"token_drop": 0.0}),
}


def run(
    features_dir: Path, split: dict, epochs: int, out: Path, seed: int, labels: list[str] | None = None
) -> dict[str, Any]:
    results = {}
    for label in labels or list(VARIANTS):
        model, overrides = VARIANTS[label]
        params = {"epochs": epochs, "seed": seed, "models": {model: overrides}}
        folds, seconds = [], time.perf_counter()
        for k in range(len(split["folds"])):
            slug = re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")
            m = train_fold(features_dir, split, k, model, params, out / slug / f"fold{k}", "auto")
            folds.append({**m["test"], "jsd": m["instability_last10"]})
        results[label] = {"summary": summarize(folds), "seconds": time.perf_counter() - seconds}
        logging.info("%s: %s", label, results[label]["summary"]["f1_macro"])
    return results


def table(results: dict[str, Any], n_folds: int) -> str:
    def cell(s: dict[str, float], fmt: str = ".3f") -> str:
        return f"{s['mean']:{fmt}} ± {s['std']:{fmt}}" if s["n"] else "n/a"

    lines = [
        "| model | macro F1 | AUC | accuracy | JSD (last 10 epochs) |",
        "|---|---|---|---|---|",
    ]
    for label, r in results.items():
        s = r["summary"]
        lines.append(f"| {label} | {cell(s['f1_macro'])} | {cell(s['auc'])} | {cell(s['acc'])} | {cell(s['jsd'], '.1e')} |")
    return "\n".join(lines) + f"\n\nTest metrics at the epoch selected on validation, mean ± std over {n_folds} folds.\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features-dir", type=Path, required=True)
    p.add_argument("--labels", type=Path, required=True)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), metavar="LABEL", help="rows to run (default: all)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger(__name__).setLevel(logging.INFO)
    split = make_split(args.labels, "kfold", args.folds, args.val_fraction, args.seed)
    results = run(args.features_dir, split, args.epochs, args.out, args.seed, args.variants)
    text = table(results, args.folds)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "comparison.md").write_text(text)
    (args.out / "comparison.json").write_text(json.dumps(results, indent=2))
    print(text)


if __name__ == "__main__":
    main()
