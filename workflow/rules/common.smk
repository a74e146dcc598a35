# Cohort discovery, output paths and command-line arguments shared by the rules.
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, workflow.basedir)

from wsi_asmil import __version__ as VERSION
from wsi_asmil.slides.cohort import check_split_feasible, match_cohort
from wsi_asmil.slides.inventory import usable_ids
from wsi_asmil.features.packaged_weights import check_weights_setting
from wsi_asmil.core.run_layout import RunLayout
from wsi_asmil.pipeline.workflow_args import mpp_options, options, train_params
from wsi_asmil.slides.slide import discover_slides
from wsi_asmil.synthetic import demo_slide_ids
from wsi_asmil.features.tile import TileParams

from snakemake.settings.types import DeploymentMethod

# With --sdm conda each rule runs in envs/wsi-asmil.yaml; otherwise in the interpreter running
# Snakemake (the project's virtual environment), whether or not it is activated.
CONDA = DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method
PY = "python" if CONDA else shlex.quote(sys.executable)
ENV = "../../envs/wsi-asmil.yaml"
OUT = config["out_dir"].rstrip("/")
DEMO = config["slides_dir"] is None

if DEMO:
    SLIDES_DIR = f"{OUT}/demo/slides"
    SLIDE_IDS = demo_slide_ids(config["demo"]["n_slides"])
    LABELS = f"{OUT}/demo/labels.csv"
    TRAIN_IDS = SLIDE_IDS
    MPP_OVERRIDE = {}

    def slide_file(slide_id):
        return f"{OUT}/demo/slides/{slide_id}.svs"

else:
    if config["labels"] is None:
        raise ValueError("config key 'labels' must name a label table when 'slides_dir' is set")
    _found, _ignored = discover_slides(config["slides_dir"])
    for _p in _ignored:
        print(f"wsi-asmil: ignoring {_p} (not a slide extension)", file=sys.stderr)
    SLIDES_DIR = config["slides_dir"]
    COHORT = match_cohort(config["labels"], _found)
    check_split_feasible(COHORT, config["labels"], config["split"]["mode"], config["split"]["folds"])
    SLIDE_IDS = sorted(COHORT.slides)
    LABELS = config["labels"]
    TRAIN_IDS = COHORT.labeled_ids
    MPP_OVERRIDE = COHORT.mpp

    def slide_file(slide_id):
        return str(COHORT.slides[slide_id])


def slide_path(wildcards):
    return slide_file(wildcards.slide)


check_weights_setting(config["features"]["encoder"], config["features"]["weights"])
TILING = TileParams(**config["tiling"]).tag()
ENCODER = config["features"]["encoder"].replace("/", "_").replace(":", "_")
FOLDS = list(range(1 if config["split"]["mode"] == "fixed" else config["split"]["folds"]))
MODELS = config["train"]["models"]

# Every path comes from wsi_asmil.core.run_layout, which the package's stages use as well.
LAYOUT = RunLayout(OUT, TILING, ENCODER)
INVENTORY = LAYOUT.inventory
SEG_DIR = LAYOUT.segment()
TILES = LAYOUT.tiles()
FEATURES_DIR = LAYOUT.features_dir
FEATURES = LAYOUT.features()
SPLIT = LAYOUT.split
MODEL_DIR = LAYOUT.fold()
REPORT = LAYOUT.report

wildcard_constraints:
    slide=r"[^/]+",
    model=r"[a-z_]+",
    fold=r"\d+",


def mpp_args(wildcards):
    """The per-slide mpp override and the config fallback, as command-line arguments."""
    return mpp_options(wildcards.slide, MPP_OVERRIDE, config["mpp_fallback"])


def cli_args(section, exclude=()):
    """A config section as --long-options; as a rule param it makes reruns follow config edits."""
    return options(config[section], exclude=exclude)


def gpus(section):
    """GPU slots a rule of ``section`` takes: none when its device is the CPU, so it neither waits
    for the card locally nor asks Slurm for one."""
    return 0 if config[section]["device"] == "cpu" else 1


def fold_checkpoints(wildcards):
    """Every fold's checkpoint of the job's model."""
    return [LAYOUT.checkpoint(wildcards.model, k) for k in FOLDS]


def usable(ids):
    """The slides among ``ids`` that the inventory could open (evaluated after it has run)."""
    ok = usable_ids(checkpoints.inventory.get().output[0])
    return [s for s in ids if s in ok]


def all_outputs(wildcards=None):
    return [
        f"{REPORT}/metrics.json",
        f"{REPORT}/predictions.csv",
        f"{REPORT}/index.html",
        *heatmap_targets(),  # heatmap.smk: drawn heatmaps, legend, localisation
        *predict_targets(),  # predict.smk: predictions and heatmaps of new slides
    ]
