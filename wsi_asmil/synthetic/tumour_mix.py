"""Semi-synthetic bags from real tile features: micro-metastasis rates over real tissue mixtures.

The witness bags (:mod:`wsi_asmil.synthetic.witness`) test attention in an invented feature space.
These bags keep a real encoder's feature statistics: every tile is a real tile's features (the
demo's pretrained EfficientNet-Lite0 features, say) whose tumour truth is known exactly from the
truth masks, and only the composition of each bag is synthetic.

Pools, from a features folder and its truth masks (:func:`tumour_fractions`):
    a slide's *normal* tiles lie wholly outside the tumour (fraction 0), its *tumour* tiles at least
    half on it (the localisation stage's ``TUMOUR_TILE_FRACTION``); tiles in between are never used, so the truth is exact.
Parts:
    the source slides are divided among train, val and test by slide (stratified by whether a
    slide has tumour), so no slide's tiles reach two parts, and each bag draws from its part only.
A bag (its own random stream):
    M tiles, log-uniform in ``bag_size``, drawn from the normal tiles of ``sources_per_bag`` slides
    of its part with Dirichlet(``concentration``) weights: a per-bag tissue mixture chosen the same
    way for both classes, so the bag mean moves with the mixture and hardly with the label. A
    positive bag then has ``max(1, round(r M))`` of its tiles, r log-uniform in ``tumour_rate``
    (0.5-2 %: micro-metastasis-like), replaced by tumour tiles of its part. Within a bag tiles are
    drawn without replacement where the pool allows.

Every bag is written as a features store with ``tile_truth`` (1 tumour, 0 normal), like the witness
bags, with ``labels.csv`` (``slide_id,label,split``) and ``tumour_mix.json`` (the spec, the parts
and a per-bag summary).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from wsi_asmil.core.io import write_csv, write_json
from wsi_asmil.features.store import open_store
from wsi_asmil.maps.localisation import TUMOUR_TILE_FRACTION
from wsi_asmil.synthetic.witness import NEGATIVE, POSITIVE, write_bag_store
from wsi_asmil.tissue.masks import mask_fractions, read_tumour_mask

log = logging.getLogger(__name__)

PARTS = ("train", "val", "test")


@dataclass(frozen=True)
class MixSpec:
    """Everything that determines a cohort, with its source features; equal specs, equal bags."""

    n_bags: int = 360
    positive_share: float = 0.5
    bag_size: tuple[int, int] = (500, 1500)
    tumour_rate: tuple[float, float] = (0.005, 0.02)
    sources_per_bag: int = 3
    concentration: float = 1.0
    #: Shares of the bags, and of the source slides, in train, val and test.
    part_shares: tuple[float, float, float] = (200 / 360, 60 / 360, 100 / 360)
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.tumour_rate[0] <= self.tumour_rate[1] < 1:
            raise ValueError(f"tumour_rate must be 0 < min <= max < 1, got {self.tumour_rate}")
        if not 1 <= self.bag_size[0] <= self.bag_size[1]:
            raise ValueError(f"bag_size must be 1 <= min <= max, got {self.bag_size}")
        if self.sources_per_bag < 1 or self.concentration <= 0:
            raise ValueError("sources_per_bag must be >= 1 and concentration > 0")
        if abs(sum(self.part_shares) - 1) > 1e-9 or min(self.part_shares) <= 0:
            raise ValueError(f"part_shares must be positive and sum to 1, got {self.part_shares}")


def tumour_fractions(features_dir: str | Path, truth_dir: str | Path) -> dict[str, np.ndarray]:
    """Each tile's share on tumour, per slide with a features store and a truth mask
    (``<truth_dir>/<slide>.png`` + ``.json``, as the localisation stage writes them)."""
    out = {}
    for png in sorted(Path(truth_dir).glob("*.png")):
        store_path = Path(features_dir) / f"{png.stem}.zarr"
        if not store_path.exists():
            continue
        group = open_store(store_path)
        coords, extent = group["coords"][:], float(group.attrs["tile_extent"])
        mask, side = read_tumour_mask(png, png.with_suffix(".json"))
        out[png.stem] = mask_fractions(mask, float(side["downsample"]), coords[:, 0], coords[:, 1], extent)
    return out


@dataclass(frozen=True)
class Pools:
    """Row indices of each slide's normal and tumour tiles, and each slide's part."""

    normal: dict[str, np.ndarray]
    tumour: dict[str, np.ndarray]
    part: dict[str, str]

    def slides(self, part: str) -> list[str]:
        return sorted(s for s, p in self.part.items() if p == part)


def make_pools(fractions: dict[str, np.ndarray], spec: MixSpec) -> Pools:
    """The normal and tumour tiles of every slide, and the slides divided among the parts by
    slide, stratified by tumour, every part given at least one slide with tumour."""
    normal = {s: np.flatnonzero(f == 0) for s, f in fractions.items()}
    tumour = {s: np.flatnonzero(f >= TUMOUR_TILE_FRACTION) for s, f in fractions.items()}
    rng = np.random.default_rng([spec.seed, 1])
    part: dict[str, str] = {}
    for group in (sorted(s for s in fractions if len(tumour[s])), sorted(s for s in fractions if not len(tumour[s]))):
        order = [group[i] for i in rng.permutation(len(group))]
        cuts = np.round(np.cumsum(spec.part_shares) * len(order)).astype(int)
        for i, slide in enumerate(order):
            part[slide] = PARTS[int(np.searchsorted(cuts, i, side="right"))]
    for name in PARTS:
        if not any(len(tumour[s]) for s in part if part[s] == name):
            raise ValueError(f"too few slides with tumour tiles to give the {name} part one "
                             f"({sum(1 for s in tumour if len(tumour[s]))} slides have tumour)")
    return Pools(normal, tumour, part)


def _draw(rng: np.random.Generator, rows: np.ndarray, n: int) -> np.ndarray:
    return rng.choice(rows, size=n, replace=n > len(rows))


def compose_bag(pools: Pools, part: str, positive: bool, spec: MixSpec, rng: np.random.Generator
                ) -> tuple[list[tuple[str, int]], np.ndarray]:
    """One bag's tiles as (slide, row) in bag order and its per-tile truth (1 tumour)."""
    lo, hi = spec.bag_size
    m = int(round(np.exp(rng.uniform(np.log(lo), np.log(hi)))))
    slides = pools.slides(part)
    sources = rng.choice(len(slides), size=min(spec.sources_per_bag, len(slides)), replace=False)
    counts = rng.multinomial(m, rng.dirichlet(np.full(len(sources), spec.concentration)))
    tiles = [(slides[i], int(r)) for i, n in zip(sources, counts) for r in _draw(rng, pools.normal[slides[i]], n)]
    truth = np.zeros(m, dtype=np.int8)
    if positive:
        rate = float(np.exp(rng.uniform(*np.log(spec.tumour_rate))))
        n_tumour = max(1, int(round(rate * m)))
        pool = [(s, int(r)) for s in slides for r in pools.tumour[s]]
        picked = _draw(rng, np.arange(len(pool)), n_tumour)
        where = rng.choice(m, size=n_tumour, replace=False)
        for position, k in zip(where, picked):
            tiles[position] = pool[k]
        truth[where] = 1
    return tiles, truth


