"""Feature extraction: every tile of a slide through a frozen encoder into a features store.

The CPU side only reads and decodes uint8 tiles, in DataLoader worker processes that each keep one
handle on the slide and read whole batches in slide order. Where the read level is a JPEG-tiled
TIFF level (Aperio SVS, generic TIFF) that agrees with OpenSlide, workers decode the file's own
JPEG tiles directly, each about once; :mod:`wsi_asmil.slides.tile_reader` makes that choice. Resizing
to the encoder's input, conversion to float, normalisation, channels_last and bf16 autocast run on
the compute device, where they are cheap, and the device runs a batch ahead of the host, which
collects results one batch late so the device never waits on the copy back.

Rows are written a whole Zarr chunk at a time by a background thread into a hidden scratch store
that records its progress (:class:`wsi_asmil.features.store.PartialFeatures`): a job killed half way
through a large slide resumes after the last finished chunk, and the result equals an
uninterrupted run. The store appears at its final path only when complete.

A tile that cannot be decoded (a corrupt JPEG tile inside an otherwise readable slide) is logged,
skipped and counted: its row is left out of the features store together with its coordinates, and
the store's attrs record ``n_failed_tiles`` and ``failed_coords``. So the features store has exactly
``n_failed_tiles`` rows fewer than the tiles store. A slide where more than
``MAX_FAILED_FRACTION`` of the tiles fail is damaged as a whole, and fails with a message.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.fx.experimental.optimization import fuse as fx_fuse
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from wsi_asmil.core.args import add_feature_args, add_slide_args, setup_logging
from wsi_asmil.core.devices import resolve_device, usable_cores
from wsi_asmil.core.disk import DiskFullError, is_disk_full
from wsi_asmil.core.memory import is_out_of_memory
from wsi_asmil.features import store
from wsi_asmil.features.encoders import Encoder, build_encoder
from wsi_asmil.slides.slide import RegionReadError, Slide, SlideError
from wsi_asmil.slides.tile_reader import ReadPlan, TileReader

log = logging.getLogger(__name__)

#: More undecodable tiles than this share of a slide's tiles fails the slide: the file is damaged
#: (truncated, corrupt), and features of what is left would silently misrepresent it.
MAX_FAILED_FRACTION = 0.5


class FeatureExtractionError(RuntimeError):
    """Feature extraction of one slide failed; the message names the slide and what to do."""


class TileDataset(Dataset):
    """uint8 (h, w, 3) tiles of one slide at the read level, fetched a whole batch at a time.

    Each worker process opens its own handles through its copy of the :class:`TileReader`.
    """

    def __init__(
        self,
        slide_path: str | Path,
        coords: np.ndarray,
        plan: ReadPlan,
        mpp_override: float | None = None,
        mpp_fallback: float | None = None,
    ) -> None:
        self.coords = coords
        self.reader = TileReader(slide_path, plan, mpp_override, mpp_fallback)

    def __len__(self) -> int:
        return len(self.coords)

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 tiles (B, h, w, 3), read ok (B,)); a tile that cannot be decoded is blank, not ok."""
        w, h = self.reader.plan.read_size
        tiles = torch.empty((len(indices), h, w, 3), dtype=torch.uint8)
        ok = torch.ones(len(indices), dtype=torch.bool)
        for j, i in enumerate(indices):
            try:
                tiles[j] = torch.from_numpy(self.reader.read(*(int(v) for v in self.coords[i])))
            except RegionReadError as exc:  # the handle was reopened; the next tile reads normally
                log.warning("tile %d at level-0 (%d, %d) skipped: %s", i, *self.coords[i], exc)
                tiles[j] = 0
                ok[j] = False
        return tiles, ok


class ChunkAlignedBatches(Sampler[list[int]]):
    """Batches of consecutive rows from ``start`` on that never straddle a store chunk, so every
    finished chunk can be checkpointed on its own."""

    def __init__(self, n_rows: int, batch_size: int, chunk_rows: int, start: int = 0) -> None:
        self.ranges = [
            (a, min(a + batch_size, c + chunk_rows, n_rows))
            for c in range(start, n_rows, chunk_rows)
            for a in range(c, min(c + chunk_rows, n_rows), batch_size)
        ]

    def __iter__(self) -> Iterator[list[int]]:
        return (list(range(a, b)) for a, b in self.ranges)

    def __len__(self) -> int:
        return len(self.ranges)


