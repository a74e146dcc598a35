# Heatmaps and localisation. One scoring job per model gives every usable training slide its
# attention from the fold model that tested it (shared by drawing, localisation and the report);
# one drawing job per model x slide (no torch); one colour bar; ground truth rasterised once per
# slide; localisation metrics per model. Each job's params hold only the config it reads, so a
# colour-map edit re-draws and re-reports, and a threshold edit only re-scores localisation.
# With heatmap.overlap above tiling.overlap the drawn slides are also tiled on that denser grid,
# embedded by the features rule's own command and scored by the same fold models: the drawing
# averages the overlapping scores per pixel. Localisation stays on the training grid's scores.
from wsi_asmil.tissue.annotations import find_annotation

HEATMAP = config["heatmap"]
LOCALISATION = HEATMAP["localisation"]
HEATMAP_MODELS = list(MODELS) if HEATMAP["models"] is None else list(HEATMAP["models"])
SCORE_FOLD = str(HEATMAP["fold"])
SCORES_DIR = LAYOUT.scores()
HEATMAP_DIR = LAYOUT.heatmaps()
LEGEND = LAYOUT.legend
TRUTH_DIR = str(Path(LAYOUT.truth()).parent)
LOCALISATION_DIR = LAYOUT.localisation


def check_models(key, models):
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise ValueError(f"config key '{key}': {unknown} not among the trained models train.models={MODELS}")


def check_fold(key, fold):
    if isinstance(fold, int) and fold >= len(FOLDS):
        raise ValueError(f"config key '{key}': fold {fold} does not exist (the run has {len(FOLDS)} fold(s))")


check_models("heatmap.models", HEATMAP_MODELS)
check_fold("heatmap.fold", HEATMAP["fold"])

if 0 < HEATMAP["overlap"] < config["tiling"]["overlap"]:
    raise ValueError(
        f"config key 'heatmap.overlap': {HEATMAP['overlap']} is sparser than tiling.overlap "
        f"{config['tiling']['overlap']}; use 0 (draw the training grid) or a value above it"
    )
DENSE = HEATMAP["overlap"] > config["tiling"]["overlap"]
DENSE_TILING = TileParams(**{**config["tiling"], "overlap": HEATMAP["overlap"]}).tag()
DENSE_TILES = f"{OUT}/tiles/{DENSE_TILING}/{{slide}}.zarr"
DENSE_LAYOUT = RunLayout(OUT, DENSE_TILING, ENCODER)
DENSE_FEATURES = DENSE_LAYOUT.features()
DENSE_MARKER = f"{DENSE_LAYOUT.features_dir}/batches/{{batch}}.json"
DENSE_SCORES_DIR = f"{OUT}/heatmaps/{{model}}/scores_{DENSE_TILING}"
#: The scores the drawn models' heatmaps and viewer overlays are painted from.
DRAW_SCORES_DIR = DENSE_SCORES_DIR if DENSE else SCORES_DIR

# Ground truth: per-slide files in localisation.annotations, else the demo's exact masks.
if LOCALISATION["annotations"] is not None:
    TRUTH_SOURCES = {
        s: str(p) for s in TRAIN_IDS if (p := find_annotation(LOCALISATION["annotations"], s)) is not None
    }
    if not TRUTH_SOURCES:
        print(f"wsi-asmil: no annotation found in {LOCALISATION['annotations']} for any training slide", file=sys.stderr)
elif DEMO:
    TRUTH_SOURCES = {s: f"{OUT}/demo/truth/{s}.json" for s in TRAIN_IDS}
else:
    TRUTH_SOURCES = {}
DEMO_TRUTH = DEMO and LOCALISATION["annotations"] is None
LOCALISE = bool(TRUTH_SOURCES)


DRAW_KEYS = ("mpp", "max_edge", "normalize", "uniform_range", "cmap", "alpha", "blur_um", "clip_to_tissue",
             "top_k", "geojson_object", "tiff_mpp")


def draw_args(section=HEATMAP):
    """The drawing settings as command-line options (no scoring or localisation keys)."""
    return options(section, only=DRAW_KEYS)


def draw_outputs(base):
    """Outputs of one drawing job under ``base`` (a folder pattern with {model})."""
    out = {
        "image": f"{base}/{{slide}}.png",
        "geojson": f"{base}/{{slide}}.geojson",
        "gallery": f"{base}/{{slide}}_topk.jpg",
    }
    if HEATMAP["tiff_mpp"] is not None:
        out["tiff"] = f"{base}/{{slide}}_overlay.tif"
    return out


