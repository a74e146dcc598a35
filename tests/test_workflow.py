"""The Snakemake workflow through its command line: config validation, a whole run on a tiny demo
cohort, and reruns that follow config edits exactly."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import CONFIG_FEATURES
from geojson_check import read_tile_geojson

from wsi_asmil.features import store
from wsi_asmil.pipeline.provenance import weights_identity

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(REPO)]

TINY = {
    "demo": {"n_slides": 8, "seed": 1, "width": 2560, "height": 2048},
    "split": {"folds": 2},
    "train": {"epochs": 3, "models": ["asmil", "abmil"]},
    "features": {"threads": 2},
    "heatmap": {"models": ["asmil"]},  # both models are scored and localised; one is drawn
}
#: A new slide for the predict path (the real CC0 slide under an awkward name) and a broken one.
NEW_SLIDE = "new slide é"
#: The feature folder of runs that keep config.yaml's encoder.
FEATURES_DIR = Path("features") / "0.5mpp_224px" / CONFIG_FEATURES["encoder"]
#: The denser tiling the drawn slides are also scored on (config.yaml's heatmap.overlap).
DENSE_TILING = "0.5mpp_224px_ov0.5"


def snakemake(*args: str, config: dict | None = None, tmp: Path, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [*SNAKEMAKE, "--cores", "2"]
    if config is not None:
        cfg = tmp / f"config-{abs(hash(json.dumps(config, sort_keys=True)))}.yaml"
        cfg.write_text(yaml.safe_dump(config))
        cmd += ["--configfile", str(cfg)]
    proc = subprocess.run([*cmd, *args], capture_output=True, text=True, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def planned_rules(proc: subprocess.CompletedProcess) -> dict[str, int]:
    """Rule -> job count from the 'Job stats' table of a dry run."""
    text = proc.stdout + proc.stderr
    if "Nothing to be done" in text:
        return {}
    table = text.split("Job stats:")[1].split("\n\n")[0]
    counts = {}
    for line in table.splitlines():
        m = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if m and m.group(1) not in ("total", "all"):
            counts[m.group(1)] = int(m.group(2))
    return counts


def deep_merge(base: dict, extra: dict) -> dict:
    out = json.loads(json.dumps(base))
    for k, v in extra.items():
        out[k] = deep_merge(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("run")
    new = tmp / "new slides"
    new.mkdir()
    shutil.copy(REPO / "tests" / "data" / "cmu_small_region.svs", new / f"{NEW_SLIDE}.svs")
    (new / "broken.svs").write_bytes(b"")
    config = {**TINY, "out_dir": str(tmp / "out"), "predict": {"slides_dir": str(new)}}
    snakemake(config=config, tmp=tmp)
    return tmp, config


@pytest.mark.parametrize(
    "override,key",
    [
        ({"bogus_key": 1}, "bogus_key"),
        ({"tiling": {"tile_size": "big"}}, "tile_size"),
        ({"tiling": {"overlap": 1.5}}, "overlap"),
        ({"train": {"asmil": {"anchor_mode": "sometimes"}}}, "anchor_mode"),
        ({"heatmap": {"fold": "best"}}, "fold"),
        ({"heatmap": {"localisation": {"threshold": "median"}}}, "threshold"),
        ({"heatmap": {"models": ["abmil_anchor"]}}, "heatmap.models"),
        ({"tiling": {"overlap": 0.5}, "heatmap": {"overlap": 0.25}}, "heatmap.overlap"),
        ({"predict": {"bogus": 1}}, "bogus"),
        ({"features": {"batch_size": "huge"}}, "batch_size"),
        ({"features": {"num_workers": -1}}, "num_workers"),
        ({"train": {"memory_budget": "lots"}}, "memory_budget"),
        ({"features": {"encoder": "resnet18", "weights": "imagenet-pypi"}}, "features.encoder"),
    ],
)
def test_bad_config_fails_before_any_job(tmp_path: Path, override: dict, key: str) -> None:
    proc = snakemake("-n", config={**override, "out_dir": str(tmp_path / "out")}, tmp=tmp_path, check=False)
    assert proc.returncode != 0
    assert key in proc.stdout + proc.stderr
    assert not (tmp_path / "out").exists()


def test_nested_command_line_values_are_typed_by_the_schema(tmp_path: Path) -> None:
    """Snakemake leaves the scalars inside a nested --config value as strings ('256'); the
    workflow types them by the schema, and a value that is no number still fails by key."""
    out = f"out_dir={tmp_path / 'out'}"
    ok = snakemake("-n", "--config", out, 'tiling={"tile_size": 256, "overlap": 0.25}', 'split={"folds": 2}',
                   'train={"asmil": {"beta": 0, "anchor_horizon_epochs": null}, "amp": true}', tmp=tmp_path)
    assert "inventory" in ok.stdout + ok.stderr
    bad = snakemake("-n", "--config", out, 'tiling={"tile_size": "big"}', tmp=tmp_path, check=False)
    assert bad.returncode != 0 and "tile_size" in bad.stdout + bad.stderr


def test_the_disk_plan_foresaw_what_the_run_wrote(finished_run: tuple[Path, dict]) -> None:
    """The manifest's disk plan, made before the first job, against the bytes the run left on disk:
    within 20 % in all, and every stage within a factor of two (small stages are mostly 4 KiB blocks)."""
    from wsi_asmil.pipeline.disk_plan import du

    _, config = finished_run
    out = Path(config["out_dir"])
    plan = json.loads((out / "manifest.json").read_text())["disk_plan"]
    assert plan["verdict"] == "ok" and plan["to_write_bytes"] == plan["estimated_bytes"]  # a fresh run
    real = {s["name"]: sum(du(out / f) for f in s["folders"]) for s in plan["stages"]}
    estimated = {s["name"]: s["estimate"] for s in plan["stages"]}
    assert sum(estimated.values()) == pytest.approx(sum(real.values()), rel=0.2), (estimated, real)
    for name, size in real.items():
        assert size / 2 <= estimated[name] <= size * 2, (name, estimated[name], size)


def test_whole_workflow_outputs(finished_run: tuple[Path, dict]) -> None:
    tmp, config = finished_run
    out = Path(config["out_dir"])
    ids = [f"demo_{i:03d}" for i in range(8)]
    labels = pd.read_csv(out / "demo" / "labels.csv")
    assert sorted(labels["slide_id"]) == ids
    for sid in ids:
        for name in ("mask.png", "mask.json", "tissue.geojson", "qc.jpg"):
            assert (out / "segment" / sid / name).stat().st_size > 0
        coords, _, tiles_attrs = store.read_tiles(out / "tiles" / "0.5mpp_224px" / f"{sid}.zarr")
        feats, fcoords, attrs = store.read_features(out / FEATURES_DIR / f"{sid}.zarr")
        assert len(coords) > 0 and np.array_equal(coords, fcoords)
        assert feats.shape == (len(coords), attrs["feature_dim"]) and np.isfinite(feats).all()
        assert attrs["encoder"] == CONFIG_FEATURES["encoder"] and tiles_attrs["mpp"] == pytest.approx(0.25)
        assert attrs["weights"] == weights_identity(CONFIG_FEATURES)["weights"]
        assert (out / "heatmaps" / "asmil" / f"{sid}.png").stat().st_size > 0
        assert not (out / "heatmaps" / "abmil" / f"{sid}.png").exists()  # scored, not drawn
        for model in ("asmil", "abmil"):
            scores = pd.read_csv(out / "heatmaps" / model / "scores" / f"{sid}_scores.csv")
            assert len(scores) == len(coords) and scores["score"].sum() == pytest.approx(1.0, abs=1e-3)
        # The drawn model's map comes from the denser grid: same encoder, same fold model.
        dense, _, dense_attrs = store.read_tiles(out / "tiles" / DENSE_TILING / f"{sid}.zarr")
        _, dense_fcoords, dense_feature_attrs = store.read_features(
            out / "features" / DENSE_TILING / CONFIG_FEATURES["encoder"] / f"{sid}.zarr")
        assert dense_attrs["overlap"] == 0.5 and len(dense) > 2 * len(coords) and np.array_equal(dense, dense_fcoords)
        assert dense_feature_attrs["weights"] == attrs["weights"]
        dense_scores = pd.read_csv(out / "heatmaps" / "asmil" / f"scores_{DENSE_TILING}" / f"{sid}_scores.csv")
        assert dense_scores["score"].sum() == pytest.approx(1.0, abs=1e-3)
        folds = [json.loads((out / "heatmaps" / "asmil" / d / f"{sid}_scores.json").read_text())["folds"]
                 for d in ("scores", f"scores_{DENSE_TILING}")]
        assert folds[0] == folds[1]
        assert not (out / "heatmaps" / "abmil" / f"scores_{DENSE_TILING}").exists()  # only drawn models
        corners, _, meas = read_tile_geojson(out / "heatmaps" / "asmil" / f"{sid}.geojson")
        assert np.array_equal(corners, dense)
        np.testing.assert_allclose(meas["attention"], dense_scores["score"], rtol=1e-6)
        assert (out / "heatmaps" / "asmil" / f"{sid}_topk.jpg").stat().st_size > 0
    assert (out / "heatmaps" / "legend.png").stat().st_size > 0
    for model in ("asmil", "abmil"):
        for k in range(2):
            d = out / "models" / model / f"fold{k}"
            names = {p.name for p in d.iterdir()}
            assert {"model.pt", "history.csv", "predictions.csv", "metrics.json", "curves.png"} <= names
            assert "last.pt" not in names  # train.keep_last is off by default
            assert len(pd.read_csv(d / "history.csv")) == 3
    report = json.loads((out / "report" / "metrics.json").read_text())
    for model in ("asmil", "abmil"):
        assert len(report[model]["folds"]) == 2
        assert 0 <= report[model]["test"]["acc"]["mean"] <= 1
    preds = pd.read_csv(out / "report" / "predictions.csv")
    assert sorted(preds[preds["model"] == "asmil"]["slide_id"]) == ids  # each slide tested once
    assert (out / "report" / "metrics.md").read_text().count("|") > 10
    # Localisation against the demo's exact truth, for every trained model (even slides have tumour).
    for model in ("asmil", "abmil"):
        loc = pd.read_csv(out / "localisation" / f"{model}.csv")
        assert sorted(loc["slide_id"]) == ids
        assert sorted(loc.loc[loc["has_tumour"], "slide_id"]) == ids[::2]
        tumour = loc[loc["has_tumour"]]
        for col in ("dice", "iou", "coverage_tumour_k", "attention_in_tumour", "tumour_in_tiles"):
            assert tumour[col].between(0, 1).all(), col
    summary = json.loads((out / "report" / "localisation.json").read_text())
    assert summary["by_model"]["asmil"]["dice"]["n"] == 4 and summary["paired"]
    html = (out / "report" / "index.html").read_text()
    for section in ("Classification", "Attention instability", "Attention", "Localisation", "Heatmaps", "New slides", "Slides left out"):
        assert f">{section}" in html, section
    assert html.count("data:image/jpeg;base64,") == 6  # heatmap sample: 6 slides x 1 drawn model
    # The zoomable viewer: the same 6 slides, each with the slide, the drawn model's heat and the truth.
    assert "href='viewer.html'" in html
    sample = json.loads((out / "report" / "viewer" / "sample.json").read_text())
    assert len(sample) == 6 and all(f">{sid} " in html for sid in sample)
    page = (out / "report" / "viewer.html").read_text()
    for sid in sample:
        layers = json.loads((out / "report" / "viewer" / "slides" / sid / "layers.json").read_text())
        assert [layer["name"] for layer in layers["layers"]] == ["slide", "asmil", "truth"] and sid in page
    assert (out / "report" / "viewer" / "openseadragon" / "openseadragon.min.js").is_file()
    assert "broken" in html  # the unusable new slide is listed
    # Inference on new slides: every model's ensemble, no labels; the broken slide says why.
    pred = pd.read_csv(out / "predict" / "predictions.csv", keep_default_na=False)
    new = pred[pred["slide_id"] == NEW_SLIDE]
    assert sorted(new["model"]) == ["abmil", "asmil"] and (new["status"] == "ok").all()
    assert (new["folds"] == "0;1").all() and (new["n_tiles"].astype(int) > 0).all()
    assert (new["prob_normal"].astype(float) + new["prob_tumour"].astype(float)).tolist() == pytest.approx([1.0, 1.0])
    broken = pred[pred["slide_id"] == "broken"]
    assert (broken["status"] == "error").all() and broken["message"].str.contains("empty").all()
    for model in ("asmil", "abmil"):
        assert (out / "predict" / "heatmaps" / model / f"{NEW_SLIDE}.png").stat().st_size > 0
        assert (out / "predict" / "heatmaps" / model / f"{NEW_SLIDE}.geojson").stat().st_size > 0
    assert NEW_SLIDE not in set(preds["slide_id"])  # never in a test set: it has no label
    for rule in ("segment", "tile", "features", "train", "heatmap", "attention", "localisation", "truth", "viewer"):
        assert any((out / "logs" / rule).rglob("*.log"))
        assert any((out / "benchmarks" / rule).rglob("*.tsv"))


#: What re-scoring every model re-runs downstream (cohort and new slides; the drawn model's dense grid).
SCORED = {"attention": 2, "heatmap_attention": 1, "heatmap": 8, "localisation": 2, "predict_attention": 2,
          "predict_heatmap": 2, "predict": 1}
#: What a new tiling or new features re-run on the drawn slides' dense grid.
DENSE_TILE = {"heatmap_tile": 8, "heatmap_features": 1}
#: What new scores or colours of the drawn model re-run in the viewer: its 6 slides' pyramids and the page.
VIEWER = {"viewer_pyramids": 6, "viewer_page": 1}


def rerun_plan(finished_run: tuple[Path, dict], edit: dict) -> dict[str, int]:
    tmp, config = finished_run
    return planned_rules(snakemake("-n", config=deep_merge(config, edit), tmp=tmp))


def test_nothing_to_do_after_a_run(finished_run: tuple[Path, dict]) -> None:
    assert rerun_plan(finished_run, {}) == {}


@pytest.mark.parametrize(
    "edit,expected",
    [
        ({"segment": {"min_saturation": 20}}, {"segment": 8, "tile": 8, "features": 1, "train": 4, "report": 1, **SCORED,
                                               **DENSE_TILE, "predict_segment": 1, "predict_tile": 1,
                                               "predict_features": 1, **VIEWER}),
        ({"tiling": {"tile_size": 256}}, {"tile": 8, "features": 1, "train": 4, "report": 1, **SCORED, **DENSE_TILE,
                                          "predict_tile": 1, "predict_features": 1, **VIEWER}),
        ({"features": {"precision": "fp32"}}, {"features": 1, "heatmap_features": 1, "train": 4, "report": 1, **SCORED,
                                               "predict_features": 1, **VIEWER}),
        ({"features": {"batch_size": 32, "num_workers": 0}}, {}),
        ({"train": {"memory_budget": "1MiB"}}, {}),
        ({"train": {"lr": 0.0002}}, {"train": 4, "report": 1, **SCORED, **VIEWER}),
        ({"train": {"asmil": {"beta": 0.5}}}, {"train": 2, "report": 1, "attention": 1, "heatmap_attention": 1,
                                               "heatmap": 8, "localisation": 1, "predict_attention": 1,
                                               "predict_heatmap": 1, "predict": 1, **VIEWER}),
        ({"train": {"abmil": {"hidden": 64}}}, {"train": 2, "report": 1, "attention": 1, "localisation": 1,
                                                "predict_attention": 1, "predict_heatmap": 1, "predict": 1}),
        # Drawing settings re-draw (and re-report: the page embeds heatmaps), never re-score.
        ({"heatmap": {"cmap": "magma"}}, {"heatmap": 8, "heatmap_legend": 1, "predict_heatmap": 2, "report": 1, **VIEWER}),
        ({"heatmap": {"localisation": {"threshold": "top_q"}}}, {"localisation": 2, "report": 1}),
        # Viewer settings re-draw the viewer's pyramids only; without the viewer the report drops its link.
        ({"viewer": {"overlay_mpp": 4.0}}, {**VIEWER, "report": 1}),
        ({"viewer": {"enabled": False}}, {"report": 1}),
        ({"heatmap": {"fold": "ensemble"}}, {"attention": 2, "heatmap_attention": 1, "heatmap": 8, "localisation": 2,
                                             "report": 1, **VIEWER}),
        # A denser grid for the drawn slides tiles, embeds and scores it, never the training grid;
        # overlap 0 draws the training grid's scores again.
        ({"heatmap": {"overlap": 0.75}}, {**DENSE_TILE, "heatmap_attention": 1, "heatmap": 8, "report": 1, **VIEWER}),
        ({"heatmap": {"overlap": 0.0}}, {"heatmap": 8, "report": 1, **VIEWER}),
        ({"heatmap": {"device": "cpu", "threads": 1}}, {}),
        ({"predict": {"fold": 1}}, {"predict_attention": 2, "predict_heatmap": 2, "predict": 1, "report": 1}),
        # A model added trains, scores and reports alone; settings of a model not trained change nothing.
        ({"train": {"models": ["asmil", "abmil", "transmil"]}}, {"train": 2, "attention": 1, "localisation": 1, "report": 1,
                                                                 "predict_attention": 1, "predict_heatmap": 1, "predict": 1}),
        ({"train": {"transmil": {"dim": 64}}}, {}),
    ],
    ids=["segment", "tiling", "features", "speed-only", "train-speed-only", "train", "asmil-only", "abmil-only",
         "heatmap", "localisation", "viewer", "viewer-off", "scoring-fold", "dense-grid", "training-grid",
         "scoring-speed-only", "predict-fold", "model-added", "untrained-model"],
)
def test_config_edit_reruns_exactly_the_affected_stages(
    finished_run: tuple[Path, dict], edit: dict, expected: dict[str, int]
) -> None:
    assert rerun_plan(finished_run, edit) == expected


def test_scoring_jobs_take_the_heatmap_sections_threads(finished_run: tuple[Path, dict]) -> None:
    """Cohort and new-slide scoring are one rule (predict_attention reuses attention): both take
    heatmap.threads, not train.threads, and only the cohort's, whose folds hold it, reads the split."""
    tmp, config = finished_run
    edit = {"heatmap": {"threads": 1}, "train": {"threads": 2}}
    proc = snakemake("-n", "-p", "--forcerun", "attention", "heatmap_attention", "predict_attention", config=deep_merge(config, edit), tmp=tmp)
    commands = [line.strip().removeprefix("Shell command:").strip()
                for line in (proc.stdout + proc.stderr).splitlines() if "-m wsi_asmil.maps.scoring" in line]
    cohort = [c for c in commands if "/predict/" not in c.split("--out-dir")[1]]
    new = [c for c in commands if "/predict/" in c.split("--out-dir")[1]]
    assert len(cohort) == 3 and len(new) == 2, commands
    assert all(c.startswith("OMP_NUM_THREADS=1 ") for c in commands), commands
    assert all("--split " in c for c in cohort) and not any("--split" in c for c in new)


