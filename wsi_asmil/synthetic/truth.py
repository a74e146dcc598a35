"""Ground-truth masks: computed without rendering, and written to / read from PNG + JSON files."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import cv2
import numpy as np

from wsi_asmil.core.io import atomic_path
from wsi_asmil.synthetic.layout import Layout
from wsi_asmil.synthetic.spec import SlideSpec, SlideTruth


def slide_truth(spec: SlideSpec, downsample: int | None = None) -> SlideTruth:
    """Ground-truth masks without rendering: cheap, and identical to what ``write_slide`` returns.

    ``downsample`` evaluates the rendering rule on another grid (e.g. a pyramid level) so a
    segmentation can be scored at its own resolution.
    """
    return Layout(spec).truth(downsample)


def _write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _png(mask: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", mask.astype(np.uint8) * 255)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def write_truth(
    truth_dir: str | os.PathLike[str], slide_id: str, truth: SlideTruth, spec: SlideSpec
) -> dict[str, Path]:
    """Write ``<id>_tissue.png``, ``<id>_tumour.png`` (uint8 0/255) and ``<id>.json``, each atomically."""
    out = Path(truth_dir)
    paths = {
        "tissue": out / f"{slide_id}_tissue.png",
        "tumour": out / f"{slide_id}_tumour.png",
        "json": out / f"{slide_id}.json",
    }
    _write_bytes(paths["tissue"], _png(truth.tissue))
    _write_bytes(paths["tumour"], _png(truth.tumour))
    meta = {"slide_id": slide_id, "label": spec.label, **truth.to_json(), "spec": asdict(spec)}
    _write_bytes(paths["json"], (json.dumps(meta, indent=2) + "\n").encode())
    return paths


def read_truth(truth_dir: str | os.PathLike[str], slide_id: str) -> SlideTruth:
    """The ground truth written by :func:`write_truth`, for scoring segmentation and heatmaps."""
    out = Path(truth_dir)
    meta = json.loads((out / f"{slide_id}.json").read_text())
    masks = {}
    for name in ("tissue", "tumour"):
        mask = cv2.imread(str(out / f"{slide_id}_{name}.png"), cv2.IMREAD_GRAYSCALE)
        if mask is None:
            raise FileNotFoundError(f"no {name} truth mask for slide '{slide_id}' in {out}")
        masks[name] = mask > 0
    return SlideTruth(
        masks["tissue"], masks["tumour"], meta["downsample"], meta["mpp"], meta["width"], meta["height"]
    )
