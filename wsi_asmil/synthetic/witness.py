"""A feature-level MIL cohort where attention has to work: "witness" bags, with per-tile truth.

No slides are drawn: each bag is a features store in exactly the layout training reads
(``<out>/features/<bag_id>.zarr``, see :mod:`wsi_asmil.features.store`) plus ``<out>/labels.csv``, so a
bag can be trained on, scored and mapped like a real slide. Every store also holds ``tile_truth``
(M,) int8 in row order (:func:`wsi_asmil.features.store.read_tile_truth`): 0 background, ``k`` in
1..n_clusters a witness of cluster ``k``, -1 a decoy.

The generative model, in feature space (D = feature_dim). Cohort-wide constants
(:func:`witness_world`, drawn from ``seed`` alone):

* a random rotation ``R`` whose first column, the discriminating direction ``w``, is a random
  +-1/sqrt(D) vector: every feature coordinate carries the same small share of ``w``;
* ``n_tissue_types`` background centres ``mu_t`` ~ N(0, tissue_spread^2 I), projected off ``w``;
* ``n_clusters`` look-alike appearances ``a_k = mu_(k mod T) + lookalike_distance * s_k``, with
  ``s_k`` a +-1 sign vector projected off ``w`` and normalised (far from every background centre in norm, yet
  extreme in no single coordinate); witness centre ``a_k + witness_shift * w``, decoy centre
  ``a_k - decoy_shift * w``;
* within-cluster noise ``R (sd * N(0, I))``, ``sd`` 1 on ``w`` (R's first axis) and log-uniform in
  ``noise_sd`` on the other axes.

Each bag (its own random stream, :func:`bag_rng`):

* M tiles, log-uniform in ``bag_size``, laid on a square grid of ``tile_size`` px as one irregular
  tissue blob (rows in raster order, like :func:`wsi_asmil.features.tile.tile_grid`);
* tissue-type map: Voronoi cells of random seeds whose types follow the bag's mixture
  ~ Dirichlet(``tissue_concentration``), so the bag mean moves with its composition;
* look-alike tiles, n = max(1, round(r M)) with r log-uniform in ``witness_rate`` (positive bags:
  witnesses) or ``decoy_rate`` (negative bags: decoys), placed in 1-3 spatial blobs; each takes
  the bag's dominant cluster (uniform over clusters) with probability ``dominant_share``,
  otherwise one of the other clusters;
* tile = centre of its kind + R (sd * N(0, I)) + o, with one nuisance offset
  o ~ N(0, nuisance_sd^2 I) per bag, then rounded through float16 (values are O(1)).

Why attention has to work: look-alike tiles have the same count distribution and appearance in
both classes (decoys only occur in negative bags), so only their sign along ``w`` carries the
label, diluted in the bag mean to r (witness_shift + decoy_shift) ~ 0.1 against the per-bag
offset (sd 0.5 on ``w``): mean pooling stays near chance. Max pooling the projection on ``w``
separates the classes (witnesses sit ``witness_shift`` noise sds out; background stays at 0),
and a detector of "close to a witness appearance" fires on the decoys of negative bags as well.
The mirror holds too: a decoy is evidence for "negative", so a model may attend to look-alikes
of either sign; in positive bags the look-alikes are exactly the witnesses.

Witnesses of another kind (``witness_kind="conjunction"``): a witness is far out along two
orthogonal directions at once, ``w`` and ``w2`` (``witness_shift`` on each), and every bag, of
either class, holds half-look-alikes (the decoys) twice as far out along only one of them. On
``w + w2`` a witness and a decoy then project alike, and along ``w`` or ``w2`` alone some decoys
outrank every witness: no direction ranks the witnesses first, only their conjunction
(``min(x.w, x.w2)``) does, and only witnesses carry the label.

Command line: ``python -m wsi_asmil.synthetic.witness --out DIR --bags 240 [--seed 0 --dim 128]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr
from tqdm import tqdm

from wsi_asmil.core.io import write_csv, write_json
from wsi_asmil.features import store

log = logging.getLogger("wsi_asmil.synthetic.witness")  # the same name when run with -m

#: Encoder name in the attrs of every witness store.
ENCODER = "witness-synthetic"
#: Level-0 microns per pixel the coords are given at (for heatmaps; the features do not depend on it).
MPP = 0.5
#: Tile codes of ``tile_truth``.
BACKGROUND = 0
DECOY = -1
#: Share of a bag's tissue grid's bounding square that is tissue.
TISSUE_FILL = 0.55
#: Background tiles per tissue-type Voronoi seed.
TILES_PER_TISSUE_SEED = 150
NEGATIVE, POSITIVE = "negative", "positive"
WITNESS_KINDS = ("direction", "conjunction")


def _pair(value: Sequence[float], cast: type) -> tuple[Any, Any]:
    lo, hi = value
    return cast(lo), cast(hi)


@dataclass(frozen=True)
class WitnessSpec:
    """Everything that determines a witness cohort; equal specs give byte-identical features.

    Shifts and spreads are in units of the within-cluster noise sd along ``w`` (which is 1).
    """

    #: Number of bags.
    n_bags: int = 240
    #: Share of bags whose content is positive (exactly ``round(n_bags * positive_share)`` bags).
    positive_share: float = 0.5
    #: (min, max) tiles per bag; sizes are log-uniform in between.
    bag_size: tuple[int, int] = (500, 5000)
    #: (min, max) share of a positive bag's tiles that are witnesses, log-uniform; at least 1 tile.
    witness_rate: tuple[float, float] = (0.005, 0.02)
    #: (min, max) share of a negative bag's tiles that are decoys (look-alikes on the negative side
    #: of ``w``), log-uniform; at least 1 tile unless the max is 0 (no decoys at all).
    decoy_rate: tuple[float, float] = (0.005, 0.02)
    #: Feature dimension D.
    feature_dim: int = 128
    #: Number of distinct witness clusters (>= 2); decoy cluster k mirrors witness cluster k.
    n_clusters: int = 3
    #: Probability that a look-alike tile is of its bag's dominant cluster (the rest: the others).
    dominant_share: float = 0.8
    #: Witness centres sit this far out along ``w`` (background: 0).
    witness_shift: float = 6.0
    #: Decoy centres sit this far on the negative side of ``w``.
    decoy_shift: float = 3.0
    #: Number of background tissue types (clusters).
    n_tissue_types: int = 4
    #: sd of every coordinate of the tissue-type centres (then made orthogonal to ``w``).
    tissue_spread: float = 0.8
    #: Distance of look-alike appearance k from the centre of tissue type k (mod n_tissue_types).
    lookalike_distance: float = 10.0
    #: (min, max) within-cluster noise sd of the latent axes off ``w``, log-uniform per axis.
    noise_sd: tuple[float, float] = (0.5, 1.0)
    #: Dirichlet concentration of a bag's tissue-type mixture (small: bags dominated by one type).
    tissue_concentration: float = 1.0
    #: sd per coordinate of the per-bag nuisance offset added to every tile of the bag.
    nuisance_sd: float = 0.5
    #: Share of bags whose label in labels.csv is flipped (exactly ``round(n_bags * label_noise)``).
    label_noise: float = 0.0
    #: Grid step of the coords in level-0 px.
    tile_size: int = 224
    #: Seed of the cohort: the world, the labels and every bag.
    seed: int = 0
    #: ``direction`` (witnesses out along ``w``, decoys only in negative bags) or ``conjunction``
    #: (witnesses out along ``w`` and ``w2`` at once, half-look-alike decoys in every bag).
    witness_kind: str = "direction"

    def __post_init__(self) -> None:
        for name, cast in (("bag_size", int), ("witness_rate", float), ("decoy_rate", float), ("noise_sd", float)):
            value = getattr(self, name)
            if len(tuple(value)) != 2:
                raise ValueError(f"{name} must be a (min, max) pair, got {value!r}")
            object.__setattr__(self, name, _pair(value, cast))
        if self.n_bags < 1:
            raise ValueError(f"n_bags must be >= 1, got {self.n_bags}")
        if not 0.0 < self.positive_share < 1.0:
            raise ValueError(f"positive_share must be within (0, 1), got {self.positive_share}")
        lo, hi = self.bag_size
        if not 1 <= lo <= hi:
            raise ValueError(f"bag_size must satisfy 1 <= min <= max, got {self.bag_size}")
        lo, hi = self.witness_rate
        if not 0.0 < lo <= hi <= 0.5:
            raise ValueError(f"witness_rate must satisfy 0 < min <= max <= 0.5, got {self.witness_rate}")
        lo, hi = self.decoy_rate
        if not (0.0 < lo <= hi <= 0.5 or lo == hi == 0.0):
            raise ValueError(f"decoy_rate must satisfy 0 < min <= max <= 0.5 (or be (0, 0)), got {self.decoy_rate}")
        if self.feature_dim < 4:
            raise ValueError(f"feature_dim must be >= 4, got {self.feature_dim}")
        if self.n_clusters < 2:
            raise ValueError(f"n_clusters must be >= 2, got {self.n_clusters}")
        if not 0.0 <= self.dominant_share <= 1.0:
            raise ValueError(f"dominant_share must be within [0, 1], got {self.dominant_share}")
        if self.witness_shift <= 0 or self.decoy_shift < 0:
            raise ValueError("witness_shift must be > 0 and decoy_shift >= 0")
        if self.n_tissue_types < 1:
            raise ValueError(f"n_tissue_types must be >= 1, got {self.n_tissue_types}")
        lo, hi = self.noise_sd
        if not 0.0 < lo <= hi:
            raise ValueError(f"noise_sd must satisfy 0 < min <= max, got {self.noise_sd}")
        if self.tissue_spread < 0 or self.lookalike_distance < 0 or self.nuisance_sd < 0:
            raise ValueError("tissue_spread, lookalike_distance and nuisance_sd must be >= 0")
        if self.tissue_concentration <= 0:
            raise ValueError(f"tissue_concentration must be > 0, got {self.tissue_concentration}")
        if not 0.0 <= self.label_noise <= 1.0:
            raise ValueError(f"label_noise must be within [0, 1], got {self.label_noise}")
        if self.tile_size < 1 or self.seed < 0:
            raise ValueError("tile_size must be >= 1 and seed >= 0")
        if self.witness_kind not in WITNESS_KINDS:
            raise ValueError(f"witness_kind must be one of {WITNESS_KINDS}, got {self.witness_kind!r}")

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class WitnessWorld:
    """The cohort-wide geometry, in feature space (rows are vectors of length D)."""

    #: (D, D) orthogonal: a tile's noise is ``rotation @ (latent_noise_sd * N(0, I))``; column 0 is ``w``.
    rotation: np.ndarray
    #: (D,) unit discriminating direction ``w``: witnesses high, background 0, decoys low.
    direction: np.ndarray
    #: (n_tissue_types, D) background cluster centres (orthogonal to ``w``).
    tissue_centres: np.ndarray
    #: (n_clusters, D) witness cluster centres; row k-1 is cluster k.
    witness_centres: np.ndarray
    #: Decoy centres: (n_clusters, D) the witness appearances on the negative side of ``w``; for
    #: conjunction witnesses (2 n_clusters, D), out along ``w`` alone, then along ``w2`` alone.
    decoy_centres: np.ndarray
    #: (D,) within-cluster noise sd per latent axis (axis 0 is ``w``).
    latent_noise_sd: np.ndarray


def _world_key(spec: WitnessSpec) -> tuple[Any, ...]:
    return (spec.seed, spec.feature_dim, spec.n_clusters, spec.n_tissue_types, spec.tissue_spread,
            spec.lookalike_distance, spec.noise_sd, spec.witness_shift, spec.decoy_shift, spec.witness_kind)


@functools.lru_cache(maxsize=8)
def _world(key: tuple[Any, ...]) -> WitnessWorld:
    seed, dim, n_clusters, n_types, spread, distance, noise_sd, witness_shift, decoy_shift, kind = key
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,)))
    q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
    q = q * np.sign(np.diag(r))  # a uniformly random rotation, the same for every LAPACK
    # ... reflected so that w = q[:, 0] lands on a random +-1/sqrt(D) vector: every feature
    # coordinate then carries the same small share of the witness shift, none of them most of it
    w = rng.choice([-1.0, 1.0], dim) / np.sqrt(dim)
    u = q[:, 0] - w
    if np.linalg.norm(u) > 1e-12:
        u /= np.linalg.norm(u)
        q = q - 2.0 * np.outer(u, u @ q)
    w = q[:, 0].copy()

    def off_w(v: np.ndarray) -> np.ndarray:
        return v - np.outer(v @ w, w)

    tissue = off_w(spread * rng.standard_normal((n_types, dim)))
    # look-alike k: its parent tissue type moved by a flat +-distance/sqrt(D) vector, so that it is
    # far from every background centre in norm yet stands out in no single coordinate
    flat = off_w(rng.choice([-1.0, 1.0], (n_clusters, dim)) / np.sqrt(dim))
    looks = tissue[np.arange(n_clusters) % n_types] + distance * flat / np.linalg.norm(flat, axis=1, keepdims=True)
    witness, decoy = looks + witness_shift * w, looks - decoy_shift * w
    if kind == "conjunction":  # w2 = q[:, 1], orthogonal to w; looks carry no share of it either
        w2 = q[:, 1]
        looks = looks - np.outer(looks @ w2, w2)
        witness = looks + witness_shift * (w + w2)
        decoy = np.concatenate([looks + 2 * witness_shift * w, looks + 2 * witness_shift * w2])
    lo, hi = noise_sd
    sd = np.exp(rng.uniform(np.log(lo), np.log(hi), dim))
    sd[0] = 1.0
    arrays = (q, w, tissue, witness, decoy, sd)
    for a in arrays:
        a.setflags(write=False)
    return WitnessWorld(*arrays)


def witness_world(spec: WitnessSpec) -> WitnessWorld:
    """The cohort-wide constants of ``spec`` (direction, centres, rotation), cached."""
    return _world(_world_key(spec))


def bag_ids(spec: WitnessSpec) -> list[str]:
    """``bag_0000``, ``bag_0001``, ... (at least four digits)."""
    width = max(4, len(str(spec.n_bags - 1)))
    return [f"bag_{i:0{width}d}" for i in range(spec.n_bags)]


def bag_labels(spec: WitnessSpec) -> tuple[np.ndarray, np.ndarray]:
    """(content, reported) bool arrays over the bags: whether each bag holds witnesses, and its label
    in labels.csv (the content with exactly ``round(n_bags * label_noise)`` labels flipped)."""
    rng = np.random.default_rng(np.random.SeedSequence(spec.seed, spawn_key=(1,)))
    n_pos = min(spec.n_bags, max(0, int(round(spec.n_bags * spec.positive_share))))
    content = np.zeros(spec.n_bags, dtype=bool)
    content[rng.permutation(spec.n_bags)[:n_pos]] = True
    reported = content.copy()
    n_flip = int(round(spec.n_bags * spec.label_noise))
    flipped = rng.permutation(spec.n_bags)[:n_flip]
    reported[flipped] = ~reported[flipped]
    return content, reported


def bag_rng(spec: WitnessSpec, index: int) -> np.random.Generator:
    """The random stream of bag ``index``: independent of n_bags and of every other bag."""
    return np.random.default_rng(np.random.SeedSequence(spec.seed, spawn_key=(2, index)))


@dataclass(frozen=True)
class WitnessBag:
    """One bag: features (M, D) float32 exactly representable in float16, truth (M,) int8 and
    level-0 top-left coords (M, 2) int64, all in raster (row) order."""

    features: np.ndarray
    truth: np.ndarray
    coords: np.ndarray
    slide_dimensions: tuple[int, int]


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi)))) if hi > lo else float(lo)


def _tissue_grid(rng: np.random.Generator, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Grid (row, col) of ``m`` tissue tiles forming one irregular blob, in raster order."""
    side = int(np.ceil(np.sqrt(m / TISSUE_FILL))) + 2
    ys, xs = np.mgrid[0:side, 0:side].astype(np.float64)
    c = (side - 1) / 2.0
    r, theta = np.hypot(xs - c, ys - c) / side, np.arctan2(ys - c, xs - c)
    wobble = np.ones_like(r)
    for k in (2, 3, 5):  # a wavy outline, not a disc
        wobble += rng.uniform(0.0, 0.15) * np.cos(k * theta + rng.uniform(0.0, 2 * np.pi))
    score = (r / wobble).ravel() + rng.uniform(0.0, 0.02, side * side)
    keep = np.sort(np.argsort(score, kind="stable")[:m])
    return keep // side, keep % side


