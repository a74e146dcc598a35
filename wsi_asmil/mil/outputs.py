"""A trained fold's artefacts: checkpoints, history, instability, predictions, attention summaries,
metrics.json and the training curves, each written atomically.

The selected epoch's checkpoint (``model.pt``) is what heatmaps and prediction use; the last
epoch's (``last.pt``) only when ``keep_last`` asks for it, since metrics.json already holds its
test metrics (``test_last``). Both are stored in float16 where the fold's bags show that exact
enough (:mod:`wsi_asmil.mil.checkpoint_precision`)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from wsi_asmil.core.io import atomic_path, write_csv, write_json
from wsi_asmil.mil.checkpoint_precision import checkpoint_state
from wsi_asmil.mil.epochs import RunResult
from wsi_asmil.mil.evaluate import EvalResult
from wsi_asmil.mil.fold_data import FoldData
from wsi_asmil.mil.metrics import (
    is_practically_uniform,
    last_mean,
)
from wsi_asmil.mil.models import (
    build_model,
    save_checkpoint,
)
from wsi_asmil.mil.params import split_model_params

#: An epoch counts as high-learning-rate when its rate is at least this share of the peak.
HIGH_LR_SHARE = 0.5


def plot_curves(history: pd.DataFrame, selected_epoch: int, path: Path, title: str) -> None:
    """Loss, validation metrics and attention instability against epoch, selected epoch marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    panels = [
        ("loss", ["train_loss", "train_ce", "train_as", "train_aux", "val_loss"]),
        ("validation", ["val_acc", "val_f1_macro", "val_auc"]),
        ("attention instability (JSD, nats)", ["jsd", "jsd_pooled"]),
        ("attention (val + test)", ["effective_fraction", "positive_mass", "instance_auc", "grad_ratio"]),
    ]
    for ax, (name, columns) in zip(axes, panels):
        for column in columns:
            ax.plot(history["epoch"], history[column], marker=".", label=column)
        ax.axvline(selected_epoch, color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def predictions_frame(result: EvalResult, classes: Sequence[str]) -> pd.DataFrame:
    """One row per test slide: class names for label and prediction, one probability per class."""
    frame = pd.DataFrame({
        "slide_id": result.slide_ids,
        "label": [classes[i] for i in result.labels],
        "pred": [classes[i] for i in result.probs.argmax(axis=1)],
    })
    for c, name in enumerate(classes):
        frame[f"prob_{name}"] = result.probs[:, c]
    frame["split"] = "test"
    return frame


def instability_summary(history: pd.DataFrame, peak_lr: float) -> dict[str, float]:
    """The per-map JSD over the last 10 epochs (the paper's window) and over the epochs trained at
    a high rate (at least ``HIGH_LR_SHARE`` of the peak), and the pooled map's JSD for comparison.

    Under a cosine schedule the last 10 epochs run at a rate near 0, where every model's attention
    stops moving; instability is a property of the high-rate epochs.
    """
    high = history[history["lr"] >= HIGH_LR_SHARE * peak_lr]
    return {
        "instability_last10": last_mean(history["jsd"].tolist(), 10),
        "instability_high_lr": last_mean(high["jsd"].tolist(), len(high)),
        "instability_pooled_last10": last_mean(history["jsd_pooled"].tolist(), 10),
        "grad_ratio_high_lr": last_mean(high["grad_ratio"].tolist(), len(high)),
    }


def attention_frame(result: EvalResult, data: FoldData) -> pd.DataFrame:
    """One row per test slide at the selected epoch: its attention summary, tiles and positives."""
    rows = []
    for slide_id, label in zip(result.slide_ids, result.labels):
        positives = result.n_positive.get(slide_id)
        rows.append({
            "slide_id": slide_id, "label": data.classes[label],
            "n_tiles": len(result.attention[slide_id]),
            "n_positive": math.nan if positives is None else positives,
            **result.summaries[slide_id],
        })
    return pd.DataFrame(rows)


def write_outputs(
    out: Path,
    run: RunResult,
    data: FoldData,
    model_name: str,
    fold: int,
    params: dict[str, Any],
    anchor: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Every artefact of the fold, each written atomically; returns the metrics.json content."""
    meta = {
        "model_name": model_name,
        "model_kwargs": split_model_params(params["models"][model_name])[0],
        "classes": data.classes,
        "in_dim": data.in_dim,
        "params": params,
    }
    model = build_model(model_name, data.in_dim, len(data.classes), **meta["model_kwargs"])
    check_bags = data.bags["val"] if len(data.bags["val"]) else data.bags["test"]
    best_state, precision = checkpoint_state(model, run.best.state, check_bags)
    save_checkpoint(out / "model.pt", best_state, epoch=run.best.epoch, **meta)
    if params.get("keep_last"):
        last_state, _ = checkpoint_state(model, run.last.state, check_bags)
        save_checkpoint(out / "last.pt", last_state, epoch=run.last.epoch, **meta)
    history = run.history
    write_csv(out / "history.csv", history)
    n_slides = len(data.bags["val"]) + len(data.bags["test"])
    instability = pd.DataFrame(
        {"epoch": history["epoch"], "jsd": history["jsd"], "n_slides": n_slides}
    )
    write_csv(out / "instability.csv", instability)
    write_csv(out / "predictions.csv", predictions_frame(run.best.test, data.classes))
    write_csv(out / "attention.csv", attention_frame(run.best.test, data))
    test_attention = run.best.test.attention_means()
    uniform = bool(test_attention) and is_practically_uniform(test_attention)
    metrics = {
        "model": model_name,
        "fold": fold,
        "seed": int(params["seed"]),
        "selected_epoch": run.best.epoch,
        "last_epoch": run.last.epoch,
        "test": run.best.test.metrics(),
        "test_last": run.last.test.metrics(),
        "val": run.best.val.metrics(),
        **instability_summary(history, float(params["lr"])),
        "attention": {**test_attention, "practically_uniform": uniform},
        "anchor": dict(anchor or {}),
        "checkpoint": {**precision, "parameters": sum(v.numel() for v in best_state.values()),
                       "bytes": (out / "model.pt").stat().st_size},
        "skipped_empty_slides": data.skipped,
        # how the features were held, not the bytes "auto" found free: those vary run to run (the log has them)
        "features_source": {k: v for k, v in (data.source or {}).items() if k in ("mode", "budget", "feature_bytes")},
    }
    write_json(out / "metrics.json", metrics)
    plot_curves(history, run.best.epoch, out / "curves.png", f"{model_name} fold {fold}")
    return metrics
