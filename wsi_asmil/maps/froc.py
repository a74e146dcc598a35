"""Lesion-level FROC, the CAMELYON16 protocol, for attention heatmaps.

Dice and tile AUC ask whether attention covers tumour; FROC asks what a pathologist would ask of a
detector: of the metastases on these slides, how many does the map point at, for how many false
alarms per slide? This is the localisation score the CAMELYON16 challenge ranked by.

The evaluation mask, as in the challenge's evaluation script:
    the tumour mask grown by 75 um in diameter (every pixel closer than 37.5 um to tumour), holes
    filled, and split into lesions, its 8-connected regions.
Isolated tumour cells:
    a lesion whose major axis is under 275 um (200 um of tumour plus the 75 um of growth) is an
    isolated-tumour-cell cluster: it is not counted as a lesion to find, and a detection inside
    one is neither a true nor a false positive.
Detections, from a slide's attention:
    each tile's score is its attention relative to uniform (``a x M``: 1 is what flat attention
    gives every tile). The highest-scoring tile becomes a detection at its centre, every tile
    whose centre lies within ``nms_radius_um`` of it is suppressed, and so on while the best tile
    left scores at least ``min_score`` (default 2, twice uniform). Flat attention thus makes no
    detection at all. Scores relative to uniform are comparable between slides, which FROC needs:
    its thresholds run over the detections of every slide at once.
Counting:
    a detection inside a lesion is a hit; each lesion takes the highest score among its hits (a
    true positive at every threshold up to that score); every detection outside all lesions is a
    false positive, on tumour and normal slides alike; false positives per slide divide by the
    number of slides.
Score:
    the mean sensitivity at 1/4, 1/2, 1, 2, 4 and 8 false positives per slide, each read off the
    FROC curve by linear interpolation from the origin (0 false positives, nothing found), as the
    challenge's script and MONAI's ``compute_froc_score`` do; past the curve's last point the
    sensitivity stays at its last value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage

#: False positives per slide at which sensitivity is averaged (CAMELYON16).
FP_RATES = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
#: Diameter by which tumour grows into the evaluation mask (about five tumour cells).
GROWTH_UM = 75.0
#: A lesion whose major axis in the evaluation mask is shorter is isolated tumour cells.
ITC_AXIS_UM = 275.0


@dataclass(frozen=True)
class FrocParams:
    """How detections are taken from a heatmap (see the module docstring)."""

    nms_radius_um: float = 224.0
    min_score: float = 2.0

    def __post_init__(self) -> None:
        if not self.nms_radius_um > 0:
            raise ValueError(f"localisation.froc_nms_um must be positive, got {self.nms_radius_um}")
        if not self.min_score > 0:
            raise ValueError(f"localisation.froc_min_score must be positive, got {self.min_score}")


@dataclass(frozen=True)
class Lesions:
    """A slide's evaluation mask: ``labels`` 0 outside, 1..n per lesion; ``itc`` the isolated ones."""

    labels: np.ndarray
    itc: frozenset[int]

    @property
    def countable(self) -> int:
        """Lesions a detector is asked to find (isolated tumour cells left out)."""
        return int(self.labels.max()) - len(self.itc) if self.labels.size else 0


def major_axis_px(region: np.ndarray) -> float:
    """The major axis of a region's equivalent ellipse (the second moments' definition that
    scikit-image's ``regionprops`` uses), in pixels."""
    ys, xs = np.nonzero(region)
    if len(xs) < 2:
        return 0.0
    cov = np.cov(np.stack([xs, ys]).astype(np.float64), bias=True)
    return 4.0 * math.sqrt(max(float(np.linalg.eigvalsh(cov)[-1]), 0.0))


