from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from hypothesis import given
from hypothesis import strategies as st

from wsi_asmil.core.devices import usable_cores
from wsi_asmil.features import store
from wsi_asmil.features.encoders import WeightsError, build_encoder
from wsi_asmil.features.extract import ChunkAlignedBatches, Embedder, extract_slide, fold_batchnorm, loader_settings
from wsi_asmil.features.extract import main as features_main
from wsi_asmil.features.tile import TileParams, tile_slide
from wsi_asmil.slides.slide import Slide
from wsi_asmil.tissue.segment import SegmentParams, segment_slide


class Payload:
    """A pickle that runs a shell command when unpickled: what an untrusted checkpoint can hide."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch '{self.marker}'",))


@pytest.fixture(scope="module")
def real_tiles(real_slide: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiles")
    segment_slide(real_slide, out / "seg", SegmentParams())
    tile_slide(real_slide, out / "seg", out / "tiles.zarr", out / "grid.png", TileParams())
    return out / "tiles.zarr"


def test_random_weights_are_seeded() -> None:
    a = build_encoder("resnet18", "random", seed=0)
    b = build_encoder("resnet18", "random", seed=0)
    c = build_encoder("resnet18", "random", seed=1)
    wa, wb, wc = (e.model.conv1.weight for e in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert a.dim == 512 and a.weights_id == "random(seed=0)"
    assert not any(p.requires_grad for p in a.model.parameters())


def test_batchnorm_folding_changes_results_only_at_rounding() -> None:
    enc = build_encoder("resnet18", "random")
    folded = fold_batchnorm(enc.model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in enc.model.modules())  # the encoder is untouched
    torch.manual_seed(0)
    x = torch.randn(4, 3, 224, 224)
    with torch.no_grad():
        np.testing.assert_allclose(folded(x).numpy(), enc.model(x).numpy(), rtol=1e-3, atol=1e-4)


def test_vit_small_dimension() -> None:
    enc = build_encoder("vit_small", "random")
    assert enc.dim == 384 and enc.spec.timm_name == "vit_small_patch16_224"
    out = Embedder(enc, torch.device("cpu"), bf16=False)(torch.zeros(2, 224, 224, 3, dtype=torch.uint8))
    assert out.shape == (2, 384)


def test_local_weights_file_loaded_and_hashed(tmp_path: Path) -> None:
    torch.manual_seed(7)
    source = timm.create_model("resnet18", num_classes=10)
    state = {f"module.{k}": v for k, v in source.state_dict().items()}  # DDP-style prefix
    path = tmp_path / "weights.pth"
    torch.save({"state_dict": state}, path)
    enc = build_encoder("resnet18", str(path))
    assert torch.equal(enc.model.conv1.weight, source.conv1.weight)
    assert enc.weights_id.startswith("sha256:") and len(enc.weights_id) == 7 + 64


def test_weights_errors_name_the_config_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(WeightsError, match="features.weights"):
        build_encoder("resnet18", str(tmp_path / "missing.pth"))
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, wrong)
    with pytest.raises(WeightsError, match="lacks"):
        build_encoder("resnet18", str(wrong))
    unsafe = tmp_path / "unsafe.pth"
    marker = tmp_path / "pwned"
    torch.save({"state_dict": Payload(marker)}, unsafe)
    with pytest.raises(WeightsError, match="weights_only"):
        build_encoder("resnet18", str(unsafe))
    assert not marker.exists()  # the payload never ran
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as on an offline node
    with pytest.raises(WeightsError, match="features.weights"):
        build_encoder("resnet18", "hub")


def test_extract_matches_direct_computation(real_slide: Path, real_tiles: Path, tmp_path: Path) -> None:
    enc = build_encoder("resnet18", "random")
    attrs = extract_slide(real_slide, real_tiles, tmp_path / "f.zarr", enc, "cpu", "fp32", batch_size=16, num_workers=0)
    feats, coords, stored = store.read_features(tmp_path / "f.zarr")
    tile_coords, _, _ = store.read_tiles(real_tiles)
    assert np.array_equal(coords, tile_coords)
    assert feats.shape == (len(coords), 512)
    assert stored["encoder"] == "resnet18" and stored["weights"] == "random(seed=0)"
    assert stored["precision"] == "fp32" and attrs["input_size"] == 224
    assert stored["norm_mean"] == [0.485, 0.456, 0.406] and stored["mpp"] == pytest.approx(0.499)
    # reference: read two tiles by hand, normalise on the CPU the textbook way, run the model
    with Slide(real_slide) as s:
        tiles = np.stack([s.read_at_mpp(int(x), int(y), 0.5, 224) for x, y in coords[[0, -1]]])
    x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = enc.model(x).numpy()
    np.testing.assert_allclose(feats[[0, -1]], ref.astype(np.float16), rtol=2e-3, atol=2e-3)


def test_workers_and_bf16_agree(real_slide: Path, real_tiles: Path, tmp_path: Path) -> None:
    enc = build_encoder("resnet18", "random")
    extract_slide(real_slide, real_tiles, tmp_path / "a.zarr", enc, "cpu", "fp32", 16, 0)
    extract_slide(real_slide, real_tiles, tmp_path / "b.zarr", enc, "cpu", "fp32", 7, 1)
    extract_slide(real_slide, real_tiles, tmp_path / "c.zarr", enc, "cpu", "bf16", 16, 0)
    a, b, c = (store.read_features(tmp_path / f"{n}.zarr")[0] for n in "abc")
    np.testing.assert_array_equal(a, b)
    cos = (a * c).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(c, axis=1))
    assert cos.min() > 0.98


def test_auto_loader_settings_follow_the_device() -> None:
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert loader_settings(gpu, 16, None, None) == (512, 15)  # every core but one reads for the GPU
    assert loader_settings(gpu, 1, None, None) == (512, 1)
    assert loader_settings(cpu, 8, None, None) == (64, 1)  # the encoder needs the cores itself
    assert loader_settings(cpu, 1, None, None) == (64, 0)
    assert loader_settings(gpu, 16, 100, 0) == (100, 0)  # numbers are kept as given
    assert loader_settings(cpu, 8, 7, 3) == (7, 3)


def test_command_line_with_auto_settings(real_slide: Path, real_tiles: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "f.zarr"
    threads = torch.get_num_threads()
    try:
        features_main(["--slide", str(real_slide), "--tiles", str(real_tiles), "--out", str(out), "--device", "cpu",
                       "--precision", "fp32", "--batch-size", "auto", "--num-workers", "auto", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    assert "batches of 64 tiles, 0 reader process(es), 1 torch thread(s)" in capsys.readouterr().err
    ref = tmp_path / "ref.zarr"
    extract_slide(real_slide, real_tiles, ref, build_encoder("resnet18", "random"), "cpu", "fp32", 16, 0)
    np.testing.assert_array_equal(store.read_features(out)[0], store.read_features(ref)[0])
    with pytest.raises(SystemExit):
        features_main(["--slide", str(real_slide), "--tiles", str(real_tiles), "--out", str(out), "--batch-size", "many"])


def test_empty_tile_set(real_slide: Path, tmp_path: Path) -> None:
    store.write_tiles(tmp_path / "t.zarr", np.zeros((0, 2)), np.zeros(0), {
        "slide_id": "cmu_small_region", "target_mpp": 0.5, "tile_size": 224, "read_level": 0, "tile_extent": 224.4,
    })
    extract_slide(real_slide, tmp_path / "t.zarr", tmp_path / "f.zarr", build_encoder("resnet18", "random"), "cpu", "fp32")
    feats, coords, _ = store.read_features(tmp_path / "f.zarr")
    assert feats.shape == (0, 512) and coords.shape == (0, 2)


def test_interrupted_extraction_leaves_only_hidden_progress(real_slide: Path, real_tiles: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "ROWS_PER_CHUNK", 16)
    enc = build_encoder("resnet18", "random")

    class Boom(torch.nn.Module):
        calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            Boom.calls += 1
            if Boom.calls > 4:
                raise RuntimeError("killed half way")
            return torch.zeros(len(x), 512)

    broken = type(enc)(Boom(), enc.name, enc.spec, enc.dim, enc.weights_id)
    with pytest.raises(RuntimeError, match="half way"):
        extract_slide(real_slide, real_tiles, tmp_path / "f.zarr", broken, "cpu", "fp32", 8, 0)
    assert [p.name for p in tmp_path.iterdir()] == [".f.zarr.partial"]  # nothing looks complete
    progress = json.loads((tmp_path / ".f.zarr.partial" / "progress.json").read_text())
    assert progress["rows_done"] == 16  # batches 1-2 form the first chunk; 3-4 were not checkpointed


def test_resume_skips_finished_chunks_and_equals_uninterrupted(real_slide: Path, real_tiles: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "ROWS_PER_CHUNK", 8)
    enc = build_encoder("resnet18", "random")
    calls: list[int] = []

    class Flaky(torch.nn.Module):
        def __init__(self, fail_at: int | None) -> None:
            super().__init__()
            self.fail_at = fail_at

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls.append(len(x))
            if self.fail_at is not None and len(calls) == self.fail_at:
                raise RuntimeError("node lost")
            return enc.model(x)

    extract_slide(real_slide, real_tiles, tmp_path / "ref.zarr", type(enc)(Flaky(None), enc.name, enc.spec, enc.dim, enc.weights_id), "cpu", "fp32", 4, 0)
    ref = store.read_features(tmp_path / "ref.zarr")[0]
    calls.clear()
    with pytest.raises(RuntimeError, match="node lost"):
        extract_slide(real_slide, real_tiles, tmp_path / "f.zarr", type(enc)(Flaky(7), enc.name, enc.spec, enc.dim, enc.weights_id), "cpu", "fp32", 4, 0)
    done = json.loads((tmp_path / ".f.zarr.partial" / "progress.json").read_text())["rows_done"]
    assert done == 16 and len(ref) > 24  # batches 1-4 were checkpointed, 5-6 not
    calls.clear()
    extract_slide(real_slide, real_tiles, tmp_path / "f.zarr", type(enc)(Flaky(None), enc.name, enc.spec, enc.dim, enc.weights_id), "cpu", "fp32", 4, 0)
    assert sum(calls) == len(ref) - done
    np.testing.assert_array_equal(store.read_features(tmp_path / "f.zarr")[0], ref)
    assert not (tmp_path / ".f.zarr.partial").exists()


def test_stale_progress_of_other_settings_is_discarded(real_slide: Path, real_tiles: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "ROWS_PER_CHUNK", 16)
    coords = store.read_tiles(real_tiles)[0]
    stale = store.PartialFeatures(tmp_path / "f.zarr", coords, 512, {}, fingerprint="other weights")
    stale.write_chunk(0, np.ones((16, 512)), [])
    enc = build_encoder("resnet18", "random")
    extract_slide(real_slide, real_tiles, tmp_path / "f.zarr", enc, "cpu", "fp32", 8, 0)
    extract_slide(real_slide, real_tiles, tmp_path / "ref.zarr", enc, "cpu", "fp32", 8, 0)
    np.testing.assert_array_equal(store.read_features(tmp_path / "f.zarr")[0], store.read_features(tmp_path / "ref.zarr")[0])


@given(
    n=st.integers(0, 200), batch=st.integers(1, 40), chunk=st.integers(1, 64), start_chunks=st.integers(0, 5)
)
def test_batches_cover_the_rest_and_never_straddle_a_chunk(n: int, batch: int, chunk: int, start_chunks: int) -> None:
    start = min(start_chunks * chunk, n)
    ranges = ChunkAlignedBatches(n, batch, chunk, start).ranges
    assert [i for a, b in ranges for i in range(a, b)] == list(range(start, n))
    for a, b in ranges:
        assert 0 < b - a <= batch and a // chunk == (b - 1) // chunk


def test_reads_are_direct_where_they_match_openslide(real_slide: Path, real_tiles: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    enc = build_encoder("resnet18", "random")
    direct = extract_slide(real_slide, real_tiles, tmp_path / "d.zarr", enc, "cpu", "fp32", 16, 0)
    slow = extract_slide(real_slide, real_tiles, tmp_path / "o.zarr", enc, "cpu", "fp32", 16, 0, reader="openslide")
    assert (direct["reader"], slow["reader"]) == ("jpeg-direct", "openslide")
    np.testing.assert_array_equal(store.read_features(tmp_path / "d.zarr")[0], store.read_features(tmp_path / "o.zarr")[0])
    # a direct decode that does not match OpenSlide's pixels is not used: the store says OpenSlide
    request.getfixturevalue("ycbcr_misdecode")
    guarded = extract_slide(real_slide, real_tiles, tmp_path / "g.zarr", enc, "cpu", "fp32", 16, 0)
    assert guarded["reader"] == "openslide"


def test_direct_reads_at_a_non_integer_downsample(tmp_path: Path) -> None:
    """A 4097 px wide scan has a 2.0005x level: OpenSlide resamples to sub-pixel origins there, the
    direct reader starts at whole pixels; it is still used, and the features barely differ."""
    from wsi_asmil.synthetic import SlideSpec, write_slide

    slide = tmp_path / "odd.svs"
    write_slide(slide, SlideSpec(4097, 3073, mpp=0.25, tumour=True, seed=4, tissue_coverage=0.7))
    segment_slide(slide, tmp_path / "seg", SegmentParams())
    tile_slide(slide, tmp_path / "seg", tmp_path / "t.zarr", tmp_path / "g.png", TileParams())
    coords, _, tattrs = store.read_tiles(tmp_path / "t.zarr")
    with Slide(slide) as s:
        assert tattrs["read_level"] == 1 and s.level_downsamples[1] != 2.0
    enc = build_encoder("resnet18", "random")
    direct = extract_slide(slide, tmp_path / "t.zarr", tmp_path / "d.zarr", enc, "cpu", "fp32", 16, 0)
    extract_slide(slide, tmp_path / "t.zarr", tmp_path / "o.zarr", enc, "cpu", "fp32", 16, 0, reader="openslide")
    assert direct["reader"] == "jpeg-direct" and len(coords) > 20
    a, b = store.read_features(tmp_path / "d.zarr")[0], store.read_features(tmp_path / "o.zarr")[0]
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() > 0.98


def test_feature_speed_benchmark_runs(tmp_path: Path) -> None:
    """benchmarks/feature_speed.py at toy size, so the unattended GPU run is not broken by a change here."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "feature_speed.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--work", str(tmp_path), "--size", "4096x3072", "--encoders", "resnet18",
         "--device", "cpu", "--threads", "1", "--batch-size", "8", "--clam-tiles", "8", "--check-tiles", "0", "--ceiling-seconds", "1"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "feature_speed.json").read_text())
    setup, run = results["setup"], results["resnet18"]
    assert setup["tiles"] > 0 and setup["reader"] == "jpeg-direct" and setup["workers"] == 0  # auto, one thread
    assert run["ours"]["tiles"] == setup["tiles"] and run["ours"]["peak_pss_mib"] > 0
    for figure in (results["decode_ceiling"], results["reader"], results["reader_openslide"], run["model_ceiling"],
                   run["ours"], run["clam_style"]):
        assert figure["tiles_per_s"] > 0
    assert run["speedup_vs_clam"] == run["ours"]["tiles_per_s"] / run["clam_style"]["tiles_per_s"]


def test_usable_cores_follow_the_cpu_affinity() -> None:
    """A Slurm job's cpuset, not the node's core count, decides the default threads and readers."""
    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no CPU affinity on this platform")
    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(before)})
        assert usable_cores() == 1
    finally:
        os.sched_setaffinity(0, before)
    assert usable_cores() == len(before)