def write_tumour_mix_cohort(out_dir: str | Path, features_dir: str | Path, truth_dir: str | Path,
                            spec: MixSpec, progress: bool = True) -> Path:
    """Write ``out_dir/features/<bag>.zarr`` (with ``tile_truth``), ``labels.csv`` and
    ``tumour_mix.json``; returns ``out_dir``."""
    out, features_dir = Path(out_dir), Path(features_dir)
    pools = make_pools(tumour_fractions(features_dir, truth_dir), spec)
    rng = np.random.default_rng(spec.seed)
    n_pos = round(spec.n_bags * spec.positive_share)
    labels = rng.permutation(np.r_[np.ones(n_pos, bool), np.zeros(spec.n_bags - n_pos, bool)])
    cuts = np.round(np.cumsum(spec.part_shares) * spec.n_bags).astype(int)
    features = {s: open_store(features_dir / f"{s}.zarr")["features"][:] for s in pools.part}  # a few MB each
    attrs0 = dict(open_store(features_dir / f"{next(iter(pools.part))}.zarr").attrs)
    rows, summary = [], []
    for i in tqdm(range(spec.n_bags), unit="bag", desc="tumour-mix bags", disable=not progress):
        part = PARTS[int(np.searchsorted(cuts, i, side="right"))]
        tiles, truth = compose_bag(pools, part, bool(labels[i]), spec, np.random.default_rng([spec.seed, 2, i]))
        feats = np.stack([features[s][r] for s, r in tiles]).astype(np.float16)
        side = int(np.ceil(np.sqrt(len(tiles))))
        coords = np.stack(np.divmod(np.arange(len(tiles)), side)[::-1], axis=1).astype(np.int64) * 224
        bag_id = f"mix_{i:04d}"
        label = POSITIVE if labels[i] else NEGATIVE
        attrs = {
            "kind": "features", "encoder": attrs0.get("encoder"), "weights": attrs0.get("weights"),
            "feature_dim": int(feats.shape[1]), "slide_id": bag_id, "label": label, "part": part,
            "mpp": 0.5, "target_mpp": 0.5, "tile_size": 224, "tile_extent": 224.0, "overlap": 0.0,
            "read_level": 0, "read_downsample": 1.0, "min_tissue_fraction": 0.0,
            "slide_dimensions": [side * 224, side * 224], "tumour_mix_spec": json.dumps(dataclasses.asdict(spec)),
        }
        write_bag_store(out / "features", bag_id, coords, feats, truth, attrs)
        rows.append({"slide_id": bag_id, "label": label, "split": part})
        summary.append({"slide_id": bag_id, "label": label, "part": part, "n_tiles": len(tiles),
                        "n_tumour": int(truth.sum()), "sources": sorted({s for s, _ in tiles})})
    write_csv(out / "labels.csv", pd.DataFrame(rows))
    sizes = {part: {"slides": len(pools.slides(part)),
                    "normal_tiles": sum(len(pools.normal[s]) for s in pools.slides(part)),
                    "tumour_tiles": sum(len(pools.tumour[s]) for s in pools.slides(part))} for part in PARTS}
    write_json(out / "tumour_mix.json", {"spec": dataclasses.asdict(spec), "parts": pools.part, "pools": sizes,
                                         "bags": summary})
    log.info("%d tumour-mix bags (%d positive) from %d slides -> %s", spec.n_bags, n_pos, len(pools.part), out)
    return out


