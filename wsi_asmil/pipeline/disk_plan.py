"""The disk plan: what a run will write, per stage, known before its first job.

A 10,000-slide cohort should learn that its disk is too small before the first tile is cut, not
hours in. The plan counts every large output from the cohort and the config:

* tile and feature stores, both grids: tiles x feature_dim x 2 bytes (float16), times the
  features' compression, which is measured from the run's own stores where any exist;
* checkpoints: the models' parameter counts (built on PyTorch's ``meta`` device, so nothing is
  allocated) x folds, in float16 (what :mod:`wsi_asmil.mil.checkpoint_precision` keeps when exact);
* heatmaps, the top-tile mosaics, tile GeoJSON, the viewer's pyramids and the demo's own slides,
  from their pixel counts at the configured resolutions.

Tile counts come, per slide, from the best source there is: the tiles store if tiling has run,
the tissue mask if segmentation has, the synthetic layout for the demo (handed in by the workflow:
the pipeline never imports the demo generator), and otherwise a sample of
slides segmented from their thumbnails (at most :data:`SAMPLE_SLIDES`), whose tissue share stands
in for the others. Outputs already on disk count against the estimate, so a resumed run asks only
for what it still has to write. Every per-file constant below was measured on the demo's outputs
(docs/outputs.md, "Disk") and rounds small files up to the filesystem's 4 KiB blocks.
"""

from __future__ import annotations

import math
import os
import random
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wsi_asmil.core.disk import free_bytes, human_bytes, mount_point
from wsi_asmil.core.run_layout import RunLayout
from wsi_asmil.features.tile import TileParams, tile_grid

#: Slides whose thumbnails are segmented to learn the cohort's tissue share, and slide headers read.
SAMPLE_SLIDES = 8
SAMPLE_HEADERS = 64
BLOCK = 4096
#: Below this much room left after the run, the check warns (and the run goes on).
MARGIN_SHARE = 0.10
#: Bytes on disk per pixel or per item, measured on the demo (24 slides; docs/outputs.md).
SEGMENT_FIXED, SEGMENT_PER_PX = 4 * BLOCK, 1.2  # mask.png, qc.jpg, mask.json, tissue.geojson
TILES_FIXED, TILES_PER_TILE, GRID_PNG_PER_PX = 10 * BLOCK, 10.0, 1.4  # zarr metadata + chunks, grid QC
HEATMAP_PER_PX, TOPK_PER_TILE_PX, GEOJSON_PER_TILE = 1.1, 0.15, 360.0
VIEWER_SLIDE_PER_PX, VIEWER_OVERLAY_PER_PX = 0.35, 0.25
DEMO_SVS_PER_PX = 0.17
FOLD_FILES = 100 * 1024  # history, attention, predictions, metrics, curves of one fold
#: float16 features of an encoder with no store in this run yet: stored as written (no compression).
DEFAULT_COMPRESSION = 1.0
#: Known ratios (stored bytes / raw float16 bytes), measured on the demo's stores.
ENCODER_COMPRESSION = {"efficientnet_lite0": 0.53}


@dataclass(frozen=True)
class SlideSize:
    """What the plan needs of a slide: its level-0 size and mpp, and the tiles of each grid."""

    slide_id: str
    width: int
    height: int
    mpp: float
    tiles: dict[str, int]
    source: str  # tiles | mask | layout | sampled

    def pixels_at(self, mpp: float) -> float:
        return self.width * self.height * (self.mpp / mpp) ** 2


@dataclass
class Stage:
    name: str
    folders: tuple[str, ...]
    estimate: int
    written: int = 0

    @property
    def remaining(self) -> int:
        return max(0, self.estimate - self.written)