def _blobs(rng: np.random.Generator, rows: np.ndarray, cols: np.ndarray, n: int) -> np.ndarray:
    """Indices of ``n`` tiles forming 1-3 ragged spatial blobs."""
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    n_blobs = int(min(n, rng.integers(1, 4)))
    centres = rng.choice(len(rows), n_blobs, replace=False)
    weights = rng.dirichlet(np.full(n_blobs, 2.0))
    d = np.hypot(rows[:, None] - rows[centres][None], cols[:, None] - cols[centres][None])
    score = (d / np.sqrt(weights)[None]).min(axis=1) + rng.uniform(0.0, 1.5, len(rows))
    return np.argsort(score, kind="stable")[:n]


def _conjunction_decoys(spec: WitnessSpec, rng: np.random.Generator, rows: np.ndarray, cols: np.ndarray,
                        label: bool, look: np.ndarray, truth: np.ndarray, kind: np.ndarray) -> None:
    """Half-look-alikes in every bag, in place: a negative bag's look-alikes become decoys out along
    ``w`` or ``w2`` alone; a positive bag gets as many again beside its witnesses, so decoys carry
    no label."""
    k, types = spec.n_clusters, spec.n_tissue_types
    if label:
        free = np.setdiff1d(np.arange(len(truth)), look)
        lo, hi = spec.decoy_rate
        n = 0 if hi == 0 else min(len(free), max(1, int(round(_log_uniform(rng, lo, hi) * len(truth)))))
        extra = free[_blobs(rng, rows[free], cols[free], n)]
        truth[extra] = DECOY
        kind[extra] = types + k + rng.integers(0, k, n)
    decoys = np.flatnonzero(truth == DECOY)
    axis = rng.integers(0, 2, len(decoys))  # out along w (0) or w2 (1)
    kind[decoys] = types + k + (kind[decoys] - types - k) % k + axis * k


