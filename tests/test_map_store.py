"""MapStore: one epoch's attention maps, in memory or on disk, read back as they were written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from wsi_asmil.mil.map_store import MapStore
from wsi_asmil.mil.metrics import mean_jsd


def maps(seed: int, r: int = 4, m: int = 50) -> np.ndarray:
    z = np.random.default_rng(seed).standard_normal((r, m)).astype(np.float32)
    return np.exp(z) / np.exp(z).sum(-1, keepdims=True)


@pytest.mark.parametrize("on_disk", [False, True])
def test_maps_read_back_as_written(tmp_path: Path, on_disk: bool) -> None:
    store = MapStore(tmp_path / "epoch1" if on_disk else None)
    written = {"a/b": maps(0), "TCGA 01:..": maps(1, m=7), "c": maps(2, r=1)}  # any slide id
    for slide_id, value in written.items():
        store.put(slide_id, value)
    assert store.on_disk == on_disk and list(store) == list(written) and len(store) == 3
    for slide_id, value in written.items():
        got = store[slide_id]
        assert got.dtype == np.float32 and np.array_equal(got, value)
    assert "a/b" in store and "missing" not in store
    with pytest.raises(KeyError):
        store["missing"]
    if on_disk:
        assert sorted(p.name for p in (tmp_path / "epoch1").iterdir()) == ["0.npy", "1.npy", "2.npy"]
    store.discard()
    assert len(store) == 0 and not (tmp_path / "epoch1").exists()


def test_instability_is_the_same_from_disk(tmp_path: Path) -> None:
    previous = {s: maps(i) for i, s in enumerate("abc")}
    current = {s: maps(i + 10) for i, s in enumerate("abd")}
    stores = []
    for name, values in (("prev", previous), ("cur", current)):
        store = MapStore(tmp_path / name)
        for slide_id, value in values.items():
            store.put(slide_id, value)
        stores.append(store)
    assert mean_jsd(*stores) == mean_jsd(previous, current) > 0


def test_a_folder_is_never_reused(tmp_path: Path) -> None:
    MapStore(tmp_path / "epoch1")
    with pytest.raises(FileExistsError):
        MapStore(tmp_path / "epoch1")
