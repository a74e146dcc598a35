"""Feature-extraction throughput, slide file to finished Zarr store, with the two ceilings around it.

    python benchmarks/feature_speed.py --work /tmp/fbench                       # CAMELYON-sized slide
    python benchmarks/feature_speed.py --work /tmp/fbench --size 16384x12288    # a small slide
    python benchmarks/feature_speed.py --work /tmp/fbench --encoders resnet18 vit_small --compile

One run prints, per encoder, tiles per second for:

* **decode ceiling**: the read level's own JPEG tiles (those under tissue) decoded by every core
  with no model, counted as 224-px tiles' worth of pixels: what the machine's CPUs can feed;
* **reader**: our DataLoader and tile reader with no model (the CPU side of the pipeline), with
  the direct JPEG reader and with OpenSlide;
* **model ceiling**: the encoder on random uint8 batches already on the device, resize and
  normalisation included (``--batch-size``);
* **ours, end to end**: ``python -m wsi_asmil.features.extract`` from the slide file to a finished Zarr
  store (the real command, in its own process; the throughput is the one it logs, which excludes
  interpreter start and model build, also reported as the job's wall time), with the peak memory of its process tree (sum of PSS over
  the process and its reader workers, sampled every 0.5 s; GPU peak from the log);
* **CLAM-style loop**: fp32, one OpenSlide ``read_region`` per tile in DataLoader workers, PIL
  resize + ToTensor + Normalize on the CPU, one DataLoader for the slide, results copied back per
  batch, on the first ``--clam-tiles`` tiles; and the ratio of ours to it.

On CUDA it also checks that the GPU path and the CPU path give the same features (fp32, to float16
rounding) for ``--check-tiles`` tiles.

The benchmark slide is an Aperio-style pyramid (0.25 um/px, levels 2x, 8x, 32x) whose level-0 and
2x tiles are JPEG tiles of a rendered synthetic slide (:mod:`wsi_asmil.synthetic`) laid out over a
smooth tissue map, written pre-encoded so a 100k x 80k slide takes a minute rather than an hour.
Slide, mask and tiles are kept in ``--work`` and reused. Results are printed and written to
``<work>/feature_speed.json``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import tifffile
import torch

from wsi_asmil.core.devices import resolve_device, usable_cores
from wsi_asmil.features import store
from wsi_asmil.features.encoders import build_encoder
from wsi_asmil.features.extract import Embedder, TileDataset, _as_batch, loader_settings, use_bf16
from wsi_asmil.features.tile import TileParams, tile_slide
from wsi_asmil.slides.slide import Slide
from wsi_asmil.slides.tiff_jpeg import JpegTiledLevel
from wsi_asmil.slides.tile_reader import ReadPlan
from wsi_asmil.synthetic import SlideSpec, write_slide
from wsi_asmil.synthetic.aperio import TIFF_OPTIONS
from wsi_asmil.tissue.segment import SegmentParams, segment_slide

TILE = 256
CAMELYON = (100_096, 80_128)
MPP = 0.25


# --- the benchmark slide ---------------------------------------------------------------------------


def _tissue_map(rows: int, cols: int, seed: int, coverage: float = 0.6) -> np.ndarray:
    """A smooth random tissue map on the level-0 tile grid with about ``coverage`` tissue."""
    rng = np.random.default_rng(seed)
    noise = rng.normal(size=(max(4, rows // 24), max(4, cols // 24))).astype(np.float32)
    field = cv2.resize(noise, (cols, rows), interpolation=cv2.INTER_CUBIC)
    field = cv2.GaussianBlur(field, (0, 0), max(rows, cols) / 60)
    return field > np.quantile(field, 1 - coverage)


def _pool(path: Path, level: int, limit: int = 96) -> tuple[list[bytes], list[np.ndarray]]:
    """Encoded JPEG tiles with tissue from one level of a rendered slide, and their pixels."""
    with Slide(path) as s:
        w, h = s.level_dimensions[level]
        ds = s.level_downsamples[level]
        encoded, pixels = [], []
        for y in range(0, h - TILE + 1, TILE):
            for x in range(0, w - TILE + 1, TILE):
                rgb = s.read_rgb(level, int(x * ds), int(y * ds), TILE, TILE)
                if rgb.mean() < 215:
                    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 80])
                    encoded.append(buf.tobytes())
                    pixels.append(rgb)
                if len(encoded) >= limit:
                    return encoded, pixels
    return encoded, pixels


def make_bench_slide(path: Path, width: int, height: int, seed: int = 0) -> None:
    """Write the benchmark slide (see the module docstring) atomically."""
    source = path.with_name(".pool-source.svs")
    write_slide(source, SlideSpec(4096, 4096, mpp=MPP, tumour=True, seed=seed, tissue_coverage=0.8))
    pool0, pix0 = _pool(source, 0)
    pool1, _ = _pool(source, 1)
    source.unlink()
    _, white = cv2.imencode(".jpg", np.full((TILE, TILE, 3), 255, np.uint8))
    white = white.tobytes()
    rows, cols = height // TILE, width // TILE
    tissue = _tissue_map(rows, cols, seed)
    pick = np.random.default_rng(seed).integers(0, 1 << 30, size=(rows, cols))

    def level0():
        for r in range(rows):
            for c in range(cols):
                yield pool0[pick[r, c] % len(pool0)] if tissue[r, c] else white

    rows1, cols1 = -(-rows // 2), -(-cols // 2)

    def level1():
        for r in range(rows1):
            for c in range(cols1):
                t = tissue[2 * r : 2 * r + 2, 2 * c : 2 * c + 2].any()
                yield pool1[pick[min(2 * r, rows - 1), min(2 * c, cols - 1)] % len(pool1)] if t else white

    # Level 8x from thumbnails of the level-0 tiles, so segmentation sees the same tissue.
    thumbs = [cv2.resize(p, (TILE // 8, TILE // 8), interpolation=cv2.INTER_AREA) for p in pix0]
    level8 = np.full((rows * TILE // 8, cols * TILE // 8, 3), 255, np.uint8)
    s = TILE // 8
    for r, c in zip(*np.nonzero(tissue)):
        level8[r * s : (r + 1) * s, c * s : (c + 1) * s] = thumbs[pick[r, c] % len(thumbs)]
    level32 = cv2.resize(level8, (level8.shape[1] // 4, level8.shape[0] // 4), interpolation=cv2.INTER_AREA)
    desc = (f"Aperio Image Library v12.0.15\r\n{width}x{height} [0,0 {width}x{height}] ({TILE}x{TILE}) "
            f"JPEG/RGB Q=80|AppMag = 40|MPP = {MPP:.4f}|ScanScope ID = BENCHMARK")
    tmp = path.with_name(f".{path.name}.tmp")
    opts = {k: v for k, v in TIFF_OPTIONS.items() if k != "compressionargs"}
    with tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        tw.write(level0(), shape=(rows * TILE, cols * TILE, 3), dtype=np.uint8, description=desc, **opts)
        tw.write(level1(), shape=(rows * TILE // 2, cols * TILE // 2, 3), dtype=np.uint8, description=desc, **opts)
        for img in (level8, level32):
            tw.write(img, description=desc, **TIFF_OPTIONS)
    os.replace(tmp, path)


def prepare(work: Path, size: tuple[int, int]) -> tuple[Path, Path]:
    slide = work / f"bench_{size[0]}x{size[1]}.svs"
    if not slide.exists():
        t = time.perf_counter()
        make_bench_slide(slide, *size)
        print(f"wrote {slide.name} in {time.perf_counter() - t:.0f} s", flush=True)
    tiles = work / f"{slide.stem}.tiles.zarr"
    if not tiles.exists():
        segment_slide(slide, work / f"{slide.stem}.seg", SegmentParams())
        tile_slide(slide, work / f"{slide.stem}.seg", tiles, work / f"{slide.stem}.grid.png", TileParams())
    return slide, tiles


# --- memory of a process tree ----------------------------------------------------------------------


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in open(f"/proc/{p}/task/{task}/children").read().split()]
        except OSError:
            pass
    return out


def _pss_mib(pids: list[int]) -> float:
    total = 0
    for p in pids:
        try:
            for line in open(f"/proc/{p}/smaps_rollup"):
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def run_ours(slide: Path, tiles: Path, out: Path, encoder: str, args: argparse.Namespace) -> dict:
    """The real features command in its own process, its logged throughput and peak tree PSS."""
    out_store = out / f"{encoder}.zarr"
    cmd = [sys.executable, "-m", "wsi_asmil.features.extract", "--slide", str(slide), "--tiles", str(tiles),
           "--out", str(out_store), "--encoder", encoder, "--weights", "random", "--device", args.device,
           "--batch-size", str(args.batch_size), "--num-workers", str(args.workers), "--threads", str(args.threads)]
    if args.compile:
        cmd.append("--compile")
    peak, started = 0.0, time.perf_counter()
    with subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True) as proc:
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
        reader.start()
        while proc.poll() is None:
            peak = max(peak, _pss_mib(_tree(proc.pid)))
            time.sleep(0.5)
        reader.join()
    wall = time.perf_counter() - started
    log = "".join(lines)
    (out / f"{encoder}.log").write_text(log)
    m = re.search(r"(\d+) tiles in ([\d.]+) s \(([\d.]+) tiles/s", log)
    if proc.returncode != 0 or not m:
        raise SystemExit(f"features run failed ({proc.returncode}):\n{log[-3000:]}")
    gpu = re.search(r"peak GPU memory ([\d.]+) MiB", log)
    return {"tiles": int(m.group(1)), "seconds": float(m.group(2)), "tiles_per_s": float(m.group(3)),
            "job_wall_seconds": round(wall, 2),
            "peak_pss_mib": round(peak), "peak_gpu_mib": float(gpu.group(1)) if gpu else None,
            "reader": re.search(r"\((\w+), ([\w-]+) reads\)", log).group(2)}


# --- ceilings ---------------------------------------------------------------------------------------


def _decode_range(args: tuple[str, tuple[int, int], list[int]]) -> int:
    path, size, keys = args
    level = JpegTiledLevel.find(path, size)
    assert level is not None
    for k in keys:
        level.decode(k // level.cols, k % level.cols)
    level.close()
    return len(keys)


def decode_ceiling(slide: Path, plan: ReadPlan, coords: np.ndarray, cores: int) -> dict:
    """The read level's JPEG tiles under the tissue tiles, decoded once each by ``cores`` processes."""
    with Slide(slide) as s:
        size = s.level_dimensions[plan.level]
    level = JpegTiledLevel.find(slide, size)
    if level is None:
        return {"note": "read level is not JPEG-tiled TIFF"}
    keys: set[int] = set()
    for x, y in coords:
        lx, ly = int(round(x / plan.downsample)), int(round(y / plan.downsample))
        keys.update(r * level.cols + c for r, c in level.tiles_under(lx, ly, *plan.read_size))
    order = sorted(keys)
    parts = [(str(slide), size, order[i::cores]) for i in range(cores)]
    with mp.get_context("fork").Pool(cores) as pool:
        t = time.perf_counter()
        n = sum(pool.map(_decode_range, parts))
        dt = time.perf_counter() - t
    pixels_per_tile = plan.read_size[0] * plan.read_size[1]
    return {"jpeg_tiles": n, "jpeg_tiles_per_s": n / dt,
            "tiles_per_s": n * level.tile_w * level.tile_h / pixels_per_tile / dt}


