"""The cohort report: every fold of every model gathered into metrics, predictions and one HTML page.

Test metrics are those of the epoch selected on validation (``test``) and of the last epoch
(``test_last``), per fold and as mean +/- std over folds, together with the attention-instability
figure (mean JSD over the last 10 epochs) that is the paper's central claim. Where ground truth
exists, the localisation metrics of each model (``wsi_asmil.maps.localisation``) are aggregated over
the slides with tumour and compared slide by slide between models (Wilcoxon signed-rank test).

Outputs in ``out_dir``: ``metrics.json`` (per model), ``metrics.md``, ``predictions.csv``,
``localisation.csv`` (every model's per-slide rows), ``localisation.json`` (per-model summaries
and the paired comparisons) and ``index.html``, a self-contained page
with the tables, the instability curves, a sample of heatmaps with the truth outlined, the
predictions on new slides and the slides the inventory could not use.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from wsi_asmil import __version__
from wsi_asmil.core.args import setup_logging
from wsi_asmil.core.disk import human_bytes
from wsi_asmil.core.io import write_csv, write_json, write_text
from wsi_asmil.core.run_layout import fold_checkpoint, link_from_report
from wsi_asmil.maps.froc import FP_RATES
from wsi_asmil.maps.localisation import froc_summary, pooled_froc, summarise
from wsi_asmil.maps.scores import read_meta, scores_paths
from wsi_asmil.mil.metrics import summarize
from wsi_asmil.report import html as H
from wsi_asmil.tissue.masks import read_tumour_mask

log = logging.getLogger(__name__)

#: Columns of the readable table, in order, with their headings.
TABLE_METRICS = {
    "acc": "accuracy",
    "f1_macro": "macro F1",
    "f1_micro": "micro F1",
    "auc": "AUC",
}
#: Localisation columns of the summary tables, with their headings.
LOCALISATION_TABLE = {
    "dice": "Dice",
    "iou": "IoU",
    "dice_topq": "Dice (top-q)",
    "coverage_tumour_k": "coverage @k(tumour)",
    "tile_auc": "tile AUC",
    "attention_in_tumour": "attention in tumour",
    "dice_oracle": "Dice ceiling",
}
#: Metrics compared slide by slide between models.
PAIRED_METRICS = ("dice", "iou", "dice_topq", "coverage_tumour_k", "tile_auc", "attention_in_tumour")


def fold_dir(models_dir: Path, model: str, fold: int) -> Path:
    return fold_checkpoint(models_dir / model, fold).parent


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
            "instability_high_lr": summarize(
                [{"jsd": f.get("instability_high_lr", math.nan)} for f in folds]
            )["jsd"],
            "attention": summarize([f.get("attention") or {} for f in folds]),
            "uniform_folds": sum(bool((f.get("attention") or {}).get("practically_uniform")) for f in folds),
            "checkpoint": checkpoint_summary(folds),
        }
    predictions = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if len(predictions):
        first = ["model", "fold", "slide_id", "label", "pred"]
        predictions = predictions[first + [c for c in predictions.columns if c not in first]]
    return report, predictions


def checkpoint_summary(folds: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One model's checkpoint: parameters, bytes on disk per fold (mean) and in all, stored dtypes."""
    records = [f["checkpoint"] for f in folds if f.get("checkpoint")]
    if not records:
        return {}
    sizes = [int(r["bytes"]) for r in records]
    return {"parameters": int(records[0]["parameters"]), "bytes_per_fold": sum(sizes) / len(sizes),
            "bytes_total": sum(sizes), "dtypes": sorted({r["dtype"] for r in records})}


def histories(models_dir: str | Path, models: Sequence[str], n_folds: int) -> dict[str, list[pd.DataFrame]]:
    """Every fold's per-epoch history (with the ``jsd`` instability column) per model."""
    out: dict[str, list[pd.DataFrame]] = {}
    for model in models:
        out[model] = []
        for k in range(n_folds):
            p = fold_dir(Path(models_dir), model, k) / "history.csv"
            if p.is_file():
                out[model].append(pd.read_csv(p))
    return out


def _fmt(stat: dict[str, float], spec: str = ".3f") -> str:
    if stat is None or math.isnan(stat["mean"]):
        return "n/a"
    return f"{stat['mean']:{spec}} ± {stat['std']:{spec}}"


