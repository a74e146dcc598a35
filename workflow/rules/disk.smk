# The disk plan (wsi_asmil.pipeline.disk_plan): what this run will write, per stage, printed with
# the plan (so `snakemake -n` shows it), checked against the free space of out_dir and $TMPDIR
# before the first job (config disk_check), and recorded in the run manifest.
from wsi_asmil.pipeline import disk_plan as _disk_plan
from wsi_asmil.synthetic import demo_tissue as _demo_tissue

DISK_PLAN = None
if workflow.is_main_process:
    _grids = {TILING: TileParams(**config["tiling"])}
    if DENSE:
        _grids[DENSE_TILING] = TileParams(**{**config["tiling"], "overlap": HEATMAP["overlap"]})
    _demo = config["demo"]
    DISK_PLAN = _disk_plan.plan_run(
        config, LAYOUT, None if DEMO else {s: slide_file(s) for s in SLIDE_IDS}, TRAIN_IDS, _grids,
        HEATMAP_MODELS, len(FOLDS), mpp=MPP_OVERRIDE,
        demo=_demo_tissue(_demo["n_slides"], _demo["seed"], _demo["width"], _demo["height"], _demo["mpp"])
        if DEMO else None,
    )
    print(DISK_PLAN.summary(), file=sys.stderr)


def check_disk():
    """The onstart hook's first step: stop a run that will not fit before its first job."""
    if DISK_PLAN is not None:
        warning = _disk_plan.check(DISK_PLAN, config["disk_check"])
        if warning:
            print(warning, file=sys.stderr)