@dataclass
class DiskPlan:
    """The plan: per stage the estimate and what is already there, and the filesystems' free space."""

    stages: list[Stage]
    out_dir: str
    free: int
    filesystem: str
    scratch_need: int = 0
    scratch_free: int | None = None
    scratch_dir: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(s.estimate for s in self.stages)

    @property
    def needed(self) -> int:
        return sum(s.remaining for s in self.stages)

    def verdict(self) -> str:
        """``ok``, ``tight`` (less than MARGIN_SHARE of the disk's free space would be left) or ``short``."""
        if self.needed > self.free or (self.scratch_free is not None and self.scratch_need > self.scratch_free):
            return "short"
        if self.free - self.needed < MARGIN_SHARE * self.free:
            return "tight"
        return "ok"

    def summary(self) -> str:
        width = max(len(s.name) for s in self.stages)
        lines = [f"wsi-asmil: disk plan for {self.out_dir} on {self.filesystem} ({human_bytes(self.free)} free)"]
        for s in self.stages:
            lines.append(f"  {s.name:<{width}}  {human_bytes(s.estimate):>9} estimated, "
                         f"{human_bytes(s.written):>9} written, {human_bytes(s.remaining):>9} to write")
        lines.append(f"  {'total':<{width}}  {human_bytes(self.total):>9} estimated, "
                     f"{human_bytes(self.needed):>9} still to write: {self.verdict()}")
        if self.scratch_dir is not None:
            lines.append(f"  training scratch in {self.scratch_dir}: {human_bytes(self.scratch_need)} "
                         f"({human_bytes(self.scratch_free or 0)} free)")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "out_dir": self.out_dir, "filesystem": self.filesystem, "free_bytes": self.free,
            "estimated_bytes": self.total, "to_write_bytes": self.needed, "verdict": self.verdict(),
            "stages": [{**asdict(s), "remaining": s.remaining} for s in self.stages],
            "scratch": {"dir": self.scratch_dir, "need_bytes": self.scratch_need, "free_bytes": self.scratch_free},
            "notes": self.notes,
        }


class DiskShortError(RuntimeError):
    """The run will not fit; raised before its first job."""


def blocks(n: float) -> int:
    """Bytes rounded up to whole filesystem blocks (what ``du`` reports)."""
    return int(math.ceil(max(0.0, n) / BLOCK)) * BLOCK


def du(path: str | os.PathLike[str]) -> int:
    """Bytes on disk under ``path`` (allocated blocks, as ``du``); 0 when absent."""
    p = Path(path)
    if not p.exists():
        return 0
    if p.is_file():
        return p.stat().st_blocks * 512
    total = 0
    for root, _, files in os.walk(p):
        total += os.lstat(root).st_blocks * 512  # folders take blocks too (a Zarr store has several)
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_blocks * 512
            except OSError:
                continue
    return total


def store_bytes(n_tiles: int, dim: int, compression: float) -> int:
    """A features store: float16 rows (chunks of 4096 rows), the int64 coords, the metadata."""
    chunks = max(1, math.ceil(n_tiles / 4096))
    data = sum(blocks(min(4096, n_tiles - i * 4096) * dim * 2 * compression) for i in range(chunks))
    return data + chunks * blocks(min(4096, n_tiles) * 16 * 0.5) + 4 * BLOCK


def tiles_store_bytes(n_tiles: int) -> int:
    return TILES_FIXED + blocks(n_tiles * TILES_PER_TILE)


def checkpoint_parameters(model: str, in_dim: int, n_classes: int, hyper: Mapping[str, Any]) -> int:
    """The parameter count of ``model``, built on the meta device (no memory, no time)."""
    import torch

    from wsi_asmil.mil.models import build_model
    from wsi_asmil.mil.params import split_model_params

    arch, _ = split_model_params(hyper)
    with torch.device("meta"):
        net = build_model(model, in_dim, n_classes, **arch)
    return sum(p.numel() for p in net.state_dict().values())


def encoder_dim(encoder: str) -> int:
    """The encoder's feature width: its spec's, else timm's architecture built on the meta device."""
    from wsi_asmil.features.encoders import spec_for

    spec = spec_for(encoder)
    if spec.dim is not None:
        return spec.dim
    import timm
    import torch

    with torch.device("meta"):
        return int(timm.create_model(spec.timm_name, pretrained=False, num_classes=0).num_features)


def _store_stats(folder: Path) -> tuple[int | None, float | None]:
    """(feature_dim, compression) measured on the existing stores of ``folder``; None where none."""
    import zarr

    raw = stored = 0
    dim = None
    for p in sorted(folder.glob("*.zarr"))[:16]:
        try:
            array = zarr.open_group(p, mode="r")["features"]
        except Exception:  # a foreign or damaged store: the features stage will name it
            continue
        dim = int(array.shape[1])
        raw += int(array.shape[0]) * dim * 2
        # the chunks' own bytes, not their blocks: store_bytes rounds to blocks itself
        stored += sum(f.stat().st_size for f in (p / "features").rglob("*") if f.is_file() and f.name != "zarr.json")
    return dim, (stored / raw if raw >= 256 * 1024 else None)


def grid_tiles(mask: np.ndarray, downsample: float, width: int, height: int, mpp: float,
               grids: Mapping[str, TileParams]) -> dict[str, int]:
    return {tag: len(tile_grid(mask, downsample, (width, height), mpp, p)[0]) for tag, p in grids.items()}