def reader_ceiling(slide: Path, coords: np.ndarray, plan: ReadPlan, workers: int, batch: int, limit: int) -> dict:
    from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

    ds = TileDataset(slide, coords[:limit], plan)
    loader = DataLoader(ds, batch_sampler=BatchSampler(SequentialSampler(ds), batch, False), collate_fn=_as_batch,
                        num_workers=workers, prefetch_factor=2 if workers else None)
    t = time.perf_counter()
    n = sum(len(tiles) for tiles, _ in loader)
    return {"tiles": n, "tiles_per_s": n / (time.perf_counter() - t)}


def model_ceiling(encoder: str, device: torch.device, batch: int, seconds: float, compile: bool) -> dict:
    enc = build_encoder(encoder, "random")
    embed = Embedder(enc, device, use_bf16(device, "auto"), compile)
    x = torch.randint(0, 256, (batch, 224, 224, 3), dtype=torch.uint8, device=device)
    for _ in range(3):
        embed(x)
    _sync(device)
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        embed(x)
        n += batch
    _sync(device)
    return {"tiles_per_s": n / (time.perf_counter() - t), "bf16": embed.bf16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# --- the CLAM-style reference loop -------------------------------------------------------------------


class ClamStyleDataset(torch.utils.data.Dataset):
    """One ``read_region`` per tile, PIL resize, ToTensor and Normalize on the CPU, all fp32."""

    def __init__(self, slide: Path, coords: np.ndarray, level: int, read_size: int) -> None:
        from torchvision import transforms

        self.slide, self.coords, self.level, self.read_size = str(slide), coords, level, read_size
        self.osr = None
        self.transform = transforms.Compose([
            transforms.Resize(224),
            transforms.ToTensor(),
            transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ])

    def __len__(self) -> int:
        return len(self.coords)

    def __getitem__(self, i: int) -> torch.Tensor:
        import openslide

        if self.osr is None:
            self.osr = openslide.OpenSlide(self.slide)
        x, y = self.coords[i]
        img = self.osr.read_region((int(x), int(y)), self.level, (self.read_size, self.read_size)).convert("RGB")
        return self.transform(img)


def clam_loop(slide: Path, coords: np.ndarray, plan: ReadPlan, encoder: str, device: torch.device, workers: int) -> dict:
    from torch.utils.data import DataLoader

    model = build_encoder(encoder, "random").model.to(device)
    ds = ClamStyleDataset(slide, coords, plan.level, plan.read_size[0])
    loader = DataLoader(ds, batch_size=256, num_workers=workers, pin_memory=device.type == "cuda")
    t = time.perf_counter()
    feats = []
    with torch.inference_mode():
        for batch in loader:
            feats.append(model(batch.to(device)).cpu().numpy())
    dt = time.perf_counter() - t
    return {"tiles": len(coords), "tiles_per_s": len(coords) / dt}


def check_equality(slide: Path, coords: np.ndarray, plan: ReadPlan, encoder: str, n: int) -> dict:
    """The same tiles and weights through the CUDA and the CPU path, both fp32."""
    enc = build_encoder(encoder, "random")
    tiles, _ = TileDataset(slide, coords[:n], plan).__getitems__(list(range(min(n, len(coords)))))
    gpu = Embedder(enc, torch.device("cuda"), bf16=False)(tiles).cpu().numpy()
    enc = build_encoder(encoder, "random")
    cpu = Embedder(enc, torch.device("cpu"), bf16=False)(tiles).numpy()
    diff = np.abs(gpu.astype(np.float32) - cpu.astype(np.float32))
    spacing = np.spacing(np.abs(cpu).astype(np.float16)).astype(np.float32)
    return {"tiles": len(tiles), "max_abs_diff": float(diff.max()),
            "max_diff_in_fp16_ulps": float((diff / spacing).max()),
            "equal_to_fp16_rounding": bool(np.allclose(gpu, cpu, rtol=2e-3, atol=2e-3))}


# --- main --------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--size", default=f"{CAMELYON[0]}x{CAMELYON[1]}", help="level-0 WxH at 0.25 um/px")
    p.add_argument("--encoders", nargs="+", default=["resnet18", "vit_small"])
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=None, help="default: the pipeline's auto (512 on CUDA, 64 on CPU)")
    p.add_argument("--workers", type=int, default=None,
                   help="reader processes (default: the pipeline's auto: cores - 1 on CUDA, 1 on CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores; reading JPEG tiles directly costs little)")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder")
    p.add_argument("--clam-tiles", type=int, default=None, help="tiles for the CLAM-style loop (default 20000 CUDA, 300 CPU)")
    p.add_argument("--check-tiles", type=int, default=256)
    p.add_argument("--ceiling-seconds", type=float, default=None, help="how long the model ceiling runs (default 10 CUDA, 20 CPU)")
    p.add_argument("--skip", nargs="*", default=[], choices=["decode", "reader", "model", "ours", "clam"])
    args = p.parse_args()
    device = resolve_device(args.device)
    args.device = str(device)
    cuda = device.type == "cuda"
    cores = usable_cores()
    args.threads = args.threads or cores
    args.batch_size, args.workers = loader_settings(device, args.threads, args.batch_size, args.workers)
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    size = tuple(int(v) for v in args.size.lower().split("x"))
    slide, tiles = prepare(args.work, size)
    coords, _, tattrs = store.read_tiles(tiles)
    with Slide(slide) as s:
        plan = ReadPlan.for_slide(s, coords, tattrs["target_mpp"], 224, tattrs["read_level"], "auto")
    machine = torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine()
    head = {"slide": slide.name, "tiles": len(coords), "device": machine, "cores": cores,
            "workers": args.workers, "batch_size": args.batch_size, "reader": plan.reader, "torch": torch.__version__}
    print(json.dumps(head), flush=True)
    results: dict = {"setup": head}
    if "decode" not in args.skip:
        results["decode_ceiling"] = decode_ceiling(slide, plan, coords, cores)
        print("decode ceiling", results["decode_ceiling"], flush=True)
    if "reader" not in args.skip:
        n = 20_000 if cuda else 2_000
        results["reader"] = reader_ceiling(slide, coords, plan, args.workers, args.batch_size, n)
        print(f"reader ({plan.reader}), no model", results["reader"], flush=True)
        if plan.reader != "openslide":
            via_openslide = plan.via_openslide()
            results["reader_openslide"] = reader_ceiling(slide, coords, via_openslide, args.workers, args.batch_size, n)
            print("reader (openslide), no model", results["reader_openslide"], flush=True)
    for encoder in args.encoders:
        r: dict = {}
        if "model" not in args.skip:
            r["model_ceiling"] = model_ceiling(encoder, device, args.batch_size, args.ceiling_seconds or (10 if cuda else 20), args.compile)
            print(encoder, "model ceiling", r["model_ceiling"], flush=True)
        if "ours" not in args.skip:
            out = args.work / "out" / slide.stem
            out.mkdir(parents=True, exist_ok=True)
            r["ours"] = run_ours(slide, tiles, out, encoder, args)
            print(encoder, "ours", r["ours"], flush=True)
        if "clam" not in args.skip:
            n = args.clam_tiles or (20_000 if cuda else 300)
            r["clam_style"] = clam_loop(slide, coords[:n], plan, encoder, device, args.workers)
            print(encoder, "CLAM-style", r["clam_style"], flush=True)
        if "ours" in r and "clam_style" in r:
            r["speedup_vs_clam"] = r["ours"]["tiles_per_s"] / r["clam_style"]["tiles_per_s"]
        if cuda and args.check_tiles:
            r["gpu_cpu_equality"] = check_equality(slide, coords, plan, encoder, args.check_tiles)
        results[encoder] = r
        print(encoder, json.dumps(r, indent=1), flush=True)
    (args.work / "feature_speed.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
