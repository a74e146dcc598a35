"""Out-of-core training: dask statistics, streamed bags with prefetching, and the memory budget.

The claim under test is that streaming is a speed setting only: a fold forced to stream by a tiny
``memory_budget`` trains to the very same numbers as the same fold held in memory.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import zarr
from conftest import witness_fold

from wsi_asmil.mil import epochs as epochs_module
from wsi_asmil.mil import evaluate as evaluate_module
from wsi_asmil.mil.bag_source import (
    BagReadError,
    InMemoryBags,
    StreamingBags,
    choose_source,
    feature_sums,
    parse_budget,
    scan_slides,
)
from wsi_asmil.mil.fold_data import load_bags, load_fold
from wsi_asmil.mil.map_store import MapStore
from wsi_asmil.mil.models.norm import FeatureNorm
from wsi_asmil.mil.train import train_fold

CPU = torch.device("cpu")


def write_store(path: Path, features: np.ndarray, chunk_rows: int) -> None:
    """A features store in store.py's layout, chunked by ``chunk_rows`` rows."""
    group = zarr.open_group(path, mode="w", zarr_format=3)
    m, d = features.shape
    group.create_array("features", data=features.astype(np.float16), chunks=(max(1, min(chunk_rows, m)), d))
    group.create_array("coords", data=np.zeros((m, 2), dtype=np.int64), chunks=(max(1, min(chunk_rows, m)), 2))
    group.attrs.update({"kind": "features", "feature_dim": d})


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], dict[str, str]]:
    """Eight slides of skewed, off-centre features over several Zarr chunks each, one empty slide."""
    root = tmp_path_factory.mktemp("stores")
    rng = np.random.default_rng(3)
    ids, labels = [], {}
    for i in range(8):
        m = int(rng.integers(1, 700))
        x = rng.gamma(2.0, 3.0, size=(m, 24)) - 4.0 + 50.0 * (i % 3)
        write_store(root / f"s{i}.zarr", x, chunk_rows=97)
        ids.append(f"s{i}")
        labels[f"s{i}"] = "ab"[i % 2]
    write_store(root / "empty.zarr", np.zeros((0, 24)), chunk_rows=97)
    labels["empty"] = "a"
    return root, ids + ["empty"], labels


def test_dask_statistics_equal_the_in_memory_ones(stores) -> None:
    """The sums dask computes over the stores give the standardisation FeatureNorm.fit computes
    from the bags in memory, bit for bit (same float64 reduction per slide, same slide order)."""
    root, ids, labels = stores
    entries, skipped = scan_slides(root, ids, labels, ["a", "b"])
    assert skipped == ["empty"] and [e.slide_id for e in entries] == ids[:-1]
    bags, _ = load_bags(root, ids, labels, ["a", "b"], CPU)
    in_memory, from_stores = FeatureNorm(24), FeatureNorm(24)
    in_memory.fit([b.features for b in bags])
    s, ss, n = feature_sums(entries)
    from_stores.fit_sums(s, ss, n)
    assert n == sum(len(b.features) for b in bags)
    assert torch.equal(in_memory.mean, from_stores.mean) and torch.equal(in_memory.std, from_stores.std)
    everything = torch.cat([b.features for b in bags]).double()  # an independent reference
    torch.testing.assert_close(from_stores.mean.double(), everything.mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(from_stores.std.double(), everything.std(0, unbiased=False), rtol=1e-5, atol=1e-6)
    assert (from_stores.std > 1).all()  # not the identity the module starts as


def test_streaming_bags_equal_the_in_memory_bags_in_any_order(stores) -> None:
    root, ids, labels = stores
    entries, _ = scan_slides(root, ids, labels, ["a", "b"])
    memory = InMemoryBags(load_bags(root, ids, labels, ["a", "b"], CPU)[0], entries)
    stream = StreamingBags(entries, CPU, torch.float32, prefetch=1)
    order = [5, 0, 5, 7, 2]
    for a, b in zip(memory.iterate(order), stream.iterate(order), strict=True):
        assert (a.slide_id, a.label) == (b.slide_id, b.label)
        assert torch.equal(a.features, b.features) and torch.equal(a.target, b.target)
    assert [b.slide_id for b in stream] == [e.slide_id for e in entries]


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "bag-prefetch"]