def _known_size(slide_id: str, layout: RunLayout, grids: Mapping[str, TileParams]) -> SlideSize | None:
    """A slide's size from what the run already wrote (tiles stores, else its tissue mask)."""
    from wsi_asmil.features import store
    from wsi_asmil.tissue.masks import read_tissue_mask

    tiles: dict[str, int] = {}
    attrs: dict[str, Any] = {}
    for tag in grids:
        path = Path(RunLayout(layout.root, tag, layout.encoder).tiles(slide_id))
        if path.is_dir():  # the count from the array's metadata: no coordinates read
            group = store.open_store(path)
            tiles[tag], attrs = int(group["coords"].shape[0]), dict(group.attrs)
    if len(tiles) == len(grids):
        w, h = attrs["slide_dimensions"]
        return SlideSize(slide_id, int(w), int(h), float(attrs["mpp"]), tiles, "tiles")
    mask_png = Path(layout.segment(slide_id)) / "mask.png"
    if mask_png.is_file() and mask_png.with_name("mask.json").is_file():
        mask, info = read_tissue_mask(mask_png)
        (w, h), mpp = info["dimensions"], float(info["mpp"])
        return SlideSize(slide_id, w, h, mpp, grid_tiles(mask, info["downsample"], w, h, mpp, grids), "mask")
    return None


def slide_header(
    path: str | os.PathLike[str], mpp_override: float | None, mpp_fallback: float | None
) -> tuple[int, int, float] | None:
    """(width, height, mpp) of a slide from its header, or None where it cannot be opened."""
    from wsi_asmil.slides.slide import Slide

    try:
        with Slide(path, mpp_override, mpp_fallback) as s:
            return int(s.dimensions[0]), int(s.dimensions[1]), float(s.mpp)
    except Exception:  # unreadable slides are the inventory's to report, not the plan's
        return None


def grid_cells(width: int, height: int, mpp: float, params: TileParams) -> float:
    """Cells of a slide's tile grid (tissue or not): what a tissue share is a share of."""
    stride = params.tile_size * params.target_mpp / mpp * (1 - params.overlap)
    return max(1.0, (width / stride) * (height / stride))


def sampled_sizes(slides: Mapping[str, str], layout: RunLayout, grids: Mapping[str, TileParams],
                  segment: Mapping[str, Any], mpp: Mapping[str, float | None], mpp_fallback: float | None,
                  seed: int = 0) -> tuple[list[SlideSize], list[str]]:
    """Every slide's size: known where the run has it, else from a sample of segmented thumbnails.

    Slide headers are read only for slides the run has not segmented yet, so a resumed run opens
    no slide at all."""
    from wsi_asmil.slides.slide import Slide
    from wsi_asmil.tissue.segment import SegmentParams, segment_image

    ids = sorted(slides)
    sizes = {sid: s for sid in ids if (s := _known_size(sid, layout, grids)) is not None}
    unknown = [sid for sid in ids if sid not in sizes]
    if not unknown:
        return [sizes[s] for s in ids], []
    sample = random.Random(seed).sample(unknown, min(len(unknown), SAMPLE_HEADERS))
    headers = {sid: h for sid in sample if (h := slide_header(slides[sid], mpp.get(sid), mpp_fallback))}
    params = SegmentParams(**segment)
    shares: dict[str, list[float]] = {tag: [] for tag in grids}
    for sid in list(headers)[:SAMPLE_SLIDES]:
        w, h, m = headers[sid]
        try:
            with Slide(slides[sid], mpp.get(sid), mpp_fallback) as s:
                thumb, ds = s.thumbnail_at_mpp(params.mpp)
        except Exception:
            continue
        mask = segment_image(thumb, m * ds, params)[0]
        sizes[sid] = SlideSize(sid, w, h, m, grid_tiles(mask, ds, w, h, m, grids), "sampled")
        for tag, p in grids.items():
            shares[tag].append(sizes[sid].tiles[tag] / grid_cells(w, h, m, p))
    typical = list(headers.values()) or [(s.width, s.height, s.mpp) for s in sizes.values()]
    if not typical:
        return [sizes[s] for s in ids if s in sizes], ["no slide could be read: the plan counts no tiles"]
    mean_share = {tag: float(np.mean(v)) if v else 0.5 for tag, v in shares.items()}
    for i, sid in enumerate(unknown):
        if sid in sizes:
            continue
        w, h, m = headers.get(sid) or typical[i % len(typical)]
        tiles = {tag: int(round(mean_share[tag] * grid_cells(w, h, m, p))) for tag, p in grids.items()}
        sizes[sid] = SlideSize(sid, w, h, m, tiles, "sampled")
    n_thumbnails = len(next(iter(shares.values()), []))
    notes = [f"{len(unknown)} slide(s) not segmented yet: their tiles follow the tissue share of "
             f"{n_thumbnails} segmented thumbnail(s)"]
    return [sizes[s] for s in ids], notes


