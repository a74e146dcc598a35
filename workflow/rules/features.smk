# Feature extraction runs in batches of slides (wsi_asmil.features.batch): one job builds the model
# once and writes each member's own store (FEATURES) atomically. The job's Snakemake output is the
# batch's marker, never the stores, because Snakemake deletes a job's outputs before rerunning it:
# a batch rerun for one added or failed slide keeps its finished members (the job skips every store
# whose recorded request still matches). Consumers wait for the markers of their slides' batches
# (feature_markers) and get the store paths as before.
from wsi_asmil.features.batch import assign_batches, members_json, slides_per_job

# Settings that change speed, never results: not params, so editing them re-runs nothing (except
# slides_per_job, which re-forms the batches: their jobs rerun, keep every store, and downstream
# jobs rerun because their inputs, the markers, are new).
PERFORMANCE_ONLY = ("threads", "batch_size", "num_workers", "compile", "slides_per_job")
COMPILE_FLAG = "--compile" if config["features"]["compile"] else ""
SLIDES_PER_JOB = slides_per_job(config["features"]["slides_per_job"], config["features"]["device"])
FEATURE_MARKER = f"{FEATURES_DIR}/batches/{{batch}}.json"
# Slide -> batch name, over every slide of the cohort (usable or not: membership never depends on
# what the inventory could open, so it is known before the inventory runs).
FEATURE_BATCH_OF = {s: b for b, ids in assign_batches(SLIDE_IDS, SLIDES_PER_JOB).items() for s in ids}

wildcard_constraints:
    batch=r"\d+-of-\d+",


def feature_markers(ids):
    """The batch markers that a rule reading the cohort's feature stores of ``ids`` waits for."""
    return sorted({expand(FEATURE_MARKER, batch=FEATURE_BATCH_OF[s])[0] for s in ids})


def fallback_args(wildcards=None):
    """The config's mpp fallback for a batch job (per-slide overrides travel in its members)."""
    return mpp_options(None, {}, config["mpp_fallback"])


def cohort_batch(wildcards):
    """The usable slides of the batch (after the inventory has run)."""
    return usable([s for s, b in FEATURE_BATCH_OF.items() if b == wildcards.batch])


rule features:
    input:
        slides=lambda wc: [slide_file(s) for s in cohort_batch(wc)],
        tiles=lambda wc: expand(TILES, slide=cohort_batch(wc)),
    output:
        marker=FEATURE_MARKER,
    params:
        members=lambda wc: members_json(
            cohort_batch(wc), slide_file, lambda s: expand(TILES, slide=s)[0],
            lambda s: expand(FEATURES, slide=s)[0], MPP_OVERRIDE,
        ),
        args=lambda wc: cli_args("features", exclude=PERFORMANCE_ONLY),
        mpp=fallback_args,
        version=VERSION,
    threads: config["features"]["threads"]
    resources:
        gpu=gpus("features"),
    conda:
        ENV
    log:
        f"{OUT}/logs/features/{TILING}/{ENCODER}/batch-{{batch}}.log",
    benchmark:
        f"{OUT}/benchmarks/features/{TILING}/{ENCODER}/batch-{{batch}}.tsv"
    shell:
        "{PY} -m wsi_asmil.features.batch --members {params.members:q} --marker {output.marker:q}"
        " {params.args} {params.mpp} --threads {threads}"
        " --batch-size {config[features][batch_size]} --num-workers {config[features][num_workers]}"
        " {COMPILE_FLAG} > {log:q} 2>&1"
