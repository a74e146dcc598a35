"""The epoch loop: train, evaluate val and test, follow the attention's instability and keep the
epoch that validation selects (val macro F1 + val AUC)."""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from wsi_asmil.mil.evaluate import EvalResult, evaluate, gradient_split, mean_summaries
from wsi_asmil.mil.fold_data import FoldData
from wsi_asmil.mil.map_store import MapStore
from wsi_asmil.mil.metrics import (
    mean_jsd,
)
from wsi_asmil.mil.trainer import Trainer, train_one_epoch

logger = logging.getLogger(__name__)

def selection_score(val: Mapping[str, float]) -> float:
    """val macro F1 + val AUC; an undefined term (e.g. a single-class val set) counts as 0."""
    return sum(0.0 if math.isnan(val[k]) else val[k] for k in ("f1_macro", "auc"))


@dataclass
class Snapshot:
    """Everything reported about one epoch, so the selected epoch needs no re-evaluation.

    Without the per-map attention (``EvalResult.maps``): only the next epoch's instability needs
    it, and kept here it would hold R maps per val and test slide twice more for the whole run.
    """

    epoch: int
    state: dict[str, torch.Tensor]
    val: EvalResult
    test: EvalResult
    score: float


@dataclass
class RunResult:
    history: pd.DataFrame
    best: Snapshot
    last: Snapshot


def run_epochs(trainer: Trainer, data: FoldData, label: str) -> RunResult:
    """Train every epoch; evaluate val and test, track the instability and the selected epoch.

    Test slides are evaluated every epoch only because their attention enters the instability
    curve; only the snapshot chosen on validation (and the last one) is ever reported.
    """
    epochs = int(trainer.params["epochs"])
    if epochs < 1:
        raise ValueError("epochs must be >= 1")
    n_classes = len(data.classes)
    rows: list[dict[str, float]] = []
    previous: tuple[MapStore, dict[str, np.ndarray]] | None = None
    best: Snapshot | None = None
    scratch = maps_scratch(data)
    bar = tqdm(range(1, epochs + 1), desc=label, disable=None)
    for epoch in bar:
        lr = float(trainer.scheduler.get_last_lr()[0])
        trainer.begin_epoch(epoch)
        stats = train_one_epoch(trainer, data.bags["train"], desc=f"epoch {epoch}")
        maps = MapStore(None if scratch is None else Path(scratch.name) / f"epoch{epoch}")
        val = evaluate(trainer.model, data.bags["val"], n_classes, trainer.autocast, maps)
        test = evaluate(trainer.model, data.bags["test"], n_classes, trainer.autocast, maps)
        pooled = {**val.attention, **test.attention}
        jsd = jsd_pooled = math.nan
        if previous is not None:
            jsd, jsd_pooled = mean_jsd(previous[0], maps), mean_jsd(previous[1], pooled)
            previous[0].discard()
        previous = (maps, pooled)
        vm = val.metrics()
        rows.append({
            "epoch": epoch, "lr": lr, "train_loss": stats["loss"], "train_ce": stats["ce"],
            "train_as": stats["as"], "train_aux": stats["aux"], "val_loss": vm["loss"],
            "val_acc": vm["acc"],
            "val_f1_macro": vm["f1_macro"], "val_auc": vm["auc"], "jsd": jsd, "jsd_pooled": jsd_pooled,
            **mean_summaries({**val.summaries, **test.summaries}),
            **gradient_split(trainer, data.bags["train"]),
        })
        logger.info(
            "%s epoch %d/%d lr %.3g loss %.4f (ce %.4f as %.4f) val loss %.4f acc %.3f f1 %.3f auc %.3f "
            "jsd %.4g effective tiles %.3f top %.2fx uniform grad ratio %.3g", label, epoch, epochs, lr,
            stats["loss"], stats["ce"], stats["as"], vm["loss"], vm["acc"], vm["f1_macro"], vm["auc"], jsd,
            rows[-1].get("effective_fraction", math.nan), rows[-1].get("top_ratio", math.nan),
            rows[-1]["grad_ratio"],
        )
        bar.set_postfix(loss=f"{stats['loss']:.3f}", val_f1=f"{vm['f1_macro']:.3f}")
        score = selection_score(vm)
        is_best = bool(data.bags["val"]) and (best is None or score > best.score)
        if is_best or epoch == epochs:
            state = {k: v.detach().cpu().clone() for k, v in trainer.model.state_dict().items()}
            snapshot = Snapshot(epoch, state, replace(val, maps={}), replace(test, maps={}), score)
            best = snapshot if is_best else best
    if scratch is not None:
        scratch.cleanup()
    if best is None:
        logger.warning("%s: no validation slides, selecting the last epoch", label)
        best = snapshot
    return RunResult(pd.DataFrame(rows), best, snapshot)


def maps_scratch(data: FoldData) -> tempfile.TemporaryDirectory | None:
    """A scratch folder (under $TMPDIR, node-local on most clusters) for the epochs' attention
    maps when the fold streams its features from disk; None keeps them in memory."""
    if data.source is None or data.source.get("mode") != "stream":
        return None
    return tempfile.TemporaryDirectory(prefix="wsi-asmil-attention-maps-")
