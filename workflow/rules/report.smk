

rule report:
    input:
        metrics=expand(f"{MODEL_DIR}/metrics.json", model=MODELS, fold=FOLDS),
        predictions=expand(f"{MODEL_DIR}/predictions.csv", model=MODELS, fold=FOLDS),
    output:
        metrics=f"{REPORT}/metrics.json",
        predictions=f"{REPORT}/predictions.csv",
        table=f"{REPORT}/metrics.md",
    params:
        models_dir=f"{OUT}/models",
        models=MODELS,
        folds=len(FOLDS),
        version=VERSION,
    conda:
        ENV
    log:
        f"{OUT}/logs/report.log",
    benchmark:
        f"{OUT}/benchmarks/report.tsv"
    shell:
        "{PY} -m wsi_asmil.report --models-dir {params.models_dir:q} --models {params.models:q}"
        " --folds {params.folds} --out-dir {REPORT:q} > {log:q} 2>&1"
