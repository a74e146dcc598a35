"""Does ASMIL do what its paper claims, here? Every claim measured over seeds, with paired differences.

Four cohorts:

    # (a) the witness-bag benchmark: 360 feature-level bags of 500-1,500 tiles (200 train, 60 val,
    #     100 test), witnesses 0.5-2 % of a positive bag, decoys in negative bags, a per-bag offset
    #     that hides the label from the bag mean; generated under --work on first use
    python benchmarks/asmil_claims.py witness --work /tmp/claims --seeds 5 --epochs 50 --lrs 1e-4 1e-3 --jobs 2

    # (b) witnesses of another kind: out along two directions at once, half-look-alike decoys in
    #     every bag, so that no direction ranks them first (wsi_asmil.synthetic.witness)
    python benchmarks/asmil_claims.py witness --witness-kind conjunction --work /tmp/claims_conj \
        --seeds 5 --epochs 50 --lrs 1e-3 --jobs 2

    # (c) semi-synthetic bags of the demo's real pretrained features (after `make demo`): 0.5-2 %
    #     tumour tiles over per-bag mixtures of normal tissue, split by source slide
    #     (wsi_asmil.synthetic.tumour_mix; its mean-pooling and oracle AUCs in mix_baselines.json)
    python benchmarks/asmil_claims.py mix --results results --work /tmp/claims_mix --seeds 5 --epochs 50 --jobs 2

    # (d) the demo cohort with its pretrained features (after `make demo`), tumour tiles from the
    #     demo's truth masks, 4-fold cross-validation per seed
    python benchmarks/asmil_claims.py demo --results results --work /tmp/claims_demo --seeds 5 --epochs 20 --jobs 2

The mechanism behind flat ASMIL attention: the readouts that take parts of ASMIL's away (and the
repaired ``asmil_linear``), with their per-epoch traces (``traces.csv``, ``traces.png``: training
CE, logit spread, top tile x M, mass on the positives, per variant and learning rate)::

    python benchmarks/asmil_claims.py witness --work /tmp/claims --seeds 5 --epochs 50 --lrs 1e-3 1e-4 --jobs 2 \
        --variants ASMIL "ASMIL mean readout (no CLS aggregator)" "ASMIL linear readout + LayerNorm" \
        "ASMIL linear readout (asmil_linear)" "ASMIL linear readout, no anchor (beta 0)" ABMIL ACMIL

Each (learning rate, variant, seed, fold) is one ``train_fold`` run with the project's trainer (the
paper's protocol: AdamW, cosine decay, one bag per step, selection on validation F1 + AUC); the seed
sets the model's initialisation and the data order (and, on the demo, the folds). A finished run is
not redone, so an interrupted benchmark resumes. The script writes ``runs.csv`` (one row per run),
``summary.csv`` and ``claims.md``: per variant, mean +/- std over seeds; per variant, the paired
difference from ASMIL over seeds with a 95 % t confidence interval; and the paper's claims with a
verdict: *holds* (the difference has the paper's sign and its interval excludes 0), *does not hold*
(the interval excludes 0 with the opposite sign), *inconclusive*, or *not testable* where ASMIL's
attention stayed practically uniform (then no attention claim can be tested at all).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

log = logging.getLogger("asmil_claims")

VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "ASMIL": ("asmil", {}),
    "ASMIL no anchor (beta 0)": ("asmil", {"beta": 0.0}),
    "ASMIL released anchor (frozen random)": ("asmil", {"anchor_mode": "frozen_random"}),
    "ASMIL softmax target (tau 1)": ("asmil", {"target": "softmax", "tau": 1.0}),
    "ASMIL no token dropout": ("asmil", {"token_drop": 0.0}),
    "ABMIL": ("abmil", {}),
    "ABMIL + Anchor/NSF": ("abmil_anchor", {}),
    "ACMIL": ("acmil", {}),
    # The paper's anchor memory at 400 slides (m = 0.999: 2.5 epochs) on any cohort size.
    "ASMIL anchor horizon 2.5 epochs": ("asmil", {"anchor_horizon_epochs": 2.5}),
    "ABMIL + Anchor/NSF, horizon 2.5 epochs": ("abmil_anchor", {"anchor_horizon_epochs": 2.5}),
    # The mechanism: each readout takes one part of the paper's away (wsi_asmil.mil.models.asmil).
    "ASMIL mean readout (no CLS aggregator)": ("asmil", {"readout": "mean"}),
    "ASMIL linear readout + LayerNorm": ("asmil", {"readout": "linear_norm"}),
    "ASMIL linear readout (asmil_linear)": ("asmil_linear", {}),
    "ASMIL linear readout, no anchor (beta 0)": ("asmil_linear", {"beta": 0.0}),
    "ASMIL linear readout, beta 0.1": ("asmil_linear", {"beta": 0.1}),
    "ASMIL linear readout, tokens std 1, beta 0": ("asmil_linear", {"token_std": 1.0, "beta": 0.0}),
    "ASMIL linear readout, tokens std 1": ("asmil_linear", {"token_std": 1.0}),
    "ASMIL linear readout, anchor warm-up 10": ("asmil_linear", {"anchor_warmup_epochs": 10}),
    "ASMIL linear readout, tokens std 1, anchor warm-up 10": (
        "asmil_linear", {"token_std": 1.0, "anchor_warmup_epochs": 10}),
    "ASMIL linear readout, tokens std 1, softmax target": (
        "asmil_linear", {"token_std": 1.0, "target": "softmax", "tau": 1.0}),
    "ASMIL linear readout, tokens std 1, NSF at uniform": (
        "asmil_linear", {"token_std": 1.0, "target": "nsf_uniform"}),
    "ASMIL linear readout, tokens std 1, horizon 0.1 epochs": (
        "asmil_linear", {"token_std": 1.0, "anchor_horizon_epochs": 0.1}),
    "ASMIL linear readout, tokens std 1, beta 0.03": ("asmil_linear", {"token_std": 1.0, "beta": 0.03}),
    "ASMIL tokens std 1, beta 0": ("asmil", {"token_std": 1.0, "beta": 0.0}),
    "ASMIL tokens std 1, NSF at uniform": ("asmil", {"token_std": 1.0, "target": "nsf_uniform"}),
    # The repaired model (asmil_repaired: linear readout, tokens at std 1, beta 0.1) and its ablations.
    "ASMIL repaired (asmil_repaired)": ("asmil_repaired", {}),
    "ASMIL repaired, no anchor (beta 0)": ("asmil_repaired", {"beta": 0.0}),
    "ASMIL repaired, softmax target (tau 1)": ("asmil_repaired", {"target": "softmax", "tau": 1.0}),
}

#: The variants whose per-epoch traces (traces.csv, traces.png) show the mechanism.
TRACED = ("ASMIL", "ASMIL linear readout (asmil_linear)", "ASMIL linear readout, no anchor (beta 0)",
          "ASMIL tokens std 1, beta 0", "ASMIL repaired, no anchor (beta 0)", "ASMIL repaired (asmil_repaired)",
          "ABMIL")
#: history.csv columns traced: the training CE, and what the test and val attention does.
TRACE_COLUMNS = {"train_ce": "training CE", "logit_spread": "attention logit spread (sd over tiles)",
                 "top_ratio": "top tile × M", "positive_mass": "attention mass on positives"}

#: Per-run measures: (column, what it is, higher is better for the paper's side?)
MEASURES: dict[str, str] = {
    "f1_macro": "test macro F1 (selected epoch)",
    "auc": "test AUC",
    "jsd_high_lr": "per-map JSD between consecutive epochs, epochs at >= half the peak lr",
    "jsd_last10": "per-map JSD, last 10 epochs (the paper's window)",
    "effective_fraction": "test score map: exp(entropy) / M",
    "top_ratio": "test score map: top weight x M",
    "positive_mass": "attention mass on witness / tumour tiles",
    "instance_auc": "instance AUROC of the attention for witness / tumour tiles",
    "spread_over_positives": "positive bags: exp(entropy) / number of positive tiles",
    "grad_ratio_high_lr": "||grad beta L_AS|| / ||grad CE||, high-lr epochs",
    "uniform": "share of runs whose test attention is practically uniform",
}


@dataclass(frozen=True)
class Run:
    """One training job of the benchmark."""

    lr: float
    variant: str
    seed: int
    fold: int
    features_dir: str
    split: dict[str, Any]
    epochs: int
    out: str
    truth_file: str | None
    schedule: str = "cosine"


def _train(run: Run) -> dict[str, Any]:
    """One run in a worker process (one torch thread: the workers share the cores)."""
    import torch

    from wsi_asmil.mil.models import model_defaults
    from wsi_asmil.mil.train import train_fold

    torch.set_num_threads(1)
    out = Path(run.out)
    if not (out / "metrics.json").is_file():
        model, overrides = VARIANTS[run.variant]
        # the grid's lr for every model, also one with a learning rate of its own (asmil_repaired)
        own_lr = {"lr": None} if "lr" in model_defaults(model) else {}
        params = {"epochs": run.epochs, "lr": run.lr, "schedule": run.schedule, "seed": run.seed,
                  "models": {model: {**overrides, **own_lr}}}
        truth = dict(np.load(run.truth_file)) if run.truth_file else None
        logging.getLogger("wsi_asmil").setLevel(logging.WARNING)
        train_fold(run.features_dir, run.split, run.fold, model, params, out, "cpu", tile_truth=truth)
    return summarise_run(run, out)


def summarise_run(run: Run, out: Path) -> dict[str, Any]:
    metrics = json.loads((out / "metrics.json").read_text())
    attention = pd.read_csv(out / "attention.csv")
    positive = attention[attention["n_positive"].fillna(0) > 0]
    spread = (positive["effective_fraction"] * positive["n_tiles"] / positive["n_positive"]).mean()
    att = metrics["attention"]
    nan = lambda v: math.nan if v is None else float(v)  # noqa: E731  (strict JSON writes NaN as null)
    return {
        "lr": run.lr, "variant": run.variant, "seed": run.seed, "fold": run.fold,
        "f1_macro": nan(metrics["test"]["f1_macro"]), "auc": nan(metrics["test"]["auc"]),
        "jsd_high_lr": nan(metrics["instability_high_lr"]), "jsd_last10": nan(metrics["instability_last10"]),
        "effective_fraction": nan(att.get("effective_fraction")), "top_ratio": nan(att.get("top_ratio")),
        "positive_mass": nan(att.get("positive_mass")), "instance_auc": nan(att.get("instance_auc")),
        "spread_over_positives": float(spread) if len(positive) else math.nan,
        "grad_ratio_high_lr": nan(metrics["grad_ratio_high_lr"]),
        "uniform": float(bool(att.get("practically_uniform"))),
        "selected_epoch": metrics["selected_epoch"],
    }


# --- cohorts -----------------------------------------------------------------------------------


def witness_cohort(
    work: Path, seed: int, n_bags: int = 360, bag_size: tuple[int, int] = (500, 1500), kind: str = "direction"
) -> tuple[Path, list[dict[str, Any]], None]:
    """The witness-bag cohort of witnesses of ``kind`` (generated once) and one fixed split for
    every seed: 200/60/100 of 360 bags (the same shares of another count), stratified by label."""
    from wsi_asmil.synthetic.witness import WitnessSpec, write_witness_cohort

    cohort = work / ("witness" if kind == "direction" else f"witness_{kind}")
    labels_csv = cohort / "labels.csv"
    if not labels_csv.is_file():
        write_witness_cohort(cohort, WitnessSpec(n_bags=n_bags, bag_size=bag_size, seed=seed, witness_kind=kind))
    table = pd.read_csv(labels_csv, dtype=str)
    labels = dict(zip(table["slide_id"], table["label"]))
    rng = np.random.default_rng(seed)
    parts: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for label in sorted(set(labels.values())):  # stratified by label
        ids = sorted(s for s, v in labels.items() if v == label)
        ids = [ids[i] for i in rng.permutation(len(ids))]
        n_train, n_val = round(len(ids) * 200 / 360), round(len(ids) * 60 / 360)
        parts["train"] += ids[:n_train]
        parts["val"] += ids[n_train : n_train + n_val]
        parts["test"] += ids[n_train + n_val :]
    split = {"classes": sorted(set(labels.values())), "labels": labels, "folds": [parts]}
    return cohort / "features", [split], None


def demo_features(results: Path) -> Path:
    """The training grid's features folder of a demo run (config.yaml's tiling; the dense heatmap
    grid beside it holds the drawn slides only), with its one encoder."""
    import yaml

    from wsi_asmil.features.tile import TileParams

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "config.yaml").read_text())
    grid = results / "features" / TileParams(**config["tiling"]).tag()
    encoders = sorted(p for p in grid.glob("*") if p.is_dir())
    if len(encoders) != 1:
        raise SystemExit(f"expected one encoder's features under {grid} (config.yaml's tiling), found {encoders}")
    return encoders[0]


def mix_cohort(results: Path, work: Path, n_bags: int, bag_size: tuple[int, int]) -> tuple[Path, list[dict[str, Any]], None]:
    """Semi-synthetic bags of the demo's real features (wsi_asmil.synthetic.tumour_mix), generated
    once, with their one split by source slide; the pooling baselines go to mix_baselines.json."""
    from wsi_asmil.synthetic.tumour_mix import MixSpec, pooling_baselines, split_of, write_tumour_mix_cohort

    cohort = work / "tumour_mix"
    if not (cohort / "labels.csv").is_file():
        write_tumour_mix_cohort(cohort, demo_features(results), results / "localisation" / "truth",
                                MixSpec(n_bags=n_bags, bag_size=bag_size))
        baselines = pooling_baselines(cohort)
        (work / "mix_baselines.json").write_text(json.dumps(baselines, indent=2))
        log.info("tumour-mix cohort: mean pooling AUC %.3f, oracle AUC %.3f", baselines["mean_pooling_auc"],
                 baselines["oracle_max_auc"])
    return cohort / "features", [split_of(cohort)], None


def demo_cohort(results: Path, work: Path, seeds: int, folds: int) -> tuple[Path, list[dict[str, Any]], Path]:
    """The demo's features and per-tile tumour truth (tiles at least half tumour, from the truth
    masks the localisation stage rasterised), and a stratified k-fold split per seed."""
    from wsi_asmil.maps.localisation import TUMOUR_TILE_FRACTION
    from wsi_asmil.mil.split import make_split
    from wsi_asmil.synthetic.tumour_mix import tumour_fractions

    features_dir = demo_features(results)
    truth_file = work / "demo_tile_truth.npz"
    if not truth_file.is_file():
        fractions = tumour_fractions(features_dir, results / "localisation" / "truth")
        work.mkdir(parents=True, exist_ok=True)
        np.savez(truth_file, **{s: (f >= TUMOUR_TILE_FRACTION).astype(np.int8) for s, f in fractions.items()})
    labels_csv = results / "demo" / "labels.csv"
    splits = [make_split(labels_csv, "kfold", folds, 0.2, seed) for seed in range(seeds)]
    return features_dir, splits, truth_file


# --- statistics ----------------------------------------------------------------------------------


def per_seed(runs: pd.DataFrame) -> pd.DataFrame:
    """Fold means per (lr, variant, seed): the unit the paired comparison works on."""
    return runs.groupby(["lr", "variant", "seed"], as_index=False)[list(MEASURES)].mean()


def paired(seeds: pd.DataFrame, lr: float, variant: str, measure: str, reference: str = "ASMIL") -> dict[str, float]:
    """Mean difference variant - reference over shared seeds, with a 95 % t interval."""
    a = seeds[(seeds.lr == lr) & (seeds.variant == variant)].set_index("seed")[measure]
    b = seeds[(seeds.lr == lr) & (seeds.variant == reference)].set_index("seed")[measure]
    d = (a - b).dropna()
    n = len(d)
    if n == 0:
        return {"mean": math.nan, "lo": math.nan, "hi": math.nan, "n": 0}
    mean = float(d.mean())
    if n < 2 or d.std(ddof=1) == 0:
        return {"mean": mean, "lo": mean, "hi": mean, "n": n}
    half = float(stats.t.ppf(0.975, n - 1) * d.std(ddof=1) / math.sqrt(n))
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": n}


def verdict(diff: Mapping[str, float], paper_sign: int) -> str:
    """``paper_sign`` is the sign the paper predicts for the difference as computed."""
    if diff["n"] == 0 or math.isnan(diff["mean"]):
        return "not measured"
    if diff["lo"] > 0 or diff["hi"] < 0:
        return "holds" if (diff["mean"] > 0) == (paper_sign > 0) else "does not hold"
    return "inconclusive"


#: (claim, measure, variant, reference, sign the paper predicts for variant - reference)
CLAIMS: list[tuple[str, str, str, str, int]] = [
    ("PI: ASMIL's attention is more stable than ABMIL's", "jsd_high_lr", "ABMIL", "ASMIL", +1),
    ("PI: the anchor stabilises ASMIL's attention", "jsd_high_lr", "ASMIL no anchor (beta 0)", "ASMIL", +1),
    ("PI: the anchor plug-in stabilises ABMIL", "jsd_high_lr", "ABMIL", "ABMIL + Anchor/NSF", +1),
    ("PII: ABMIL over-concentrates where ASMIL spreads over the witnesses", "spread_over_positives", "ABMIL", "ASMIL", -1),
    ("PII: the NSF anchor spreads ASMIL's attention over more positives", "spread_over_positives", "ASMIL no anchor (beta 0)", "ASMIL", -1),
    ("ASMIL localises positives better than ABMIL (instance AUC)", "instance_auc", "ABMIL", "ASMIL", -1),
    ("F1: ASMIL beats ABMIL", "f1_macro", "ABMIL", "ASMIL", -1),
    ("F1: ASMIL beats ACMIL", "f1_macro", "ACMIL", "ASMIL", -1),
    ("Plug-in: Anchor + NSF improves ABMIL's F1", "f1_macro", "ABMIL", "ABMIL + Anchor/NSF", -1),
    ("Ablation: removing the anchor costs F1", "f1_macro", "ASMIL no anchor (beta 0)", "ASMIL", -1),
    ("Ablation: NSF beats a plain softmax target (F1)", "f1_macro", "ASMIL softmax target (tau 1)", "ASMIL", -1),
    ("Ablation: token dropout helps (F1)", "f1_macro", "ASMIL no token dropout", "ASMIL", -1),
    ("Paper's EMA anchor beats the released frozen random anchor (F1)", "f1_macro", "ASMIL released anchor (frozen random)", "ASMIL", -1),
]

#: The repaired model against the models its attention should match or beat (its own claims: the
#: sign is what a working repair predicts, variant - reference).
REPAIR_CLAIMS: list[tuple[str, str, str, str, int]] = [
    ("asmil_repaired attends to positives more than ASMIL", "positive_mass", "ASMIL repaired (asmil_repaired)", "ASMIL", +1),
    ("asmil_repaired ranks positives better than ASMIL", "instance_auc", "ASMIL repaired (asmil_repaired)", "ASMIL", +1),
    ("asmil_repaired's F1 is at least ASMIL's", "f1_macro", "ASMIL repaired (asmil_repaired)", "ASMIL", +1),
    ("asmil_repaired's F1 against ABMIL's", "f1_macro", "ASMIL repaired (asmil_repaired)", "ABMIL", +1),
    ("asmil_repaired's F1 against ACMIL's", "f1_macro", "ASMIL repaired (asmil_repaired)", "ACMIL", +1),
    ("asmil_repaired's attention on positives against ABMIL's", "positive_mass", "ASMIL repaired (asmil_repaired)", "ABMIL", +1),
    ("asmil_repaired's attention on positives against ACMIL's", "positive_mass", "ASMIL repaired (asmil_repaired)", "ACMIL", +1),
    ("PI: the anchor stabilises asmil_repaired's attention", "jsd_high_lr", "ASMIL repaired, no anchor (beta 0)", "ASMIL repaired (asmil_repaired)", +1),
    ("PII: NSF spreads asmil_repaired's attention over more positives than a softmax target",
     "spread_over_positives", "ASMIL repaired, softmax target (tau 1)", "ASMIL repaired (asmil_repaired)", -1),
    ("asmil_repaired's anchor adds attention on positives", "positive_mass", "ASMIL repaired, no anchor (beta 0)",
     "ASMIL repaired (asmil_repaired)", -1),
    ("asmil_linear attends to positives more than ASMIL", "positive_mass", "ASMIL linear readout (asmil_linear)", "ASMIL", +1),
    ("The anchor stabilises asmil_linear's attention", "jsd_high_lr", "ASMIL linear readout, no anchor (beta 0)", "ASMIL linear readout (asmil_linear)", +1),
]


def fmt(x: float, spec: str = ".3f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def report(runs: pd.DataFrame, cohort: str, command: str) -> str:
    seeds = per_seed(runs)
    lines = [f"# ASMIL's claims: the {cohort}", "", f"`{command}`", ""]
    for lr in sorted(seeds.lr.unique()):
        sub = seeds[seeds.lr == lr]
        n_seeds = sub.seed.nunique()
        lines += [f"## lr {lr:g} ({n_seeds} seeds; mean ± std over seeds)", "",
                  "| variant | macro F1 | AUC | JSD high lr | JSD last 10 | eff. tiles | top × M | mass on positives | instance AUC | spread / positives | grad ratio | uniform runs |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for variant in VARIANTS:
            v = sub[sub.variant == variant]
            if v.empty:
                continue
            cell = lambda m, spec=".3f": f"{fmt(v[m].mean(), spec)} ± {fmt(v[m].std(ddof=1), spec)}"  # noqa: E731
            lines.append("| " + " | ".join([
                variant, cell("f1_macro"), cell("auc"), cell("jsd_high_lr", ".1e"), cell("jsd_last10", ".1e"),
                cell("effective_fraction"), cell("top_ratio", ".1f"), cell("positive_mass"), cell("instance_auc"),
                cell("spread_over_positives", ".2f"), cell("grad_ratio_high_lr", ".1e"), fmt(v["uniform"].mean(), ".0%"),
            ]) + " |")
        uniform = sub.groupby("variant")["uniform"].mean()
        lines += ["", "| claim | measure | variant − reference (95 % CI) | verdict |", "|---|---|---|---|"]
        for claim, measure, variant, reference, sign in [*CLAIMS, *REPAIR_CLAIMS]:
            d = paired(seeds, lr, variant, measure, reference)
            v = verdict(d, sign)
            # A repair is tested against flat attention: only its own flatness leaves nothing to test.
            tested = (variant,) if (claim, measure, variant, reference, sign) in REPAIR_CLAIMS else (variant, reference)
            flat = [m for m in tested if uniform.get(m, 0.0) > 0.5]
            if measure not in ("f1_macro", "auc") and flat and d["n"]:
                # Flat attention has no instability and no concentration to compare: a uniform model
                # would "win" every attention claim by not attending at all.
                v = f"not testable ({' and '.join(flat)}: attention practically uniform)"
            ci = f"{fmt(d['mean'], '.3g')} [{fmt(d['lo'], '.3g')}, {fmt(d['hi'], '.3g')}]"
            lines.append(f"| {claim} | {measure}: {variant} − {reference} | {ci} | {v} |")
        lines.append("")
    return "\n".join(lines)


def run_dir(work: Path, schedule: str, lr: float, variant: str, seed: int, fold: int) -> Path:
    """Where one run's outputs live under ``--work``."""
    slug = re.sub(r"[^a-z0-9]+", "_", variant.lower()).strip("_")
    runs_dir = "runs" if schedule == "cosine" else f"runs_{schedule}"
    return work / runs_dir / f"lr{lr:g}" / slug / f"seed{seed}" / f"fold{fold}"


