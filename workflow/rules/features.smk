

rule features:
    input:
        slide=slide_path,
        tiles=rules.tile.output.store,
    output:
        store=directory(FEATURES),
    params:
        args=lambda wc: cli_args("features", exclude=("threads",)),
        mpp=mpp_args,
        version=VERSION,
    threads: config["features"]["threads"]
    resources:
        gpu=1,
    log:
        f"{OUT}/logs/features/{TILING}/{ENCODER}/{{slide}}.log",
    benchmark:
        f"{OUT}/benchmarks/features/{TILING}/{ENCODER}/{{slide}}.tsv"
    shell:
        "{PY} -m wsi_asmil.features --slide {input.slide:q} --tiles {input.tiles:q}"
        " --out {output.store:q} {params.args} --threads {threads} {params.mpp} > {log:q} 2>&1"
