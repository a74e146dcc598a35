"""Seconds, peak memory and disk of the report viewer's Deep Zoom pyramids for one large slide.

    python benchmarks/viewer_pyramid.py --work /tmp/vbench                           # 100k x 200k px
    python benchmarks/viewer_pyramid.py --work /tmp/vbench25 --width 25088 --height 50176   # 1/16 the area

The slide is the package's synthetic Aperio-style slide (tiled JPEG TIFF, 0.25 um/px, a 2x level
and coarser ones) written once into ``--work`` with its exact tissue and tumour masks, which stand
in for the segmentation mask and the truth mask. Scores are random over a grid of 224 px tiles at
0.5 um/px on the tissue (the viewer only reads them: their values do not change its cost).

The measured step is the workflow's own command, ``python -m wsi_asmil.report.viewer pyramids``, in its
own process: the slide layer at ``--viewer-mpp`` (JPEG), one heat layer per model at
``--overlay-mpp`` (PNG RGBA, tissue-clipped) and the truth outline; wall seconds from outside and
the process's peak resident memory (VmHWM) at exit. Prints one Markdown table row per run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from heatmap_speed import run  # the same measured runner as the heatmap benchmark


def ensure_slide(work: Path, width: int, height: int) -> Path:
    """The slide, its tissue mask and its truth mask (written once, reused on reruns)."""
    slide = work / f"slide_{width}x{height}.svs"
    if slide.exists():
        return slide
    from wsi_asmil.core.io import write_json
    from wsi_asmil.synthetic import SlideSpec, write_slide

    print(f"writing a {width} x {height} synthetic slide to {slide} ...", flush=True)
    truth = write_slide(slide, SlideSpec(width=width, height=height, tumour=True, tumour_fraction=0.05, seed=7,
                                         n_islands=3, tissue_coverage=0.5))
    for name, mask in (("mask", truth.tissue), ("truth", truth.tumour)):
        cv2.imwrite(str(work / f"{name}.png"), mask.astype(np.uint8) * 255)
        write_json(work / f"{name}.json", {"downsample": truth.downsample})
    return slide


def fake_scores(work: Path, width: int, height: int, extent: float = 448.0) -> tuple[Path, int]:
    """Random scores of every 224 px tile at 0.5 um/px (448 level-0 px) whose centre is on tissue,
    written as scoring writes a slide's scores."""
    from wsi_asmil.maps.scores import scores_paths
    from wsi_asmil.synthetic.scores import write_synthetic_scores

    tissue = cv2.imread(str(work / "mask.png"), cv2.IMREAD_GRAYSCALE) > 0
    ds = json.loads((work / "mask.json").read_text())["downsample"]
    xs, ys = np.arange(0, width - extent + 1, extent), np.arange(0, height - extent + 1, extent)
    coords = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)
    centre = ((coords + extent / 2) / ds).astype(int)
    coords = coords[tissue[np.minimum(centre[:, 1], tissue.shape[0] - 1), np.minimum(centre[:, 0], tissue.shape[1] - 1)]]
    scores = np.random.default_rng(0).random(len(coords))
    write_synthetic_scores(work, "bench", coords.astype(np.int64), scores / scores.sum(), extent, model="bench",
                           slide_dimensions=[width, height])
    return scores_paths(work, "bench")[0], len(coords)


def folder_size(path: Path) -> tuple[int, float]:
    files = [p for p in path.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files) / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help="scratch folder (the slide is reused from here)")
    p.add_argument("--width", type=int, default=100_096, help="level-0 width in px (0.25 um/px)")
    p.add_argument("--height", type=int, default=200_192, help="level-0 height in px")
    p.add_argument("--models", type=int, default=2, help="heat layers (models)")
    p.add_argument("--viewer-mpp", type=float, default=1.0)
    p.add_argument("--overlay-mpp", type=float, default=2.0)
    args = p.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    slide = ensure_slide(work, args.width, args.height)
    csv, n_tiles = fake_scores(work, args.width, args.height)
    out = work / f"viewer_{args.viewer_mpp:g}_{args.overlay_mpp:g}_{args.models}"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    cmd = ["pyramids", "--slide", str(slide), "--out-dir", str(out), "--tissue-mask", str(work / "mask.png"),
           "--truth", str(work / "truth.png"), "--viewer-mpp", str(args.viewer_mpp), "--overlay-mpp", str(args.overlay_mpp),
           "--scores", *(f"model{i}={csv}" for i in range(args.models))]
    seconds, mib = run("wsi_asmil.report.viewer", cmd, work / "viewer.log")
    files, disk = folder_size(out)
    layers = json.loads((out / "layers.json").read_text())["layers"]
    sizes = {layer["name"]: "x".join(layer["source"]["Image"]["Size"].values()) for layer in layers if "source" in layer}
    print(f"\nslide {args.width} x {args.height} px at 0.25 um/px, {n_tiles} scored tiles; "
          f"{platform.machine()}, {os.cpu_count()} CPU(s); layers {sizes}\n")
    print("| slide px | slide layer um/px | overlay um/px | models | DZI files | disk MiB | seconds | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {args.width} x {args.height} | {args.viewer_mpp:g} | {args.overlay_mpp:g} | {args.models} | {files} | "
          f"{disk:.0f} | {seconds:.1f} | {mib:.0f} |")


if __name__ == "__main__":
    main()
