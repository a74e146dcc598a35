"""The run folder: where every artefact of a run lives, written once for the workflow and the package.

The Snakemake rules take their paths from a :class:`RunLayout` (with ``{slide}``, ``{model}`` and
``{fold}`` left as wildcards), and the stages that find files by themselves (the report linking
heatmaps, scoring finding fold checkpoints) ask the same object, so moving a folder is one edit.
New slides for prediction get the same tree under ``<out>/predict`` (:meth:`RunLayout.predict`),
so their ids never collide with the cohort's.

::

    <out>/inventory/slides.csv
    <out>/segment/<slide>/{mask.png, mask.json, tissue.geojson, qc.jpg}
    <out>/tiles/<tiling>/<slide>.zarr
    <out>/features/<tiling>/<encoder>/<slide>.zarr
    <out>/splits/split.json
    <out>/models/<model>/fold<k>/{model.pt, metrics.json, ...}
    <out>/heatmaps/<model>/{<slide>.png, <slide>.geojson, <slide>_topk.jpg, scores/<slide>_scores.*}
    <out>/localisation/{truth/<slide>.png, <model>.csv, <model>.json}
    <out>/report/index.html
    <out>/logs/..., <out>/benchmarks/...   (one file per job, mirroring the outputs)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

SLIDE = "{slide}"
MODEL = "{model}"
FOLD = "{fold}"
CHECKPOINT = "model.pt"


@dataclass(frozen=True)
class RunLayout:
    """Paths of one run folder; the arguments default to Snakemake wildcards."""

    root: str
    tiling: str = ""
    encoder: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", str(self.root).rstrip("/") or ".")

    def predict(self) -> "RunLayout":
        """The parallel tree for new slides (segment, tiles, features, heatmaps, inventory)."""
        return RunLayout(f"{self.root}/predict", self.tiling, self.encoder)

    # --- per slide -------------------------------------------------------------------------------
    @property
    def inventory(self) -> str:
        return f"{self.root}/inventory/slides.csv"

    def segment(self, slide: str = SLIDE) -> str:
        return f"{self.root}/segment/{slide}"

    def tiles(self, slide: str = SLIDE) -> str:
        return f"{self.root}/tiles/{self.tiling}/{slide}.zarr"

    @property
    def features_dir(self) -> str:
        return f"{self.root}/features/{self.tiling}/{self.encoder}"

    def features(self, slide: str = SLIDE) -> str:
        return f"{self.features_dir}/{slide}.zarr"

    # --- training --------------------------------------------------------------------------------
    @property
    def split(self) -> str:
        return f"{self.root}/splits/split.json"

    def models(self, model: str = MODEL) -> str:
        return f"{self.root}/models/{model}"

    def fold(self, model: str = MODEL, fold: int | str = FOLD) -> str:
        return f"{self.models(model)}/fold{fold}"

    def checkpoint(self, model: str = MODEL, fold: int | str = FOLD) -> str:
        return f"{self.fold(model, fold)}/{CHECKPOINT}"

    # --- heatmaps, localisation, report ----------------------------------------------------------
    def heatmaps(self, model: str = MODEL) -> str:
        return f"{self.root}/heatmaps/{model}"

    def scores(self, model: str = MODEL) -> str:
        return f"{self.heatmaps(model)}/scores"

    def heatmap_image(self, model: str = MODEL, slide: str = SLIDE) -> str:
        return f"{self.heatmaps(model)}/{slide}.png"

    @property
    def legend(self) -> str:
        return f"{self.root}/heatmaps/legend.png"

    @property
    def localisation(self) -> str:
        return f"{self.root}/localisation"

    def truth(self, slide: str = SLIDE) -> str:
        return f"{self.localisation}/truth/{slide}.png"

    @property
    def report(self) -> str:
        return f"{self.root}/report"

    # --- bookkeeping -----------------------------------------------------------------------------
    def log(self, job: str) -> str:
        """``<out>/logs/<job>.log``; ``job`` names the stage and the wildcards, e.g. ``heatmap/{model}/{slide}``."""
        return f"{self.root}/logs/{job}.log"

    def benchmark(self, job: str) -> str:
        return f"{self.root}/benchmarks/{job}.tsv"


def fold_checkpoint(models_dir: str | Path, fold: int) -> Path:
    """A fold's checkpoint inside one model's folder (``RunLayout.models``)."""
    return Path(models_dir) / f"fold{fold}" / CHECKPOINT


def link_from_report(report_dir: str | Path, target: str | Path) -> str:
    """A relative link from the report folder to ``target``, so the run folder can be moved whole."""
    return Path(os.path.relpath(Path(target), Path(report_dir))).as_posix()
