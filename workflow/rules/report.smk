# The report: metrics, predictions, instability curves, localisation and a sample of heatmaps in one
# self-contained HTML page, linked to the zoomable viewer when it is on. Names defined in heatmap.smk,
# predict.smk and viewer.smk (included later) are used inside functions, which Snakemake evaluates
# once every rule file is read.


rule report:
    input:
        metrics=expand(f"{MODEL_DIR}/metrics.json", model=MODELS, fold=FOLDS),
        predictions=expand(f"{MODEL_DIR}/predictions.csv", model=MODELS, fold=FOLDS),
        histories=expand(f"{MODEL_DIR}/history.csv", model=MODELS, fold=FOLDS),
        split=SPLIT,
        inventory=INVENTORY,
        localisation=lambda wc: expand(f"{LOCALISATION_DIR}/{{model}}.csv", model=MODELS) if LOCALISE else [],
        truth=lambda wc: expand(f"{TRUTH_DIR}/{{slide}}.png", slide=usable(sorted(TRUTH_SOURCES))) if LOCALISE else [],
        scores=lambda wc: expand(SCORES_DIR, model=HEATMAP_MODELS),
        heatmaps=lambda wc: expand(f"{HEATMAP_DIR}/{{slide}}.png", model=HEATMAP_MODELS, slide=usable(TRAIN_IDS)),
        legend=lambda wc: LEGEND,
        new=lambda wc: f"{PREDICT_OUT}/predictions.csv" if PREDICT_ON else [],
        viewer=lambda wc: f"{REPORT}/viewer.html" if VIEWER_ON else [],
    output:
        metrics=f"{REPORT}/metrics.json",
        predictions=f"{REPORT}/predictions.csv",
        table=f"{REPORT}/metrics.md",
        localisation=f"{REPORT}/localisation.csv",
        localisation_summary=f"{REPORT}/localisation.json",
        html=f"{REPORT}/index.html",
    params:
        models_dir=f"{OUT}/models",
        models=MODELS,
        folds=len(FOLDS),
        extra=lambda wc, input: shlex.join([
            "--heatmaps-dir", f"{OUT}/heatmaps", "--heatmap-models", *HEATMAP_MODELS,
            "--sample", str(HEATMAP["report_sample"]), "--localisation", *input.localisation,
            *(["--truth-dir", TRUTH_DIR] if LOCALISE else []),
            *(["--new-predictions", input.new] if PREDICT_ON else []),
            *(["--viewer", "viewer.html"] if VIEWER_ON else []),
        ]),
        version=VERSION,
    conda:
        ENV
    log:
        f"{OUT}/logs/report.log",
    benchmark:
        f"{OUT}/benchmarks/report.tsv"
    shell:
        "{PY} -m wsi_asmil.report.build --models-dir {params.models_dir:q} --models {params.models:q}"
        " --folds {params.folds} --out-dir {REPORT:q} --split {input.split:q} --inventory {input.inventory:q}"
        " {params.extra} > {log:q} 2>&1"
