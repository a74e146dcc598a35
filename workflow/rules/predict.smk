# Inference on new slides: the cohort's unlabeled slides and every slide of predict.slides_dir go
# through segment, tile and features (the same rules; a folder's slides under predict/ so their
# ids never collide with the cohort's), then every fold model (or one), giving
# predict/predictions.csv and heatmaps. No labels, no retraining.
from wsi_asmil.slides.inventory import usable_ids as _usable_ids

PREDICT = config["predict"]
PREDICT_LAYOUT = LAYOUT.predict()
PREDICT_OUT = PREDICT_LAYOUT.root
PREDICT_MODELS = list(MODELS) if PREDICT["models"] is None else list(PREDICT["models"])
check_models("predict.models", PREDICT_MODELS)
check_fold("predict.fold", PREDICT["fold"])
PREDICT_COHORT = [] if DEMO else list(COHORT.unlabeled)
PREDICT_FOLDER = {}
if PREDICT["slides_dir"] is not None:
    _pfound, _pignored = discover_slides(PREDICT["slides_dir"])
    for _p in _pignored:
        print(f"wsi-asmil: ignoring {_p} in predict.slides_dir (not a slide extension)", file=sys.stderr)
    _clash = sorted(set(_pfound) & set(PREDICT_COHORT))
    if _clash:
        raise ValueError(
            f"config key 'predict.slides_dir': slide id(s) {_clash} are also unlabeled slides of slides_dir; "
            "rename one of each pair so their predictions do not overwrite each other"
        )
    PREDICT_FOLDER = {s: str(p) for s, p in _pfound.items()}
PREDICT_ON = bool(PREDICT_COHORT or PREDICT_FOLDER)
PREDICT_INVENTORY = PREDICT_LAYOUT.inventory
PRED_SEG_DIR = PREDICT_LAYOUT.segment()
PRED_TILES = PREDICT_LAYOUT.tiles()
PRED_FEATURES = PREDICT_LAYOUT.features()
PRED_SCORES = PREDICT_LAYOUT.scores()
PRED_HEATMAP_DIR = PREDICT_LAYOUT.heatmaps()


def predict_ids():
    """The new slides that can be opened (after the inventories have run)."""
    ids = usable(PREDICT_COHORT) if PREDICT_COHORT else []
    if PREDICT_FOLDER:
        ok = _usable_ids(checkpoints.predict_inventory.get().output[0])
        ids += [s for s in sorted(PREDICT_FOLDER) if s in ok]
    return ids


def predict_slide(wildcards):
    return PREDICT_FOLDER[wildcards.slide] if wildcards.slide in PREDICT_FOLDER else slide_file(wildcards.slide)


def predict_store(slide_id):
    return expand(PRED_FEATURES if slide_id in PREDICT_FOLDER else FEATURES, slide=slide_id)[0]


PRED_FEATURE_MARKER = f"{PREDICT_OUT}/features/{TILING}/{ENCODER}/batches/{{batch}}.json"
# The folder's slides are batched among themselves (features.smk batches the cohort's).
PRED_BATCH_OF = {s: b for b, ids in assign_batches(PREDICT_FOLDER, SLIDES_PER_JOB).items() for s in ids}


def predict_markers(ids):
    """The batch markers of the feature stores of new slides ``ids`` (cohort or folder)."""
    folder = {expand(PRED_FEATURE_MARKER, batch=PRED_BATCH_OF[s])[0] for s in ids if s in PREDICT_FOLDER}
    return sorted(folder) + feature_markers([s for s in ids if s not in PREDICT_FOLDER])


def predict_batch(wildcards):
    """The folder's usable slides of a batch (after the folder's inventory has run)."""
    ok = _usable_ids(checkpoints.predict_inventory.get().output[0])
    return [s for s, b in PRED_BATCH_OF.items() if b == wildcards.batch and s in ok]


def predict_mpp_args(wildcards):
    """A folder's slides have no label table: only the config fallback applies to them."""
    if wildcards.slide not in PREDICT_FOLDER:
        return mpp_args(wildcards)
    return mpp_options(None, {}, config["mpp_fallback"])


def predict_segment_file(name):
    def fn(wildcards):
        base = PRED_SEG_DIR if wildcards.slide in PREDICT_FOLDER else SEG_DIR
        return expand(f"{base}/{name}", slide=wildcards.slide)[0]

    return fn


def predict_targets():
    if not PREDICT_ON:
        return []
    targets = [f"{PREDICT_OUT}/predictions.csv"]
    if PREDICT["heatmaps"]:
        targets += draw_targets(PRED_HEATMAP_DIR, PREDICT_MODELS, predict_ids())
    return targets


