"""benchmarks/asmil_claims.py: its statistics by hand, and the whole script at toy size."""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

import pandas as pd
import pytest

BENCHMARKS = str(Path(__file__).resolve().parents[1] / "benchmarks")


@pytest.fixture(scope="module")
def claims():
    """Imported by name from a path entry, so the script's spawned workers can import it too."""
    sys.path.insert(0, BENCHMARKS)
    try:
        yield importlib.import_module("asmil_claims")
    finally:
        sys.path.remove(BENCHMARKS)


def test_paired_difference_and_verdicts_by_hand(claims) -> None:
    seeds = pd.DataFrame({
        "lr": 1e-4, "seed": [0, 1, 2, 0, 1, 2],
        "variant": ["ASMIL"] * 3 + ["ABMIL"] * 3,
        "f1_macro": [0.8, 0.7, 0.9, 0.6, 0.6, 0.7],
    })
    d = claims.paired(seeds, 1e-4, "ABMIL", "f1_macro")
    # differences -0.2, -0.1, -0.2: mean -1/6, sd 0.0577, t(0.975, 2) = 4.303 -> half width 0.1434
    assert d["n"] == 3 and d["mean"] == pytest.approx(-1 / 6)
    assert d["hi"] - d["mean"] == pytest.approx(4.302653 * 0.057735 / math.sqrt(3), rel=1e-4)
    assert claims.verdict(d, -1) == "holds" and claims.verdict(d, +1) == "does not hold"
    assert claims.verdict({"mean": 0.1, "lo": -0.1, "hi": 0.3, "n": 3}, -1) == "inconclusive"
    assert claims.verdict(claims.paired(seeds, 1e-4, "ACMIL", "f1_macro"), -1) == "not measured"


def test_the_benchmark_runs_at_toy_size(claims, tmp_path: Path) -> None:
    claims.main(["witness", "--work", str(tmp_path), "--bags", "24", "--bag-size", "40", "80", "--seeds", "2",
                 "--epochs", "2", "--lrs", "1e-3", "--variants", "ASMIL", "ABMIL",
                 "ASMIL linear readout (asmil_linear)", "--jobs", "1"])
    runs = pd.read_csv(tmp_path / "runs.csv")
    assert len(runs) == 6 and set(runs["variant"]) == {"ASMIL", "ABMIL", "ASMIL linear readout (asmil_linear)"}
    assert runs["instance_auc"].between(0, 1).all() and runs["jsd_high_lr"].ge(0).all()
    text = (tmp_path / "claims.md").read_text()
    assert "| F1: ASMIL beats ABMIL | f1_macro: ABMIL − ASMIL |" in text
    assert "not measured" in text  # ACMIL was not run
    assert "| asmil_linear attends to positives more than ASMIL | positive_mass:" in text
    traces = pd.read_csv(tmp_path / "traces.csv")  # 3 traced variants x 2 epochs, each over 2 seeds
    assert len(traces) == 6 and (traces["runs"] == 2).all() and (tmp_path / "traces.png").stat().st_size > 0
    assert (traces["top_ratio_min"] <= traces["top_ratio_mean"]).all()


def test_the_semi_synthetic_cohort_runs_at_toy_size(claims, tmp_path: Path) -> None:
    """The mix cohort from a run's features and truth masks (faked as test_tumour_mix does)."""
    from test_tumour_mix import fake_run

    results = tmp_path / "results"
    fake_run(results, 12, 3.0, results / "features" / "0.5mpp_224px" / "fake", results / "localisation" / "truth")
    claims.main(["mix", "--results", str(results), "--work", str(tmp_path / "work"), "--bags", "24", "--bag-size", "40",
                 "80", "--seeds", "1", "--epochs", "1", "--lrs", "1e-3", "--variants", "ABMIL", "--jobs", "1"])
    runs = pd.read_csv(tmp_path / "work" / "runs.csv")
    assert len(runs) == 1 and runs["positive_mass"].between(0, 1).all()
    baselines = (tmp_path / "work" / "mix_baselines.json").read_text()
    assert "mean_pooling_auc" in baselines and "oracle_max_auc" in baselines


def test_a_repair_is_tested_against_flat_attention_but_never_when_flat_itself(claims) -> None:
    runs = pd.DataFrame([
        {"lr": 1e-3, "variant": v, "seed": s, "fold": 0, **dict.fromkeys(claims.MEASURES, 0.5),
         "positive_mass": mass + 0.01 * s, "uniform": flat}
        for v, mass, flat in (("ASMIL", 0.01, 1.0), ("ASMIL linear readout (asmil_linear)", 0.1, 0.0), ("ABMIL", 0.9, 0.0))
        for s in range(5)
    ])
    text = claims.report(runs, "toy", "python benchmarks/asmil_claims.py witness --variants 'A B'")
    line = next(r for r in text.splitlines() if r.startswith("| asmil_linear attends to positives more than ASMIL"))
    assert line.endswith("| holds |")
    paper = next(r for r in text.splitlines() if r.startswith("| ASMIL localises positives better"))
    assert "not testable (ASMIL: attention practically uniform)" in paper  # the paper's claims need both to attend
    flat = runs.assign(uniform=1.0)
    line = next(r for r in claims.report(flat, "toy", "cmd").splitlines()
                if r.startswith("| asmil_linear attends to positives more than ASMIL"))
    assert "not testable (ASMIL linear readout (asmil_linear)" in line
