"""Train one fold of one MIL model on frozen tile features and write its evaluation artefacts.

Protocol (spec section 6): AdamW, cosine decay per step to zero without warm-up, global-norm
gradient clipping, one bag per step, everything seeded. Validation every epoch selects the epoch
with the highest val macro F1 + val AUC; the attention of val and test slides is recorded each
epoch for the instability (PI) metric. Usage::

    python -m wsi_asmil.mil.train --features-dir DIR --split split.json --fold 0 --model asmil \\
        --params '{"epochs": 50}' --out-dir results/models/asmil/fold0
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from wsi_asmil.core.args import setup_logging
from wsi_asmil.core.devices import resolve_device
from wsi_asmil.core.memory import BagMemoryError
from wsi_asmil.mil.epochs import run_epochs
from wsi_asmil.mil.fold_data import SPLIT_PARTS, load_fold
from wsi_asmil.mil.models import (
    MODELS,
    model_spec,
)
from wsi_asmil.mil.outputs import write_outputs
from wsi_asmil.mil.params import for_model, resolve_params
from wsi_asmil.mil.trainer import build_trainer, horizon_epochs

logger = logging.getLogger(__name__)


def train_fold(
    features_dir: str | os.PathLike[str],
    split: str | os.PathLike[str] | Mapping[str, Any],
    fold: int,
    model_name: str,
    params: Mapping[str, Any] | None,
    out_dir: str | os.PathLike[str],
    device: str = "auto",
    tile_truth: Mapping[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Train ``model_name`` on fold ``fold`` and write model.pt, last.pt, history.csv,
    instability.csv, attention.csv, predictions.csv, metrics.json and curves.png into ``out_dir``.

    ``tile_truth`` (slide id -> per-tile positives) feeds the attention metrics only; stores that
    carry their own truth need none. Returns the content of metrics.json (NaN where it has null).
    """
    model_spec(model_name)
    resolved = for_model(resolve_params(params), model_name)
    dev = resolve_device(device)
    data = load_fold(features_dir, split, fold, dev, tile_truth=tile_truth, memory_budget=resolved["memory_budget"])
    logger.info(
        "fold %d, %s on %s: %d train, %d val, %d test slides (%d empty skipped)",
        fold, model_name, dev, *(len(data.bags[p]) for p in SPLIT_PARTS), len(data.skipped),
    )
    trainer = build_trainer(model_name, data, resolved, dev)
    anchor = None
    if trainer.anchor is not None:
        steps = len(data.bags["train"])
        anchor = {"mode": trainer.anchor.mode, "momentum": trainer.anchor.momentum,
                  "horizon_epochs": horizon_epochs(trainer.anchor.momentum, steps), "steps_per_epoch": steps}
        logger.info("anchor %s, momentum %.6g: horizon %.3g epochs of %d steps", anchor["mode"],
                    anchor["momentum"], anchor["horizon_epochs"], steps)
    run = run_epochs(trainer, data, f"{model_name} fold {fold}")
    metrics = write_outputs(Path(out_dir), run, data, model_name, fold, resolved, anchor)
    test = metrics["test"]
    logger.info(
        "selected epoch %d: test acc %.3f macro F1 %.3f AUC %.3f",
        run.best.epoch, test["acc"], test["f1_macro"], test["auc"],
    )
    return metrics


# --- command line ----------------------------------------------------------------------------------


def _parse_params(text: str) -> dict[str, Any]:
    """``--params`` is a JSON file path or a JSON object literal (what Snakemake passes)."""
    if not text.lstrip().startswith("{") and Path(text).is_file():
        text = Path(text).read_text()
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError("--params must be a JSON object")
    return value


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m wsi_asmil.mil.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--features-dir", required=True, help="folder of <slide_id>.zarr stores")
    parser.add_argument("--split", required=True, help="split JSON (classes, labels, folds)")
    parser.add_argument("--fold", type=int, required=True)
    parser.add_argument("--model", required=True, choices=sorted(MODELS))
    parser.add_argument("--params", default="{}", help="training params: JSON file or string")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "--memory-budget", help="train.memory_budget, overriding --params (speed only: auto, bytes, '8GiB')"
    )
    args = parser.parse_args(argv)
    setup_logging()
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm():
        try:
            params = _parse_params(args.params)
            if args.memory_budget is not None:
                params["memory_budget"] = args.memory_budget
            train_fold(args.features_dir, args.split, args.fold, args.model, params, args.out_dir, args.device)
        except BagMemoryError as exc:  # the message says what to change; no CUDA traceback
            logger.error("%s", exc)
            raise SystemExit(1) from None


if __name__ == "__main__":
    main()
