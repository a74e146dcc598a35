# Heatmaps and localisation. One scoring job per model gives every usable training slide its
# attention from the fold model that tested it (shared by drawing, localisation and the report);
# one drawing job per model x slide (no torch); one colour bar; ground truth rasterised once per
# slide; localisation metrics per model. Each job's params hold only the config it reads, so a
# colour-map edit re-draws and re-reports, and a threshold edit only re-scores localisation.
# With heatmap.overlap above tiling.overlap the drawn slides are also tiled on that denser grid,
# embedded by the features rule's own command and scored by the same fold models: the drawing
# averages the overlapping scores per pixel. Localisation stays on the training grid's scores.
from wsi_asmil.annotations import find_annotation

HEATMAP = config["heatmap"]
LOCALISATION = HEATMAP["localisation"]
HEATMAP_MODELS = list(MODELS) if HEATMAP["models"] is None else list(HEATMAP["models"])
SCORE_FOLD = str(HEATMAP["fold"])
SCORES_DIR = f"{OUT}/heatmaps/{{model}}/scores"
HEATMAP_DIR = f"{OUT}/heatmaps/{{model}}"
LEGEND = f"{OUT}/heatmaps/legend.png"
TRUTH_DIR = f"{OUT}/localisation/truth"
LOCALISATION_DIR = f"{OUT}/localisation"


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
DENSE_FEATURES = f"{OUT}/features/{DENSE_TILING}/{ENCODER}/{{slide}}.zarr"
DENSE_SCORES_DIR = f"{OUT}/heatmaps/{{model}}/scores_{DENSE_TILING}"

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


def draw_args(section=HEATMAP):
    """The drawing settings as command-line options (no scoring or localisation keys)."""
    args = ["--mpp", section["mpp"], "--normalize", section["normalize"], "--uniform-range", section["uniform_range"],
            "--cmap", section["cmap"], "--alpha", section["alpha"], "--blur-um", section["blur_um"],
            "--top-k", section["top_k"], "--geojson-object", section["geojson_object"],
            "--clip-to-tissue" if section["clip_to_tissue"] else "--no-clip-to-tissue"]
    if section["max_edge"] is not None:
        args += ["--max-edge", section["max_edge"]]
    if section["tiff_mpp"] is not None:
        args += ["--tiff-mpp", section["tiff_mpp"]]
    return shlex.join(str(a) for a in args)


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
        features=lambda wc: expand(FEATURES, slide=usable(TRAIN_IDS)),
        split=SPLIT,
        models=expand(f"{OUT}/models/{{{{model}}}}/fold{{fold}}/model.pt", fold=FOLDS),
    output:
        directory(SCORES_DIR),
    params:
        models_dir=lambda wc: f"{OUT}/models/{wc.model}",
        fold=SCORE_FOLD,
        folds=len(FOLDS),
        version=VERSION,
    threads: config["train"]["threads"]
    resources:
        gpu=gpus("heatmap"),
    conda:
        ENV
    log:
        f"{OUT}/logs/attention/{{model}}.log",
    benchmark:
        f"{OUT}/benchmarks/attention/{{model}}.tsv"
    shell:
        "OMP_NUM_THREADS={threads} {PY} -m wsi_asmil.scoring --features {input.features:q}"
        " --models-dir {params.models_dir:q} --model-name {wildcards.model} --folds {params.folds}"
        " --fold {params.fold} --split {input.split:q} --device {config[heatmap][device]}"
        " --out-dir {output:q} > {log:q} 2>&1"


