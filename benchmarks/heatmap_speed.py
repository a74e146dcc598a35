"""Seconds and peak memory of heatmaps on a CAMELYON-sized slide (100k x 80k px at 0.25 um/px).

    python benchmarks/heatmap_speed.py --work /tmp/hmbench                 # writes the slide once (~5 min)
    python benchmarks/heatmap_speed.py --work /tmp/hmbench --overlap 0 0.5 --tiff-mpp 2
    python benchmarks/heatmap_speed.py --work /tmp/hmbench --overlap 0 0.5 --score-only   # seconds

Every step runs the real command line in its own process, the way the workflow runs it, and is
measured: wall seconds from outside, and the process's own peak resident memory (VmHWM, read as it
exits). Steps, per tiling overlap:

1. segmentation and tiling (once per overlap; they give the tile count, reported for context);
2. ``wsi_asmil.maps.scoring``: a randomly initialised ASMIL (512-d input, the default architecture)
   scores random float16 features of every tile (the numbers are meaningless, the cost is real),
   ``--chunk-tiles`` tiles at a time (default: scoring's own);
3. ``wsi_asmil.maps.heatmap``: the overlay PNG at ``--mpp`` with the tissue clip, the QuPath GeoJSON of
   every tile and the top-8 gallery; with ``--tiff-mpp`` a second run adds the pyramidal TIFF.

Steps whose outputs are already in ``--work`` are not redone (the slide, its mask, the tiles, the
features and the model). ``--score-only`` measures scoring alone: it needs neither the mask nor the
tiles once the features exist, so a rerun takes seconds.

Results are printed as a Markdown table and written to ``<work>/heatmap_speed.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

WIDTH, HEIGHT = 100_096, 80_128  # CAMELYON16-sized, whole 256-px tiles


#: Runs ``python -m <module> args...`` and records the process's own peak RSS (VmHWM of its address
#: space) at exit. ``wait4``'s ``ru_maxrss`` would not do: Linux carries the parent's high-water mark
#: over a fork + exec, so every child would look as large as this script.
RUNNER = (
    "import atexit, runpy, sys\n"
    "out, mod = sys.argv[1], sys.argv[2]\n"
    "def hwm():\n"
    "    kb = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
    "    open(out, 'w').write(kb)\n"
    "atexit.register(hwm)\n"
    "sys.argv = [mod, *sys.argv[3:]]\n"
    "runpy.run_module(mod, run_name='__main__', alter_sys=True)\n"
)


def run(module: str, args: list[str], log: Path, threads: int | None = None) -> tuple[float, float]:
    """Run ``python -m module args``; return (wall seconds, peak RSS in MiB) of that process."""
    hwm = log.with_suffix(".hwm")
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run([sys.executable, "-c", RUNNER, str(hwm), module, *args], stdout=fh,
                              stderr=subprocess.STDOUT, env=env)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(args)} failed; see {log}:\n{log.read_text()[-3000:]}")
    return seconds, int(hwm.read_text()) / 1024.0


def ensure_slide(path: Path) -> None:
    if path.exists():
        return
    from wsi_asmil.synthetic import SlideSpec, write_slide

    print(f"writing a {WIDTH} x {HEIGHT} synthetic slide to {path} (about 5 minutes) ...", flush=True)
    write_slide(path, SlideSpec(width=WIDTH, height=HEIGHT, tumour=True, tumour_fraction=0.05, seed=7,
                                n_islands=3, tissue_coverage=0.5))


def fake_inputs(work: Path, tiles: Path, tag: str) -> tuple[Path, Path, int]:
    """Random features for every tile and a random-weight ASMIL fold checkpoint."""
    import torch

    from wsi_asmil.features import store
    from wsi_asmil.mil.models.registry import build_model, save_checkpoint

    feats_path = work / f"features_{tag}.zarr"
    if not feats_path.exists():
        coords, _, attrs = store.read_tiles(tiles)
        rng = np.random.default_rng(0)
        with store.feature_writer(feats_path, coords, 512, {**attrs, "encoder": "random", "weights": "random"}) as w:
            for start in range(0, len(coords), 8192):
                n = min(8192, len(coords) - start)
                w.write(start, rng.normal(size=(n, 512)).astype(np.float16))
    models = work / "models" / "asmil"
    if not (models / "fold0" / "model.pt").exists():
        torch.manual_seed(0)
        save_checkpoint(models / "fold0" / "model.pt", build_model("asmil", 512, 2), model_name="asmil",
                        model_kwargs={}, classes=["normal", "tumour"], in_dim=512, epoch=0, params={})
    return feats_path, models, int(store.lazy_features(feats_path).shape[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help="scratch folder (the slide is reused from here)")
    p.add_argument("--slide", type=Path, default=None, help="slide to use (default: <work>/camelyon_like.svs)")
    p.add_argument("--overlap", type=float, nargs="+", default=[0.0], help="tiling overlaps to measure")
    p.add_argument("--mpp", type=float, default=8.0, help="overlay PNG resolution (um/px)")
    p.add_argument("--tiff-mpp", type=float, default=None, help="also time a pyramidal TIFF overlay at this um/px")
    p.add_argument("--threads", type=int, default=2, help="OMP threads of the scoring process")
    p.add_argument("--chunk-tiles", type=int, default=None, help="tiles scored at a time (default: scoring's)")
    p.add_argument("--score-only", action="store_true", help="measure scoring alone (no drawing)")
    args = p.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    slide = args.slide or work / "camelyon_like.svs"
    needs_slide = not args.score_only or any(not (work / f"features_o{o:g}.zarr").exists() for o in args.overlap)
    if needs_slide:
        ensure_slide(slide)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    seg = work / "segment"
    results: dict = {"slide": str(slide), "machine": f"{platform.machine()}, {os.cpu_count()} CPU(s)", "runs": []}
    if needs_slide and not (seg / "mask.png").exists():
        results["segment"] = run("wsi_asmil.tissue.segment", ["--slide", str(slide), "--out-dir", str(seg)], logs / "segment.log")
    for overlap in args.overlap:
        tag = f"o{overlap:g}"
        tiles = work / f"tiles_{tag}.zarr"
        row: dict = {"overlap": overlap}
        if not tiles.exists() and not (work / f"features_{tag}.zarr").exists():
            row["tile"] = run("wsi_asmil.features.tile", ["--slide", str(slide), "--seg-dir", str(seg), "--out", str(tiles),
                              "--qc", str(work / f"grid_{tag}.png"), "--overlap", str(overlap)], logs / f"tile_{tag}.log")
        feats, models, n = fake_inputs(work, tiles, tag)
        row["tiles"] = n
        out = work / f"out_{tag}"
        chunk = ["--chunk-tiles", str(args.chunk_tiles)] if args.chunk_tiles else []
        row["score"] = run("wsi_asmil.maps.scoring", ["--features", str(feats), "--models-dir", str(models), "--folds", "1",
                           "--fold", "0", "--device", "cpu", "--out-dir", str(out / "scores"), *chunk],
                           logs / f"score_{tag}.log", threads=args.threads)
        if args.score_only:
            results["runs"].append(row)
            print(json.dumps(row), flush=True)
            continue
        name = feats.name[: -len(".zarr")]
        draw = ["--slide", str(slide), "--scores", str(out / "scores" / f"{name}_scores.csv"),
                "--out", str(out / "heatmap.png"), "--geojson", str(out / "tiles.geojson"), "--gallery", str(out / "topk.jpg"),
                "--tissue-mask", str(seg / "mask.png"), "--mpp", str(args.mpp)]
        row["draw"] = run("wsi_asmil.maps.heatmap", draw, logs / f"draw_{tag}.log")
        row["geojson_mb"] = (out / "tiles.geojson").stat().st_size / 2**20
        if args.tiff_mpp:
            row["draw_tiff"] = run("wsi_asmil.maps.heatmap", [*draw, "--tiff", str(out / "overlay.tif"), "--tiff-mpp", str(args.tiff_mpp)], logs / f"tiff_{tag}.log")
            row["tiff_mb"] = (out / "overlay.tif").stat().st_size / 2**20
        results["runs"].append(row)
        print(json.dumps(row), flush=True)
    (work / "heatmap_speed.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nslide {WIDTH} x {HEIGHT} px at 0.25 um/px; {results['machine']}; overlay at {args.mpp:g} um/px\n")
    print("| overlap | tiles | scoring s / MiB | PNG + GeoJSON + gallery s / MiB | + pyramidal TIFF s / MiB |")
    print("|---|---|---|---|---|")
    for r in results["runs"]:
        tiff = f"{r['draw_tiff'][0]:.1f} / {r['draw_tiff'][1]:.0f}" if "draw_tiff" in r else "-"
        draw = f"{r['draw'][0]:.1f} / {r['draw'][1]:.0f}" if "draw" in r else "-"
        print(f"| {r['overlap']:g} | {r['tiles']} | {r['score'][0]:.1f} / {r['score'][1]:.0f} | {draw} | {tiff} |")


if __name__ == "__main__":
    main()
