

rule heatmap:
    input:
        slide=slide_path,
        features=FEATURES,
        split=SPLIT,
        models=expand(f"{OUT}/models/{{{{model}}}}/fold{{fold}}/model.pt", fold=FOLDS),
    output:
        image=f"{OUT}/heatmaps/{{model}}/{{slide}}.png",
        scores=f"{OUT}/heatmaps/{{model}}/{{slide}}_scores.csv",
    params:
        models_dir=lambda wc: f"{OUT}/models/{wc.model}",
        args=lambda wc: cli_args("heatmap", exclude=("models",)),
        mpp=mpp_args,
        version=VERSION,
    resources:
        gpu=1,
    conda:
        ENV
    log:
        f"{OUT}/logs/heatmap/{{model}}/{{slide}}.log",
    benchmark:
        f"{OUT}/benchmarks/heatmap/{{model}}/{{slide}}.tsv"
    shell:
        "{PY} -m wsi_asmil.heatmap --slide {input.slide:q} --features {input.features:q}"
        " --split {input.split:q} --models-dir {params.models_dir:q} --out {output.image:q}"
        " --scores {output.scores:q} {params.args} {params.mpp} > {log:q} 2>&1"