def split_of(out_dir: str | Path) -> dict[str, Any]:
    """The cohort's one-fold split (its bags' parts), in the split file's format."""
    table = pd.read_csv(Path(out_dir) / "labels.csv", dtype=str)
    labels = dict(zip(table["slide_id"], table["label"]))
    fold = {part: table.loc[table["split"] == part, "slide_id"].tolist() for part in PARTS}
    return {"classes": sorted(set(labels.values())), "labels": labels, "folds": [fold]}


def pooling_baselines(out_dir: str | Path) -> dict[str, float]:
    """What the cohort asks of attention, on its test bags: the AUC of mean pooling (a logistic
    regression on the training bags' mean features) and the oracle's (a logistic regression on the
    training bags' tiles and their truth, max-pooled over each bag's tiles)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    split = split_of(out_dir)
    fold = split["folds"][0]
    bags = {}
    for slide in fold["train"] + fold["test"]:
        group = open_store(Path(out_dir) / "features" / f"{slide}.zarr")
        bags[slide] = (group["features"][:].astype(np.float32), group["tile_truth"][:])
    y = {s: float(split["labels"][s] == POSITIVE) for s in bags}
    train, test = fold["train"], fold["test"]
    mean_model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    mean_model.fit(np.stack([bags[s][0].mean(0) for s in train]), [y[s] for s in train])
    mean_auc = roc_auc_score([y[s] for s in test], mean_model.predict_proba(np.stack([bags[s][0].mean(0) for s in test]))[:, 1])
    tiles = np.concatenate([bags[s][0] for s in train])
    truth = np.concatenate([bags[s][1] for s in train])
    tile_model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, class_weight="balanced"))
    tile_model.fit(tiles, truth)
    oracle = [tile_model.decision_function(bags[s][0]).max() for s in test]
    return {"mean_pooling_auc": float(mean_auc), "oracle_max_auc": float(roc_auc_score([y[s] for s in test], oracle)),
            "test_bags": len(test), "train_bags": len(train)}