def _as_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The dataset already returns a stacked batch; DataLoader must not collate it again."""
    return batch


def use_bf16(device: torch.device, precision: str) -> bool:
    """bf16 autocast where the hardware has native bf16 (CUDA, AVX512-BF16/AMX CPUs); else fp32."""
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def fold_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of a frozen CNN with each BatchNorm folded into the convolution before it.

    At inference a BatchNorm is a fixed affine map, so folding it changes results only at float
    rounding and saves a pass over every activation (about 20% of ResNet-18 on a 2-core CPU).
    Models without BatchNorm, or that torch.fx cannot trace, are returned as they are.
    """
    if not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()):
        return model
    try:
        return fx_fuse(model.eval())
    except Exception as exc:  # an untraceable timm model still works, only unfused
        log.info("BatchNorm left unfolded (%s: %s)", type(exc).__name__, exc)
        return model


class Embedder:
    """An encoder on a device, fed uint8 NHWC batches: resize and normalisation run on the device.

    Returns float16 features still on the device (the copy back is the caller's, a batch later).
    """

    def __init__(self, encoder: Encoder, device: torch.device, bf16: bool, compile: bool = False) -> None:
        self.encoder = encoder
        self.device = device
        self.bf16 = bf16
        self.size = encoder.spec.input_size
        self.model = fold_batchnorm(encoder.model).to(device).to(memory_format=torch.channels_last)
        if compile:
            self.model = torch.compile(self.model, dynamic=False)
        shape = (1, 3, 1, 1)
        self.mean = torch.tensor(encoder.spec.mean, device=device).view(shape) * 255.0
        self.std = torch.tensor(encoder.spec.std, device=device).view(shape) * 255.0

    @torch.inference_mode()
    def __call__(self, tiles_u8: torch.Tensor) -> torch.Tensor:
        x = tiles_u8.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        x = ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.model(x)
        return out.to(torch.float16)


def loader_settings(
    device: torch.device, threads: int, batch_size: int | None, num_workers: int | None
) -> tuple[int, int]:
    """Tiles per batch and reader processes, choosing where the config says ``auto`` (None).

    A GPU embeds ResNet-18 tiles some ten times faster than one core decodes them, so it gets large
    batches and every core of the job but one as a reader. On a CPU the encoder needs the cores
    itself: one reader is enough to keep reading off the critical path.
    """
    if device.type == "cuda":
        return batch_size or 512, max(1, threads - 1) if num_workers is None else num_workers
    return batch_size or 64, min(1, threads - 1) if num_workers is None else num_workers


def fingerprint(coords: np.ndarray, attrs: dict[str, Any]) -> str:
    """Identity of a store's rows: the tiles and every setting that changes a feature value."""
    h = hashlib.sha256(np.ascontiguousarray(coords, dtype=np.int64).tobytes())
    keys = ("slide_id", "encoder", "timm_name", "weights", "input_size", "precision", "reader",
            "read_level", "read_size", "norm_mean", "norm_std")
    h.update(json.dumps({k: attrs.get(k) for k in keys}, sort_keys=True).encode())
    return h.hexdigest()