if DENSE:

    use rule tile as heatmap_tile with:
        output:
            store=directory(DENSE_TILES),
            qc=f"{OUT}/tiles/{DENSE_TILING}/{{slide}}_grid.png",
        params:
            seg_dir=lambda wc: f"{OUT}/segment/{wc.slide}",
            args=lambda wc: f'{cli_args("tiling", exclude=("overlap",))} --overlap {HEATMAP["overlap"]}',
            mpp=mpp_args,
            version=VERSION,
        log:
            f"{OUT}/logs/tile/{DENSE_TILING}/{{slide}}.log",
        benchmark:
            f"{OUT}/benchmarks/tile/{DENSE_TILING}/{{slide}}.tsv"

    use rule features as heatmap_features with:
        input:
            slide=slide_path,
            tiles=DENSE_TILES,
        output:
            store=directory(DENSE_FEATURES),
        log:
            f"{OUT}/logs/features/{DENSE_TILING}/{ENCODER}/{{slide}}.log",
        benchmark:
            f"{OUT}/benchmarks/features/{DENSE_TILING}/{ENCODER}/{{slide}}.tsv"

    use rule attention as heatmap_attention with:
        input:
            features=lambda wc: expand(DENSE_FEATURES, slide=usable(TRAIN_IDS)),
            split=SPLIT,
            models=expand(f"{OUT}/models/{{{{model}}}}/fold{{fold}}/model.pt", fold=FOLDS),
        output:
            directory(DENSE_SCORES_DIR),
        log:
            f"{OUT}/logs/attention/{DENSE_TILING}/{{model}}.log",
        benchmark:
            f"{OUT}/benchmarks/attention/{DENSE_TILING}/{{model}}.tsv"


rule heatmap:
    input:
        slide=slide_path,
        scores=DENSE_SCORES_DIR if DENSE else SCORES_DIR,
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
        "{PY} -m wsi_asmil.heatmap --slide {input.slide:q} --scores {params.scores:q}"
        " --out {output.image:q} --geojson {output.geojson:q} --gallery {output.gallery:q}"
        " {params.files} {params.args} {params.mpp} > {log:q} 2>&1"


rule heatmap_legend:
    output:
        LEGEND,
    params:
        args=shlex.join(["--normalize", HEATMAP["normalize"], "--uniform-range", str(HEATMAP["uniform_range"]),
                         "--cmap", HEATMAP["cmap"]]),
        version=VERSION,
    conda:
        ENV
    log:
        f"{OUT}/logs/heatmap_legend.log",
    benchmark:
        f"{OUT}/benchmarks/heatmap_legend.tsv"
    shell:
        "{PY} -m wsi_asmil.heatmap --legend {output:q} {params.args} > {log:q} 2>&1"


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
        args=shlex.join(["--mpp", str(LOCALISATION["mpp"]), "--include", *LOCALISATION["include"],
                         "--exclude", *LOCALISATION["exclude"]]),
        mpp=mpp_args,
        version=VERSION,
    conda:
        ENV
    log:
        f"{OUT}/logs/truth/{{slide}}.log",
    benchmark:
        f"{OUT}/benchmarks/truth/{{slide}}.tsv"
    shell:
        "{PY} -m wsi_asmil.annotations --slide {input.slide:q} --annotation {params.source:q}"
        " {params.args} {params.mpp} --out {output.png:q} --out-json {output.json:q} > {log:q} 2>&1"


rule localisation:
    input:
        scores=SCORES_DIR,
        truth=lambda wc: expand(f"{TRUTH_DIR}/{{slide}}.png", slide=usable(sorted(TRUTH_SOURCES))),
    output:
        csv=f"{LOCALISATION_DIR}/{{model}}.csv",
        json=f"{LOCALISATION_DIR}/{{model}}.json",
    params:
        args=shlex.join(["--threshold", LOCALISATION["threshold"], "--top-q", str(LOCALISATION["top_q"]),
                         "--top-k", *map(str, LOCALISATION["top_k"])]),
        version=VERSION,
    conda:
        ENV
    log:
        f"{OUT}/logs/localisation/{{model}}.log",
    benchmark:
        f"{OUT}/benchmarks/localisation/{{model}}.tsv"
    shell:
        "{PY} -m wsi_asmil.localisation --model {wildcards.model} --scores {input.scores:q}"
        " --truth {input.truth:q} {params.args} --out-csv {output.csv:q} --out-json {output.json:q}"
        " > {log:q} 2>&1"
