"""The semi-synthetic cohort from real tile features: pools, parts, rates, truth and the bag mean."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from wsi_asmil.features.store import feature_writer, open_store
from wsi_asmil.synthetic.tumour_mix import (
    MixSpec,
    make_pools,
    pooling_baselines,
    split_of,
    tumour_fractions,
    write_tumour_mix_cohort,
)
from wsi_asmil.tissue.annotations import TumourMask, write_tumour_mask

DIM, SIDE = 8, 12  # 12 x 12 tiles of 100 level-0 px per slide, truth at downsample 100: a pixel per tile


def fake_run(root: Path, n_slides: int, tumour_shift: float, features: Path | None = None,
             truth: Path | None = None) -> tuple[Path, Path]:
    """Features stores and truth masks as a run writes them (under ``root`` unless given): every
    slide has its own tissue offset; the even slides have a 4 x 4-tile tumour whose tiles are
    shifted by ``tumour_shift``."""
    features, truth = features or root / "features", truth or root / "truth"
    rng = np.random.default_rng(0)
    ys, xs = np.divmod(np.arange(SIDE * SIDE), SIDE)
    coords = np.stack([xs, ys], axis=1).astype(np.int64) * 100
    for i in range(n_slides):
        mask = np.zeros((SIDE, SIDE), bool)
        if i % 2 == 0:
            mask[2:6, 3:7] = True
        values = rng.normal(size=(SIDE * SIDE, DIM)) + rng.normal(scale=2.0, size=DIM)
        values[mask.reshape(-1), 0] += tumour_shift
        # the slide and the row in features 1 and 2 (exact in float16), to trace a bag's tiles
        values[:, 1], values[:, 2] = i, np.arange(SIDE * SIDE)
        attrs = {"slide_id": f"s{i}", "tile_extent": 100.0, "encoder": "fake"}
        with feature_writer(features / f"s{i}.zarr", coords, DIM, attrs) as writer:
            writer.write(0, values.astype(np.float32))
        write_tumour_mask(truth / f"s{i}.png", truth / f"s{i}.json", TumourMask(mask, 100.0, "test", "test"),
                          f"s{i}", 0.5, (SIDE * 100, SIDE * 100))
    return features, truth


def test_pools_are_exact_and_parts_divide_slides_by_tumour(tmp_path: Path) -> None:
    features, truth = fake_run(tmp_path, 12, 3.0)
    fractions = tumour_fractions(features, truth)
    assert set(fractions) == {f"s{i}" for i in range(12)} and (fractions["s0"] == 1).sum() == 16
    pools = make_pools(fractions, MixSpec())
    assert all(len(pools.tumour[s]) == (16 if int(s[1:]) % 2 == 0 else 0) for s in fractions)
    assert all(len(pools.normal[s]) + len(pools.tumour[s]) == SIDE * SIDE for s in fractions)
    parts = {p: pools.slides(p) for p in ("train", "val", "test")}
    assert sorted(sum(parts.values(), [])) == sorted(fractions)  # every slide in exactly one part
    assert all(any(int(s[1:]) % 2 == 0 for s in slides) for slides in parts.values())
    with pytest.raises(ValueError, match="too few slides with tumour"):
        make_pools({"a": np.ones(4), "b": np.zeros(4)}, MixSpec())


def test_bags_have_the_promised_rates_truth_and_sources(tmp_path: Path) -> None:
    features, truth = fake_run(tmp_path / "run", 12, 3.0)
    spec = MixSpec(n_bags=40, bag_size=(100, 200), tumour_rate=(0.01, 0.05), sources_per_bag=2)
    out = write_tumour_mix_cohort(tmp_path / "mix", features, truth, spec, progress=False)
    meta = json.loads((out / "tumour_mix.json").read_text())
    split = split_of(out)
    assert [len(split["folds"][0][p]) for p in ("train", "val", "test")] == [22, 7, 11]
    assert sum(b["label"] == "positive" for b in meta["bags"]) == 20
    assert sum(p["tumour_tiles"] for p in meta["pools"].values()) == 6 * 16  # the even slides' 4 x 4 tumours
    for bag in meta["bags"]:
        group = open_store(out / "features" / f"{bag['slide_id']}.zarr")
        values, tile_truth = group["features"][:], group["tile_truth"][:]
        m = len(values)
        assert spec.bag_size[0] <= m <= spec.bag_size[1] and bag["n_tiles"] == m
        n = int(tile_truth.sum())
        if bag["label"] == "positive":
            assert max(1, int(np.floor(0.01 * m))) <= n <= int(np.ceil(0.05 * m))
        else:
            assert n == 0
        # every tile is a real tile of a slide of the bag's part, tumour exactly where the truth says
        source, row = values[:, 1].astype(np.int64), values[:, 2].astype(np.int64)
        assert {meta["parts"][f"s{s}"] for s in source} == {bag["part"]}
        on_tumour = np.isin(row, (np.arange(2, 6)[:, None] * SIDE + np.arange(3, 7)).ravel()) & (source % 2 == 0)
        np.testing.assert_array_equal(on_tumour, tile_truth == 1)


def test_the_composition_itself_carries_no_label(tmp_path: Path) -> None:
    """Tumour tiles that look like normal tissue leave only the composition to go by: chance."""
    features, truth = fake_run(tmp_path / "run", 16, 0.0)
    spec = MixSpec(n_bags=120, bag_size=(100, 200), sources_per_bag=3, seed=1)
    out = write_tumour_mix_cohort(tmp_path / "mix", features, truth, spec, progress=False)
    assert 0.25 < pooling_baselines(out)["mean_pooling_auc"] < 0.75