def extract_slide(
    slide_path: str | Path,
    tiles_store: str | Path,
    out_store: str | Path,
    encoder: Encoder,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int = 64,
    num_workers: int = 1,
    mpp_override: float | None = None,
    mpp_fallback: float | None = None,
    reader: str = "auto",
    compile: bool = False,
    embedder: Embedder | None = None,
    extra_attrs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Embed every tile of a tiles store and write the features store atomically (resumably).

    ``embedder``: an :class:`Embedder` of ``encoder`` already on its device, which a job that
    embeds several slides builds once (its device and precision then replace ``device``,
    ``precision`` and ``compile``). ``extra_attrs`` are recorded in the store's attrs as well.
    """
    started = time.perf_counter()
    coords, _, tile_attrs = store.read_tiles(tiles_store)
    sid = tile_attrs["slide_id"]
    dev = resolve_device(device) if embedder is None else embedder.device
    bf16 = use_bf16(dev, precision) if embedder is None else embedder.bf16
    size = encoder.spec.input_size
    # The encoder sees the tile's physical field at its own input size.
    field_mpp = tile_attrs["target_mpp"] * tile_attrs["tile_size"] / size
    with Slide(slide_path, mpp_override, mpp_fallback) as slide:
        plan = ReadPlan.for_slide(slide, coords, field_mpp, size, tile_attrs["read_level"], reader)
    attrs = {
        **{k: v for k, v in tile_attrs.items() if k not in ("kind", "created", "wsi_asmil_version")},
        "encoder": encoder.name,
        "timm_name": encoder.spec.timm_name,
        "weights": encoder.weights_id,
        "input_size": size,
        "norm_mean": list(encoder.spec.mean),
        "norm_std": list(encoder.spec.std),
        "precision": "bf16" if bf16 else "fp32",
        "reader": plan.reader,
        "read_size": list(plan.read_size),
        **(extra_attrs or {}),
    }
    embed = Embedder(encoder, dev, bf16, compile) if embedder is None else embedder
    try:
        partial = store.PartialFeatures(out_store, coords, encoder.dim, attrs, fingerprint(coords, attrs))
        if partial.resumed_from:
            log.info("slide '%s': resuming after %d of %d finished rows", sid, partial.resumed_from, len(coords))
        _embed_rows(slide_path, coords, plan, embed, partial, batch_size, num_workers, mpp_override, mpp_fallback, sid)
        if partial.failed and len(partial.failed) > MAX_FAILED_FRACTION * len(coords):
            partial.discard()
            raise FeatureExtractionError(
                f"slide '{sid}': {len(partial.failed)} of {len(coords)} tiles of {slide_path} cannot be "
                f"decoded (more than {MAX_FAILED_FRACTION:.0%}): the file is truncated or corrupt; "
                "copy it again or re-export it from the scanner (the log lists the tiles)"
            )
        partial.finish()
    except OSError as exc:
        if is_disk_full(exc, out_store):
            # the scratch goes, to give its space back to the jobs still running
            shutil.rmtree(store.PartialFeatures.scratch_for(out_store), ignore_errors=True)
            raise DiskFullError(
                out_store,
                note=f"slide '{sid}': its partial store was removed. Free space under out_dir (or point "
                "out_dir at a larger disk) and rerun: finished slides are kept",
            ) from exc
        raise
    seconds = time.perf_counter() - started
    done = len(coords) - partial.resumed_from
    gpu = f"; peak GPU memory {torch.cuda.max_memory_allocated(dev) / 2**20:.0f} MiB" if dev.type == "cuda" else ""
    log.info("slide '%s': %d tiles in %.2f s (%.1f tiles/s)%s", sid, done, seconds, done / max(seconds, 1e-9), gpu)
    failed = partial.failed
    attrs.update(n_failed_tiles=len(failed))
    if failed:
        log.warning(
            "slide '%s': %d of %d tiles could not be decoded and were skipped (features store has "
            "%d rows; failed coords in its attrs)", sid, len(failed), len(coords), len(coords) - len(failed),
        )
    log.info(
        "slide '%s': %d tiles -> %d-d %s features on %s (%s, %s reads)",
        sid, len(coords) - len(failed), encoder.dim, encoder.name, dev, attrs["precision"], plan.reader,
    )
    return attrs


def _embed_rows(
    slide_path: str | Path,
    coords: np.ndarray,
    plan: ReadPlan,
    embed: Embedder,
    partial: store.PartialFeatures,
    batch_size: int,
    num_workers: int,
    mpp_override: float | None,
    mpp_fallback: float | None,
    sid: str,
) -> None:
    """Read, embed and checkpoint every row not yet in ``partial``.

    The device works on batch i while the host collects batch i-1, and a background thread writes
    each finished chunk (at most one in flight), so reading, compute and writing overlap.
    """
    n = len(coords)
    chunk = partial.chunk_rows
    sampler = ChunkAlignedBatches(n, batch_size, chunk, partial.rows_done)
    dataset = TileDataset(slide_path, coords, plan, mpp_override, mpp_fallback)
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=_as_batch,
        num_workers=num_workers,
        pin_memory=embed.device.type == "cuda",
        prefetch_factor=2 if num_workers > 0 else None,
    )
    buffer = np.empty((0, embed.encoder.dim), dtype=np.float16)
    buffer_start, buffer_failed = partial.rows_done, []
    pending: deque[tuple[int, torch.Tensor, torch.Tensor]] = deque()
    writes: Future | None = None
    progress = tqdm(total=n, initial=partial.rows_done, desc=f"features {sid}", unit="tile", mininterval=5, disable=None)

    def collect(start: int, feats: torch.Tensor, ok: torch.Tensor) -> None:
        nonlocal buffer, buffer_start, buffer_failed, writes
        rows = feats.cpu().numpy()
        if start == buffer_start:
            buffer = np.empty((min(chunk, n - start), rows.shape[1]), dtype=np.float16)
        buffer[start - buffer_start : start - buffer_start + len(rows)] = rows
        buffer_failed += (start + torch.nonzero(~ok).flatten()).tolist()
        progress.update(len(rows))
        if start + len(rows) == buffer_start + len(buffer):
            if writes is not None:
                writes.result()
            writes = pool.submit(partial.write_chunk, buffer_start, buffer, buffer_failed)
            buffer_start, buffer_failed = start + len(rows), []

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="features-writer") as pool:
        try:
            for (start, _), (tiles, ok) in zip(sampler.ranges, loader):
                pending.append((start, _embed_batch(embed, tiles, sid, batch_size), ok))
                if len(pending) > 1:
                    collect(*pending.popleft())
            while pending:
                collect(*pending.popleft())
        finally:
            if writes is not None:
                writes.result()
            progress.close()


def _embed_batch(embed: Embedder, tiles: torch.Tensor, slide_id: str, batch_size: int) -> torch.Tensor:
    try:
        return embed(tiles)
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        raise FeatureExtractionError(
            f"slide '{slide_id}': out of memory on {embed.device} embedding a batch of {len(tiles)} tiles "
            f"({exc.__class__.__name__}). Lower features.batch_size (now {batch_size}), or set "
            "features.device: cpu, or free the device (another process may hold its memory); a "
            "rerun continues after the last finished chunk"
        ) from exc


def start_job(args: argparse.Namespace) -> tuple[Encoder, Embedder, int, int]:
    """What a features job sets up once, however many slides it embeds: torch threads, tiles per
    batch, reader processes, the encoder and its (folded, possibly compiled) copy on the device.

    Returns (encoder, embedder, batch size, reader processes).
    """
    cores = usable_cores()
    threads = min(args.threads, cores) if args.threads else cores
    try:
        dev = resolve_device(args.device)
    except RuntimeError as exc:  # CUDA asked for where there is none
        log.error("features.device: %s", exc)
        raise SystemExit(1) from None
    batch_size, num_workers = loader_settings(dev, threads, args.batch_size, args.num_workers)
    torch.set_num_threads(threads if args.threads else max(1, cores - num_workers))
    log.info("batches of %d tiles, %d reader process(es), %d torch thread(s)", batch_size, num_workers, torch.get_num_threads())
    encoder = build_encoder(args.encoder, args.weights, args.seed)
    embedder = Embedder(encoder, dev, use_bf16(dev, args.precision), args.compile)
    return encoder, embedder, batch_size, num_workers


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m wsi_asmil.features.extract", description=__doc__)
    add_slide_args(p)
    p.add_argument("--tiles", required=True, help="tiles Zarr store of the slide")
    p.add_argument("--out", required=True, help="features Zarr store to write")
    add_feature_args(p)
    args = p.parse_args(argv)
    setup_logging()
    encoder, embedder, batch_size, num_workers = start_job(args)
    try:
        extract_slide(
            args.slide, args.tiles, args.out, encoder, batch_size=batch_size, num_workers=num_workers,
            mpp_override=args.slide_mpp, mpp_fallback=args.mpp_fallback, reader=args.reader, embedder=embedder,
        )
    except (FeatureExtractionError, SlideError) as exc:  # a clear message, no traceback
        log.error("%s", exc)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