def evaluation_mask(tumour: np.ndarray, um_per_px: float) -> Lesions:
    """The lesions of a tumour mask whose pixels are ``um_per_px`` wide (see the module docstring)."""
    tumour = np.asarray(tumour, dtype=bool)
    if not tumour.any():
        return Lesions(np.zeros(tumour.shape, dtype=np.int32), frozenset())
    distance = cv2.distanceTransform((~tumour).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    grown = ndimage.binary_fill_holes(distance < GROWTH_UM / (2.0 * um_per_px))
    n, labels, boxes, _ = cv2.connectedComponentsWithStats(grown.astype(np.uint8), connectivity=8)
    itc = set()
    for i in range(1, n):  # each lesion measured inside its own box: time linear in the mask
        x, y, w, h = boxes[i, :4]
        if major_axis_px(labels[y : y + h, x : x + w] == i) * um_per_px < ITC_AXIS_UM:
            itc.add(i)
    return Lesions(labels.astype(np.int32), frozenset(itc))


def detections(centres: np.ndarray, scores: np.ndarray, radius: float, min_score: float) -> np.ndarray:
    """Indices of the tiles kept by greedy non-maximum suppression, best first: a tile is kept
    when it scores at least ``min_score`` and no kept tile's centre lies within ``radius``."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    centres = np.asarray(centres, dtype=np.float64).reshape(-1, 2)
    alive = np.ones(len(order), dtype=bool)
    kept = []
    for i in order:
        if scores[i] < min_score:
            break
        if not alive[i]:
            continue
        kept.append(i)
        alive &= np.hypot(*(centres - centres[i]).T) > radius
    return np.asarray(kept, dtype=np.int64)


@dataclass(frozen=True)
class SlideHits:
    """One slide's detections against its lesions: the best score of each countable lesion
    (0 where none was hit) and the scores of the false positives."""

    lesion_scores: np.ndarray
    fp_scores: np.ndarray
    n_detections: int
    n_lesions: int
    n_itc: int


def slide_hits(
    coords: np.ndarray, extent: float, attention: np.ndarray, tumour: np.ndarray, downsample: float,
    mpp: float, params: FrocParams = FrocParams(),
) -> SlideHits:
    """Detections of one slide's attention (tiles at level-0 ``coords``, ``extent`` px wide)
    scored against its tumour mask (``downsample`` level-0 px per mask px; slide ``mpp``)."""
    lesions = evaluation_mask(tumour, downsample * mpp)
    attention = np.asarray(attention, dtype=np.float64)
    relative = attention * len(attention)
    centres = np.asarray(coords, dtype=np.float64).reshape(-1, 2) + extent / 2.0
    kept = detections(centres * mpp, relative, params.nms_radius_um, params.min_score)
    best = np.zeros(int(lesions.labels.max()) + 1)
    fps = []
    h, w = lesions.labels.shape
    for i in kept:
        x, y = (centres[i] / downsample).astype(np.int64)
        label = int(lesions.labels[y, x]) if 0 <= x < w and 0 <= y < h else 0
        if label == 0:
            fps.append(relative[i])
        elif label not in lesions.itc:
            best[label] = max(best[label], relative[i])
    countable = [i for i in range(1, len(best)) if i not in lesions.itc]
    return SlideHits(best[countable], np.asarray(fps, dtype=np.float64), len(kept), len(countable), len(lesions.itc))


@dataclass(frozen=True)
class Froc:
    """The FROC curve over a set of slides and its score."""

    fps_per_slide: np.ndarray  # at each threshold, descending scores
    sensitivity: np.ndarray
    at_rates: dict[float, float]
    score: float
    n_slides: int
    n_lesions: int


def froc(slides: Sequence[SlideHits]) -> Froc:
    """The curve and score over ``slides`` (see the module docstring); NaN without any lesion."""
    n_slides = len(slides)
    lesions = np.concatenate([s.lesion_scores for s in slides]) if slides else np.zeros(0)
    fps = np.concatenate([s.fp_scores for s in slides]) if slides else np.zeros(0)
    if not len(lesions) or not n_slides:
        nan = dict.fromkeys(FP_RATES, math.nan)
        return Froc(np.zeros(0), np.zeros(0), nan, math.nan, n_slides, len(lesions))
    thresholds = np.unique(np.concatenate([lesions[lesions > 0], fps]))[::-1]
    fp_rate = np.array([(fps >= t).sum() / n_slides for t in thresholds])
    sens = np.array([(lesions >= t).sum() / len(lesions) for t in thresholds])
    # The curve starts at (0 FPs, 0 found) before the first threshold; where thresholds share a
    # false-positive rate, the best sensitivity at that rate stands (np.interp needs distinct x).
    fp_rate, sens = np.concatenate([[0.0], fp_rate]), np.concatenate([[0.0], sens])
    last = np.r_[fp_rate[1:] != fp_rate[:-1], True]
    fp_rate, sens = fp_rate[last], sens[last]
    at = {r: float(np.interp(r, fp_rate, sens)) for r in FP_RATES}
    return Froc(fp_rate, sens, at, float(np.mean(list(at.values()))), n_slides, len(lesions))