def planned_outputs(proc: subprocess.CompletedProcess) -> list[str]:
    """Every output path of the jobs a dry run plans."""
    paths = []
    for line in (proc.stdout + proc.stderr).splitlines():
        key, _, value = line.strip().partition(": ")
        if key == "output":
            paths += [p.strip() for p in value.split(", ")]
    return paths


def test_encoder_change_reruns_features_onwards_and_keeps_the_old_features(finished_run: tuple[Path, dict]) -> None:
    tmp, config = finished_run
    out = Path(config["out_dir"])
    proc = snakemake("-n", config=deep_merge(config, {"features": {"encoder": "vit_small", "weights": "random"}}), tmp=tmp)
    # the 8 slides are one batch (features.slides_per_job: auto), the new slide another; so are their dense tiles
    assert planned_rules(proc) == {"features": 1, "heatmap_features": 1, "train": 4, "report": 1, **SCORED,
                                   "predict_features": 1, **VIEWER}
    outputs = planned_outputs(proc)
    assert str(out / "features" / "0.5mpp_224px" / "vit_small" / "batches" / "0-of-1.json") in outputs
    # the new encoder's stores go beside the old ones, which no job touches
    assert not [p for p in outputs if f"/{FEATURES_DIR.as_posix()}/" in p]
    assert len(list((out / FEATURES_DIR).glob("*.zarr"))) >= 8


