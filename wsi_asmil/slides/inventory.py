"""The cohort inventory: open every slide once, before any real work, and record what is usable.

A cohort of thousands of unchecked files always holds a few that are empty, truncated, not slides
at all, or without a resolution. Probing them up front turns each into one line of
``inventory/slides.csv`` naming the file and the reason (files without a slide extension are
logged as ignored), while every other slide goes on: the workflow schedules segmentation,
features, training and heatmaps only for usable slides, and the report lists the rest.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import pandas as pd

from wsi_asmil.core.args import optional_float, setup_logging
from wsi_asmil.core.io import write_csv
from wsi_asmil.slides.cohort import read_labels
from wsi_asmil.slides.slide import SLIDE_EXTENSIONS, Slide, SlideError, discover_slides

log = logging.getLogger(__name__)

COLUMNS = ["slide_id", "path", "status", "message", "mpp", "mpp_source", "vendor", "width", "height", "levels"]


def probe_slide(
    slide_id: str, path: str | Path, mpp_override: float | None = None, mpp_fallback: float | None = None
) -> dict[str, Any]:
    """One inventory row: ``status`` is ``ok`` or ``error`` with the reason in ``message``."""
    row: dict[str, Any] = {"slide_id": slide_id, "path": str(path), "status": "ok", "message": ""}
    try:
        with Slide(path, mpp_override, mpp_fallback) as slide:
            row.update(
                mpp=slide.mpp, mpp_source=slide.mpp_info.source, vendor=slide.vendor,
                width=slide.dimensions[0], height=slide.dimensions[1], levels=slide.level_count,
            )
            # The smallest level is what segmentation reads first: a slide whose pyramid cannot be
            # decoded fails here, not hours later.
            level = slide.level_count - 1
            w, h = slide.level_dimensions[level]
            slide.read_rgb(level, 0, 0, min(w, 64), min(h, 64))
    except (SlideError, OSError, ValueError) as exc:
        row.update(status="error", message=str(exc))
    except Exception as exc:  # OpenSlide raises its own error types from deep in the decoder
        row.update(status="error", message=f"slide '{slide_id}': {path}: {type(exc).__name__}: {exc}")
    return row


def take_inventory(
    slides_dir: str | Path, labels_csv: str | Path | None = None, mpp_fallback: float | None = None
) -> pd.DataFrame:
    """Probe every slide discovered in ``slides_dir``, with the label table's mpp overrides."""
    slides, ignored = discover_slides(slides_dir)
    overrides: dict[str, float] = {}
    if labels_csv is not None:
        table = read_labels(labels_csv)
        if "mpp" in table.columns:
            overrides = {s: float(m) for s, m in zip(table["slide_id"], table["mpp"]) if m == m}
    rows = [probe_slide(sid, path, overrides.get(sid), mpp_fallback) for sid, path in slides.items()]
    inventory = pd.DataFrame(rows).reindex(columns=COLUMNS)
    bad = inventory[inventory["status"] != "ok"]
    for _, row in bad.iterrows():
        log.error("unusable slide '%s' (%s): %s", row["slide_id"], row["path"], row["message"])
    for path in ignored:
        log.warning("ignoring %s: not a slide extension (%s)", path, " ".join(SLIDE_EXTENSIONS))
    log.info(
        "%d slides usable, %d unusable, %d other files ignored", len(inventory) - len(bad), len(bad), len(ignored)
    )
    return inventory


def usable_ids(inventory_csv: str | Path) -> set[str]:
    table = pd.read_csv(inventory_csv, dtype={"slide_id": str}, keep_default_na=False)
    return set(table.loc[table["status"] == "ok", "slide_id"])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m wsi_asmil.slides.inventory", description=__doc__)
    p.add_argument("--slides-dir", required=True, help="folder of slides")
    p.add_argument("--labels", default=None, help="label table (for its per-slide mpp column)")
    p.add_argument("--mpp-fallback", type=optional_float, default=None)
    p.add_argument("--out", required=True, help="inventory CSV to write")
    args = p.parse_args(argv)
    setup_logging()
    write_csv(args.out, take_inventory(args.slides_dir, args.labels, args.mpp_fallback))


if __name__ == "__main__":
    main()
