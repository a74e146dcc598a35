"""A full disk is named wherever it strikes, and a run that will not fit stops before its first job.

The writers are tested on a real full filesystem: a 2 MiB tmpfs mounted for the test (root only, as
in CI), so each library fails the way it does in production (torch's checkpoint writer with its
"unexpected pos" RuntimeError, Zarr, OpenCV's encoder via the atomic writer, tifffile, Deep Zoom
folders). Without root the same checks run against an injected ENOSPC.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from wsi_asmil.core import disk
from wsi_asmil.core.disk import DiskFullError, is_disk_full
from wsi_asmil.core.io import atomic_path, write_csv, write_image, write_json
from wsi_asmil.features import store
from wsi_asmil.maps.deepzoom import Pyramid, write_dzi
from wsi_asmil.mil.models import build_model, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs, nearly filled; unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], check=True)
    try:
        (mnt / "ballast").write_bytes(b"\0" * (MiB + MiB // 2))  # leave about half a MiB
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _big_state() -> dict[str, torch.Tensor]:
    return build_model("abmil", 1024, 2, inner_dim=512).state_dict()  # ~2 MiB of float32


WRITERS: dict[str, Callable[[Path], Path]] = {}


def writer(name: str) -> Callable[[Callable[[Path], Path]], Callable[[Path], Path]]:
    def register(fn: Callable[[Path], Path]) -> Callable[[Path], Path]:
        WRITERS[name] = fn
        return fn
    return register


@writer("torch checkpoint")
def _checkpoint(d: Path) -> Path:
    path = d / "model.pt"
    save_checkpoint(path, _big_state(), model_name="abmil", model_kwargs={"inner_dim": 512}, classes=["a", "b"],
                    in_dim=1024, epoch=1, params={})
    return path


@writer("features store (zarr)")
def _features(d: Path) -> Path:
    path = d / "slide.zarr"
    rng = np.random.default_rng(0)
    coords = np.zeros((2000, 2), dtype=np.int64)
    with store.feature_writer(path, coords, 512, {"slide_id": "slide"}) as w:
        w.write(0, rng.normal(size=(2000, 512)).astype(np.float32))
    return path


@writer("resumable features scratch")
def _partial(d: Path) -> Path:
    final = d / "slide.zarr"
    rng = np.random.default_rng(0)
    partial = store.PartialFeatures(final, np.zeros((5000, 2), dtype=np.int64), 512, {}, "fp")
    for start in range(0, 5000, partial.chunk_rows):
        rows = min(partial.chunk_rows, 5000 - start)
        partial.write_chunk(start, rng.normal(size=(rows, 512)).astype(np.float32), [])
    partial.finish()
    return final


@writer("tiles store")
def _tiles(d: Path) -> Path:
    path = d / "tiles.zarr"
    rng = np.random.default_rng(0)
    store.write_tiles(path, rng.integers(0, 2**40, size=(200_000, 2)), rng.random(200_000), {})
    return path


@writer("PNG image")
def _png(d: Path) -> Path:
    path = d / "heatmap.png"
    write_image(path, np.random.default_rng(0).integers(0, 255, size=(800, 800, 3), dtype=np.uint8))
    return path


@writer("CSV")
def _csv(d: Path) -> Path:
    path = d / "attention.csv"
    write_csv(path, pd.DataFrame(np.random.default_rng(0).random((50_000, 4))))
    return path


@writer("JSON")
def _json(d: Path) -> Path:
    path = d / "metrics.json"
    write_json(path, {"values": np.random.default_rng(0).random(100_000).tolist()})
    return path


@writer("TIFF (tifffile)")
def _tiff(d: Path) -> Path:
    import tifffile

    path = d / "overlay.tif"
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp) as tw:
        tw.write(np.random.default_rng(0).integers(0, 255, size=(1024, 1024, 3), dtype=np.uint8), tile=(256, 256))
    return path


@writer("Deep Zoom pyramid")
def _dzi(d: Path) -> Path:
    path = d / "viewer_slide"
    rng = np.random.default_rng(0)
    with atomic_path(path) as tmp:
        tmp.mkdir()
        write_dzi(tmp, "slide", Pyramid(1500, 1500), lambda g: rng.integers(0, 255, (*g.shape, 3), dtype=np.uint8),
                  "png")
    return path


def _nothing_left(folder: Path, final: Path) -> None:
    assert not final.exists()
    leftovers = [p.name for p in folder.iterdir() if p.name != "ballast"]
    assert not [n for n in leftovers if ".tmp-" in n or n == final.name], leftovers


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_every_writer_names_a_full_disk(name: str, full_disk: Path) -> None:
    target = full_disk / "out"
    target.mkdir()
    final = {"torch checkpoint": "model.pt", "features store (zarr)": "slide.zarr",
             "resumable features scratch": "slide.zarr", "tiles store": "tiles.zarr", "PNG image": "heatmap.png",
             "CSV": "attention.csv", "JSON": "metrics.json", "TIFF (tifffile)": "overlay.tif",
             "Deep Zoom pyramid": "viewer_slide"}[name]
    with pytest.raises(DiskFullError) as caught:
        WRITERS[name](target)
    message = str(caught.value)
    named = target / (f".{final}.partial" if name == "resumable features scratch" else final)
    assert message.startswith(f"no space left on {full_disk} writing {named} (") and message.endswith(" free)")
    assert caught.value.errno == errno.ENOSPC
    if name == "resumable features scratch":
        # the hidden scratch stays for the resume, and counts only the chunks that landed
        progress = json.loads((named / "progress.json").read_text())
        assert 0 <= progress["rows_done"] < 5000 and progress["rows_done"] % 4096 == 0
        named.rename(full_disk / "kept_scratch")
    _nothing_left(target, target / final)


def test_the_same_writers_have_room_on_a_roomy_disk(tmp_path: Path) -> None:
    """The writers above fail only for lack of space: each succeeds where there is room."""
    for name, write in WRITERS.items():
        folder = tmp_path / name.replace(" ", "_")
        folder.mkdir()
        assert write(folder).exists(), name


def test_a_full_disk_keeps_the_previous_output_and_says_what_is_free(tmp_path: Path, monkeypatch) -> None:
    """Injected ENOSPC (any machine): the earlier complete file survives, the temporary goes."""
    path = tmp_path / "metrics.json"
    write_json(path, {"old": 1})
    monkeypatch.setattr(disk, "free_bytes", lambda p: 1536)
    with pytest.raises(DiskFullError, match=r"writing .*metrics.json \(1.5 KB free\)"):
        with atomic_path(path) as tmp:
            tmp.write_text("partial")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert json.loads(path.read_text()) == {"old": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_what_counts_as_a_full_disk(tmp_path: Path, monkeypatch) -> None:
    assert is_disk_full(OSError(errno.ENOSPC, "full"), tmp_path)
    assert is_disk_full(OSError(errno.EDQUOT, "quota"), tmp_path)
    assert not is_disk_full(OSError(errno.EACCES, "denied"), tmp_path)
    assert not is_disk_full(ValueError("bad"), tmp_path)
    wrapped = RuntimeError("wrapper")
    wrapped.__cause__ = OSError(errno.ENOSPC, "full")
    assert is_disk_full(wrapped, tmp_path)
    torch_error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 60791616 vs 60791504")
    monkeypatch.setattr(disk, "free_bytes", lambda p: 10 * 2**20)
    assert is_disk_full(torch_error, tmp_path)  # a short write with 10 MB left: the disk was full
    monkeypatch.setattr(disk, "free_bytes", lambda p: 100 * 2**30)
    assert not is_disk_full(torch_error, tmp_path)  # with 100 GB free it is some other failure


def _snakemake(out_dir: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    small = out_dir.parent / "small_demo.yaml"
    small.write_text("demo: {n_slides: 4}\n")
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "--cores", "1", "--configfile", str(small), "--config",
         f"out_dir={out_dir}", f"disk_check={str(check).lower()}", *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )


def test_a_run_that_will_not_fit_stops_before_its_first_job(full_disk: Path) -> None:
    out = full_disk / "run"
    dry = _snakemake(out, "-n")
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert "wsi-asmil: disk plan for" in dry.stderr and "still to write: short" in dry.stderr  # shown by -n
    real = _snakemake(out)
    assert real.returncode != 0
    assert "not enough disk: the run needs about" in real.stderr and f"on {full_disk}" in real.stderr
    assert "disk_check=false" in real.stderr and "heatmap.overlap" in real.stderr
    assert not out.exists() or not any(out.rglob("*.svs"))  # no job ran: not even the demo's slides

    forced = _snakemake(out, check=False)  # told to go on: the first writer names the full disk
    assert forced.returncode != 0
    logs = "".join(p.read_text() for p in (out / "logs").rglob("*.log"))
    assert f"DiskFullError: no space left on {full_disk} writing {out}/demo/" in logs


def _plan_config() -> dict:
    import yaml

    return yaml.safe_load((ROOT / "config.yaml").read_text())


def test_the_plan_counts_a_real_cohort_from_thumbnails_then_from_what_the_run_wrote(demo_slides, real_slide,
                                                                                   tmp_path: Path) -> None:
    """Before segmentation, tiles come from segmented thumbnails; once a slide is tiled, from its
    store, exactly; a slide that cannot be opened costs the plan nothing but a note."""
    from wsi_asmil.core.run_layout import RunLayout
    from wsi_asmil.features.tile import TileParams, tile_slide
    from wsi_asmil.pipeline.disk_plan import plan_run, sampled_sizes
    from wsi_asmil.tissue.segment import SegmentParams, segment_slide

    config = _plan_config()
    slides = {**{k: str(v) for k, v in demo_slides.items()}, "cmu": str(real_slide)}
    grids = {TileParams().tag(): TileParams(), TileParams(overlap=0.5).tag(): TileParams(overlap=0.5)}
    layout = RunLayout(str(tmp_path / "out"), TileParams().tag(), "efficientnet_lite0")
    before, notes = sampled_sizes(slides, layout, grids, config["segment"], {}, None)
    assert {s.source for s in before} == {"sampled"} and "not segmented yet" in notes[0]

    sid = sorted(demo_slides)[0]
    segment_slide(demo_slides[sid], layout.segment(sid), SegmentParams(**config["segment"]))
    masked = {s.slide_id: s for s in sampled_sizes(slides, layout, grids, config["segment"], {}, None)[0]}
    assert masked[sid].source == "mask"
    for tag, params in grids.items():
        tiled = RunLayout(layout.root, tag, layout.encoder)
        info = tile_slide(demo_slides[sid], layout.segment(sid), tiled.tiles(sid), tmp_path / f"{tag}.png", params)
        assert masked[sid].tiles[tag] == info["n_tiles"]  # the mask gives the tiling's own count
    after = {s.slide_id: s for s in sampled_sizes(slides, layout, grids, config["segment"], {}, None)[0]}
    assert after[sid].source == "tiles" and after[sid].tiles == masked[sid].tiles

    plan = plan_run(config, layout, slides, sorted(slides), grids, ["asmil"], 4)
    features = next(s for s in plan.stages if s.name == "features")
    assert features.estimate > 0 and plan.verdict() == "ok"
    assert "uncompressed" not in " ".join(plan.notes)  # efficientnet_lite0's ratio is known


def test_a_short_or_tight_disk_is_refused_or_warned_with_the_keys_that_shrink_it() -> None:
    from wsi_asmil.pipeline.disk_plan import DiskPlan, DiskShortError, Stage, check

    stages = [Stage("features", ("features",), 900 * MiB), Stage("models", ("models",), 100 * MiB, written=40 * MiB)]
    short = DiskPlan(stages, "/data/run", free=500 * MiB, filesystem="/data")
    assert short.needed == 960 * MiB and short.verdict() == "short"
    with pytest.raises(DiskShortError, match=r"needs about 960.0 MB more on /data \(for /data/run\) and 500.0 MB "
                                             r"is free.*features: features.encoder.*models: train.models.*disk_check=false"):
        check(short)
    assert check(short, enabled=False) is None
    tight = DiskPlan(stages, "/data/run", free=1000 * MiB, filesystem="/data")
    assert tight.verdict() == "tight" and "only 40.0 MB free on /data" in check(tight)
    roomy = DiskPlan(stages, "/data/run", free=100 * 1024 * MiB, filesystem="/data", scratch_need=5 * MiB,
                     scratch_free=MiB, scratch_dir="/tmp")
    with pytest.raises(DiskShortError, match="training needs about 5.0 MB of scratch in /tmp"):
        check(roomy)


def test_a_large_store_is_foreseen_from_the_compression_of_small_ones(tmp_path: Path) -> None:
    """The plan measures the features' compression on the run's first stores and extrapolates to
    slides of any size: a 20,000-tile store lands within 20 % of the estimate made from 64-tile
    stores (post-activation-like features: sparse, skewed, in float16)."""
    from wsi_asmil.pipeline.disk_plan import _store_stats, du, store_bytes

    rng = np.random.default_rng(0)

    def features(n: int) -> np.ndarray:
        x = rng.gamma(0.6, 0.5, size=(n, 256)).astype(np.float32)
        x[rng.random(x.shape) < 0.3] = 0.0  # post-ReLU zeros
        return x

    small = tmp_path / "small"
    for i in range(8):
        with store.feature_writer(small / f"s{i}.zarr", rng.integers(0, 10**6, (64, 2)), 256, {}) as w:
            w.write(0, features(64))
    dim, ratio = _store_stats(small)
    assert dim == 256 and 0.3 < ratio < 1.0
    big = tmp_path / "big.zarr"
    with store.feature_writer(big, rng.integers(0, 10**6, (20_000, 2)), 256, {}) as w:
        for start in range(0, 20_000, 5_000):
            w.write(start, features(5_000))
    assert store_bytes(20_000, 256, ratio) == pytest.approx(du(big), rel=0.2)
