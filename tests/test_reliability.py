"""Reliability (issue 7): bad input, interrupted runs, hostile names, and nothing lost.

One test (at least) per row of the issue's table, each on files the test writes itself:

| row | tests |
|---|---|
| zero-byte / truncated / non-slide file | test_unreadable_file_names_file_and_reason, test_bad_cohort_* (slow) |
| unsupported file in slides_dir | test_unsupported_files_are_ignored_with_a_notice |
| corrupt JPEG tiles | test_corrupt_jpeg_tile_*, test_thumbnail_*, test_damaged_slide_fails_*, test_bad_cohort_stores_* (slow) |
| no tissue | test_blank_slide_gives_empty_bag_that_training_skips, test_bad_cohort_blank_slide_* (slow) |
| missing mpp | test_missing_mpp_names_both_ways_in_stage_and_inventory |
| label table problems | test_label_table_problems_stop_the_run_at_start_up, test_unlabeled_slide_is_a_warning, test_check_split_feasible |
| config errors | tests/test_workflow.py::test_bad_config_fails_before_any_job |
| SIGKILL mid-stage | test_sigkill_*_then_rerun_* (per stage), test_sigkill_workflow_* (slow, Snakemake) |
| two runs on one out_dir | test_second_run_on_the_same_out_dir_is_refused |
| disk full | test_disk_full_*, test_disk_full_on_a_real_tiny_filesystem |
| hostile slide ids | test_hostile_slide_id_through_snakemake, test_braces_in_a_slide_id_are_refused_by_name, test_bad_cohort_* (slow) |
| untrusted checkpoint / weights | test_untrusted_checkpoint_is_refused, tests/test_features.py::test_weights_errors_name_the_config_key |
| out of memory | test_out_of_memory_* |

Stage processes are killed at exact points by ``tests/hooks/sitecustomize.py`` (on PYTHONPATH only
in these tests). Snakemake runs use a private working directory, so their locks and metadata never
touch the repository's ``.snakemake``.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
import yaml
from conftest import CONFIG_FEATURES, physical_pattern, write_generic_tiff

from wsi_asmil.core.disk import DiskFullError
from wsi_asmil.core.io import write_text
from wsi_asmil.features import store
from wsi_asmil.features.batch import assign_batches, slides_per_job
from wsi_asmil.features.encoders import build_encoder
from wsi_asmil.features.extract import Embedder, FeatureExtractionError, extract_slide
from wsi_asmil.features.tile import TileParams, tile_slide
from wsi_asmil.slides.cohort import LabelTableError, check_split_feasible, match_cohort
from wsi_asmil.slides.inventory import probe_slide
from wsi_asmil.slides.slide import RegionReadError, Slide, SlideError, discover_slides
from wsi_asmil.synthetic import SlideSpec, write_slide
from wsi_asmil.tissue.segment import SegmentParams, segment_slide

REPO = Path(__file__).resolve().parents[1]
HOOKS = Path(__file__).parent / "hooks"
PY = sys.executable
TILING = "0.5mpp_224px"
#: The encoder of the tests that call wsi_asmil.features.extract directly: random ResNet-18 (fast, 512-d).
ENCODER = "resnet18"
#: The feature folder of the workflow runs here, which keep config.yaml's encoder.
WORKFLOW_ENCODER = CONFIG_FEATURES["encoder"]

# The smallest workflow that still trains: CPU, one model, two epochs, no heatmaps.
E2E_CONFIG = {
    "split": {"folds": 2, "val_fraction": 0.0},
    "train": {"models": ["abmil"], "epochs": 2, "threads": 1, "device": "cpu"},
    "features": {"threads": 1, "num_workers": 0, "batch_size": 32, "device": "cpu"},
    "heatmap": {"models": []},
}


# --- files the tests write -------------------------------------------------------------------------


def make_slide(path: Path, tumour: bool = False, seed: int = 0, size: int = 1536) -> Path:
    """A small Aperio-style pyramidal JPEG slide (levels 1, 2, 8) with one tissue island."""
    spec = SlideSpec(width=size, height=size, mpp=0.25, tumour=tumour, seed=seed, n_islands=1, tissue_coverage=0.7)
    write_slide(path, spec)
    return path


def corrupt_tile(path: Path, level: int, index: int) -> None:
    """Overwrite one JPEG tile's compressed bytes in place (found via tifffile's dataoffsets)."""
    with tifffile.TiffFile(path) as tf:
        page = tf.pages[level]
        offset, count = page.dataoffsets[index], page.databytecounts[index]
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\0" * count)


def blank_slide(path: Path, size: int = 1024) -> Path:
    """All glass: a white tiled TIFF with resolution tags (mpp 0.25)."""
    return write_generic_tiff(path, np.full((size, size, 3), 245, dtype=np.uint8), mpp=0.25)


def hook_env(**variables: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HOOKS), str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(variables)
    return env


def random_encoder():
    return build_encoder(ENCODER, "random", seed=0)


def prepare_tiles(slide: Path, out: Path) -> Path:
    segment_slide(slide, out / "seg", SegmentParams())
    tile_slide(slide, out / "seg", out / "tiles.zarr", out / "grid.png", TileParams())
    return out / "tiles.zarr"


# --- Snakemake through its command line, in a private working directory --------------------------


def workdir(tmp: Path) -> Path:
    wd = tmp / "wd"
    wd.mkdir(exist_ok=True)
    if not (wd / "config.yaml").exists():
        (wd / "config.yaml").symlink_to(REPO / "config.yaml")  # the configfile: directive's defaults
    return wd


def snakemake_cmd(wd: Path, config: dict, *args: str, cores: int = 2) -> list[str]:
    cfg = wd / f"config-{abs(hash(json.dumps(config, sort_keys=True)))}.yaml"
    cfg.write_text(yaml.safe_dump(config, allow_unicode=True))
    return [PY, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(wd),
            "--cores", str(cores), *args, "--configfile", str(cfg)]  # --configfile last: it takes several


def snakemake(wd: Path, config: dict, *args: str, env: dict | None = None, check: bool = True,
              timeout: float = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(snakemake_cmd(wd, config, *args), capture_output=True, text=True, cwd=wd,
                          env=env, timeout=timeout, start_new_session=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def cohort_config(tmp: Path, slides: Path, labels: Path, **extra: object) -> dict:
    return {**json.loads(json.dumps(E2E_CONFIG)), "slides_dir": str(slides), "labels": str(labels),
            "out_dir": str(tmp / "out"), **extra}


def feature_markers(out: Path, slides: Path, ids: list[str], config: dict = E2E_CONFIG) -> list[str]:
    """The batch markers that stand for the feature stores of ``ids`` (the stores themselves are
    not Snakemake outputs; see wsi_asmil.features.batch): the targets that build them."""
    per_job = slides_per_job(config["features"].get("slides_per_job", "auto"), config["features"]["device"])
    batches = assign_batches(discover_slides(slides)[0], per_job)
    return sorted(str(out / "features" / TILING / WORKFLOW_ENCODER / "batches" / f"{b}.json")
                  for b, members in batches.items() if set(members) & set(ids))


def train_targets(out: Path, model: str = "abmil", folds: int = 2) -> list[str]:
    return [str(out / "models" / model / f"fold{k}" / name) for k in range(folds)
            for name in ("model.pt", "metrics.json", "predictions.csv")]


# === zero-byte, truncated, non-slide files ==========================================================


@pytest.mark.parametrize("kind", ["zero-byte", "truncated", "text", "random bytes"])
def test_unreadable_file_names_file_and_reason(kind: str, real_slide: Path, tmp_path: Path) -> None:
    path = tmp_path / f"bad {kind}.svs"
    content = {
        "zero-byte": b"",
        "truncated": real_slide.read_bytes()[:4096],
        "text": b"sample sheet, not a slide\n" * 40,
        "random bytes": np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes(),
    }[kind]
    path.write_bytes(content)
    with pytest.raises(SlideError) as err:
        Slide(path)
    message = str(err.value)
    assert f"'bad {kind}'" in message and str(path) in message
    assert ("empty (0 bytes)" in message) if kind == "zero-byte" else ("truncated, corrupt or not a supported" in message)
    # the stage's command line fails with the same message, the inventory records it
    proc = subprocess.run([PY, "-m", "wsi_asmil.tissue.segment", "--slide", str(path), "--out-dir", str(tmp_path / "seg")],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode != 0 and str(path) in proc.stderr and not (tmp_path / "seg").exists()
    row = probe_slide(f"bad {kind}", path)
    assert row["status"] == "error" and str(path) in row["message"]


# === unsupported files in slides_dir ================================================================


def test_unsupported_files_are_ignored_with_a_notice(real_slide: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(real_slide, slides / "a.svs")
    (slides / "notes.txt").write_text("not a slide")
    (slides / "thumbnail.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    found, ignored = discover_slides(slides)
    assert list(found) == ["a"] and sorted(p.name for p in ignored) == ["notes.txt", "thumbnail.png"]
    from wsi_asmil.slides.inventory import take_inventory

    with caplog.at_level(logging.WARNING):
        table = take_inventory(slides)
    assert list(table["slide_id"]) == ["a"]
    assert "notes.txt" in caplog.text and "thumbnail.png" in caplog.text
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label\na,\n")
    proc = snakemake(workdir(tmp_path), cohort_config(tmp_path, slides, labels), "-n")
    assert "ignoring" in proc.stderr and "notes.txt" in proc.stderr and "thumbnail.png" in proc.stderr


# === corrupt JPEG tiles inside a readable slide =====================================================


@pytest.fixture(scope="module")
def corrupt_pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same slide twice: intact, and with one tile of level 1 (the 0.5 um/px level that
    features read) overwritten. Segmentation reads level 2, so both get the same tiles."""
    root = tmp_path_factory.mktemp("corrupt")
    intact = make_slide(root / "intact.svs", tumour=True, seed=5, size=2048)
    broken = root / "broken.svs"
    shutil.copy(intact, broken)
    corrupt_tile(broken, level=1, index=5)  # level 1 is 1024 x 1024: 4 x 4 tiles; 5 = level-0 (512..1024)²
    tiles = prepare_tiles(intact, root / "intact")
    features = root / "intact" / "features.zarr"  # the reference: intact slide, uninterrupted
    extract_slide(intact, tiles, features, random_encoder(), "cpu", "fp32", 4, 0)
    return {"intact": intact, "broken": broken, "tiles": tiles, "features": features, "root": root}