def known_sizes(masks: Sequence[tuple[str, int, int, float, np.ndarray, float]],
                grids: Mapping[str, TileParams], source: str) -> list[SlideSize]:
    """Sizes of slides whose tissue masks are known before the run: ``(slide_id, width, height,
    mpp, mask, mask downsample)`` each (the demo's, from its synthetic layouts)."""
    return [SlideSize(sid, w, h, mpp, grid_tiles(mask, ds, w, h, mpp, grids), source)
            for sid, w, h, mpp, mask, ds in masks]


def plan_run(
    config: Mapping[str, Any],
    layout: RunLayout,
    slides: Mapping[str, str] | None,
    labelled: Sequence[str],
    grids: Mapping[str, TileParams],
    heatmap_models: Sequence[str],
    n_folds: int,
    n_classes: int = 2,
    mpp: Mapping[str, float | None] | None = None,
    demo: Sequence[tuple[str, int, int, float, np.ndarray, float]] | None = None,
) -> DiskPlan:
    """The run's disk plan. ``slides`` maps ids to files; for the demo, whose slides the run makes,
    it is None and ``demo`` holds their tissue masks (:func:`wsi_asmil.synthetic.demo_tissue`).
    ``grids`` are the tilings the run cuts, the training grid first (then, for heatmaps, the dense one)."""
    out = Path(layout.root)
    notes: list[str] = []
    if slides is None:
        sizes = known_sizes(demo or [], grids, "layout")
    else:
        sizes, notes = sampled_sizes(slides, layout, grids, config["segment"], mpp or {}, config.get("mpp_fallback"))
    train_grid = next(iter(grids))
    dense_grid = list(grids)[-1]
    labelled_set = set(labelled)
    heat = [s for s in sizes if s.slide_id in labelled_set]
    seg_mpp = float(config["segment"]["mpp"])
    hm = config["heatmap"]

    dim = None
    compression = None
    for tag in grids:
        d, c = _store_stats(Path(RunLayout(layout.root, tag, layout.encoder).features_dir))
        dim, compression = dim or d, compression or c
    encoder = config["features"]["encoder"]
    if dim is None:
        dim = encoder_dim(encoder)
    if compression is None:
        compression = ENCODER_COMPRESSION.get(encoder, DEFAULT_COMPRESSION)
        if encoder not in ENCODER_COMPRESSION:
            notes.append(f"no {encoder} feature store yet: features counted uncompressed (an upper bound)")

    stages = [
        Stage("segment", ("segment",),
              sum(SEGMENT_FIXED + blocks(SEGMENT_PER_PX * s.pixels_at(seg_mpp)) for s in sizes)),
        Stage("tiles", ("tiles",),
              sum(tiles_store_bytes(s.tiles[tag]) + blocks(GRID_PNG_PER_PX * s.pixels_at(seg_mpp))
                  for s in sizes for tag in grids)),
        Stage("features", ("features",), sum(store_bytes(s.tiles[tag], dim, compression)
                                          for tag in grids for s in (sizes if tag == train_grid else heat))),
    ]
    params_per_model = {m: checkpoint_parameters(m, dim, n_classes, config["train"].get(m) or {})
                        for m in config["train"]["models"]}
    copies = 2 if config["train"].get("keep_last") else 1
    stages.append(Stage("models", ("models",), sum(
        n_folds * (copies * blocks(2 * n + 64 * 1024) + FOLD_FILES) for n in params_per_model.values())))
    hm_mpp = float(hm["mpp"])
    per_slide_heatmap = [
        blocks(HEATMAP_PER_PX * s.pixels_at(hm_mpp))
        + blocks(TOPK_PER_TILE_PX * int(hm["top_k"]) * int(config["tiling"]["tile_size"]) ** 2 * 3)
        + blocks(GEOJSON_PER_TILE * s.tiles[dense_grid])
        for s in heat
    ]
    stages.append(Stage("heatmaps", ("heatmaps",), len(heatmap_models) * sum(per_slide_heatmap)))
    report = 1024 * 1024 + 16 * 1024 * len(sizes)
    viewer_cfg = config.get("viewer") or {}
    if viewer_cfg.get("enabled") and heatmap_models:
        sample = sorted(heat, key=lambda s: s.slide_id)[: int(hm["report_sample"])]
        pyramid = 4 / 3  # a Deep Zoom pyramid's levels add a third to its full-resolution level
        slide_mpp, overlay_mpp = float(viewer_cfg["slide_mpp"]), float(viewer_cfg["overlay_mpp"])
        report += 600 * 1024 + sum(
            blocks(VIEWER_SLIDE_PER_PX * s.pixels_at(slide_mpp) * pyramid)
            + len(heatmap_models) * blocks(VIEWER_OVERLAY_PER_PX * s.pixels_at(overlay_mpp) * pyramid)
            for s in sample)
    stages.append(Stage("report", ("report", "localisation"), report))
    if slides is None:
        stages.insert(0, Stage("demo slides", ("demo",), sum(blocks(DEMO_SVS_PER_PX * s.width * s.height)
                                                            for s in sizes)))
    jobs = len(sizes) * (2 + 2 * len(grids)) + len(heat) * len(heatmap_models) + n_folds * len(params_per_model)
    stages.append(Stage("logs", ("logs", "benchmarks", "manifests"), jobs * 2 * BLOCK + 64 * 1024))
    for stage in stages:
        stage.written = sum(du(out / f) for f in stage.folders)
    scratch = tempfile.gettempdir()
    return DiskPlan(
        stages=stages, out_dir=str(out), free=free_bytes(out), filesystem=str(mount_point(out)),
        scratch_need=scratch_bytes(config, heat, train_grid, dim, n_folds), scratch_free=free_bytes(scratch),
        scratch_dir=scratch, notes=notes,
    )


