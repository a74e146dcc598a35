"""Batched feature jobs: stable membership, skipping current stores without torch, one failing
slide among several, and reruns that redo only what is missing or stale."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from wsi_asmil.features import store
from wsi_asmil.features.batch import (
    assign_batches,
    batch_index,
    main,
    members_json,
    n_batches,
    parse_members,
    report_path,
    slides_per_job,
)
from wsi_asmil.features.tile import TileParams, tile_slide
from wsi_asmil.tissue.segment import SegmentParams, segment_slide

REPO = Path(__file__).resolve().parents[1]
#: A tiny timm network with random weights: these tests are about bookkeeping, not features.
ENCODER = ["--encoder", "test_resnet", "--weights", "random", "--device", "cpu", "--threads", "1", "--num-workers", "0"]


def test_slides_per_job_auto_depends_on_the_device() -> None:
    assert slides_per_job("auto", "cpu") == 8
    assert slides_per_job("auto", "auto") == slides_per_job("auto", "cuda:1") == 32
    assert slides_per_job(5, "cpu") == 5
    with pytest.raises(ValueError, match="features.slides_per_job"):
        slides_per_job(0, "cpu")


@given(st.integers(1, 5000), st.integers(1, 64))
def test_batch_count_is_a_power_of_two_that_averages_at_most_slides_per_job(n: int, per_job: int) -> None:
    k = n_batches(n, per_job)
    assert k & (k - 1) == 0
    assert n / k <= per_job
    if k > 1:
        assert n / k > per_job / 2


def test_adding_a_slide_changes_one_batch_until_the_cohort_doubles() -> None:
    ids = [f"slide {i:03d}" for i in range(100)]
    before = assign_batches(ids, 8)
    assert len(before) == 16  # 100 / 8 -> 13 batches needed -> 16
    assert sorted(s for members in before.values() for s in members) == sorted(ids)
    after = assign_batches([*ids, "added é"], 8)
    changed = [b for b in after if after[b] != before.get(b)]
    assert len(changed) == 1 and "added é" in after[changed[0]]
    assert set(before) <= set(after)
    # Past 128 slides the count doubles: every batch is re-formed (once) under new names.
    grown = assign_batches([f"slide {i:03d}" for i in range(129)], 8)
    assert len(grown) == 32 and not set(grown) & set(before)


def test_membership_does_not_depend_on_the_python_process() -> None:
    ids = [f"s{i}" for i in range(50)]
    code = "import json, sys; from wsi_asmil.features.batch import assign_batches; print(json.dumps(assign_batches(json.loads(sys.argv[1]), 4)))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code, json.dumps(ids)], capture_output=True, text=True, env=env, check=True)
    assert json.loads(out.stdout) == assign_batches(ids, 4)
    assert batch_index("s1", 1) == 0


def test_members_round_trip_and_duplicates_are_refused() -> None:
    text = members_json(["a b", "é"], lambda s: f"/s/{s}.svs", lambda s: f"/t/{s}", lambda s: f"/f/{s}", {"é": 0.25})
    members = parse_members(text)
    assert [(m.slide_id, m.slide, m.slide_mpp) for m in members] == [("a b", "/s/a b.svs", None), ("é", "/s/é.svs", 0.25)]
    with pytest.raises(ValueError, match="duplicate"):
        parse_members(json.dumps([json.loads(text)[0]] * 2))
    with pytest.raises(ValueError, match="--members"):
        parse_members("{not json")


@pytest.fixture(scope="module")
def cohort(demo_slides: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Three slides (one under an awkward name) with their tiles stores: slide id -> (slide, tiles)."""
    tmp = tmp_path_factory.mktemp("batch-cohort")
    out = {}
    for name, src in zip(["a", "b", "c é"], sorted(demo_slides.values())):
        slide = tmp / f"{name}.svs"
        shutil.copy(src, slide)
        segment_slide(slide, tmp / "seg" / name, SegmentParams())
        tile_slide(slide, tmp / "seg" / name, tmp / "tiles" / f"{name}.zarr", tmp / f"{name}_grid.png", TileParams())
        out[name] = (slide, tmp / "tiles" / f"{name}.zarr")
    return out