def draw_io(wildcards, input, output):
    """File options that depend on the config: the tissue mask and the TIFF overlay."""
    args = []
    if HEATMAP["clip_to_tissue"]:
        args += ["--tissue-mask", input.mask]
    if "tiff" in output.keys():
        args += ["--tiff", output.tiff]
    return shlex.join(args)


def draw_targets(base, models, ids):
    """Every file of every drawing job: Snakemake only re-runs a job for the missing outputs that
    are asked for, so a newly enabled output (``tiff_mpp``) must be named here."""
    return [f for pattern in draw_outputs(base).values() for f in expand(pattern, model=models, slide=ids)]


def heatmap_targets():
    """What `snakemake` (rule all) builds for heatmaps and localisation."""
    ids = usable(TRAIN_IDS)
    targets = draw_targets(HEATMAP_DIR, HEATMAP_MODELS, ids) + [LEGEND]
    if LOCALISE:
        targets += expand(f"{LOCALISATION_DIR}/{{model}}.json", model=MODELS)
    return targets


rule attention:
    input:
        features=lambda wc: feature_markers(usable(TRAIN_IDS)),
        split=SPLIT,
        models=fold_checkpoints,
    output:
        directory(SCORES_DIR),
    params:
        stores=lambda wc: expand(FEATURES, slide=usable(TRAIN_IDS)),
        models_dir=lambda wc: LAYOUT.models(wc.model),
        fold=SCORE_FOLD,
        folds=len(FOLDS),
        split=lambda wc, input: f"--split {shlex.quote(input.split)}",
        version=VERSION,
    threads: config["heatmap"]["threads"]
    resources:
        gpu=gpus("heatmap"),
    conda:
        ENV
    log:
        f"{OUT}/logs/attention/{{model}}.log",
    benchmark:
        f"{OUT}/benchmarks/attention/{{model}}.tsv"
    shell:
        "OMP_NUM_THREADS={threads} {PY} -m wsi_asmil.maps.scoring --features {params.stores:q}"
        " --models-dir {params.models_dir:q} --model-name {wildcards.model} --folds {params.folds}"
        " --fold {params.fold} {params.split} --device {config[heatmap][device]}"
        " --out-dir {output:q} > {log:q} 2>&1"


if DENSE:

    use rule tile as heatmap_tile with:
        output:
            store=directory(DENSE_TILES),
            qc=f"{OUT}/tiles/{DENSE_TILING}/{{slide}}_grid.png",
        params:
            seg_dir=lambda wc: LAYOUT.segment(wc.slide),
            args=lambda wc: f'{cli_args("tiling", exclude=("overlap",))} --overlap {HEATMAP["overlap"]}',
            mpp=mpp_args,
            version=VERSION,
        log:
            f"{OUT}/logs/tile/{DENSE_TILING}/{{slide}}.log",
        benchmark:
            f"{OUT}/benchmarks/tile/{DENSE_TILING}/{{slide}}.tsv"

    def dense_batch(wildcards):
        """The drawn slides of a feature batch (the training grid's batches, cohort slides only)."""
        return [s for s in cohort_batch(wildcards) if s in TRAIN_IDS]

    def dense_markers(ids):
        return sorted({expand(DENSE_MARKER, batch=FEATURE_BATCH_OF[s])[0] for s in ids})

    use rule features as heatmap_features with:
        input:
            slides=lambda wc: [slide_file(s) for s in dense_batch(wc)],
            tiles=lambda wc: expand(DENSE_TILES, slide=dense_batch(wc)),
        output:
            marker=DENSE_MARKER,
        params:
            members=lambda wc: members_json(
                dense_batch(wc), slide_file, lambda s: expand(DENSE_TILES, slide=s)[0],
                lambda s: expand(DENSE_FEATURES, slide=s)[0], MPP_OVERRIDE,
            ),
            args=lambda wc: cli_args("features", exclude=PERFORMANCE_ONLY),
            mpp=fallback_args,
            version=VERSION,
        log:
            f"{OUT}/logs/features/{DENSE_TILING}/{ENCODER}/batch-{{batch}}.log",
        benchmark:
            f"{OUT}/benchmarks/features/{DENSE_TILING}/{ENCODER}/batch-{{batch}}.tsv"

    use rule attention as heatmap_attention with:
        input:
            features=lambda wc: dense_markers(usable(TRAIN_IDS)),
            split=SPLIT,
            models=fold_checkpoints,
        output:
            directory(DENSE_SCORES_DIR),
        params:
            stores=lambda wc: expand(DENSE_FEATURES, slide=usable(TRAIN_IDS)),
            models_dir=lambda wc: LAYOUT.models(wc.model),
            fold=SCORE_FOLD,
            folds=len(FOLDS),
            version=VERSION,
        log:
            f"{OUT}/logs/attention/{DENSE_TILING}/{{model}}.log",
        benchmark:
            f"{OUT}/benchmarks/attention/{DENSE_TILING}/{{model}}.tsv"


