"""Soak test (issue 7, "Under load"): the whole workflow over a cohort of 50+ small slides with
``--cores 2``, a few bad files among them, then every output checked for completeness and
consistency, and the peak memory of every rule read from Snakemake's ``benchmark:`` files.

Marked ``soak`` (select with ``-m soak``) and ``slow`` (so ``-m "not slow"`` leaves it out). It
writes ``soak_summary.json`` (runtime, peak memory per rule) into its temporary folder and prints
the table.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_reliability import (
    TILING,
    WORKFLOW_ENCODER,
    blank_slide,
    corrupt_tile,
    make_slide,
    planned,
    snakemake,
    workdir,
)

from wsi_asmil.features import store
from wsi_asmil.synthetic import write_cohort

N_SLIDES = 52
SOAK_CONFIG = {
    "split": {"folds": 2, "val_fraction": 0.2},
    "train": {"models": ["asmil", "abmil"], "epochs": 3, "threads": 1, "device": "cpu"},
    "features": {"threads": 1, "num_workers": 0, "batch_size": 32, "device": "cpu"},
    "heatmap": {"models": ["asmil"]},
}
#: A rule whose peak resident memory passes this on 1-2k px slides has a leak or loads too much.
MAX_RSS_MB = 4000


def peak_memory(benchmarks: Path) -> pd.DataFrame:
    """Per rule (the first folder under benchmarks/): jobs, peak and median max_rss (MB), longest job (s)."""
    rows = []
    for tsv in sorted(benchmarks.rglob("*.tsv")):
        rule = tsv.relative_to(benchmarks).parts[0].removesuffix(".tsv")
        bench = pd.read_csv(tsv, sep="\t")
        rss = pd.to_numeric(bench["max_rss"], errors="coerce")
        rows.append({"rule": rule, "max_rss_mb": float(rss.max()), "s": float(bench["s"].max())})
    table = pd.DataFrame(rows)
    return table.groupby("rule").agg(
        jobs=("s", "size"), peak_rss_mb=("max_rss_mb", "max"), median_rss_mb=("max_rss_mb", "median"),
        longest_s=("s", "max"),
    )


@pytest.mark.slow
@pytest.mark.soak
def test_soak_cohort_of_50_slides_on_2_cores(tmp_path: Path) -> None:
    start = time.monotonic()
    write_cohort(tmp_path / "cohort", n_slides=N_SLIDES, seed=7, width=1280, height=1280, mpp=0.25, workers=2)
    slides = tmp_path / "cohort" / "slides"
    labels = pd.read_csv(tmp_path / "cohort" / "labels.csv", dtype=str)
    make_slide(slides / "corrupt tile.svs", tumour=True, seed=90, size=2048)
    corrupt_tile(slides / "corrupt tile.svs", level=1, index=5)
    blank_slide(slides / "blank.tif")
    (slides / "empty.svs").write_bytes(b"")
    (slides / "README.txt").write_text("scanner export notes")
    extra = pd.DataFrame({"slide_id": ["corrupt tile", "blank", "empty"], "label": ["tumour", "normal", "normal"]})
    pd.concat([labels, extra]).to_csv(tmp_path / "labels.csv", index=False)
    generated = time.monotonic() - start

    config = {**SOAK_CONFIG, "slides_dir": str(slides), "labels": str(tmp_path / "labels.csv"),
              "out_dir": str(tmp_path / "out")}
    wd = workdir(tmp_path)
    start = time.monotonic()
    run = snakemake(wd, config, timeout=3600)  # the default target: everything a user gets
    workflow_seconds = time.monotonic() - start
    out = tmp_path / "out"

    # complete: nothing left to do, no temporary output anywhere
    assert planned(snakemake(wd, config, "-n")) == {}
    assert not [p for p in out.rglob(".*") if ".tmp-" in p.name or p.name.endswith(".partial")]

    # consistent: the inventory, every store, the predictions
    inventory = pd.read_csv(out / "inventory" / "slides.csv", keep_default_na=False).set_index("slide_id")
    assert list(inventory.index[inventory["status"] != "ok"]) == ["empty"]
    usable = sorted(inventory.index[inventory["status"] == "ok"])
    assert len(usable) == N_SLIDES + 2
    failed, empty = {}, []
    for sid in usable:
        tiles, _, _ = store.read_tiles(out / "tiles" / TILING / f"{sid}.zarr")
        feats, coords, attrs = store.read_features(out / "features" / TILING / WORKFLOW_ENCODER / f"{sid}.zarr")
        assert len(tiles) == len(coords) + attrs["n_failed_tiles"], sid
        assert feats.shape == (len(coords), attrs["feature_dim"]) and np.isfinite(feats).all(), sid
        failed[sid] = attrs["n_failed_tiles"]
        if len(coords) == 0:
            empty.append(sid)
    assert failed["corrupt tile"] > 0 and sum(failed.values()) == failed["corrupt tile"]
    # the blank slide, and any small demo slide whose tissue holds no whole tile, is an empty bag
    assert "blank" in empty and len(empty) <= 3
    predictions = pd.read_csv(out / "report" / "predictions.csv", keep_default_na=False)
    expected = sorted(set(usable) - set(empty))
    for model in SOAK_CONFIG["train"]["models"]:
        assert sorted(predictions.loc[predictions["model"] == model, "slide_id"]) == expected, model
    for sid in expected:
        assert (out / "heatmaps" / "asmil" / f"{sid}.png").stat().st_size > 0
    for k in range(SOAK_CONFIG["split"]["folds"]):
        metrics = json.loads((out / "models" / "asmil" / f"fold{k}" / "metrics.json").read_text())
        assert set(metrics["skipped_empty_slides"]) <= set(empty)
    assert "README.txt" in run.stderr

    # peak memory per rule, from the benchmark files
    table = peak_memory(out / "benchmarks")
    assert {"segment", "tile", "features", "train"} <= set(table.index)
    bench = out / "benchmarks"
    assert len(list((bench / "segment").glob("*.tsv"))) == len(usable)
    assert len(list((bench / "tile" / TILING).glob("*.tsv"))) == len(usable)
    # features run in batches of slides: one job per batch marker, and the markers hold every slide
    markers = sorted((out / "features" / TILING / WORKFLOW_ENCODER / "batches").glob("*.json"))
    assert 1 < len(markers) < len(usable)
    assert len(list((bench / "features" / TILING / WORKFLOW_ENCODER).glob("*.tsv"))) == len(markers)
    members = [sid for m in markers for sid in json.loads(m.read_text())["members"]]
    assert set(usable) <= set(members) and len(members) == len(set(members))
    summary = {"slides": len(usable), "empty_slides": empty, "generate_s": round(generated, 1), "workflow_s": round(workflow_seconds, 1),
               "peak_memory": table.round(1).reset_index().to_dict(orient="records")}
    (tmp_path / "soak_summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nsoak: {len(usable)} slides, workflow {workflow_seconds:.0f} s on --cores 2 "
          f"(cohort written in {generated:.0f} s)\n{table.round(1).to_string()}")
    assert (table["peak_rss_mb"] < MAX_RSS_MB).all(), table