if PREDICT_FOLDER:

    checkpoint predict_inventory:
        input:
            slides=list(PREDICT_FOLDER.values()),
        output:
            PREDICT_INVENTORY,
        params:
            slides_dir=PREDICT["slides_dir"],
            mpp=mpp_options(None, {}, config["mpp_fallback"]),
            version=VERSION,
        conda:
            ENV
        log:
            f"{OUT}/logs/predict/inventory.log",
        benchmark:
            f"{OUT}/benchmarks/predict/inventory.tsv"
        shell:
            "{PY} -m wsi_asmil.slides.inventory --slides-dir {params.slides_dir:q} {params.mpp} --out {output:q} > {log:q} 2>&1"

    use rule segment as predict_segment with:
        input:
            slide=predict_slide,
        output:
            mask=f"{PRED_SEG_DIR}/mask.png",
            meta=f"{PRED_SEG_DIR}/mask.json",
            geojson=f"{PRED_SEG_DIR}/tissue.geojson",
            qc=f"{PRED_SEG_DIR}/qc.jpg",
        params:
            out_dir=lambda wc: f"{PREDICT_OUT}/segment/{wc.slide}",
            mpp=predict_mpp_args,
        log:
            f"{OUT}/logs/predict/segment/{{slide}}.log",
        benchmark:
            f"{OUT}/benchmarks/predict/segment/{{slide}}.tsv"

    use rule tile as predict_tile with:
        input:
            slide=predict_slide,
            mask=rules.predict_segment.output.mask,
            meta=rules.predict_segment.output.meta,
        output:
            store=directory(PRED_TILES),
            qc=f"{PREDICT_OUT}/tiles/{TILING}/{{slide}}_grid.png",
        params:
            seg_dir=lambda wc: f"{PREDICT_OUT}/segment/{wc.slide}",
            mpp=predict_mpp_args,
        log:
            f"{OUT}/logs/predict/tile/{TILING}/{{slide}}.log",
        benchmark:
            f"{OUT}/benchmarks/predict/tile/{TILING}/{{slide}}.tsv"

    use rule features as predict_features with:
        input:
            slides=lambda wc: [PREDICT_FOLDER[s] for s in predict_batch(wc)],
            tiles=lambda wc: expand(PRED_TILES, slide=predict_batch(wc)),
        output:
            marker=PRED_FEATURE_MARKER,
        params:
            # A folder's slides have no label table: no per-slide mpp, only the config fallback.
            members=lambda wc: members_json(
                predict_batch(wc), PREDICT_FOLDER.get, lambda s: expand(PRED_TILES, slide=s)[0],
                lambda s: expand(PRED_FEATURES, slide=s)[0], {},
            ),
        log:
            f"{OUT}/logs/predict/features/{TILING}/{ENCODER}/batch-{{batch}}.log",
        benchmark:
            f"{OUT}/benchmarks/predict/features/{TILING}/{ENCODER}/batch-{{batch}}.tsv"


use rule attention as predict_attention with:
    input:
        features=lambda wc: predict_markers(predict_ids()),
        models=fold_checkpoints,
    output:
        directory(PRED_SCORES),
    params:
        stores=lambda wc: [predict_store(s) for s in predict_ids()],
        fold=str(PREDICT["fold"]),
        split="",
    log:
        f"{OUT}/logs/predict/attention/{{model}}.log",
    benchmark:
        f"{OUT}/benchmarks/predict/attention/{{model}}.tsv"


use rule heatmap as predict_heatmap with:
    input:
        slide=predict_slide,
        scores=PRED_SCORES,
        mask=predict_segment_file("mask.png") if HEATMAP["clip_to_tissue"] else [],
        meta=predict_segment_file("mask.json") if HEATMAP["clip_to_tissue"] else [],
    output:
        **draw_outputs(PRED_HEATMAP_DIR),
    params:
        mpp=predict_mpp_args,
    log:
        f"{OUT}/logs/predict/heatmap/{{model}}/{{slide}}.log",
    benchmark:
        f"{OUT}/benchmarks/predict/heatmap/{{model}}/{{slide}}.tsv"


rule predict:
    input:
        scores=expand(PRED_SCORES, model=PREDICT_MODELS),
        inventory=([INVENTORY] if PREDICT_COHORT else []) + ([PREDICT_INVENTORY] if PREDICT_FOLDER else []),
    output:
        f"{PREDICT_OUT}/predictions.csv",
    params:
        slides=shlex.join([*PREDICT_COHORT, *sorted(PREDICT_FOLDER)]),
        version=VERSION,
    conda:
        ENV
    log:
        f"{OUT}/logs/predict/predictions.log",
    benchmark:
        f"{OUT}/benchmarks/predict/predictions.tsv"
    shell:
        "{PY} -m wsi_asmil.report.predict --scores {input.scores:q} --inventory {input.inventory:q}"
        " --slides {params.slides} --out {output:q} > {log:q} 2>&1"