def test_package_version_change_reruns_every_stage(finished_run: tuple[Path, dict]) -> None:
    """The version is a param of every rule: a new release of the code redoes everything."""
    tmp, config = finished_run
    cfg = tmp / "config-version.yaml"
    cfg.write_text(yaml.safe_dump(config))
    bumped = (
        "import sys, wsi_asmil; wsi_asmil.__version__ = '999.0.0'; "
        "from snakemake.cli import main; sys.argv = ['snakemake', *sys.argv[1:]]; main()"
    )
    args = ["--snakefile", str(REPO / "Snakefile"), "--directory", str(REPO), "--cores", "2", "-n", "--configfile", str(cfg)]
    proc = subprocess.run([sys.executable, "-c", bumped, *args], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    forced = snakemake("-n", "--forceall", config=config, tmp=tmp)
    plan = planned_rules(proc)
    assert plan == planned_rules(forced) and {"demo_cohort", "inventory"} <= set(plan)


def test_forcerun_and_until_redo_one_stage(finished_run: tuple[Path, dict]) -> None:
    tmp, config = finished_run
    assert planned_rules(snakemake("-n", "--forcerun", "segment", "--until", "tile", config=config, tmp=tmp)) == {
        "segment": 8, "tile": 8,
    }


def test_list_changes_names_the_outputs_an_edit_affects(finished_run: tuple[Path, dict]) -> None:
    tmp, config = finished_run
    out = Path(config["out_dir"])
    proc = snakemake("--list-changes", "params", config=deep_merge(config, {"train": {"lr": 0.0002}}), tmp=tmp)
    listed = {line.strip() for line in proc.stdout.splitlines() if line.strip().startswith(str(out))}
    assert str(out / "models" / "asmil" / "fold0" / "model.pt") in listed
    assert not any("/segment/" in p or "/tiles/" in p or "/features/" in p for p in listed)
    # nothing changed, nothing listed (Snakemake 9.27 alone lists every output: wsi_asmil.pipeline.snakemake_fixes)
    assert not snakemake("--list-changes", "params", config=config, tmp=tmp).stdout.strip()


def test_run_manifest_and_store_pointers(finished_run: tuple[Path, dict]) -> None:
    """The run wrote its manifest; every store names that run and its manifest."""
    tmp, config = finished_run
    out = Path(config["out_dir"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert (out / "manifests" / f"{manifest['run_id']}.json").is_file()
    assert manifest["executor"] == "local" and manifest["config"]["demo"]["n_slides"] == TINY["demo"]["n_slides"]
    assert manifest["wsi_asmil"]["version"] and len(manifest["wsi_asmil"]["source_sha256"]) == 64
    for dist in ("torch", "timm", "openslide-python", "zarr", "snakemake"):
        assert manifest["versions"][dist], dist
    for path in [*(out / "tiles" / "0.5mpp_224px").glob("*.zarr"), *(out / FEATURES_DIR).glob("*.zarr")]:
        attrs = store.open_store(path).attrs
        assert attrs["run_id"] == manifest["run_id"] and attrs["manifest"] == str(out.resolve() / "manifests" / f"{manifest['run_id']}.json")
        if "weights" in attrs:
            assert attrs["weights"] == manifest["encoder"]["weights"]


@pytest.mark.slow
def test_adding_a_slide_reruns_one_feature_batch_and_recomputes_only_that_slide(tmp_path: Path) -> None:
    """Six slides in batches of two (four batches), then a seventh: one batch job runs again, it
    embeds the new slide alone and keeps its batch-mates' stores; the other batches do not run."""
    from wsi_asmil.features.batch import assign_batches
    from wsi_asmil.synthetic import write_cohort

    write_cohort(tmp_path / "gen", n_slides=7, seed=2, width=2048, height=1536, mpp=0.25)
    labels = pd.read_csv(tmp_path / "gen" / "labels.csv", dtype=str)
    slides = tmp_path / "slides"
    slides.mkdir()
    ids = sorted(labels["slide_id"])
    out = tmp_path / "out"
    config = {
        "slides_dir": str(slides), "labels": str(tmp_path / "labels.csv"), "out_dir": str(out),
        "split": {"folds": 2},
        "features": {"encoder": "test_resnet", "weights": "random", "device": "cpu", "threads": 1, "slides_per_job": 2},
    }
    feats = out / "features" / "0.5mpp_224px" / "test_resnet"

    def run_with(cohort: list[str]) -> dict[str, int]:
        """Run up to the feature markers of ``cohort``; rule -> jobs that ran (a run's first job
        table counts every batch: which are done is known only after the inventory checkpoint)."""
        for sid in cohort:
            if not (slides / f"{sid}.svs").exists():
                shutil.copy(tmp_path / "gen" / "slides" / f"{sid}.svs", slides / f"{sid}.svs")
        labels[labels["slide_id"].isin(cohort)].to_csv(tmp_path / "labels.csv", index=False)
        markers = [str(feats / "batches" / f"{b}.json") for b in assign_batches(cohort, 2)]
        proc = snakemake("--keep-going", *markers, config=config, tmp=tmp_path)
        return Counter(re.findall(r"^(?:local)?(?:rule|checkpoint) (\w+):$", proc.stdout + proc.stderr, re.M))

    first = ids[:6]
    before = assign_batches(first, 2)
    after = assign_batches(ids, 2)
    assert len(before) <= 4 and set(before) <= set(after)  # no doubling between 6 and 7 slides
    assert run_with(first)["features"] == len(before)
    stamps = {s: (feats / f"{s}.zarr" / "zarr.json").stat().st_mtime_ns for s in first}
    marker_stamps = {b: (feats / "batches" / f"{b}.json").stat().st_mtime_ns for b in before}

    plan = run_with(ids)
    assert plan["features"] == 1 and plan["segment"] == 1 and plan["tile"] == 1
    new_batch = next(b for b, members in after.items() if ids[6] in members)
    statuses = json.loads((feats / "batches" / f"{new_batch}.json").read_text())["members"]
    assert statuses[ids[6]]["status"] == "done"
    assert all(statuses[s]["status"] == "current" for s in after[new_batch] if s != ids[6])
    assert {s: (feats / f"{s}.zarr" / "zarr.json").stat().st_mtime_ns for s in first} == stamps
    assert {b: (feats / "batches" / f"{b}.json").stat().st_mtime_ns for b in before if b != new_batch} == {
        b: t for b, t in marker_stamps.items() if b != new_batch
    }