def markdown_table(report: dict[str, Any]) -> str:
    """A table a reader can paste into a paper draft: test metrics at the selected epoch."""
    head = ["model", *TABLE_METRICS.values(), "JSD (last 10 epochs)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model, r in report.items():
        cells = [_fmt(r["test"].get(k)) for k in TABLE_METRICS]
        lines.append("| " + " | ".join([model, *cells, _fmt(r["instability_last10"], ".2e")]) + " |")
    n = len(next(iter(report.values()))["folds"]) if report else 0
    note = f"\nTest metrics at the epoch selected by val F1 + val AUC, mean ± std over {n} fold(s).\n"
    return "\n".join(lines) + "\n" + note


def read_localisation(paths: Sequence[str | Path]) -> pd.DataFrame:
    """Every model's per-slide localisation rows in one frame (empty without ground truth)."""
    frames = [pd.read_csv(p) for p in paths if Path(p).is_file() and Path(p).stat().st_size > 1]
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["model", "slide_id"])


def paired_comparison(table: pd.DataFrame, reference: str, metrics: Sequence[str] = PAIRED_METRICS) -> list[dict[str, Any]]:
    """``reference`` against every other model, slide by slide over slides with tumour.

    For each metric: the number of paired slides, the mean difference (reference minus other),
    wins/ties/losses of the reference, and the two-sided Wilcoxon signed-rank p-value.
    """
    from scipy.stats import wilcoxon

    out = []
    if not len(table) or reference not in set(table["model"]):
        return out
    rows = table[table["has_tumour"].astype(bool)]
    ref = rows[rows["model"] == reference].set_index("slide_id")
    for other in [m for m in dict.fromkeys(rows["model"]) if m != reference]:
        oth = rows[rows["model"] == other].set_index("slide_id")
        for metric in metrics:
            if metric not in ref.columns:
                continue
            both = pd.concat([ref[metric], oth[metric]], axis=1, keys=["a", "b"], join="inner").astype(float).dropna()
            d = (both["a"] - both["b"]).to_numpy()
            if not len(d):
                p = math.nan
            elif not np.any(d != 0):
                p = 1.0  # identical on every slide
            else:
                p = float(wilcoxon(d, zero_method="wilcox").pvalue)
            out.append({
                "reference": reference, "other": other, "metric": metric, "n": int(len(d)),
                "mean_difference": float(d.mean()) if len(d) else math.nan,
                "wins": int((d > 1e-12).sum()), "ties": int((np.abs(d) <= 1e-12).sum()), "losses": int((d < -1e-12).sum()),
                "wilcoxon_p": p,
            })
    return out


def localisation_markdown(summary: dict[str, dict[str, Any]]) -> str:
    if not summary:
        return ""
    head = ["model", "slides", *LOCALISATION_TABLE.values()]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model, s in summary.items():
        n = max((v.get("n", 0) for v in s.values()), default=0)
        lines.append("| " + " | ".join([model, str(n), *(_fmt(s.get(k)) if s.get(k) else "n/a" for k in LOCALISATION_TABLE)]) + " |")
    return "\n## Localisation (slides with tumour, mean ± std)\n\n" + "\n".join(lines) + "\n"


# --- heatmap sample --------------------------------------------------------------------------------


def slide_labels(split_json: str | Path | None) -> dict[str, str]:
    if not split_json or not Path(split_json).is_file():
        return {}
    return dict(json.loads(Path(split_json).read_text()).get("labels", {}))