def test_corrupt_jpeg_tile_raises_a_region_error_and_the_handle_recovers(corrupt_pair: dict[str, Path]) -> None:
    with Slide(corrupt_pair["broken"]) as s:
        with pytest.raises(RegionReadError, match="'broken'.*level 1") as err:
            s.read_rgb(1, 512, 512, 64, 64)
        assert (err.value.level, err.value.x0, err.value.y0) == (1, 512, 512)
        assert s.read_rgb(1, 0, 0, 64, 64).shape == (64, 64, 3)  # reopened: the next read works


def test_corrupt_jpeg_tile_is_skipped_and_counted(corrupt_pair: dict[str, Path], tmp_path: Path) -> None:
    enc = random_encoder()
    attrs = extract_slide(corrupt_pair["broken"], corrupt_pair["tiles"], tmp_path / "broken.zarr", enc, "cpu", "fp32", 4, 1)
    tiles, _, _ = store.read_tiles(corrupt_pair["tiles"])
    full, full_coords, full_attrs = store.read_features(corrupt_pair["features"])
    feats, coords, stored = store.read_features(tmp_path / "broken.zarr")
    n_failed = stored["n_failed_tiles"]
    assert full_attrs["n_failed_tiles"] == 0 and full_attrs["failed_coords"] == []
    # the tiles the corrupt JPEG tile touches (level-0 512..1024 in x and y), and only those
    touched = [(x, y) for x, y in tiles.tolist() if x < 1024 and x + 448 > 512 and y < 1024 and y + 448 > 512]
    assert n_failed == attrs["n_failed_tiles"] == len(touched) > 0
    assert sorted(map(tuple, stored["failed_coords"])) == sorted(touched)
    assert len(tiles) == len(coords) + n_failed and feats.shape == (len(coords), 512)
    keep = [tuple(c) not in set(touched) for c in full_coords.tolist()]
    np.testing.assert_array_equal(coords, full_coords[keep])
    np.testing.assert_array_equal(feats, full[keep])  # the rows that were read are exactly right
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.zarr"]  # no scratch left