def traces(table: pd.DataFrame, work: Path, schedule: str) -> pd.DataFrame:
    """Per (lr, variant, epoch): the mean and the spread over seeds and folds of each traced
    history column, over every finished run in ``table`` (this and earlier invocations)."""
    frames = []
    for row in table.itertuples():
        history = run_dir(work, schedule, row.lr, row.variant, row.seed, row.fold) / "history.csv"
        if row.variant in TRACED and history.is_file():
            h = pd.read_csv(history)[["epoch", *TRACE_COLUMNS]]
            frames.append(h.assign(lr=row.lr, variant=row.variant, seed=row.seed, fold=row.fold))
    if not frames:
        return pd.DataFrame()
    runs = pd.concat(frames, ignore_index=True)
    out = runs.groupby(["lr", "variant", "epoch"])[list(TRACE_COLUMNS)].agg(["mean", "min", "max"])
    out.columns = [f"{c}_{s}" for c, s in out.columns]
    return out.reset_index().assign(runs=runs.groupby(["lr", "variant", "epoch"]).size().to_numpy())


def plot_traces(table: pd.DataFrame, path: Path) -> None:
    """One row of panels per learning rate: each traced column against the epoch, a line per
    variant (mean over seeds, band from the lowest to the highest run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lrs = sorted(table.lr.unique())
    fig, axes = plt.subplots(len(lrs), len(TRACE_COLUMNS), figsize=(4.2 * len(TRACE_COLUMNS), 3.3 * len(lrs)),
                             squeeze=False, dpi=100)
    for row, lr in zip(axes, lrs):
        for ax, (column, title) in zip(row, TRACE_COLUMNS.items()):
            for variant in TRACED:
                v = table[(table.lr == lr) & (table.variant == variant)]
                if v.empty:
                    continue
                line, = ax.plot(v.epoch, v[f"{column}_mean"], label=variant)
                ax.fill_between(v.epoch, v[f"{column}_min"], v[f"{column}_max"], alpha=0.12, color=line.get_color())
            ax.set_title(f"{title}, lr {lr:g}", fontsize=9)
            ax.set_xlabel("epoch")
            if column in ("train_ce", "top_ratio"):
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cohort", choices=["witness", "demo", "mix"])
    p.add_argument("--work", type=Path, required=True, help="runs and the generated cohort go here")
    p.add_argument("--results", type=Path, default=Path("results"), help="demo, mix: the workflow's out_dir")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-4])
    p.add_argument("--schedule", choices=["cosine", "constant"], default="cosine",
                   help="constant: the diagnostic that keeps the rate up (runs go to runs_constant/)")
    p.add_argument("--folds", type=int, default=4, help="demo: folds per seed")
    p.add_argument("--use-folds", type=int, default=None,
                   help="demo: train only the first K folds of each seed's split (each seed draws its own folds)")
    p.add_argument("--bags", type=int, default=360, help="witness, mix: bags in the cohort")
    p.add_argument("--bag-size", type=int, nargs=2, default=(500, 1500), metavar=("MIN", "MAX"),
                   help="witness, mix: tiles per bag")
    p.add_argument("--witness-kind", choices=["direction", "conjunction"], default="direction",
                   help="witness: witnesses out along one direction, or along two at once (a third generator)")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), metavar="VARIANT")
    p.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 1)))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.cohort == "witness":
        features_dir, splits, truth_file = witness_cohort(args.work, 0, args.bags, tuple(args.bag_size),
                                                          args.witness_kind)
    elif args.cohort == "mix":
        features_dir, splits, truth_file = mix_cohort(args.results, args.work, args.bags, tuple(args.bag_size))
    else:
        features_dir, splits, truth_file = demo_cohort(args.results, args.work, args.seeds, args.folds)
    runs = []
    for lr in args.lrs:
        for variant in args.variants:
            for seed in range(args.seeds):
                split = splits[seed % len(splits)]
                for fold in range(min(len(split["folds"]), args.use_folds or len(split["folds"]))):
                    out = run_dir(args.work, args.schedule, lr, variant, seed, fold)
                    runs.append(Run(lr, variant, seed, fold, str(features_dir), split, args.epochs, str(out),
                                    str(truth_file) if truth_file else None, args.schedule))
    log.info("%d runs on %d workers", len(runs), args.jobs)
    start, rows = time.perf_counter(), []
    from tqdm import tqdm

    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        for row in tqdm(pool.map(_train, runs), total=len(runs), desc="runs"):
            rows.append(row)
    table = pd.DataFrame(rows)
    suffix = "" if args.schedule == "cosine" else f"_{args.schedule}"
    previous = args.work / f"runs{suffix}.csv"
    if previous.is_file():  # runs of earlier invocations (other learning rates, variants) stay in the report
        table = pd.concat([pd.read_csv(previous), table]).drop_duplicates(
            ["lr", "variant", "seed", "fold"], keep="last"
        )
    args.work.mkdir(parents=True, exist_ok=True)
    table.to_csv(previous, index=False)
    per_seed(table).to_csv(args.work / f"summary{suffix}.csv", index=False)
    command = "python benchmarks/asmil_claims.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    text = report(table, f"{args.cohort} cohort, {args.schedule} schedule", command)
    (args.work / f"claims{suffix}.md").write_text(text)
    trace_table = traces(table, args.work, args.schedule)
    if len(trace_table):
        trace_table.to_csv(args.work / f"traces{suffix}.csv", index=False)
        plot_traces(trace_table, args.work / f"traces{suffix}.png")
    print(text)
    print(f"{len(runs)} runs in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
