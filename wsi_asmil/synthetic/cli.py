"""Command line of the synthetic cohort generator."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from wsi_asmil.synthetic.cohort import DEMO_HEIGHT, DEMO_WIDTH, write_cohort


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: ``python -m wsi_asmil.synthetic --out DIR``."""
    parser = argparse.ArgumentParser(
        prog="python -m wsi_asmil.synthetic",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Write a deterministic synthetic cohort of Aperio-style slides with ground truth.",
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--n-slides", type=int, default=24, help="number of slides")
    parser.add_argument("--seed", type=int, default=0, help="cohort seed")
    parser.add_argument("--width", type=int, default=DEMO_WIDTH, help="nominal level-0 width in px")
    parser.add_argument("--height", type=int, default=DEMO_HEIGHT, help="nominal level-0 height in px")
    parser.add_argument("--mpp", type=float, default=0.25, help="level-0 microns per pixel")
    parser.add_argument("--workers", type=int, default=1, help="parallel processes")
    parser.add_argument("--log-level", default="INFO", help="logging level")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    write_cohort(args.out, args.n_slides, args.seed, args.width, args.height, args.mpp, args.workers)
    return 0