def test_thumbnail_survives_a_corrupt_tile(corrupt_pair: dict[str, Path], tmp_path: Path) -> None:
    """A corrupt tile at the level segmentation reads is background, with a warning."""
    path = tmp_path / "thumb broken.svs"
    shutil.copy(corrupt_pair["intact"], path)
    corrupt_tile(path, level=1, index=0)
    with Slide(corrupt_pair["intact"]) as s:
        good, _ = s.thumbnail_at_mpp(0.5)
    with Slide(path) as s:
        thumb, _ = s.thumbnail_at_mpp(0.5)  # reads level 1
        assert s.unreadable_regions == [(0, 0, 512, 512)]
    assert (thumb[:256, :256] == 255).all()
    np.testing.assert_array_equal(thumb[256:, :], good[256:, :])
    np.testing.assert_array_equal(thumb[:, 256:], good[:, 256:])


def test_damaged_slide_fails_when_most_tiles_fail(corrupt_pair: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "damaged.svs"
    shutil.copy(corrupt_pair["intact"], path)
    for index in range(16):
        corrupt_tile(path, level=1, index=index)
    with pytest.raises(FeatureExtractionError, match=r"'intact': \d+ of \d+ tiles .* truncated or corrupt"):
        extract_slide(path, corrupt_pair["tiles"], tmp_path / "out" / "f.zarr", random_encoder(), "cpu", "fp32", 8, 0)
    assert list((tmp_path / "out").iterdir()) == []  # neither the store nor its scratch


# === no tissue ======================================================================================


def test_blank_slide_gives_empty_bag_that_training_skips(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from wsi_asmil.mil.train import train_fold

    blank = blank_slide(tmp_path / "blank.tif")
    with caplog.at_level(logging.WARNING):
        tiles = prepare_tiles(blank, tmp_path / "blank")
    assert "no tiles" in caplog.text
    features_dir = tmp_path / "features"
    extract_slide(blank, tiles, features_dir / "blank.zarr", random_encoder(), "cpu", "fp32")
    feats, coords, _ = store.read_features(features_dir / "blank.zarr")
    assert feats.shape == (0, 512) and coords.shape == (0, 2)
    rng = np.random.default_rng(0)
    labels = {"blank": "tumour"}
    for i in range(6):
        sid = f"s{i}"
        with store.feature_writer(features_dir / f"{sid}.zarr", np.zeros((12, 2)), 512, {"slide_id": sid}) as w:
            w.write(0, rng.normal(size=(12, 512)) + (i % 2))
        labels[sid] = ["normal", "tumour"][i % 2]
    split = {"classes": ["normal", "tumour"], "labels": labels,
             "folds": [{"train": ["s0", "s1", "s2", "s3", "blank"], "val": [], "test": ["s4", "s5"]}]}
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        metrics = train_fold(features_dir, split, 0, "abmil", {"epochs": 1}, tmp_path / "model", "cpu")
    assert metrics["skipped_empty_slides"] == ["blank"] and "blank has no tiles" in caplog.text
    assert json.loads((tmp_path / "model" / "metrics.json").read_text())["skipped_empty_slides"] == ["blank"]


# === missing mpp ===================================================================================


def test_missing_mpp_names_both_ways_in_stage_and_inventory(tmp_path: Path) -> None:
    path = write_generic_tiff(tmp_path / "no mpp.tif", physical_pattern(512, 512, 0.5))
    proc = subprocess.run([PY, "-m", "wsi_asmil.tissue.segment", "--slide", str(path), "--out-dir", str(tmp_path / "seg")],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode != 0
    for text in ("slide 'no mpp'", "'mpp' column", "label table", "mpp_fallback"):
        assert text in proc.stderr
    row = probe_slide("no mpp", path)
    assert row["status"] == "error" and "'mpp' column" in row["message"] and "mpp_fallback" in row["message"]
    assert probe_slide("no mpp", path, mpp_override=0.5)["status"] == "ok"


# === label table ===================================================================================


def _cohort_dir(tmp: Path, real_slide: Path, ids: list[str]) -> Path:
    slides = tmp / "slides"
    slides.mkdir(exist_ok=True)
    for sid in ids:
        target = slides / f"{sid}.svs"
        if not target.exists():
            target.symlink_to(real_slide)
    return slides


@pytest.mark.parametrize(
    "table,expected",
    [
        ("slide_id,label\na,x\nb,y\ntypo,x\nd,y\n", ["labeled slide(s) not found in slides_dir: 'typo'"]),
        ("slide_id,label\na,x\nb,y\na,y\n", ["duplicate slide_id", "row 2", "row 4"]),
        ("slide_id,label,split\na,x,train\nb,y,testing\n", ["split must be one of", "row 3", "testing"]),
        ("slide_id,label\na,x\nb,x\nc,x\nd,y\n", ["split.folds = 2", "class 'y': 1 slide(s): 'd'"]),
        ("slide_id,label,mpp\na,x,zero\nb,y,\n", ["mpp must be a positive number", "row 2"]),
    ],
    ids=["missing-on-disk", "duplicate", "bad-split", "too-few-per-class", "bad-mpp"],
)
def test_label_table_problems_stop_the_run_at_start_up(real_slide: Path, tmp_path: Path, table: str, expected: list[str]) -> None:
    slides = _cohort_dir(tmp_path, real_slide, ["a", "b", "c", "d"])
    labels = tmp_path / "labels.csv"
    labels.write_text(table)
    proc = snakemake(workdir(tmp_path), cohort_config(tmp_path, slides, labels), "-n", check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "LabelTableError" in text
    for fragment in expected:
        assert fragment in text
    assert not (tmp_path / "out").exists()


def test_unlabeled_slide_is_a_warning(real_slide: Path, tmp_path: Path) -> None:
    slides = _cohort_dir(tmp_path, real_slide, ["a", "b", "c", "d", "extra"])
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label\na,x\nb,y\nc,x\nd,y\n")
    proc = snakemake(workdir(tmp_path), cohort_config(tmp_path, slides, labels), "-n")
    assert "1 slide(s) in slides_dir have no label" in proc.stderr and "extra" in proc.stderr


def test_check_split_feasible(tmp_path: Path) -> None:
    slides = {s: tmp_path / f"{s}.svs" for s in "abcdef"}
    for p in slides.values():
        p.write_bytes(b"x")
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label,split\na,x,train\nb,y,train\nc,x,test\nd,y,\ne,,\nf,x,val\n")
    cohort = match_cohort(labels, slides)
    check_split_feasible(cohort, labels, "kfold", 2)
    with pytest.raises(LabelTableError, match=r"(?s)split.folds = 3.*class 'y': 2 slide\(s\): 'b', 'd'"):
        check_split_feasible(cohort, labels, "kfold", 3)
    with pytest.raises(LabelTableError, match=r"(?s)split value.*row 5.*'slide_id': 'd'"):
        check_split_feasible(cohort, labels, "fixed", 2)
    labels.write_text("slide_id,label,split\na,x,train\nb,y,train\n")
    with pytest.raises(LabelTableError, match="at least one 'train' and one 'test'"):
        check_split_feasible(match_cohort(labels, slides), labels, "fixed", 2)


# === SIGKILL in the middle of a stage, then a rerun (each stage by hand) ============================


def _killed(proc: subprocess.CompletedProcess) -> bool:
    return proc.returncode == -signal.SIGKILL or "SIGKILL" in proc.stderr


def test_sigkill_in_tiling_then_rerun_equals_uninterrupted(corrupt_pair: dict[str, Path], tmp_path: Path) -> None:
    slide, seg = corrupt_pair["intact"], corrupt_pair["root"] / "intact" / "seg"
    out = tmp_path / "tiles" / "intact.zarr"
    cmd = [PY, "-m", "wsi_asmil.features.tile", "--slide", str(slide), "--seg-dir", str(seg), "--out", str(out), "--qc", str(tmp_path / "grid.png")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=hook_env(WSI_ASMIL_KILL_BEFORE_RENAME="intact.zarr"))
    assert _killed(proc), proc.stderr
    assert not out.exists()  # fully written, but only under its temporary name
    assert [p.name.startswith(".intact.zarr.tmp-") for p in out.parent.iterdir()] == [True]
    subprocess.run(cmd, check=True, capture_output=True)
    assert [p.name for p in out.parent.iterdir()] == ["intact.zarr"]  # the rerun removed the leftover
    coords, frac, attrs = store.read_tiles(out)
    ref_coords, ref_frac, ref_attrs = store.read_tiles(corrupt_pair["tiles"])
    np.testing.assert_array_equal(coords, ref_coords)
    np.testing.assert_array_equal(frac, ref_frac)


def test_leftover_temporaries_of_dead_writers_on_this_host_are_removed(tmp_path: Path) -> None:
    final = tmp_path / "mask.png"
    dead = subprocess.Popen([PY, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([PY, "-c", "import time; time.sleep(60)"])
    try:
        host = socket.gethostname()
        names = {
            "dead": f".mask.png.tmp-{host}-{dead.pid}-0a1b2c3d",
            "dead_dir": f".mask.png.tmp-{host}-{dead.pid}-4e5f6a7b",
            "alive": f".mask.png.tmp-{host}-{alive.pid}-0a1b2c3d",
            "other_host": f".mask.png.tmp-elsewhere.{host}-{dead.pid}-0a1b2c3d",
            "other_output": f".mask.png.json.tmp-{host}-{dead.pid}-0a1b2c3d",
            "not_ours": ".mask.png.tmp-notes",
        }
        for key, name in names.items():
            if key == "dead_dir":
                (tmp_path / name / "c").mkdir(parents=True)
            else:
                (tmp_path / name).write_text("x")
        write_text(final, "complete")
        left = {p.name for p in tmp_path.iterdir()}
        assert left == {"mask.png"} | {v for k, v in names.items() if k not in ("dead", "dead_dir")}
        assert final.read_text() == "complete"
    finally:
        alive.kill()
        alive.wait()


def test_sigkill_in_features_then_rerun_resumes_and_equals_uninterrupted(corrupt_pair: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "features" / "intact.zarr"
    cmd = [PY, "-m", "wsi_asmil.features.extract", "--slide", str(corrupt_pair["intact"]), "--tiles", str(corrupt_pair["tiles"]),
           "--out", str(out), "--device", "cpu", "--precision", "fp32", "--batch-size", "4", "--num-workers", "0", "--threads", "1"]
    env = hook_env(WSI_ASMIL_KILL_AFTER_ROWS="intact.zarr:4", WSI_ASMIL_ROWS_PER_CHUNK="4")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert _killed(proc), proc.stderr
    assert not out.exists()  # a third of the rows were checkpointed, into a hidden scratch store
    assert out.parent.exists() and all(p.name.startswith(".") for p in out.parent.iterdir())
    progress = json.loads((out.parent / ".intact.zarr.partial" / "progress.json").read_text())
    n_tiles = len(store.read_tiles(corrupt_pair["tiles"])[0])
    assert progress["rows_done"] == 4 and n_tiles == 12

    seen = []
    embed = Embedder.__call__
    monkeypatch.setattr(Embedder, "__call__", lambda self, tiles: (seen.append(len(tiles)), embed(self, tiles))[1])
    extract_slide(corrupt_pair["intact"], corrupt_pair["tiles"], out, random_encoder(), "cpu", "fp32", 4, 0)
    assert sum(seen) == n_tiles - 4  # the finished chunk was not embedded again
    np.testing.assert_array_equal(store.read_features(out)[0], store.read_features(corrupt_pair["features"])[0])
    assert [p.name for p in out.parent.iterdir()] == ["intact.zarr"]  # the scratch became the store


def _tiny_fold(root: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(1)
    features_dir = root / "features"
    labels = {}
    for i in range(6):
        sid = f"s{i}"
        with store.feature_writer(features_dir / f"{sid}.zarr", np.zeros((10, 2)), 16, {"slide_id": sid}) as w:
            w.write(0, rng.normal(size=(10, 16)) + (i % 2))
        labels[sid] = ["normal", "tumour"][i % 2]
    split = root / "split.json"
    split.write_text(json.dumps({"classes": ["normal", "tumour"], "labels": labels,
                                 "folds": [{"train": ["s0", "s1", "s2", "s3"], "val": [], "test": ["s4", "s5"]}]}))
    return features_dir, split


def test_sigkill_in_training_then_rerun_equals_uninterrupted(tmp_path: Path) -> None:
    from wsi_asmil.mil.models import load_model
    from wsi_asmil.mil.train import train_fold

    features_dir, split = _tiny_fold(tmp_path)
    out = tmp_path / "model"
    params = {"epochs": 2, "seed": 3}
    cmd = [PY, "-m", "wsi_asmil.mil.train", "--features-dir", str(features_dir), "--split", str(split), "--fold", "0",
           "--model", "abmil", "--params", json.dumps(params), "--device", "cpu", "--out-dir", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=hook_env(WSI_ASMIL_KILL_AFTER_RENAME="model.pt"))
    assert _killed(proc), proc.stderr
    # killed between two outputs: model.pt is whole, metrics.json never appeared. Snakemake marks
    # such a job incomplete and reruns it (test_sigkill_workflow_*); by hand, rerun the stage.
    assert (out / "model.pt").exists() and not (out / "metrics.json").exists()
    train_fold(features_dir, split, 0, "abmil", params, out, "cpu")
    train_fold(features_dir, split, 0, "abmil", params, tmp_path / "ref", "cpu")
    a, _ = load_model(out / "model.pt")
    b, _ = load_model(tmp_path / "ref" / "model.pt")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert (out / "predictions.csv").read_text() == (tmp_path / "ref" / "predictions.csv").read_text()


# === two runs on one out_dir =======================================================================


def test_second_run_on_the_same_out_dir_is_refused(real_slide: Path, tmp_path: Path) -> None:
    slides = _cohort_dir(tmp_path, real_slide, ["only"])
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label\nonly,\n")
    wd = workdir(tmp_path)
    config = cohort_config(tmp_path, slides, labels)
    out = tmp_path / "out"
    target = str(out / "segment" / "only" / "mask.png")
    gate = tmp_path / "gate"
    first = subprocess.Popen(snakemake_cmd(wd, config, target, cores=1), cwd=wd, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True,
                             env=hook_env(WSI_ASMIL_GATE=f"mask.png={gate}"))
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("segment/only/.mask.png.tmp-*")):  # the first run's job is mid-write
            assert first.poll() is None and time.monotonic() < deadline, first.stdout.read() if first.poll() is not None else "timeout"
            time.sleep(0.2)
        second = snakemake(wd, config, target, check=False)
        assert second.returncode != 0
        assert "cannot be locked" in second.stdout + second.stderr
        assert not (out / "segment" / "only" / "mask.png").exists()  # the second run wrote nothing
    finally:
        gate.touch()
        log = first.communicate(timeout=300)[0]
    assert first.returncode == 0, log
    mask = out / "segment" / "only"
    assert {p.name for p in mask.iterdir()} == {"mask.png", "mask.json", "tissue.geojson", "qc.jpg"}
    assert "Nothing to be done" in (lambda p: p.stdout + p.stderr)(snakemake(wd, config, target, "-n"))


# === disk full =====================================================================================


def test_disk_full_while_writing_features_removes_the_temporary_store(corrupt_pair: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "features" / "intact.zarr"
    enc = random_encoder()
    shutil.copytree(corrupt_pair["features"], out)  # the previous complete output
    before = store.read_features(out)
    monkeypatch.setattr(store, "ROWS_PER_CHUNK", 4)
    write = store.PartialFeatures.write_chunk

    def full_disk(self, start, rows, failed):  # type: ignore[no-untyped-def]
        if self.rows_done >= 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        write(self, start, rows, failed)

    monkeypatch.setattr(store.PartialFeatures, "write_chunk", full_disk)
    with pytest.raises(DiskFullError, match=r"no space left on .* writing .*intact.zarr \(.* free\); slide 'intact'.*Free space") as err:
        extract_slide(corrupt_pair["intact"], corrupt_pair["tiles"], out, enc, "cpu", "fp32", 4, 0)
    assert err.value.errno == errno.ENOSPC
    assert [p.name for p in out.parent.iterdir()] == ["intact.zarr"]  # no temporary or scratch store
    after = store.read_features(out)  # the previous complete store is intact
    np.testing.assert_array_equal(before[0], after[0])
    assert before[2]["created"] == after[2]["created"]


def test_disk_full_while_writing_tiles_keeps_the_previous_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import zarr

    out = tmp_path / "t.zarr"
    store.write_tiles(out, np.arange(8).reshape(4, 2), np.ones(4), {"slide_id": "a"})
    original = zarr.Group.create_array

    def full_disk(self, name, *args, **kwargs):  # type: ignore[no-untyped-def]
        if name == "tissue_fraction":
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, name, *args, **kwargs)

    monkeypatch.setattr(zarr.Group, "create_array", full_disk)
    with pytest.raises(OSError):
        store.write_tiles(out, np.arange(10).reshape(5, 2), np.ones(5), {"slide_id": "a"})
    assert [p.name for p in tmp_path.iterdir()] == ["t.zarr"]
    assert len(store.read_tiles(out)[0]) == 4


DISK_FULL_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    from wsi_asmil.features import store
    from wsi_asmil.features.encoders import build_encoder
    from wsi_asmil.features.extract import extract_slide
    slide, tiles, mnt = sys.argv[1:4]
    out = Path(mnt) / "f.zarr"
    enc = build_encoder("resnet18", "random")
    extract_slide(slide, tiles, out, enc, "cpu", "fp32", 4, 0)          # fits
    before = store.read_features(out)[0]
    free = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize
    with open(Path(mnt) / "filler", "wb") as f:                        # leave ~8 kB
        f.write(b"\\0" * max(0, free - 8 * 1024))
    try:
        extract_slide(slide, tiles, out, enc, "cpu", "fp32", 4, 0)
        result = {"raised": None}
    except OSError as exc:
        result = {"raised": exc.errno, "message": str(exc)}
    (Path(mnt) / "filler").unlink()
    result["listing"] = sorted(os.listdir(mnt))
    result["intact"] = bool((store.read_features(out)[0] == before).all())
    print("RESULT" + json.dumps(result))
    """
)


def test_disk_full_on_a_real_tiny_filesystem(corrupt_pair: dict[str, Path], tmp_path: Path) -> None:
    """A 2 MiB tmpfs in a private mount namespace (needs root or user namespaces; skipped otherwise)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = tmp_path / "disk_full.py"
    script.write_text(DISK_FULL_SCRIPT)
    unshare = shutil.which("unshare")
    probe = subprocess.run([unshare or "false", "-rm", "sh", "-c", f"mount -t tmpfs -o size=2m tmpfs '{mnt}'"], capture_output=True)
    if unshare is None or probe.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (no root, no user namespaces)")
    shell = "mount -t tmpfs -o size=2m tmpfs \"$0\" && exec \"$1\" \"$2\" \"$3\" \"$4\" \"$0\""
    proc = subprocess.run([unshare, "-rm", "sh", "-c", shell, str(mnt), PY, str(script), str(corrupt_pair["intact"]), str(corrupt_pair["tiles"])],
                          capture_output=True, text=True, cwd=REPO, env=hook_env())
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")]
    assert line, proc.stdout + proc.stderr
    result = json.loads(line[0][len("RESULT"):])
    assert result["raised"] == errno.ENOSPC and result["message"].startswith(f"no space left on {mnt} writing {mnt}/f.zarr (")
    assert result["listing"] == ["f.zarr"] and result["intact"]


# === hostile slide ids =============================================================================

HOSTILE = "x; touch PWNED $(touch PWNED2) `touch PWNED3` 'q\" $HOME & ü切片"


def test_hostile_slide_id_through_snakemake(tmp_path: Path) -> None:
    """One slide whose name is a shell payload goes through inventory, segment, tile and features."""
    slides = tmp_path / "slides"
    slides.mkdir()
    make_slide(slides / f"{HOSTILE}.svs", seed=2, size=1024)
    labels = tmp_path / "labels.csv"
    pd.DataFrame({"slide_id": [HOSTILE], "label": [""]}).to_csv(labels, index=False)
    wd = workdir(tmp_path)
    config = cohort_config(tmp_path, slides, labels)
    [marker] = feature_markers(tmp_path / "out", slides, [HOSTILE])
    snakemake(wd, config, marker)
    feats, coords, attrs = store.read_features(tmp_path / "out" / "features" / TILING / WORKFLOW_ENCODER / f"{HOSTILE}.zarr")
    assert attrs["slide_id"] == HOSTILE and len(coords) > 0
    assert json.loads(Path(marker).read_text())["members"][HOSTILE]["status"] == "done"
    assert (tmp_path / "out" / "segment" / HOSTILE / "mask.png").exists()
    batch = Path(marker).stem
    assert HOSTILE in (tmp_path / "out" / "logs" / "features" / TILING / WORKFLOW_ENCODER / f"batch-{batch}.log").read_text()
    for where in (wd, tmp_path, REPO, slides):
        assert not list(where.glob("PWNED*")), where


def test_braces_in_a_slide_id_are_refused_by_name(tmp_path: Path) -> None:
    """The one character class Snakemake cannot take in a path: a clear error, not a WildcardError."""
    for name in ("ok; $x 'y'.svs", "a{b}.svs"):
        (tmp_path / name).write_bytes(b"x")
    with pytest.raises(SlideError, match=r"'a\{b\}'.*rename"):
        discover_slides(tmp_path)


# === untrusted checkpoints =========================================================================


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch '{self.marker}'",))


def test_untrusted_checkpoint_is_refused(tmp_path: Path) -> None:
    from wsi_asmil.mil.models import load_model

    marker = tmp_path / "PWNED"
    path = tmp_path / "model.pt"
    torch.save({"model_name": "abmil", "in_dim": 8, "classes": ["a", "b"], "model_kwargs": {},
                "state_dict": {}, "hook": _Payload(marker)}, path)
    with pytest.raises(Exception, match="(?i)weights.only"):
        load_model(path)
    assert not marker.exists()


# === out of memory =================================================================================


def _raise(exc: BaseException):  # type: ignore[no-untyped-def]
    def forward(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise exc

    return forward


@pytest.mark.parametrize(
    "exc",
    [
        torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
        RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to allocate 81920000000 bytes"),
        MemoryError(),
    ],
    ids=["cuda", "cpu-allocator", "MemoryError"],
)
def test_out_of_memory_in_training_names_slide_bag_size_and_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> None:
    from wsi_asmil.core.memory import BagMemoryError
    from wsi_asmil.mil.models.abmil import ABMIL
    from wsi_asmil.mil.train import train_fold

    features_dir, split = _tiny_fold(tmp_path)
    monkeypatch.setattr(ABMIL, "forward", _raise(exc))
    with pytest.raises(BagMemoryError) as err:
        train_fold(features_dir, split, 0, "abmil", {"epochs": 1}, tmp_path / "m", "cpu")
    message = str(err.value)
    assert "slide 's" in message and "a bag of 10 tiles" in message
    assert "train.max_tiles" in message and "train.device: cpu" in message
    assert not (tmp_path / "m").exists()
    with pytest.raises(BagMemoryError, match=r"lower train.max_tiles \(now 8\)"):
        train_fold(features_dir, split, 0, "abmil", {"epochs": 1, "max_tiles": 8}, tmp_path / "m", "cpu")


def test_out_of_memory_in_evaluation_and_loading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from wsi_asmil.core.memory import BagMemoryError
    from wsi_asmil.mil.evaluate import evaluate
    from wsi_asmil.mil.fold_data import load_bags
    from wsi_asmil.mil.trainer import autocast_factory

    features_dir, split = _tiny_fold(tmp_path)
    oom = torch.cuda.OutOfMemoryError("CUDA out of memory.")
    bags, _ = load_bags(features_dir, ["s0"], {"s0": "normal"}, ["normal", "tumour"], torch.device("cpu"))
    with pytest.raises(BagMemoryError, match=r"(?s)evaluating slide 's0', a bag of 10 tiles.*train.device: cpu"):
        evaluate(_Oom(), bags, 2, autocast_factory(torch.device("cpu"), False))

    real_from_numpy = torch.from_numpy

    class Huge:
        def __init__(self, array):  # type: ignore[no-untyped-def]
            self.array = array

        def to(self, device):  # type: ignore[no-untyped-def]
            raise oom

    monkeypatch.setattr(torch, "from_numpy", lambda a: Huge(a) if a.ndim == 2 else real_from_numpy(a))
    with pytest.raises(BagMemoryError, match=r"loading the features of slide 's0', a bag of 10 tiles.*train.device: cpu"):
        load_bags(features_dir, ["s0"], {"s0": "normal"}, ["normal", "tumour"], torch.device("cpu"))


def test_out_of_memory_other_errors_pass_through_and_cli_is_clean(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from wsi_asmil.mil.models.abmil import ABMIL
    from wsi_asmil.mil.train import main

    features_dir, split = _tiny_fold(tmp_path)
    monkeypatch.setattr(ABMIL, "forward", _raise(ValueError("a real bug")))
    with pytest.raises(ValueError, match="a real bug"):
        main(["--features-dir", str(features_dir), "--split", str(split), "--fold", "0", "--model", "abmil",
              "--params", '{"epochs": 1}', "--device", "cpu", "--out-dir", str(tmp_path / "m")])
    monkeypatch.setattr(ABMIL, "forward", _raise(torch.cuda.OutOfMemoryError("CUDA out of memory.")))
    with pytest.raises(SystemExit) as err:
        main(["--features-dir", str(features_dir), "--split", str(split), "--fold", "0", "--model", "abmil",
              "--params", '{"epochs": 1}', "--device", "cpu", "--out-dir", str(tmp_path / "m")])
    log = capsys.readouterr().err
    assert err.value.code == 1 and "train.max_tiles" in log and "Traceback" not in log


def test_out_of_memory_in_feature_extraction(corrupt_pair: dict[str, Path], tmp_path: Path) -> None:
    enc = random_encoder()
    broken = type(enc)(_Oom(), enc.name, enc.spec, enc.dim, enc.weights_id)
    with pytest.raises(FeatureExtractionError, match=r"'intact': out of memory on cpu embedding a batch of 4 tiles.*features.batch_size \(now 4\).*features.device: cpu"):
        extract_slide(corrupt_pair["intact"], corrupt_pair["tiles"], tmp_path / "f.zarr", broken, "cpu", "fp32", 4, 0)
    assert [p.name for p in tmp_path.iterdir()] == [".f.zarr.partial"]  # progress kept for the rerun


class _Oom(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


# === end to end through Snakemake (slow) ===========================================================

HOSTILE_IDS = ["with space", "quote's", 'dq"uote', "dollar$HOME", "semi;colon && x", "x; touch PWNED",
               "ünïcødé 切片", "$(touch PWNED2) `touch PWNED3`"]
UNREADABLE = {"empty": ("empty.svs", "empty (0 bytes)"), "truncated": ("truncated.svs", "truncated, corrupt"),
              "not a slide": ("not a slide.ndpi", "truncated, corrupt"), "no mpp": ("no mpp.tif", "mpp_fallback")}


@pytest.fixture(scope="module")
def bad_cohort_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One workflow run over a cohort with every kind of bad input at once: hostile names, unreadable
    files, a slide with a corrupt JPEG tile, a blank slide, a slide without mpp (with and without an
    override), an unlabeled slide, and files that are not slides."""
    tmp = tmp_path_factory.mktemp("bad_cohort")
    slides = tmp / "slides"
    slides.mkdir()
    rows = []
    for i, sid in enumerate(HOSTILE_IDS):
        make_slide(slides / f"{sid}.svs", tumour=i % 2 == 0, seed=10 + i)
        rows.append((sid, ["normal", "tumour"][i % 2 == 0], ""))
    make_slide(slides / "corrupt tile.svs", tumour=True, seed=30, size=2048)
    corrupt_tile(slides / "corrupt tile.svs", level=1, index=5)
    rows.append(("corrupt tile", "tumour", ""))
    blank_slide(slides / "blank glass.tif")
    rows.append(("blank glass", "normal", ""))
    (slides / "empty.svs").write_bytes(b"")
    rows.append(("empty", "tumour", ""))
    make_slide(tmp / "whole.svs", seed=31)
    (slides / "truncated.svs").write_bytes((tmp / "whole.svs").read_bytes()[:4096])
    rows.append(("truncated", "normal", ""))
    (slides / "not a slide.ndpi").write_text("a spreadsheet, renamed\n" * 100)
    write_generic_tiff(slides / "no mpp.tif", physical_pattern(1024, 1024, 0.5))
    rows.append(("no mpp", "tumour", ""))
    write_generic_tiff(slides / "mpp in table.tif", physical_pattern(1024, 1024, 0.5))
    rows.append(("mpp in table", "", "0.5"))
    make_slide(slides / "unlabeled extra.svs", seed=32, size=1024)
    (slides / "notes.txt").write_text("not a slide")
    (slides / "thumbnail.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    labels = tmp / "labels.csv"
    pd.DataFrame(rows, columns=["slide_id", "label", "mpp"]).to_csv(labels, index=False)
    wd = workdir(tmp)
    config = cohort_config(tmp, slides, labels)
    out = tmp / "out"
    usable = [*HOSTILE_IDS, "corrupt tile", "blank glass", "mpp in table", "unlabeled extra"]
    targets = feature_markers(out, slides, usable)
    targets += [*train_targets(out), str(out / "report" / "metrics.json")]
    start = time.monotonic()
    proc = snakemake(wd, config, *targets)
    return {"tmp": tmp, "wd": wd, "out": out, "slides": slides, "proc": proc, "usable": usable,
            "seconds": time.monotonic() - start}


@pytest.mark.slow
def test_bad_cohort_unreadable_slides_are_listed_and_the_rest_finishes(bad_cohort_run: dict) -> None:
    out, slides = bad_cohort_run["out"], bad_cohort_run["slides"]
    inventory = pd.read_csv(out / "inventory" / "slides.csv", keep_default_na=False).set_index("slide_id")
    for sid, (name, reason) in UNREADABLE.items():
        assert inventory.loc[sid, "status"] == "error"
        assert str(slides / name) in inventory.loc[sid, "message"] and reason in inventory.loc[sid, "message"]
        assert not (out / "segment" / sid).exists()
    assert "'mpp' column" in inventory.loc["no mpp", "message"]
    assert sorted(inventory.index[inventory["status"] == "ok"]) == sorted(bad_cohort_run["usable"])
    assert inventory.loc["mpp in table", "mpp_source"] == "label-table"
    split = json.loads((out / "splits" / "split.json").read_text())
    assert not set(UNREADABLE) & set(split["labels"])
    stderr = bad_cohort_run["proc"].stderr
    assert "notes.txt" in stderr and "thumbnail.png" in stderr and "ignoring" in stderr
    assert "unlabeled extra" in stderr and "no label" in stderr
    print(f"bad cohort run: {bad_cohort_run['seconds']:.0f} s")


@pytest.mark.slow
def test_bad_cohort_stores_are_consistent_and_corrupt_tiles_counted(bad_cohort_run: dict) -> None:
    out = bad_cohort_run["out"]
    failed = {}
    for sid in bad_cohort_run["usable"]:
        tiles, _, _ = store.read_tiles(out / "tiles" / TILING / f"{sid}.zarr")
        feats, coords, attrs = store.read_features(out / "features" / TILING / WORKFLOW_ENCODER / f"{sid}.zarr")
        assert len(tiles) == len(coords) + attrs["n_failed_tiles"] and feats.shape[0] == len(coords)
        assert attrs["slide_id"] == sid
        failed[sid] = attrs["n_failed_tiles"]
    assert failed["corrupt tile"] > 0 and sum(failed.values()) == failed["corrupt tile"]
    logs = "".join(p.read_text() for p in (out / "logs" / "features" / TILING / WORKFLOW_ENCODER).glob("batch-*.log"))
    assert "slide 'corrupt tile'" in logs and "could not be decoded" in logs


@pytest.mark.slow
def test_bad_cohort_blank_slide_is_skipped_by_training(bad_cohort_run: dict) -> None:
    out = bad_cohort_run["out"]
    assert len(store.read_tiles(out / "tiles" / TILING / "blank glass.zarr")[0]) == 0
    skipped = [json.loads((out / "models" / "abmil" / f"fold{k}" / "metrics.json").read_text())["skipped_empty_slides"] for k in range(2)]
    assert all(s == ["blank glass"] for s in skipped)  # in every fold, as a train or a test slide
    predicted = pd.concat(pd.read_csv(out / "models" / "abmil" / f"fold{k}" / "predictions.csv", keep_default_na=False) for k in range(2))
    assert sorted(predicted["slide_id"]) == sorted([*HOSTILE_IDS, "corrupt tile"])  # every usable labeled bag, once


@pytest.mark.slow
def test_bad_cohort_hostile_names_without_injection(bad_cohort_run: dict) -> None:
    out = bad_cohort_run["out"]
    for sid in HOSTILE_IDS:
        assert (out / "segment" / sid / "tissue.geojson").exists()
        assert (out / "logs" / "tile" / TILING / f"{sid}.log").exists()
    for where in (bad_cohort_run["wd"], bad_cohort_run["tmp"], bad_cohort_run["slides"], REPO):
        assert not list(where.glob("PWNED*")), where


def planned(proc: subprocess.CompletedProcess) -> dict[str, int]:
    """Rule -> job count from the 'Job stats' table Snakemake prints."""
    text = proc.stdout + proc.stderr
    if "Job stats:" not in text:
        return {}
    counts = {}
    for line in text.split("Job stats:")[1].split("\n\n")[0].splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and parts[0] not in ("total", "all"):
            counts[parts[0]] = int(parts[1])
    return counts


def _run_outputs(out: Path, ids: list[str]) -> dict:
    """What an uninterrupted and an interrupted-then-rerun workflow must agree on."""
    from wsi_asmil.mil.models import load_model

    result: dict = {}
    for sid in ids:
        result[f"tiles {sid}"] = store.read_tiles(out / "tiles" / TILING / f"{sid}.zarr")[0]
        result[f"features {sid}"] = store.read_features(out / "features" / TILING / WORKFLOW_ENCODER / f"{sid}.zarr")[0]
    for k in range(2):
        fold = out / "models" / "abmil" / f"fold{k}"
        model, _ = load_model(fold / "model.pt")
        result.update({f"fold{k} {name}": value.numpy() for name, value in model.state_dict().items()})
        result[f"fold{k} predictions"] = (fold / "predictions.csv").read_text()
        result[f"fold{k} test"] = json.dumps(json.loads((fold / "metrics.json").read_text())["test"], sort_keys=True)
    return result


@pytest.mark.slow
def test_sigkill_workflow_in_tiling_features_and_training_then_rerun_equals_uninterrupted(tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    ids = ["s0", "s1", "s2", "s3"]
    for i, sid in enumerate(ids):
        make_slide(slides / f"{sid}.svs", tumour=i % 2 == 0, seed=40 + i)
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label\n" + "".join(f"{s},{['normal', 'tumour'][i % 2 == 0]}\n" for i, s in enumerate(ids)))
    wd = workdir(tmp_path)
    config = cohort_config(tmp_path, slides, labels)
    # one slide per features job but s0 and s1, which share a batch (wsi_asmil.features.batch)
    config["features"]["slides_per_job"] = 1
    out = Path(config["out_dir"])
    targets = [*train_targets(out), str(out / "report" / "metrics.json")]
    start = time.monotonic()

    # 1. SIGKILL the tiling job of s1 (store complete under its temporary name) and the features job
    #    of s2 (half its rows written). Snakemake survives, records both failures, and keeps going:
    #    s3's features are written; s0's wait for its batch-mate s1's tiles.
    first = snakemake(wd, config, *targets, check=False, env=hook_env(
        WSI_ASMIL_KILL_BEFORE_RENAME=f"/{TILING}/s1.zarr", WSI_ASMIL_KILL_AFTER_ROWS="s2.zarr:4"))
    assert first.returncode != 0
    assert not (out / "tiles" / TILING / "s1.zarr").exists()
    assert not (out / "features" / TILING / WORKFLOW_ENCODER / "s2.zarr").exists()
    assert (out / "features" / TILING / WORKFLOW_ENCODER / "s3.zarr").exists()  # the others finished
    assert not (out / "models").exists()

    # 2. Rerun; SIGKILL Snakemake and every job (the machine dies) once fold 1's model.pt is in place
    #    but its other outputs are not.
    second = snakemake(wd, config, *targets, check=False, env=hook_env(
        WSI_ASMIL_KILL_AFTER_RENAME="fold1/model.pt", WSI_ASMIL_KILL_GROUP="1"))
    assert second.returncode == -signal.SIGKILL
    fold1 = out / "models" / "abmil" / "fold1"
    assert (fold1 / "model.pt").exists() and not (fold1 / "metrics.json").exists()
    # nothing partial is taken as complete: Snakemake knows fold 1 is incomplete
    dry = snakemake(wd, config, *targets, "-n")
    assert "fold1" in dry.stdout + dry.stderr and "train" in planned(dry)

    # 3. The dead run's lock is left behind: a real rerun refuses until told the lock is stale.
    stale = snakemake(wd, config, *targets, check=False)
    assert stale.returncode != 0 and "--unlock" in stale.stdout + stale.stderr
    snakemake(wd, config, *targets, "--unlock")
    # 4. Rerun to completion; compare with an uninterrupted run of the same config.
    rerun = snakemake(wd, config, *targets)
    # only the killed jobs (fold 1, and fold 0 if it was running too) and what follows them
    assert set(planned(rerun)) == {"train", "report"}
    assert "Nothing to be done" in (lambda p: p.stdout + p.stderr)(snakemake(wd, config, *targets, "-n"))
    interrupted_seconds = time.monotonic() - start
    base_tmp = tmp_path / "baseline"
    base_tmp.mkdir()
    base_config = {**config, "out_dir": str(base_tmp / "out")}
    start = time.monotonic()
    snakemake(workdir(base_tmp), base_config, *train_targets(base_tmp / "out"), str(base_tmp / "out" / "report" / "metrics.json"))
    baseline_seconds = time.monotonic() - start
    got, want = _run_outputs(out, ids), _run_outputs(base_tmp / "out", ids)
    assert got.keys() == want.keys()
    for key in want:
        if isinstance(want[key], np.ndarray):
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
        else:
            assert got[key] == want[key], key
    print(f"interrupted runs {interrupted_seconds:.0f} s, uninterrupted {baseline_seconds:.0f} s")
