"""Tests for the feature-level witness cohort: bags, stores, labels and the three design properties
(mean pooling fails, an oracle max-pool succeeds, decoys fool a look-alike detector)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from wsi_asmil.features import store
from wsi_asmil.synthetic import witness
from wsi_asmil.synthetic.witness import WitnessSpec, bag_labels, bag_rng, make_bag, make_bag_tiles, witness_world

SPEC = WitnessSpec(n_bags=60, bag_size=(200, 800), witness_rate=(0.015, 0.025), decoy_rate=(0.015, 0.025), seed=3)


def _bags(spec: WitnessSpec) -> tuple[list[witness.WitnessBag], np.ndarray]:
    content, _ = bag_labels(spec)
    return [make_bag_tiles(spec, bag_rng(spec, i), bool(content[i])) for i in range(spec.n_bags)], content


@pytest.fixture(scope="module")
def bags() -> tuple[list[witness.WitnessBag], np.ndarray]:
    return _bags(SPEC)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = dataclasses.replace(SPEC, n_bags=12)
    return witness.write_witness_cohort(tmp_path_factory.mktemp("witness"), spec, progress=False)


# --- the spec --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        {"n_clusters": 1},
        {"positive_share": 1.0},
        {"bag_size": (800, 200)},
        {"witness_rate": (0.0, 0.02)},
        {"decoy_rate": (0.0, 0.02)},
        {"label_noise": 1.5},
        {"noise_sd": (0.5,)},
    ],
)
def test_spec_rejects_nonsense(bad: dict) -> None:
    with pytest.raises(ValueError):
        WitnessSpec(**bad)


def test_spec_coerces_pairs_and_is_hashable() -> None:
    spec = WitnessSpec(bag_size=[200, 800], witness_rate=[0.01, 0.02])
    assert spec.bag_size == (200, 800) and isinstance(spec.bag_size, tuple)
    assert hash(spec) == hash(WitnessSpec(bag_size=(200, 800), witness_rate=(0.01, 0.02)))


# --- bags ----------------------------------------------------------------------------------------


def test_bags_have_the_promised_shapes_codes_and_rates(bags) -> None:
    bag_list, content = bags
    assert content.sum() == round(SPEC.n_bags * SPEC.positive_share)
    for bag, positive in zip(bag_list, content):
        m = len(bag.truth)
        assert SPEC.bag_size[0] <= m <= SPEC.bag_size[1]
        assert bag.features.shape == (m, SPEC.feature_dim) and bag.features.dtype == np.float32
        assert bag.truth.dtype == np.int8 and bag.coords.shape == (m, 2) and bag.coords.dtype == np.int64
        codes = set(np.unique(bag.truth).tolist())
        lo, hi = SPEC.witness_rate if positive else SPEC.decoy_rate
        n_look = int((bag.truth != 0).sum())
        assert max(1, int(np.floor(lo * m))) <= n_look <= int(np.ceil(hi * m))
        if positive:
            assert codes <= {0, *range(1, SPEC.n_clusters + 1)} and -1 not in codes
        else:
            assert codes == {0, -1}


def test_features_are_float16_exact_finite_and_standard_scale(bags) -> None:
    features = np.concatenate([b.features for b in bags[0]])
    assert np.isfinite(features).all()
    np.testing.assert_array_equal(features.astype(np.float16).astype(np.float32), features)
    assert 0.5 < features.std() < 2.0
    assert np.abs(features.mean(axis=0)).max() < 3.0


def test_positive_bags_mix_several_clusters_each_dominated_by_one(bags) -> None:
    bag_list, content = bags
    dominant, shares = [], []
    for bag in (b for b, c in zip(bag_list, content) if c):
        counts = np.bincount(bag.truth[bag.truth > 0], minlength=SPEC.n_clusters + 1)[1:]
        dominant.append(int(counts.argmax()))
        shares.append(counts.max() / counts.sum())
    assert len(set(dominant)) == SPEC.n_clusters  # every cluster leads some bags
    assert 0.6 < np.mean(shares) < 0.95  # one cluster dominates, the others are present


def test_coords_are_a_grid_and_look_alikes_form_blobs(bags) -> None:
    step = SPEC.tile_size
    for bag in bags[0][:20]:
        coords = bag.coords
        assert (coords % step == 0).all() and (coords >= 0).all()
        assert len(np.unique(coords, axis=0)) == len(coords)
        # rows in raster order: y, then x
        order = np.lexsort((coords[:, 0], coords[:, 1]))
        np.testing.assert_array_equal(order, np.arange(len(coords)))
        look = coords[bag.truth != 0] / step
        if len(look) < 3:
            continue
        d = np.hypot(*(look[:, None] - look[None]).transpose(2, 0, 1))
        np.fill_diagonal(d, np.inf)
        assert np.median(d.min(axis=1)) <= 1.5  # neighbours, not scattered over the tissue


def test_make_bag_is_pure_and_seeded() -> None:
    a = make_bag(SPEC, np.random.default_rng(7), True)
    b = make_bag(SPEC, np.random.default_rng(7), True)
    c = make_bag(SPEC, np.random.default_rng(8), True)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[0].shape != c[0].shape or not np.array_equal(a[0], c[0])
    # a bag does not depend on how many bags the cohort has
    bigger = dataclasses.replace(SPEC, n_bags=SPEC.n_bags + 5)
    np.testing.assert_array_equal(
        make_bag(SPEC, bag_rng(SPEC, 4), True)[0], make_bag(bigger, bag_rng(bigger, 4), True)[0]
    )


def test_label_noise_flips_exactly_the_promised_share() -> None:
    spec = dataclasses.replace(SPEC, label_noise=0.25)
    content, reported = bag_labels(spec)
    assert (content != reported).sum() == round(0.25 * spec.n_bags)
    np.testing.assert_array_equal(content, bag_labels(SPEC)[0])  # the content does not change


# --- the three design properties -----------------------------------------------------------------


def _mean_pool_auc(bag_list: list[witness.WitnessBag], y: np.ndarray) -> float:
    means = np.stack([b.features.mean(axis=0) for b in bag_list])
    model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
    cv = StratifiedKFold(5, shuffle=True, random_state=0)
    p = cross_val_predict(model, means, y, cv=cv, method="predict_proba")[:, 1]
    return float(roc_auc_score(y, p))


def test_mean_pooling_is_near_chance(bags) -> None:
    bag_list, content = bags
    assert _mean_pool_auc(bag_list, content.astype(int)) < 0.7


def test_mean_pooling_would_work_without_the_nuisances() -> None:
    """The control of the test above: the same measurement sees the label once the per-bag offset
    and the composition noise are gone, so its failure there is the design, not a weak test."""
    spec = dataclasses.replace(SPEC, nuisance_sd=0.0, tissue_concentration=1e4)
    bag_list, content = _bags(spec)
    assert _mean_pool_auc(bag_list, content.astype(int)) > 0.75


def test_oracle_max_pool_on_the_witness_direction_separates_the_bags(bags) -> None:
    bag_list, content = bags
    w = witness_world(SPEC).direction
    scores = [float((b.features @ w).max()) for b in bag_list]
    assert roc_auc_score(content.astype(int), scores) > 0.95
    # and at the tile level, witnesses stand out along w from background and decoys
    features = np.concatenate([b.features for b in bag_list])
    is_witness = np.concatenate([b.truth > 0 for b in bag_list])
    assert roc_auc_score(is_witness, features @ w) > 0.95


def test_no_single_feature_coordinate_gives_the_witnesses_away(bags) -> None:
    features = np.concatenate([b.features for b in bags[0]])
    is_witness = np.concatenate([b.truth > 0 for b in bags[0]])
    auc = np.array([roc_auc_score(is_witness, features[:, j]) for j in range(features.shape[1])])
    assert np.maximum(auc, 1 - auc).max() < 0.95


def _nearest_centre_fires(spec: WitnessSpec, features: np.ndarray) -> bool:
    """The naive detector: does any tile lie nearer a witness centre than any background centre?"""
    world = witness_world(spec)
    centres = np.concatenate([world.tissue_centres, world.witness_centres])
    d = ((features[:, None, :] - centres[None]) ** 2).sum(axis=-1)
    return bool((d.argmin(axis=1) >= len(world.tissue_centres)).any())


def test_decoys_fool_a_look_alike_detector(bags) -> None:
    bag_list, content = bags
    fires = np.array([_nearest_centre_fires(SPEC, b.features) for b in bag_list])
    assert fires[content].mean() > 0.9
    assert fires[~content].mean() > 0.5
    # without decoys the detector is quiet in negative bags: the decoys are what fools it
    spec = dataclasses.replace(SPEC, decoy_rate=(0.0, 0.0))
    quiet, content = _bags(spec)
    assert all((b.truth == 0).all() for b, c in zip(quiet, content) if not c)
    fires = np.array([_nearest_centre_fires(spec, b.features) for b, c in zip(quiet, content) if not c])
    assert fires.mean() < 0.1


# --- the written cohort --------------------------------------------------------------------------


def test_training_reads_the_cohort_and_truth_is_in_row_order(cohort: Path) -> None:
    import torch

    from wsi_asmil.mil.fold_data import load_bags

    spec = dataclasses.replace(SPEC, n_bags=12)
    labels = pd.read_csv(cohort / "labels.csv")
    assert labels["slide_id"].tolist() == witness.bag_ids(spec)
    assert set(labels["label"]) == {"negative", "positive"}
    label_map = dict(zip(labels["slide_id"], labels["label"]))
    loaded, skipped = load_bags(
        cohort / "features", labels["slide_id"].tolist(), label_map, ["negative", "positive"],
        torch.device("cpu"), torch.float32,
    )
    assert skipped == [] and len(loaded) == spec.n_bags
    content, _ = bag_labels(spec)
    for i, bag in enumerate(loaded):
        expected = make_bag_tiles(spec, bag_rng(spec, i), bool(content[i]))
        np.testing.assert_array_equal(bag.features.numpy(), expected.features)
        assert bag.label == int(content[i])
        path = cohort / "features" / f"{bag.slide_id}.zarr"
        truth = store.read_tile_truth(path)
        assert truth is not None and truth.dtype == np.int8
        np.testing.assert_array_equal(truth, expected.truth)
        _, coords, attrs = store.read_features(path)
        np.testing.assert_array_equal(coords, expected.coords)
        assert attrs["kind"] == "features" and attrs["encoder"] == witness.ENCODER
        assert attrs["feature_dim"] == spec.feature_dim and attrs["witness_spec"] == spec.to_json()
    assert not [p for p in (cohort / "features").iterdir() if p.name.startswith(".")]  # no temporaries


def test_read_tile_truth_is_none_for_an_ordinary_store(tmp_path: Path) -> None:
    path = tmp_path / "plain.zarr"
    with store.feature_writer(path, np.zeros((3, 2), dtype=np.int64), 4, {}) as writer:
        writer.write(0, np.ones((3, 4), dtype=np.float32))
    assert store.read_tile_truth(path) is None


def test_labels_feed_make_split(cohort: Path) -> None:
    from wsi_asmil.mil.split import make_split

    split = make_split(cohort / "labels.csv", "kfold", 3, 0.2, 0)
    assert split["classes"] == ["negative", "positive"]
    assert len(split["folds"]) == 3
    tested = sorted(s for fold in split["folds"] for s in fold["test"])
    assert tested == witness.bag_ids(dataclasses.replace(SPEC, n_bags=12))


def test_rewriting_gives_byte_identical_features(tmp_path: Path) -> None:
    spec = dataclasses.replace(SPEC, n_bags=2)
    chunks = []
    for name in ("a", "b"):
        out = witness.main(
            ["--out", str(tmp_path / name), "--bags", "2", "--seed", "3", "--bag-size", "200", "800",
             "--witness-rate", "0.015", "0.025", "--decoy-rate", "0.015", "0.025", "--no-progress"]
        )
        assert out == 0
        chunks.append({
            p.relative_to(tmp_path / name): p.read_bytes()
            for p in sorted((tmp_path / name / "features").rglob("*"))
            if p.is_file() and p.name != "zarr.json"
        })
    assert chunks[0] == chunks[1] and len(chunks[0]) >= 6  # features, coords, tile_truth of 2 bags
    # the command line wrote the same bags as the spec it was given
    features, _, _ = store.read_features(tmp_path / "a" / "features" / "bag_0000.zarr")
    content, _ = bag_labels(spec)
    np.testing.assert_array_equal(features, make_bag(spec, bag_rng(spec, 0), bool(content[0]))[0])


# --- witnesses of another kind: a conjunction of two directions ---------------------------------

CONJUNCTION = dataclasses.replace(SPEC, witness_kind="conjunction")


@pytest.fixture(scope="module")
def conjunction_bags() -> tuple[list[witness.WitnessBag], np.ndarray]:
    return _bags(CONJUNCTION)


def test_conjunction_witnesses_rank_first_only_on_both_directions(conjunction_bags) -> None:
    bag_list, content = conjunction_bags
    world = witness_world(CONJUNCTION)
    w, w2 = world.direction, world.rotation[:, 1]
    features = np.concatenate([b.features for b in bag_list])
    truth = np.concatenate([b.truth for b in bag_list])
    witness_or_decoy = truth != 0
    is_witness = truth[witness_or_decoy] > 0
    x = features[witness_or_decoy]
    # along w + w2 a witness and a decoy look alike; along w or w2 alone half the decoys outrank them
    assert 0.3 < roc_auc_score(is_witness, x @ (w + w2)) < 0.7
    for d in (w, w2):
        assert roc_auc_score(is_witness, x @ d) < 0.8
    # their conjunction finds them among every tile, and max-pooled it separates the bags
    assert roc_auc_score(truth > 0, np.minimum(features @ w, features @ w2)) > 0.97
    scores = [float(np.minimum(b.features @ w, b.features @ w2).max()) for b in bag_list]
    assert roc_auc_score(content.astype(int), scores) > 0.95


def test_conjunction_decoys_are_in_every_bag_and_the_mean_hides_the_label(conjunction_bags) -> None:
    bag_list, content = conjunction_bags
    decoy_share = np.array([(b.truth == witness.DECOY).mean() for b in bag_list])
    assert (decoy_share > 0).all()
    assert abs(decoy_share[content].mean() - decoy_share[~content].mean()) < 0.005
    assert all((b.truth > 0).any() == c for b, c in zip(bag_list, content))
    assert _mean_pool_auc(bag_list, content.astype(int)) < 0.7


def test_the_direction_kind_is_unchanged_by_the_conjunction_option() -> None:
    """Bags pinned before the option existed (the truth exactly, the features to float16's
    precision): the benchmark's cohort is the one it was."""
    import hashlib

    pinned = ((5, True, "03234dcd7de9afe7", (568, 128), 329.0933, [0.32763671875, -0.1220703125, -0.9091796875]),
              (6, False, "42af3a5f9df59720", (276, 128), 2277.3335, [1.078125, -2.306640625, -0.60009765625]))
    for i, label, digest, shape, total, first in pinned:
        features, truth = make_bag(SPEC, bag_rng(SPEC, i), label)
        assert hashlib.sha256(truth.tobytes()).hexdigest()[:16] == digest and features.shape == shape
        assert features.astype(np.float64).sum() == pytest.approx(total, abs=0.5)
        np.testing.assert_allclose(features[0, :3], first, atol=2e-3)
    with pytest.raises(ValueError, match="witness_kind"):
        WitnessSpec(witness_kind="xor")