def test_a_store_lost_while_streaming_names_the_slide_and_stops_the_reader(stores, tmp_path: Path) -> None:
    root, ids, labels = stores
    copy = tmp_path / "features"
    shutil.copytree(root, copy)
    entries, _ = scan_slides(copy, ids, labels, ["a", "b"])
    shutil.rmtree(copy / "s3.zarr")
    (copy / "s5.zarr" / "features" / "zarr.json").write_text("{not json")
    stream = StreamingBags(entries, CPU, torch.float32)
    seen = []
    with pytest.raises(BagReadError, match=r"slide 's3'.*s3\.zarr") as err:
        for bag in stream.iterate(range(len(entries))):
            seen.append(bag.slide_id)
    assert seen == ["s0", "s1", "s2"]  # every bag before the lost one arrived, in order
    assert isinstance(err.value.__cause__, FileNotFoundError)
    with pytest.raises(BagReadError, match=r"slide 's5'"):
        list(stream.iterate([5]))
    assert not _prefetch_threads()


def test_leaving_an_iteration_early_stops_the_reader(stores) -> None:
    root, ids, labels = stores
    entries, _ = scan_slides(root, ids, labels, ["a", "b"])
    stream = StreamingBags(entries, CPU, torch.float32, prefetch=1)
    bags = stream.iterate(list(range(len(entries))) * 20)  # far more than the queue holds
    assert next(bags).slide_id == "s0"
    assert _prefetch_threads()  # reading ahead
    bags.close()
    assert not _prefetch_threads()


@pytest.mark.parametrize(("value", "expected"), [
    ("auto", None), (0, 0), (1_000_000, 1_000_000), ("2GiB", 2 * 2**30), ("1.5 GB", 1_500_000_000),
    ("512mib", 512 * 2**20), ("100", 100), ("7b", 7),
])
def test_memory_budget_values(value: object, expected: int | None) -> None:
    assert parse_budget(value) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["lots", "-1GiB", "1 PB", True, -5])
def test_a_bad_memory_budget_names_the_key(value: object) -> None:
    with pytest.raises(ValueError, match="train.memory_budget"):
        parse_budget(value)  # type: ignore[arg-type]


def test_the_budget_decides_in_the_training_dtype(stores) -> None:
    root, ids, labels = stores
    entries, _ = scan_slides(root, ids, labels, ["a", "b"])
    tiles = sum(e.n_tiles for e in entries)
    fits = choose_source(entries, CPU, torch.float32, tiles * 24 * 4)
    assert fits["mode"] == "memory" and fits["feature_bytes"] == tiles * 24 * 4
    assert choose_source(entries, CPU, torch.float32, tiles * 24 * 4 - 1)["mode"] == "stream"
    assert choose_source(entries, CPU, torch.float16, tiles * 24 * 2)["mode"] == "memory"  # float16 on CUDA
    assert "exceed" in choose_source(entries, CPU, torch.float32, "1KiB")["reason"]
    assert choose_source(entries, CPU, torch.float32, "auto")["mode"] == "memory"  # a few KiB always fit