def map_rows(model: str, hyper: Mapping[str, Any]) -> int:
    """Attention maps per tile a model keeps for the instability metric (ASMIL: heads x tokens)."""
    if model.startswith("asmil"):
        return int(hyper.get("n_heads", 8)) * int(hyper.get("n_tokens", 8))
    if model == "acmil":
        return int(hyper.get("n_branches", 5))
    return 1


def scratch_bytes(config: Mapping[str, Any], labelled: Sequence[SlideSize], grid: str, dim: int, n_folds: int) -> int:
    """Training's scratch under $TMPDIR: two epochs' attention maps of a fold's val and test tiles,
    written only when the fold's features stream from disk (more than half the host's memory)."""
    tiles = sum(s.tiles[grid] for s in labelled)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if tiles * dim * 4 <= memory / 2:
        return 0
    held_out = 1 / max(1, n_folds) + float(config["split"].get("val_fraction", 0.2)) * (1 - 1 / max(1, n_folds))
    rows = max(map_rows(m, config["train"].get(m) or {}) for m in config["train"]["models"])
    return int(2 * rows * 4 * tiles * held_out)


def shrink_advice(plan: DiskPlan) -> str:
    """The config keys that shrink the biggest stages, biggest first."""
    advice = {
        "features": "features.encoder (a narrower encoder), heatmap.overlap (0 = no dense heatmap grid)",
        "heatmaps": "heatmap.models (fewer models), heatmap.mpp (coarser maps), heatmap.top_k",
        "models": "train.models, train.keep_last: false, split.folds",
        "report": "viewer.enabled: false, heatmap.report_sample, viewer.slide_mpp",
        "tiles": "tiling.target_mpp (coarser tiles), tiling.min_tissue_fraction",
        "segment": "segment.mpp",
        "demo slides": "demo.n_slides",
        "logs": "fewer slides per run",
    }
    ranked = sorted(plan.stages, key=lambda s: -s.remaining)
    return "; ".join(f"{s.name}: {advice[s.name]}" for s in ranked if s.remaining and s.name in advice)


def check(plan: DiskPlan, enabled: bool = True) -> str | None:
    """Stop a run that will not fit (DiskShortError), or return a warning for a tight one."""
    if not enabled:
        return None
    verdict = plan.verdict()
    if verdict == "short":
        if plan.needed > plan.free:
            where = (f"the run needs about {human_bytes(plan.needed)} more on {plan.filesystem} "
                     f"(for {plan.out_dir}) and {human_bytes(plan.free)} is free")
        else:
            where = (f"training needs about {human_bytes(plan.scratch_need)} of scratch in {plan.scratch_dir} "
                     f"({mount_point(plan.scratch_dir or '/tmp')}) and {human_bytes(plan.scratch_free or 0)} is free")
        raise DiskShortError(
            f"wsi-asmil: not enough disk: {where}. Free space, point out_dir (or TMPDIR) elsewhere, or shrink "
            f"the run: {shrink_advice(plan)}. To run anyway: --config disk_check=false")
    if verdict == "tight":
        return (f"wsi-asmil: warning: the run will leave only {human_bytes(plan.free - plan.needed)} free on "
                f"{plan.filesystem}; shrink it with {shrink_advice(plan)}")
    return None