def choose_sample(candidates: Sequence[str], n: int, tumour_area: dict[str, float], labels: dict[str, str]) -> list[str]:
    """Up to ``n`` slides worth looking at: the largest tumours first (where truth exists), then
    slides without tumour for contrast; without truth, slides of each class in turn."""
    if n <= 0 or not candidates:
        return []
    if tumour_area:
        with_t = sorted((s for s in candidates if tumour_area.get(s, 0) > 0), key=lambda s: (-tumour_area[s], s))
        without = sorted(s for s in candidates if tumour_area.get(s, 0) <= 0)
        n_without = min(len(without), max(1, n // 3)) if len(with_t) >= n - 1 else min(len(without), n - len(with_t))
        return (with_t[: n - n_without] + without[:n_without])[:n]
    by_class: dict[str, list[str]] = {}
    for s in sorted(candidates):
        by_class.setdefault(labels.get(s, ""), []).append(s)
    out: list[str] = []
    while len(out) < n and any(by_class.values()):
        for cls in sorted(by_class):
            if by_class[cls] and len(out) < n:
                out.append(by_class[cls].pop(0))
    return out


def heatmap_section(
    heatmaps_dir: Path, models: Sequence[str], sample: Sequence[str], truth_dir: Path | None,
    loc: pd.DataFrame, labels: dict[str, str], legend: Path | None, report_dir: Path, width: int = 340,
) -> str:
    """A grid of the sampled slides (rows) by model (columns), truth outlined, linked to the full PNGs."""
    if not sample:
        return "<p class='note'>No heatmaps were drawn.</p>"
    parts = []
    if legend is not None and legend.is_file():
        parts.append(f"<p><img alt='colour bar' src='{H.png_data_uri(legend.read_bytes())}'></p>")
    if truth_dir is not None:
        parts.append("<p class='note'>White outline: ground-truth tumour.</p>")
    cols = f"grid-template-columns:repeat({len(models)},1fr)"
    for sid in sample:
        truth = truth_ds = None
        if truth_dir is not None and (truth_dir / f"{sid}.png").is_file():
            truth, side = read_tumour_mask(truth_dir / f"{sid}.png")
            truth_ds = float(side["downsample"])
        cells = []
        for model in models:
            png = heatmaps_dir / model / f"{sid}.png"
            if not png.is_file():
                cells.append(f"<div class='cell'>{H.esc(model)}: no heatmap</div>")
                continue
            meta_path = scores_paths(heatmaps_dir / model / "scores", sid)[1]
            meta = read_meta(meta_path) if meta_path.is_file() else {}
            img = cv2.cvtColor(cv2.imread(str(png), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
            size = tuple(meta.get("slide_dimensions") or (img.shape[1], img.shape[0]))
            shown = H.outlined(img, size, width, truth, truth_ds)
            caption = [f"<b>{H.esc(model)}</b>"]
            if meta.get("probs"):
                caption.append(f"pred {H.esc(meta['pred'])} (p={max(meta['probs'].values()):.2f}, folds {meta['folds']})")
            row = loc[(loc["model"] == model) & (loc["slide_id"] == sid)] if len(loc) else loc
            if len(row) and bool(row.iloc[0].get("has_tumour", False)):
                r = row.iloc[0]
                caption.append(f"Dice {H.fmt(float(r['dice']))} · cov@k {H.fmt(float(r['coverage_tumour_k']))}")
            href = H.esc(link_from_report(report_dir, png))
            cells.append(
                f"<div class='cell'><a href='{href}'><img alt='{H.esc(sid)} {H.esc(model)}' src='{H.image_data_uri(shown)}'></a>"
                f"<br>{'<br>'.join(caption)}</div>"
            )
        label = labels.get(sid, "")
        parts.append(f"<h3>{H.esc(sid)} <span class='note'>{H.esc(label)}</span></h3>"
                     f"<div class='grid' style='{cols}'>{''.join(cells)}</div>")
    return "".join(parts)


# --- the whole report ------------------------------------------------------------------------------


def write_report(
    models_dir: str | Path,
    models: list[str],
    n_folds: int,
    out_dir: str | Path,
    *,
    localisation: Sequence[str | Path] = (),
    heatmaps_dir: str | Path | None = None,
    heatmap_models: Sequence[str] = (),
    truth_dir: str | Path | None = None,
    split_json: str | Path | None = None,
    inventory: str | Path | None = None,
    new_predictions: str | Path | None = None,
    sample: int = 6,
    viewer: str | None = None,
) -> dict[str, Any]:
    """Write every report file; returns the metrics.json content."""
    report, predictions = gather(models_dir, models, n_folds)
    out = Path(out_dir)
    loc = read_localisation(localisation)
    loc_summary = {m: summarise(loc[loc["model"] == m]) for m in dict.fromkeys(loc["model"])} if len(loc) else {}
    reference = "asmil" if "asmil" in loc_summary else (next(iter(loc_summary)) if loc_summary else None)
    paired = paired_comparison(loc, reference) if reference else []
    froc = {m: s for m in loc_summary if (s := froc_summary(pooled_froc(loc[loc["model"] == m]))) is not None}
    inv = pd.read_csv(inventory, dtype={"slide_id": str}, keep_default_na=False) if inventory and Path(inventory).is_file() else None
    unusable = inv[inv["status"] != "ok"] if inv is not None else pd.DataFrame()
    write_json(out / "metrics.json", report)
    write_csv(out / "predictions.csv", predictions)
    write_csv(out / "localisation.csv", loc)
    write_json(out / "localisation.json", {"by_model": loc_summary, "froc": froc, "reference": reference,
                                           "paired": paired})
    table = markdown_table(report) + localisation_markdown(loc_summary) + froc_markdown(froc)
    write_text(out / "metrics.md", table)
    log.info("\n%s", table)

    labels = slide_labels(split_json)
    hist = histories(models_dir, models, n_folds)
    sections = [("Classification", classification_html(report, n_folds))]
    fig = H.instability_figure(hist)
    sections.append(("Attention instability", (
        f"<img alt='instability curves' src='{H.png_data_uri(fig)}'>" if fig else "<p>No training history.</p>")
        + "<p class='note'>Jensen-Shannon divergence between the attention of consecutive epochs over the "
          "validation slides (log scale; mean over folds, band from the lowest to the highest fold).</p>"))
    sections.append(("Attention", attention_html(report, n_folds)))
    sections.append(("Localisation", localisation_html(loc, loc_summary, paired, froc)))
    hdir = Path(heatmaps_dir) if heatmaps_dir else None
    tdir = Path(truth_dir) if truth_dir else None
    if hdir is not None and heatmap_models:
        drawn = sorted({p.stem for m in heatmap_models for p in (hdir / m).glob("*.png")})
        area = {}
        if tdir is not None:
            for s in drawn:
                side = tdir / f"{s}.json"
                if side.is_file():
                    area[s] = float(json.loads(side.read_text()).get("tumour_area_um2", 0.0))
        chosen = choose_sample(drawn, sample, area, labels)
        heatmaps = heatmap_section(hdir, heatmap_models, chosen, tdir if area else None, loc, labels, hdir / "legend.png", out)
        if viewer:
            heatmaps = (f"<p><a href='{H.esc(viewer)}'>Open these slides in the zoomable viewer</a>: the slide, "
                        "each model's heat (toggle, opacity) and the truth outline, panned and zoomed.</p>") + heatmaps
        sections.append(("Heatmaps", heatmaps))
    sections.append(("Test predictions", predictions_html(predictions)))
    if new_predictions and Path(new_predictions).is_file():
        newp = pd.read_csv(new_predictions, dtype={"slide_id": str}, keep_default_na=False)
        sections.append(("New slides (predict)", f"<p>{len(newp)} row(s); also in <code>predict/predictions.csv</code>.</p>"
                         + H.frame_table(newp)))
    if inv is not None:
        sections.append(("Slides left out", inventory_html(inv, unusable)))
    n_classes = len(set(labels.values()))
    subtitle = (f"wsi-asmil {H.esc(__version__)} · {len(labels)} labeled slide(s), {n_classes} class(es), "
                f"{n_folds} fold(s) · models: {H.esc(', '.join(models))}")
    write_text(out / "index.html", H.page("wsi-asmil report", sections, subtitle))
    return report


def classification_html(report: dict[str, Any], n_folds: int) -> str:
    rows = []
    for model, r in report.items():
        ckpt = r.get("checkpoint") or {}
        size = (f"{human_bytes(ckpt['bytes_per_fold'])} ({ckpt['parameters'] / 1e6:.2f} M params, "
                f"{'/'.join(ckpt['dtypes'])})") if ckpt else "n/a"
        rows.append([H.esc(model), *(H.mean_std(r["test"].get(k)) for k in TABLE_METRICS),
                     *(H.mean_std(r["test_last"].get(k)) for k in ("f1_macro", "auc")),
                     H.mean_std(r["instability_last10"], 4), H.esc(size)])
    head = ["model", *TABLE_METRICS.values(), "macro F1 (last epoch)", "AUC (last epoch)", "JSD last 10 epochs",
            "checkpoint per fold"]
    return H.table(head, rows) + (
        f"<p class='note'>Test metrics at the epoch selected by validation F1 + AUC (and at the last epoch), "
        f"mean ± std over {n_folds} fold(s). Checkpoints hold the selected epoch's weights, in float16 where "
        f"that moves no slide probability by more than 0.001 (see docs/outputs.md).</p>")


def attention_verdict(model: str, r: Mapping[str, Any], n_folds: int) -> str:
    """One sentence on whether ``model``'s attention moved at all: a flat model's heatmaps and
    instability describe no choice of tiles, and a reader must not compare them as if they did."""
    n = r.get("uniform_folds", 0)
    eff, top = r["attention"].get("effective_fraction"), r["attention"].get("top_ratio")
    figures = ""
    if eff and top and not math.isnan(eff["mean"]):
        figures = f" (its score map spreads over {eff['mean']:.1%} of the tiles; its top tile has {top['mean']:.2f}x the uniform weight)"
    if n == n_folds and n:
        return (f"{model}'s attention is practically uniform in every fold{figures}: it pools like a mean, "
                "so its heatmaps, localisation and instability say nothing about which tiles it uses.")
    if n:
        return f"{model}'s attention is practically uniform in {n} of {n_folds} folds{figures}."
    return f"{model}'s attention left uniform{figures}."


def attention_html(report: Mapping[str, Any], n_folds: int) -> str:
    rows, verdicts = [], []
    for model, r in report.items():
        a = r["attention"]
        rows.append([H.esc(model), *(H.mean_std(a.get(k)) for k in ("effective_fraction", "top_ratio", "logit_spread",
                                                                  "positive_mass", "instance_auc")),
                     H.mean_std(r["instability_high_lr"], 4), f"{r.get('uniform_folds', 0)} / {n_folds}"])
        verdicts.append(f"<li>{H.esc(attention_verdict(model, r, n_folds))}</li>")
    head = ["model", "effective tiles (exp H / M)", "top tile × M", "logit spread", "mass on tumour", "instance AUC",
            "JSD high-lr epochs", "folds practically uniform"]
    return H.table(head, rows) + f"<ul>{''.join(verdicts)}</ul>" + (
        "<p class='note'>Test slides at the selected epoch, mean ± std over folds. Practically uniform: the score map "
        "spreads over at least 90% of the tiles and no tile has more than twice the uniform weight. Tumour mass and "
        "instance AUC need per-tile truth (the localisation stage measures them from the heatmaps).</p>")


def froc_markdown(froc: dict[str, dict[str, Any]]) -> str:
    if not froc:
        return ""
    head = ["model", "slides", "lesions", "FROC", *(f"sens. @{r:g} FP" for r in FP_RATES)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model, f in froc.items():
        lines.append("| " + " | ".join([model, str(f["n_slides"]), str(f["n_lesions"]), _num(f["score"]),
                                        *(_num(v) for v in f["sensitivity_at"].values())]) + " |")
    return "\n## Lesion-level FROC (CAMELYON16 protocol, every slide with truth)\n\n" + "\n".join(lines) + "\n"


def _num(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.3f}"


def froc_html(froc: dict[str, dict[str, Any]]) -> str:
    if not froc:
        return ""
    rows = [[H.esc(m), str(f["n_slides"]), str(f["n_lesions"]), _num(f["score"]),
             *(_num(v) for v in f["sensitivity_at"].values())] for m, f in froc.items()]
    fig = H.froc_figure({m: (f["fps_per_slide"], f["sensitivity"]) for m, f in froc.items()})
    return ("<h3>Lesion-level FROC</h3>"
            + H.table(["model", "slides", "lesions", "FROC", *(f"sensitivity @{r:g} FP/slide" for r in FP_RATES)], rows)
            + (f"<img alt='FROC curves' src='{H.png_data_uri(fig)}'>" if fig else "")
            + "<p class='note'>The CAMELYON16 protocol over every slide with truth, normal slides included: "
              "lesions are the tumour grown by 75 µm, isolated tumour cells (under 275 µm) neither count nor "
              "cost; detections are a heatmap's best tiles by non-maximum suppression while attention is at "
              "least the set multiple of uniform; FROC is the mean sensitivity at 1/4 to 8 false positives "
              "per slide. Flat attention makes no detection and scores 0.</p>")


def localisation_html(loc: pd.DataFrame, summary: dict[str, Any], paired: list[dict[str, Any]],
                      froc: dict[str, dict[str, Any]] | None = None) -> str:
    if not len(loc):
        return ("<p>No ground truth: set <code>heatmap.localisation.annotations</code> to a folder of per-slide "
                "GeoJSON, ASAP XML or mask images to measure how well attention finds tumour.</p>")
    rows = []
    for model, s in summary.items():
        n = int(loc[(loc["model"] == model) & loc["has_tumour"].astype(bool)].shape[0])
        rows.append([H.esc(model), str(n), *(H.mean_std(s.get(k)) for k in LOCALISATION_TABLE)])
    threshold = str(loc["threshold"].iloc[0]) if "threshold" in loc.columns and len(loc) else "?"
    parts = [H.table(["model", "tumour slides", *LOCALISATION_TABLE.values()], rows),
             f"<p class='note'>Over slides with tumour, from each slide's test-fold attention. Dice/IoU: the tiles kept "
             f"by the {H.esc(threshold)} threshold against the tumour mask; top-q: the configured share of tiles; "
             "coverage @k(tumour): tumour fraction covered by as many top tiles as the tumour would fill; tile AUC: "
             "scores vs tumour tiles (≥ half tumour); attention in tumour: share of the attention mass on tumour; "
             "Dice ceiling: selecting exactly the tumour tiles.</p>", froc_html(froc or {})]
    if paired:
        prow = [[H.esc(p["metric"]), f"{H.esc(p['reference'])} − {H.esc(p['other'])}", str(p["n"]),
                 H.fmt(p["mean_difference"]), f"{p['wins']}/{p['ties']}/{p['losses']}", H.fmt(p["wilcoxon_p"], 4)]
                for p in paired]
        parts.append("<h3>Paired, slide by slide</h3>" + H.table(
            ["metric", "difference", "slides", "mean difference", "wins/ties/losses", "Wilcoxon p"], prow))
    cols = [c for c in ["model", "slide_id", "has_tumour", "tumour_area_mm2", "n_tiles", "tumour_tiles", "n_selected",
                        "dice", "iou", "dice_topq", "dice_otsu", "coverage_tumour_k", "tile_auc",
                        "attention_in_tumour", "dice_oracle", "froc_lesions", "froc_found", "froc_fps"]
            if c in loc.columns]
    parts.append(f"<details><summary>Per slide ({len(loc)} rows)</summary>{H.frame_table(loc[cols])}</details>")
    return "".join(parts)


def predictions_html(predictions: pd.DataFrame) -> str:
    if not len(predictions):
        return "<p>No test predictions.</p>"
    counts = predictions.groupby("model").apply(lambda f: f"{(f['label'] == f['pred']).mean():.3f}", include_groups=False)
    summary = ", ".join(f"{H.esc(m)}: accuracy {a}" for m, a in counts.items())
    return f"<p>{summary}</p><details><summary>Every test slide ({len(predictions)} rows)</summary>{H.frame_table(predictions)}</details>"


def inventory_html(inv: pd.DataFrame, unusable: pd.DataFrame) -> str:
    if not len(unusable):
        return f"<p>All {len(inv)} slide(s) could be opened.</p>"
    rows = [[H.esc(r.slide_id), H.esc(r.path), f"<span class='warn'>{H.esc(r.message)}</span>"] for r in unusable.itertuples()]
    return f"<p>{len(unusable)} of {len(inv)} slide(s) could not be used:</p>" + H.table(["slide", "file", "reason"], rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m wsi_asmil.report.build", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models-dir", required=True, help="folder holding <model>/fold<k>/")
    p.add_argument("--models", required=True, nargs="+", help="model names")
    p.add_argument("--folds", type=int, required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--localisation", nargs="*", default=[], help="<model>.csv files of wsi_asmil.maps.localisation")
    p.add_argument("--heatmaps-dir", default=None, help="folder holding <model>/<slide>.png and legend.png")
    p.add_argument("--heatmap-models", nargs="*", default=[], help="models whose heatmaps the page shows")
    p.add_argument("--truth-dir", default=None, help="folder of <slide>.png tumour masks (outlined on heatmaps)")
    p.add_argument("--split", default=None, help="split JSON (slide labels)")
    p.add_argument("--inventory", default=None, help="inventory CSV (slides left out)")
    p.add_argument("--new-predictions", default=None, help="predict/predictions.csv")
    p.add_argument("--sample", type=int, default=6, help="slides whose heatmaps the page shows")
    p.add_argument("--viewer", default=None, help="the zoomable viewer's page, relative to the report (linked)")
    args = p.parse_args(argv)
    setup_logging()
    write_report(
        args.models_dir, args.models, args.folds, args.out_dir, localisation=args.localisation,
        heatmaps_dir=args.heatmaps_dir, heatmap_models=args.heatmap_models, truth_dir=args.truth_dir,
        split_json=args.split, inventory=args.inventory, new_predictions=args.new_predictions, sample=args.sample,
        viewer=args.viewer,
    )


if __name__ == "__main__":
    main()