def make_bag_tiles(spec: WitnessSpec, rng: np.random.Generator, label: bool) -> WitnessBag:
    """Draw one bag from ``rng``: positive (``label`` true) bags hold witnesses, negative ones decoys."""
    world = witness_world(spec)
    dim, k = spec.feature_dim, spec.n_clusters
    m = int(round(_log_uniform(rng, *spec.bag_size)))
    rows, cols = _tissue_grid(rng, m)

    # background: a Voronoi map of tissue types following the bag's mixture
    mixture = rng.dirichlet(np.full(spec.n_tissue_types, spec.tissue_concentration))
    n_seeds = max(4, m // TILES_PER_TISSUE_SEED)
    seeds = rng.choice(m, min(m, n_seeds), replace=False)
    seed_types = rng.choice(spec.n_tissue_types, len(seeds), p=mixture)
    d2 = (rows[:, None] - rows[seeds][None]) ** 2 + (cols[:, None] - cols[seeds][None]) ** 2
    kind = seed_types[np.argmin(d2, axis=1)]  # index into [tissue..., witness..., decoy...]

    # look-alikes: witnesses in positive bags, decoys in negative ones
    lo, hi = spec.witness_rate if label else spec.decoy_rate
    n_look = 0 if hi == 0 else min(m, max(1, int(round(_log_uniform(rng, lo, hi) * m))))
    look = _blobs(rng, rows, cols, n_look)
    dominant = int(rng.integers(k))
    other = (dominant + rng.integers(1, k, n_look)) % k
    cluster = np.where(rng.random(n_look) < spec.dominant_share, dominant, other)
    truth = np.zeros(m, dtype=np.int8)
    truth[look] = cluster + 1 if label else DECOY
    kind[look] = spec.n_tissue_types + cluster + (0 if label else k)
    if spec.witness_kind == "conjunction":
        _conjunction_decoys(spec, rng, rows, cols, label, look, truth, kind)

    offset = spec.nuisance_sd * rng.standard_normal(dim)
    noise = rng.standard_normal((m, dim)) * world.latent_noise_sd
    centres = np.concatenate([world.tissue_centres, world.witness_centres, world.decoy_centres])
    x = centres[kind] + noise @ world.rotation.T + offset
    features = x.astype(np.float16).astype(np.float32)
    if not np.isfinite(features).all():
        raise FloatingPointError("witness features overflow float16")

    origin = spec.tile_size * rng.integers(4, 33, 2)
    coords = np.stack([origin[0] + cols * spec.tile_size, origin[1] + rows * spec.tile_size], axis=1)
    side = int(max(rows.max(), cols.max())) + 1
    dims = (int(2 * origin[0] + side * spec.tile_size), int(2 * origin[1] + side * spec.tile_size))
    return WitnessBag(features, truth, coords.astype(np.int64), dims)


def make_bag(spec: WitnessSpec, rng: np.random.Generator, label: bool) -> tuple[np.ndarray, np.ndarray]:
    """(features (M, D) float32, already float16-rounded; truth (M,) int8) of one bag drawn from ``rng``.

    Pure: the same spec, stream state and label give the same bag (the one the writer stores
    for ``rng = bag_rng(spec, i)``).
    """
    bag = make_bag_tiles(spec, rng, label)
    return bag.features, bag.truth


def _label_name(positive: bool) -> str:
    return POSITIVE if positive else NEGATIVE


def write_bag_store(
    features_dir: Path, bag_id: str, coords: np.ndarray, features: np.ndarray, truth: np.ndarray,
    attrs: dict[str, Any],
) -> None:
    """One bag as a features store with its per-tile truth (``tile_truth``), written atomically
    through :func:`wsi_asmil.features.store.feature_writer`."""
    with store.feature_writer(features_dir / f"{bag_id}.zarr", coords, features.shape[1], attrs) as writer:
        writer.write(0, features)
        group = zarr.open_group(writer.array.store, mode="r+")
        group.create_array(store.TILE_TRUTH, data=truth, chunks=(max(1, min(store.ROWS_PER_CHUNK, len(truth))),))


def write_witness_cohort(
    out_dir: str | Path, spec: WitnessSpec, progress: bool = True
) -> Path:
    """Write ``out_dir/features/<bag_id>.zarr`` for every bag, ``out_dir/labels.csv`` and
    ``out_dir/witness.json`` (the spec and a per-bag summary); return ``out_dir``.

    Each store is written atomically through :func:`wsi_asmil.features.store.feature_writer`, with the
    extra array ``tile_truth``. Stores of bags beyond ``n_bags`` from an earlier run are left alone
    (labels.csv does not list them).
    """
    out = Path(out_dir)
    features_dir = out / "features"
    content, reported = bag_labels(spec)
    ids = bag_ids(spec)
    started = time.perf_counter()
    summary = []
    for i in tqdm(range(spec.n_bags), unit="bag", desc="witness bags", disable=not progress):
        bag = make_bag_tiles(spec, bag_rng(spec, i), bool(content[i]))
        m = len(bag.truth)
        attrs = {
            "kind": "features",
            "encoder": ENCODER,
            "weights": None,
            "feature_dim": spec.feature_dim,
            "slide_id": ids[i],
            "label": _label_name(bool(reported[i])),
            "content_label": _label_name(bool(content[i])),
            "label_flipped": bool(reported[i] != content[i]),
            "bag_index": i,
            "witness_spec": spec.to_json(),
            "mpp": MPP,
            "target_mpp": MPP,
            "tile_size": spec.tile_size,
            "tile_extent": float(spec.tile_size),
            "overlap": 0.0,
            "read_level": 0,
            "read_downsample": 1.0,
            "min_tissue_fraction": 0.0,
            "slide_dimensions": list(bag.slide_dimensions),
        }
        write_bag_store(features_dir, ids[i], bag.coords, bag.features, bag.truth, attrs)
        summary.append({
            "slide_id": ids[i],
            "label": attrs["label"],
            "content_label": attrs["content_label"],
            "n_tiles": m,
            "n_witness": int((bag.truth > 0).sum()),
            "n_decoy": int((bag.truth == DECOY).sum()),
        })
    write_csv(out / "labels.csv", pd.DataFrame({"slide_id": ids, "label": [_label_name(bool(r)) for r in reported]}))
    write_json(out / "witness.json", {"spec": spec.to_json(), "encoder": ENCODER, "bags": summary})
    n_tiles = sum(b["n_tiles"] for b in summary)
    log.info(
        "%d witness bags (%d positive, %d labels flipped), %d tiles, %d witnesses, %d decoys in %.1f s -> %s",
        spec.n_bags, int(content.sum()), int((content != reported).sum()), n_tiles,
        sum(b["n_witness"] for b in summary), sum(b["n_decoy"] for b in summary),
        time.perf_counter() - started, out,
    )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m wsi_asmil.synthetic.witness --out DIR --bags 240``."""
    d = WitnessSpec()
    p = argparse.ArgumentParser(
        prog="python -m wsi_asmil.synthetic.witness",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Write a feature-level synthetic MIL cohort (witness bags with per-tile truth).",
    )
    p.add_argument("--out", type=Path, required=True, help="output directory (features/, labels.csv)")
    p.add_argument("--bags", type=int, default=d.n_bags, help="number of bags")
    p.add_argument("--seed", type=int, default=d.seed, help="cohort seed")
    p.add_argument("--dim", type=int, default=d.feature_dim, help="feature dimension")
    p.add_argument("--clusters", type=int, default=d.n_clusters, help="witness clusters (>= 2)")
    p.add_argument("--positive-share", type=float, default=d.positive_share)
    p.add_argument("--bag-size", type=int, nargs=2, default=list(d.bag_size), metavar=("MIN", "MAX"))
    p.add_argument("--witness-rate", type=float, nargs=2, default=list(d.witness_rate), metavar=("MIN", "MAX"))
    p.add_argument("--decoy-rate", type=float, nargs=2, default=list(d.decoy_rate), metavar=("MIN", "MAX"))
    p.add_argument("--dominant-share", type=float, default=d.dominant_share)
    p.add_argument("--witness-shift", type=float, default=d.witness_shift)
    p.add_argument("--decoy-shift", type=float, default=d.decoy_shift)
    p.add_argument("--nuisance-sd", type=float, default=d.nuisance_sd)
    p.add_argument("--label-noise", type=float, default=d.label_noise, help="share of labels flipped")
    p.add_argument("--kind", choices=WITNESS_KINDS, default=d.witness_kind,
                   help="witnesses out along one direction, or along two at once (conjunction)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--log-level", default="INFO", help="logging level")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spec = WitnessSpec(
        n_bags=args.bags, seed=args.seed, feature_dim=args.dim, n_clusters=args.clusters,
        positive_share=args.positive_share, bag_size=tuple(args.bag_size), witness_rate=tuple(args.witness_rate),
        decoy_rate=tuple(args.decoy_rate), dominant_share=args.dominant_share, witness_shift=args.witness_shift,
        decoy_shift=args.decoy_shift, nuisance_sd=args.nuisance_sd, label_noise=args.label_noise,
        witness_kind=args.kind,
    )
    write_witness_cohort(args.out, spec, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