rule heatmap:
    input:
        slide=slide_path,
        scores=DRAW_SCORES_DIR,
        mask=rules.segment.output.mask if HEATMAP["clip_to_tissue"] else [],
        meta=rules.segment.output.meta if HEATMAP["clip_to_tissue"] else [],
    output:
        **draw_outputs(HEATMAP_DIR),
    params:
        scores=lambda wc, input: f"{input.scores}/{wc.slide}_scores.csv",
        files=draw_io,
        args=draw_args(),
        mpp=mpp_args,
        version=VERSION,
    conda:
        ENV
    log:
        f"{OUT}/logs/heatmap/{{model}}/{{slide}}.log",
    benchmark:
        f"{OUT}/benchmarks/heatmap/{{model}}/{{slide}}.tsv"
    shell:
        "{PY} -m wsi_asmil.maps.heatmap --slide {input.slide:q} --scores {params.scores:q}"
        " --out {output.image:q} --geojson {output.geojson:q} --gallery {output.gallery:q}"
        " {params.files} {params.args} {params.mpp} > {log:q} 2>&1"


rule heatmap_legend:
    output:
        LEGEND,
    params:
        args=options(HEATMAP, only=("normalize", "uniform_range", "cmap")),
        version=VERSION,
    conda:
        ENV
    log:
        f"{OUT}/logs/heatmap_legend.log",
    benchmark:
        f"{OUT}/benchmarks/heatmap_legend.tsv"
    shell:
        "{PY} -m wsi_asmil.maps.heatmap --legend {output:q} {params.args} > {log:q} 2>&1"


rule truth:
    input:
        slide=slide_path,
        annotation=lambda wc: [] if DEMO_TRUTH else TRUTH_SOURCES[wc.slide],
    output:
        png=f"{TRUTH_DIR}/{{slide}}.png",
        json=f"{TRUTH_DIR}/{{slide}}.json",
    params:
        # The demo's truth is written with its slides (the slide is the input that orders them).
        source=lambda wc: TRUTH_SOURCES[wc.slide],
        args=options(LOCALISATION, only=("mpp", "include", "exclude")),
        mpp=mpp_args,
        version=VERSION,
    conda:
        ENV
    log:
        f"{OUT}/logs/truth/{{slide}}.log",
    benchmark:
        f"{OUT}/benchmarks/truth/{{slide}}.tsv"
    shell:
        "{PY} -m wsi_asmil.tissue.annotations --slide {input.slide:q} --annotation {params.source:q}"
        " {params.args} {params.mpp} --out {output.png:q} --out-json {output.json:q} > {log:q} 2>&1"


rule localisation:
    input:
        scores=SCORES_DIR,
        truth=lambda wc: expand(f"{TRUTH_DIR}/{{slide}}.png", slide=usable(sorted(TRUTH_SOURCES))),
    output:
        csv=f"{LOCALISATION_DIR}/{{model}}.csv",
        json=f"{LOCALISATION_DIR}/{{model}}.json",
    params:
        args=options(LOCALISATION, only=("threshold", "top_q", "top_k", "froc_nms_um", "froc_min_score")),
        version=VERSION,
    conda:
        ENV
    log:
        f"{OUT}/logs/localisation/{{model}}.log",
    benchmark:
        f"{OUT}/benchmarks/localisation/{{model}}.tsv"
    shell:
        "{PY} -m wsi_asmil.maps.localisation --model {wildcards.model} --scores {input.scores:q}"
        " --truth {input.truth:q} {params.args} --out-csv {output.csv:q} --out-json {output.json:q}"
        " > {log:q} 2>&1"
