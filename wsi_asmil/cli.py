"""Shared command-line plumbing for the stage modules."""

from __future__ import annotations

import argparse
import logging
import sys


def setup_logging(level: int = logging.INFO) -> None:
    """Log to stderr; Snakemake rules redirect it into the rule's log file."""
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )


def optional_float(text: str) -> float | None:
    """Parse a float that Snakemake may pass as an empty string or 'None' when unset."""
    return None if text in ("", "None", "null", "nan") else float(text)


def auto_or_count(text: str) -> int | None:
    """A whole number >= 0, or ``auto`` (None): the stage picks a value for its device."""
    if text == "auto":
        return None
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a whole number >= 0, got {text!r}")
    return value


def add_slide_args(p: argparse.ArgumentParser) -> None:
    """The slide path and the two mpp sources used when the file has none."""
    p.add_argument("--slide", required=True, help="slide file (or DICOM folder)")
    p.add_argument("--slide-mpp", type=optional_float, default=None, help="per-slide mpp override (label table)")
    p.add_argument("--mpp-fallback", type=optional_float, default=None, help="config mpp_fallback")
