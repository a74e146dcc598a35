"""Per-slide job cost of feature extraction: one process per slide against batched jobs.

    python benchmarks/feature_batches.py --work /tmp/fb --cohort small --slides 200 --per-slide-sample 10
    python benchmarks/feature_batches.py --work /tmp/fb --cohort demo             # the demo's 24 slides
    python benchmarks/feature_batches.py --work /tmp/fb --cohort both --device cuda  # unattended, GPU node

Both ways run the workflow's own commands in their own processes, on the same slides and tiles:

* **per slide**: ``python -m wsi_asmil.features.extract`` once per slide (what the workflow ran before
  ``features.slides_per_job``): every slide pays the interpreter, the torch and timm imports, the
  encoder build and its move to the device;
* **batched**: ``python -m wsi_asmil.features.batch`` once per ``--slides-per-job`` slides (what the
  workflow runs now).

It also prints what starting a process and importing the stage's module costs for the other
per-slide stages (segmentation, tiling, drawing), against features.

For each way it prints the wall time per slide, the per-slide overhead (wall time less the slide's own
work: reading, embedding and writing its tiles, as the job logs it per slide) and the share of the
wall time that is that work. Snakemake's own per-job cost (about a second per job) comes on top
of the per-slide way and is not counted, so the figures understate the gain.

``--per-slide-sample K`` runs the per-slide way on the first K slides only (its figures are per
slide, so a sample gives them; 200 processes on a 2-core machine would take half an hour).
Cohorts: ``small`` is ``--slides`` synthetic slides of ``--size`` pixels at 0.25 um/px (a few
tiles each: the case where start costs dominate); ``demo`` is the demo cohort (24 slides of
6144 x 4608, the workflow's defaults). Slides and tiles are made once in ``--work`` and reused;
feature stores are rewritten each run. Results are also written to ``<work>/feature_batches.json``.
Timings on a shared machine are noisy: compare the two ways from the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from wsi_asmil.core.devices import resolve_device
from wsi_asmil.features import store
from wsi_asmil.features.batch import members_json
from wsi_asmil.features.tile import TileParams, tile_slide
from wsi_asmil.synthetic import write_cohort
from wsi_asmil.tissue.segment import SegmentParams, segment_slide

#: What a features job logs per slide: "slide 'x': 13 tiles in 3.95 s (...)".
_WORK = re.compile(r"slide '(.+?)': \d+ tiles in ([0-9.]+) s")
_START = re.compile(r"job start \(torch import, encoder, device\) took ([0-9.]+) s")


def prepare(work: Path, cohort: str, n_slides: int, size: tuple[int, int]) -> dict[str, tuple[Path, Path]]:
    """slide id -> (slide file, tiles store), made once and reused."""
    root = work / cohort
    if not (root / "labels.csv").exists():
        width, height = size if cohort == "small" else (6144, 4608)
        write_cohort(root, n_slides=n_slides if cohort == "small" else 24, seed=0, width=width, height=height,
                     workers=max(1, (os.cpu_count() or 1)))
    out = {}
    for slide in sorted((root / "slides").glob("*.svs")):
        sid = slide.stem
        tiles = root / "tiles" / f"{sid}.zarr"
        if not tiles.exists():
            segment_slide(slide, root / "seg" / sid, SegmentParams())
            tile_slide(slide, root / "seg" / sid, tiles, root / "seg" / sid / "grid.png", TileParams())
        out[sid] = (slide, tiles)
    return out


def feature_options(args: argparse.Namespace) -> list[str]:
    opts = ["--encoder", args.encoder, "--weights", args.weights, "--device", args.device]
    return opts + (["--threads", str(args.threads)] if args.threads else [])


def _run(cmd: list[str], log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "a") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[:4])} ... failed; see {log}")
    return time.perf_counter() - t0


def per_slide(slides: dict[str, tuple[Path, Path]], out: Path, args: argparse.Namespace) -> dict:
    log = out / "per_slide.log"
    wall = 0.0
    for sid, (slide, tiles) in slides.items():
        cmd = [sys.executable, "-m", "wsi_asmil.features.extract", "--slide", str(slide), "--tiles", str(tiles),
               "--out", str(out / f"{sid}.zarr"), *feature_options(args)]
        wall += _run(cmd, log)
    return summarise("per slide", slides, wall, log.read_text(), jobs=len(slides))


def batched(slides: dict[str, tuple[Path, Path]], out: Path, args: argparse.Namespace) -> dict:
    log = out / "batched.log"
    ids = list(slides)
    wall, jobs = 0.0, 0
    for i in range(0, len(ids), args.slides_per_job):
        part = ids[i : i + args.slides_per_job]
        members = members_json(part, lambda s: slides[s][0], lambda s: slides[s][1], lambda s: out / f"{s}.zarr", {})
        cmd = [sys.executable, "-m", "wsi_asmil.features.batch", "--members", members,
               "--marker", str(out / "batches" / f"{jobs}.json"), *feature_options(args)]
        wall += _run(cmd, log)
        jobs += 1
    return summarise(f"batched ({args.slides_per_job} per job)", slides, wall, log.read_text(), jobs=jobs)


def summarise(way: str, slides: dict, wall: float, log: str, jobs: int) -> dict:
    work = {sid: float(sec) for sid, sec in _WORK.findall(log)}
    missing = set(slides) - set(work)
    if missing:
        sys.exit(f"{way}: no per-slide timing logged for {sorted(missing)[:5]}")
    tiles = sum(len(store.read_tiles(t)[0]) for _, t in slides.values())
    n, total_work = len(slides), sum(work.values())
    starts = [float(s) for s in _START.findall(log)]
    return {
        "way": way, "slides": n, "jobs": jobs, "tiles": tiles, "wall_s": round(wall, 2),
        "wall_per_slide_s": round(wall / n, 3),
        "work_per_slide_s": round(total_work / n, 3),
        "overhead_per_slide_s": round((wall - total_work) / n, 3),
        "work_share": round(total_work / wall, 3),
        "job_start_s_mean": round(sum(starts) / len(starts), 2) if starts else None,
    }


def show(row: dict) -> None:
    print(
        f"  {row['way']:<24} {row['slides']:>4} slides {row['jobs']:>4} jobs {row['tiles']:>6} tiles  "
        f"wall {row['wall_s']:>8.1f} s  per slide {row['wall_per_slide_s']:>6.2f} s  "
        f"overhead/slide {row['overhead_per_slide_s']:>6.2f} s  work share {row['work_share']:>5.1%}"
        + (f"  (torch import + model set-up per batch job {row['job_start_s_mean']:.1f} s)" if row["way"] != "per slide" and row["job_start_s_mean"] else "")
    )


def start_costs(repeats: int = 3) -> dict[str, float]:
    """Seconds to start a stage's process and import its module (best of ``repeats``): the cost a
    per-slide job of that stage pays before any work. Only features imports torch."""
    out = {}
    for module in ("tissue.segment", "features.tile", "maps.heatmap", "features.extract"):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", f"import wsi_asmil.{module}"], check=True)
            times.append(time.perf_counter() - t0)
        out[module] = round(min(times), 2)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--cohort", choices=["small", "demo", "both"], default="small")
    p.add_argument("--slides", type=int, default=200, help="slides of the small cohort")
    p.add_argument("--size", default="2048x1536", help="level-0 WxH of the small cohort's slides at 0.25 um/px")
    p.add_argument("--slides-per-job", type=int, default=32)
    p.add_argument("--per-slide-sample", type=int, default=None, help="run the per-slide way on this many slides only")
    p.add_argument("--encoder", default="efficientnet_lite0")
    p.add_argument("--weights", default="imagenet-pypi")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    try:  # an unattended GPU run stops here, not after building the cohort
        device = resolve_device(args.device)
    except RuntimeError as e:
        p.error(f"--device: {e}")
    size = tuple(int(v) for v in args.size.split("x"))
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    results = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load": os.getloadavg(), "gpu": gpu},
               "args": {k: str(v) for k, v in vars(args).items()}, "cohorts": {}}
    for cohort in (["small", "demo"] if args.cohort == "both" else [args.cohort]):
        slides = prepare(args.work, cohort, args.slides, size)
        out = args.work / cohort / "features"
        shutil.rmtree(out, ignore_errors=True)
        (out / "batches").mkdir(parents=True)
        (out / "per_slide").mkdir()
        sample = dict(list(slides.items())[: args.per_slide_sample]) if args.per_slide_sample else slides
        rows = [per_slide(sample, out / "per_slide", args), batched(slides, out, args)]
        print(f"{cohort} cohort ({len(slides)} slides, device {args.device}, {args.encoder}):")
        for row in rows:
            show(row)
        results["cohorts"][cohort] = rows
    results["start_costs_s"] = start_costs()
    print("process start + import, per job (s): " + ", ".join(f"{k} {v}" for k, v in results["start_costs_s"].items()))
    (args.work / "feature_batches.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"written {args.work / 'feature_batches.json'}")


if __name__ == "__main__":
    main()