def run(members: str, marker: Path, *extra: str) -> int:
    try:
        main(["--members", members, "--marker", str(marker), *ENCODER, *extra])
    except SystemExit as exc:
        return int(exc.code)
    return 0


def test_a_failing_slide_fails_alone_and_a_rerun_redoes_only_it(cohort: dict, tmp_path: Path) -> None:
    feats = tmp_path / "features"
    members = members_json(cohort, lambda s: cohort[s][0], lambda s: cohort[s][1], lambda s: feats / f"{s}.zarr", {})
    marker = feats / "batches" / "0-of-1.json"
    bad_slide = cohort["b"][0]
    good_bytes = bad_slide.read_bytes()
    bad_slide.write_bytes(b"not a slide")  # after tiling: the features job is the first to trip on it
    try:
        assert run(members, marker) == 1
    finally:
        bad_slide.write_bytes(good_bytes)
    assert not marker.exists()  # an incomplete batch has no marker, so Snakemake reruns it
    errors = json.loads(report_path(marker).read_text())
    assert errors["failed"] == ["b"]
    assert "b" in errors["members"]["b"]["error"]
    assert {s: r["status"] for s, r in errors["members"].items()} == {"a": "done", "b": "failed", "c é": "done"}
    assert not (feats / "b.zarr").exists()
    written = {s: (feats / f"{s}.zarr" / "zarr.json").stat().st_mtime_ns for s in ("a", "c é")}
    coords, _, _ = store.read_tiles(cohort["a"][1])
    feat_a, fcoords, attrs = store.read_features(feats / "a.zarr")
    assert feat_a.shape[0] == len(coords) > 0 and np.array_equal(fcoords, coords) and attrs["request"]

    assert run(members, marker) == 0
    done = json.loads(marker.read_text())["members"]
    assert {s: r["status"] for s, r in done.items()} == {"a": "current", "b": "done", "c é": "current"}
    assert {s: (feats / f"{s}.zarr" / "zarr.json").stat().st_mtime_ns for s in ("a", "c é")} == written
    assert not report_path(marker).exists()
    assert store.read_features(feats / "b.zarr")[0].shape[0] == len(store.read_tiles(cohort["b"][1])[0])

    # Everything current: the job ends before importing torch or building the model.
    code = (
        "import sys; from wsi_asmil.features.batch import main; "
        "main(sys.argv[1:]); assert 'torch' not in sys.modules, 'torch imported'"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, "--members", members, "--marker", str(marker), *ENCODER],
        capture_output=True, text=True, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    assert "3 already current" in proc.stderr
    assert {s: (feats / f"{s}.zarr" / "zarr.json").stat().st_mtime_ns for s in ("a", "c é")} == written

    # A result-changing setting makes every store stale: removed, then rebuilt under the new request.
    assert run(members, marker, "--seed", "1") == 0
    rebuilt = json.loads(marker.read_text())["members"]
    assert {r["status"] for r in rebuilt.values()} == {"done"}
    assert all(rebuilt[s]["fingerprint"] != done[s]["fingerprint"] for s in done)
    assert not np.array_equal(store.read_features(feats / "a.zarr")[0], feat_a)


def test_a_missing_tiles_store_is_a_failed_member_named_in_the_record(cohort: dict, tmp_path: Path) -> None:
    ids = ["a", "gone"]
    members = members_json(
        ids, lambda s: cohort["a"][0], lambda s: cohort["a"][1] if s == "a" else tmp_path / "none.zarr",
        lambda s: tmp_path / f"{s}.zarr", {},
    )
    marker = tmp_path / "batches" / "0-of-1.json"
    assert run(members, marker) == 1
    errors = json.loads(report_path(marker).read_text())
    assert errors["failed"] == ["gone"] and "gone" in errors["members"]["gone"]["error"]
    assert errors["members"]["a"]["status"] == "done"
