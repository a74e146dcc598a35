"""Feature extraction: every tile of a slide through a frozen encoder into a features store.

The CPU side only reads and decodes uint8 tiles (in DataLoader workers, one OpenSlide handle per
worker, tiles in slide order); conversion to float, normalisation, channels_last and bf16 autocast
happen on the compute device, where they are cheap. The store appears only when complete.

A tile that cannot be decoded (a corrupt JPEG tile inside an otherwise readable slide) is logged,
skipped and counted: its row is left out of the features store together with its coordinates, and
the store's attrs record ``n_failed_tiles`` and ``failed_coords``. So the features store has exactly
``n_failed_tiles`` rows fewer than the tiles store. A slide where more than
``MAX_FAILED_FRACTION`` of the tiles fail is damaged as a whole, and fails with a message.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from wsi_asmil import store
from wsi_asmil.cli import add_slide_args, setup_logging
from wsi_asmil.encoders import Encoder, build_encoder
from wsi_asmil.io import atomic_path
from wsi_asmil.memory import is_out_of_memory
from wsi_asmil.slide import RegionReadError, Slide, SlideError

log = logging.getLogger(__name__)

#: More undecodable tiles than this share of a slide's tiles fails the slide: the file is damaged
#: (truncated, corrupt), and features of what is left would silently misrepresent it.
MAX_FAILED_FRACTION = 0.5


class FeatureExtractionError(RuntimeError):
    """Feature extraction of one slide failed; the message names the slide and what to do."""


class TileDataset(Dataset):
    """uint8 (S, S, 3) tiles of one slide at the tiling's mpp, read lazily per worker.

    The OpenSlide handle is opened on first use inside each worker process (handles do not
    survive pickling and must not be shared between processes).
    """

    def __init__(
        self,
        slide_path: str | Path,
        coords: np.ndarray,
        target_mpp: float,
        size: int,
        read_level: int,
        mpp_override: float | None = None,
        mpp_fallback: float | None = None,
    ) -> None:
        self.slide_path = str(slide_path)
        self.coords = coords
        self.target_mpp = target_mpp
        self.size = size
        self.read_level = read_level
        self.mpp_override = mpp_override
        self.mpp_fallback = mpp_fallback
        self._slide: Slide | None = None

    def __len__(self) -> int:
        return len(self.coords)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, bool]:
        """(uint8 tile, True), or (a blank tile, False) for a tile that cannot be decoded."""
        if self._slide is None:
            self._slide = Slide(self.slide_path, self.mpp_override, self.mpp_fallback)
        x, y = self.coords[i]
        try:
            tile = self._slide.read_at_mpp(int(x), int(y), self.target_mpp, self.size, self.read_level)
        except RegionReadError as exc:  # the handle was reopened; the next tile reads normally
            log.warning("tile %d at level-0 (%d, %d) skipped: %s", i, x, y, exc)
            return torch.zeros((self.size, self.size, 3), dtype=torch.uint8), False
        return torch.from_numpy(tile), True


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def use_bf16(device: torch.device, precision: str) -> bool:
    """bf16 autocast where the hardware has native bf16 (CUDA, AVX512-BF16/AMX CPUs); else fp32."""
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


class Embedder:
    """An encoder on a device, fed uint8 NHWC batches: normalisation runs on the device."""

    def __init__(self, encoder: Encoder, device: torch.device, bf16: bool) -> None:
        self.encoder = encoder
        self.device = device
        self.bf16 = bf16
        self.model = encoder.model.to(device).to(memory_format=torch.channels_last)
        shape = (1, 3, 1, 1)
        self.mean = torch.tensor(encoder.spec.mean, device=device).view(shape) * 255.0
        self.std = torch.tensor(encoder.spec.std, device=device).view(shape) * 255.0

    @torch.inference_mode()
    def __call__(self, tiles_u8: torch.Tensor) -> torch.Tensor:
        x = tiles_u8.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        x = ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.model(x)
        return out.float().cpu()


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
) -> dict[str, Any]:
    """Embed every tile of a tiles store and write the features store atomically."""
    coords, _, tile_attrs = store.read_tiles(tiles_store)
    dev = resolve_device(device)
    bf16 = use_bf16(dev, precision)
    embed = Embedder(encoder, dev, bf16)
    size = encoder.spec.input_size
    if size != tile_attrs["tile_size"]:
        log.info("tiles of %d px are read at %d px for %s", tile_attrs["tile_size"], size, encoder.name)
    # The encoder sees the tile's physical field at its own input size.
    read_mpp = tile_attrs["target_mpp"] * tile_attrs["tile_size"] / size
    dataset = TileDataset(
        slide_path, coords, read_mpp, size, tile_attrs["read_level"], mpp_override, mpp_fallback
    )
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=dev.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
    )
    attrs = {
        **{k: v for k, v in tile_attrs.items() if k not in ("kind", "created", "wsi_asmil_version")},
        "encoder": encoder.name,
        "timm_name": encoder.spec.timm_name,
        "weights": encoder.weights_id,
        "input_size": size,
        "norm_mean": list(encoder.spec.mean),
        "norm_std": list(encoder.spec.std),
        "precision": "bf16" if bf16 else "fp32",
    }
    sid = tile_attrs["slide_id"]
    out = Path(out_store)
    # Rows are embedded into a hidden scratch store first: which tiles fail is only known at the
    # end, and the final store holds exactly the tiles that were read.
    scratch = out.with_name(f".{out.name}.rows-{os.getpid()}")
    failed: list[int] = []
    try:
        with store.feature_writer(scratch, coords, encoder.dim, attrs) as writer:
            start = 0
            for tiles, ok in tqdm(loader, desc=f"features {sid}", unit="batch", mininterval=5, disable=None):
                writer.write(start, _embed_batch(embed, tiles, sid, batch_size, dev).numpy())
                failed += (start + torch.nonzero(~ok).flatten()).tolist()
                start += len(tiles)
            if failed and len(failed) > MAX_FAILED_FRACTION * len(coords):
                raise FeatureExtractionError(
                    f"slide '{sid}': {len(failed)} of {len(coords)} tiles of {slide_path} cannot be "
                    f"decoded (more than {MAX_FAILED_FRACTION:.0%}): the file is truncated or corrupt; "
                    "copy it again or re-export it from the scanner (the log lists the tiles)"
                )
        _finish_store(scratch, out, coords, failed, encoder.dim, attrs)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(
                exc.errno,
                f"slide '{sid}': no space left on the device while writing {out} ({exc}); the "
                "partial store was removed. Free space under out_dir (or point out_dir at a larger "
                "disk) and rerun: finished slides are kept",
            ) from exc
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    attrs.update(n_failed_tiles=len(failed))
    if failed:
        log.warning(
            "slide '%s': %d of %d tiles could not be decoded and were skipped (features store has "
            "%d rows; failed coords in its attrs)", sid, len(failed), len(coords), len(coords) - len(failed),
        )
    log.info(
        "slide '%s': %d tiles -> %d-d %s features on %s (%s)",
        sid, len(coords) - len(failed), encoder.dim, encoder.name, dev, attrs["precision"],
    )
    return attrs


def _embed_batch(
    embed: Embedder, tiles: torch.Tensor, slide_id: str, batch_size: int, device: torch.device
) -> torch.Tensor:
    try:
        return embed(tiles)
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        raise FeatureExtractionError(
            f"slide '{slide_id}': out of memory on {device} embedding a batch of {len(tiles)} tiles "
            f"({exc.__class__.__name__}). Lower features.batch_size (now {batch_size}), or set "
            "features.device: cpu, or free the device (another process may hold its memory)"
        ) from exc


def _finish_store(
    scratch: Path, out: Path, coords: np.ndarray, failed: list[int], dim: int, attrs: dict[str, Any]
) -> None:
    """Move the complete scratch store into place, or, when tiles failed, write the final store
    with only the rows that were read (copied in row chunks, so memory stays bounded)."""
    failed_coords = coords[failed].tolist() if failed else []
    extra = {"n_failed_tiles": len(failed), "failed_coords": failed_coords}
    if not failed:
        zarr.open_group(scratch, mode="r+").attrs.update(extra)
        with atomic_path(out) as tmp:
            os.rename(scratch, tmp)
        return
    keep = np.ones(len(coords), dtype=bool)
    keep[failed] = False
    rows = zarr.open_group(scratch, mode="r")["features"]
    with store.feature_writer(out, coords[keep], dim, {**attrs, **extra}) as writer:
        pos = 0
        for start in range(0, len(coords), store.ROWS_PER_CHUNK):
            part = rows[start : start + store.ROWS_PER_CHUNK][keep[start : start + store.ROWS_PER_CHUNK]]
            writer.write(pos, part)
            pos += len(part)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m wsi_asmil.features", description=__doc__)
    add_slide_args(p)
    p.add_argument("--tiles", required=True, help="tiles Zarr store of the slide")
    p.add_argument("--out", required=True, help="features Zarr store to write")
    p.add_argument("--encoder", default="resnet18", help="short name (resnet18, vit_small, ...) or any timm name")
    p.add_argument("--weights", default="random", help="state-dict file, 'hub', or 'random'")
    p.add_argument("--seed", type=int, default=0, help="seed of random weights")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=1, help="tile-reading processes")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    setup_logging()
    cores = os.cpu_count() or 1
    torch.set_num_threads(min(args.threads, cores) if args.threads else max(1, cores - args.num_workers))
    encoder = build_encoder(args.encoder, args.weights, args.seed)
    try:
        extract_slide(
            args.slide, args.tiles, args.out, encoder, args.device, args.precision,
            args.batch_size, args.num_workers, args.slide_mpp, args.mpp_fallback,
        )
    except (FeatureExtractionError, SlideError) as exc:  # a clear message, no traceback
        log.error("%s", exc)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
