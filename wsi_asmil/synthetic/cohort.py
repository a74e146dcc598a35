"""The demo cohort: slide ids and specs, and writing slides, truth and ``labels.csv`` to a folder."""

from __future__ import annotations

import csv
import io
import logging
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from multiprocessing.context import BaseContext
from pathlib import Path

import numpy as np
from tqdm import tqdm

from wsi_asmil.core.io import atomic_path
from wsi_asmil.synthetic.aperio import write_slide
from wsi_asmil.synthetic.spec import TILE, SlideSpec
from wsi_asmil.synthetic.truth import write_truth

log = logging.getLogger(__name__)

DEMO_WIDTH = 6144
DEMO_HEIGHT = 4608


def demo_slide_ids(n_slides: int) -> list[str]:
    """Deterministic slide names, known before any file exists (the Snakefile needs them at parse time)."""
    return [f"demo_{i:03d}" for i in range(n_slides)]


def _round_to_tile(x: float) -> int:
    return max(TILE, int(round(x / TILE)) * TILE)


def demo_specs(
    n_slides: int,
    seed: int = 0,
    width: int = DEMO_WIDTH,
    height: int = DEMO_HEIGHT,
    mpp: float = 0.25,
) -> list[SlideSpec]:
    """The demo cohort: alternating tumour/normal, sizes within ~8% rounded to whole tiles.

    Pen marks (every third slide) and dust (two in four) fall on both classes equally, so
    artefacts carry no label signal; tumour fractions vary within 3-8% of tissue.
    """
    specs = []
    for i in range(n_slides):
        rng = np.random.default_rng([seed, i])
        specs.append(
            SlideSpec(
                width=_round_to_tile(width * rng.uniform(0.92, 1.08)),
                height=_round_to_tile(height * rng.uniform(0.92, 1.08)),
                mpp=mpp,
                tumour=i % 2 == 0,
                tumour_fraction=round(float(rng.uniform(0.03, 0.08)), 4),
                pen_marks=i % 3 == 1,
                dust=i % 4 < 2,
                seed=int(rng.integers(2**31)),
                n_islands=int(rng.integers(1, 4)),
                tissue_coverage=round(float(rng.uniform(0.4, 0.55)), 3),
            )
        )
    return specs


def _write_one(out_dir: Path, slide_id: str, spec: SlideSpec) -> str:
    truth = write_slide(out_dir / "slides" / f"{slide_id}.svs", spec)
    write_truth(out_dir / "truth", slide_id, truth, spec)
    return slide_id


def _labels_csv(ids: Sequence[str], specs: Sequence[SlideSpec]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["slide_id", "label"])
    writer.writerows((i, s.label) for i, s in zip(ids, specs))
    return buf.getvalue().encode()


def _pool_context() -> BaseContext:
    """Start workers by 'fork' on Linux: unlike 'spawn', it does not re-run ``__main__`` in them.

    So a cohort can also be written from a script fed on stdin or from an interactive session.
    """
    return get_context("fork" if sys.platform.startswith("linux") else None)


def _progress(n_slides: int) -> tqdm:
    return tqdm(total=n_slides, unit="slide", desc="synthetic slides")


def write_cohort(
    out_dir: str | os.PathLike[str],
    n_slides: int = 24,
    seed: int = 0,
    width: int = DEMO_WIDTH,
    height: int = DEMO_HEIGHT,
    mpp: float = 0.25,
    workers: int = 1,
) -> Path:
    """Write ``slides/<id>.svs``, ``truth/<id>_{tissue,tumour}.png``, ``truth/<id>.json`` and ``labels.csv``.

    ``labels.csv`` is written last, so its presence means the cohort is complete.
    """
    out = Path(out_dir)
    ids, specs = demo_slide_ids(n_slides), demo_specs(n_slides, seed, width, height, mpp)
    if workers <= 1:
        with _progress(n_slides) as bar:
            for slide_id, spec in zip(ids, specs):
                _write_one(out, slide_id, spec)
                bar.update()
    else:
        with ProcessPoolExecutor(workers, mp_context=_pool_context()) as pool:
            # The first submit forks every worker: before tqdm starts its monitor thread.
            futures = [pool.submit(_write_one, out, i, s) for i, s in zip(ids, specs)]
            with _progress(n_slides) as bar:
                for fut in as_completed(futures):
                    log.debug("wrote %s", fut.result())
                    bar.update()
    with atomic_path(out / "labels.csv") as tmp:
        tmp.write_bytes(_labels_csv(ids, specs))
    log.info("wrote %d synthetic slides to %s", n_slides, out)
    return out


def demo_tissue(
    n_slides: int, seed: int = 0, width: int = DEMO_WIDTH, height: int = DEMO_HEIGHT, mpp: float = 0.25
) -> list[tuple[str, int, int, float, np.ndarray, float]]:
    """Each demo slide's id, level-0 size, mpp and tissue mask with its downsample, from its
    layout alone (no rendering): what the disk plan needs before the demo's slides exist."""
    from wsi_asmil.synthetic.layout import Layout

    out = []
    for sid, spec in zip(demo_slide_ids(n_slides), demo_specs(n_slides, seed, width, height, mpp)):
        truth = Layout(spec).truth()
        out.append((sid, spec.width, spec.height, spec.mpp, truth.tissue, truth.downsample))
    return out