@pytest.fixture(scope="module")
def witness(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A small witness cohort: stores with per-tile truth, so attention outputs are checked too."""
    from wsi_asmil.synthetic.witness import WitnessSpec

    spec = WitnessSpec(n_bags=20, bag_size=(20, 80), witness_rate=(0.1, 0.2), feature_dim=16, seed=1)
    return witness_fold(tmp_path_factory.mktemp("witness"), spec, n_train=12, n_val=4)


def test_load_fold_streams_over_budget(witness) -> None:
    features_dir, split = witness
    memory = load_fold(features_dir, split, 0, CPU, memory_budget="1GiB")
    stream = load_fold(features_dir, split, 0, CPU, memory_budget=1)
    assert memory.source["mode"] == "memory" and stream.source["mode"] == "stream"
    assert all(isinstance(memory.bags[p], InMemoryBags) for p in memory.bags)
    assert all(isinstance(stream.bags[p], StreamingBags) for p in stream.bags)
    assert stream.in_dim == memory.in_dim == 16 and stream.classes == memory.classes


@pytest.mark.parametrize(("model", "params"), [
    ("asmil", {"max_tiles": 30}),  # anchor, token dropout and tile subsets: every random number
    ("acmil", {}),  # branch masking, auxiliary loss
])
def test_a_tiny_budget_streams_and_trains_to_identical_results(
    witness, tmp_path: Path, model: str, params: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same seed, same CPU: the streamed fold's loss curve, metrics, predictions, attention outputs
    and weights equal the in-memory fold's exactly. The streamed fold keeps each epoch's attention
    maps on disk (in $TMPDIR, removed at the end), and gathers them from the device in small groups."""
    features_dir, split = witness
    params = {"epochs": 3, "lr": 2e-3, "seed": 5, **params}
    scratch = tmp_path / "tmpdir"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    folders: dict[str, list[Path | None]] = {}

    class RecordingStore(MapStore):
        def __init__(self, folder: Path | None = None) -> None:
            super().__init__(folder)
            folders.setdefault(budget, []).append(folder)

    monkeypatch.setattr(epochs_module, "MapStore", RecordingStore)
    runs = {}
    for budget in ("auto", "1KiB"):
        out = tmp_path / budget
        if budget == "1KiB":
            monkeypatch.setattr(evaluate_module, "EVAL_GATHER_ELEMENTS", 1)  # one slide per copy to the host
        train_fold(features_dir, split, 0, model, {**params, "memory_budget": budget}, out, "cpu")
        runs[budget] = out
    memory, stream = runs["auto"], runs["1KiB"]
    assert folders["auto"] == [None] * 3
    assert len(folders["1KiB"]) == 3 and all(f is not None and scratch in f.parents for f in folders["1KiB"])
    assert not list(scratch.glob("wsi-asmil-attention-maps-*"))
    for name in ("history.csv", "predictions.csv", "attention.csv", "instability.csv"):
        assert (memory / name).read_text() == (stream / name).read_text(), name
    history = pd.read_csv(stream / "history.csv")
    assert history["train_loss"].nunique() == 3  # a real curve, not a constant
    assert history["jsd"].isna().tolist() == [True, False, False] and (history["jsd"][1:] > 0).all()
    m, s = (json.loads((run / "metrics.json").read_text()) for run in (memory, stream))
    assert m.pop("features_source")["mode"] == "memory"
    assert s.pop("features_source") == {"mode": "stream", "budget": "1KiB", "feature_bytes": m_bytes(features_dir, split)}
    assert m == s
    a, b = (torch.load(run / "model.pt", weights_only=True)["state_dict"] for run in (memory, stream))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    attention = pd.read_csv(stream / "attention.csv")
    assert attention["n_positive"].notna().all() and attention["n_positive"].sum() > 0


def m_bytes(features_dir: Path, split: dict) -> int:
    """float32 bytes of every tile of the fold's slides."""
    fold = split["folds"][0]
    ids = fold["train"] + fold["val"] + fold["test"]
    return sum(int(np.prod(zarr.open_group(features_dir / f"{i}.zarr", mode="r")["features"].shape)) for i in ids) * 4


def test_the_command_line_budget_overrides_params(witness, tmp_path: Path) -> None:
    from wsi_asmil.mil.train import main

    features_dir, split = witness
    split_path = tmp_path / "split.json"
    split_path.write_text(json.dumps(split))
    main(["--features-dir", str(features_dir), "--split", str(split_path), "--fold", "0", "--model", "abmil",
          "--params", json.dumps({"epochs": 1, "memory_budget": "auto"}), "--out-dir", str(tmp_path / "m"),
          "--device", "cpu", "--memory-budget", "0"])
    assert json.loads((tmp_path / "m" / "metrics.json").read_text())["features_source"]["mode"] == "stream"


def test_train_memory_benchmark_runs(tmp_path: Path) -> None:
    """benchmarks/train_memory.py at toy size, so the large unattended run is not broken by a change here."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "train_memory.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--scratch", str(tmp_path), "--fits-slides", "10", "--large-slides", "20",
         "--tiles", "100", "--dim", "16", "--budget", "1KiB", "--epochs", "2", "--threads", "1",
         "--json", str(tmp_path / "rows.json")],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [(r["cohort"], r["budget"], r["mode"]) for r in rows] == [
        ("fits", "auto", "memory"), ("fits", "0", "stream"), ("large", "1KiB", "stream"), ("large", "auto", "memory")]
    assert rows[0]["losses"] == rows[1]["losses"] and rows[2]["losses"] == rows[3]["losses"]
    assert all(len(r["epoch_s"]) == 2 and r["peak_rss"] > 0 and r["feature_bytes"] > 0 for r in rows)
    assert "same losses streamed and in memory: True" in proc.stdout
