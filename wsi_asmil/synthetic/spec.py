"""What determines a synthetic slide (``SlideSpec``) and its exact ground truth (``SlideTruth``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

TILE = 256


@dataclass(frozen=True)
class SlideSpec:
    """Everything that determines one synthetic slide; equal specs give identical pixels.

    Sizes are level-0 pixels at ``mpp`` um/px; cell sizes are fixed in microns, so a slide
    looks the same at the same physical resolution whatever its ``mpp``. Level downsamples are
    exact (2.0, 8.0, ...) when width and height are multiples of the largest one; multiples of
    ``TILE`` always are.
    """

    width: int
    height: int
    mpp: float = 0.25
    tumour: bool = False
    tumour_fraction: float = 0.05
    pen_marks: bool = False
    dust: bool = False
    seed: int = 0
    n_islands: int = 2
    tissue_coverage: float = 0.45

    def __post_init__(self) -> None:
        if self.width < TILE or self.height < TILE:
            raise ValueError(f"slide must be at least {TILE}x{TILE} px, got {self.width}x{self.height}")
        if not 0.05 <= self.mpp <= 4.0:
            raise ValueError(f"mpp must be within [0.05, 4], got {self.mpp}")
        if not 0.0 < self.tumour_fraction <= 0.5:
            raise ValueError(f"tumour_fraction must be within (0, 0.5], got {self.tumour_fraction}")
        if not 0.05 <= self.tissue_coverage <= 0.9:
            raise ValueError(f"tissue_coverage must be within [0.05, 0.9], got {self.tissue_coverage}")
        if not 1 <= self.n_islands <= 8:
            raise ValueError(f"n_islands must be within [1, 8], got {self.n_islands}")
        if self.seed < 0:
            raise ValueError(f"seed must be non-negative, got {self.seed}")

    @property
    def label(self) -> str:
        """The slide-level class the MIL models learn: ``tumour`` or ``normal``."""
        return "tumour" if self.tumour else "normal"


@dataclass(frozen=True)
class SlideTruth:
    """Tissue and tumour masks of a slide, exact for the rendering rule at their grid.

    ``tissue`` and ``tumour`` are boolean (rows, cols) arrays at ``downsample`` level-0 px per
    mask pixel; ``tumour`` is always inside ``tissue``.
    """

    tissue: np.ndarray
    tumour: np.ndarray
    downsample: float
    mpp: float
    width: int
    height: int

    @property
    def tissue_area_fraction(self) -> float:
        """Share of the slide covered by tissue, to sanity-check a segmenter's yield."""
        return float(self.tissue.mean())

    @property
    def tumour_fraction(self) -> float:
        """Tumour area as a fraction of tissue area: the quantity ``SlideSpec.tumour_fraction`` sets."""
        n_tissue = int(self.tissue.sum())
        return float(self.tumour.sum()) / n_tissue if n_tissue else 0.0

    def to_json(self) -> dict[str, Any]:
        """The sidecar that tells a consumer how to map mask pixels to level-0 coordinates."""
        return {
            "downsample": self.downsample,
            "mpp": self.mpp,
            "width": self.width,
            "height": self.height,
            "mask_shape": list(self.tissue.shape),
            "tissue_area_fraction": round(self.tissue_area_fraction, 6),
            "tumour_fraction": round(self.tumour_fraction, 6),
        }
