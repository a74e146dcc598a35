
# Settings that change speed, never results: not params, so editing them re-runs nothing.
PERFORMANCE_ONLY = ("threads", "batch_size", "num_workers", "compile")
COMPILE_FLAG = "--compile" if config["features"]["compile"] else ""


rule features:
    input:
        slide=slide_path,
        tiles=rules.tile.output.store,
    output:
        store=directory(FEATURES),
    params:
        args=lambda wc: cli_args("features", exclude=PERFORMANCE_ONLY),
        mpp=mpp_args,
        version=VERSION,
    threads: config["features"]["threads"]
    resources:
        gpu=gpus("features"),
    conda:
        ENV
    log:
        f"{OUT}/logs/features/{TILING}/{ENCODER}/{{slide}}.log",
    benchmark:
        f"{OUT}/benchmarks/features/{TILING}/{ENCODER}/{{slide}}.tsv"
    shell:
        "{PY} -m wsi_asmil.features --slide {input.slide:q} --tiles {input.tiles:q}"
        " --out {output.store:q} {params.args} {params.mpp} --threads {threads}"
        " --batch-size {config[features][batch_size]} --num-workers {config[features][num_workers]}"
        " {COMPILE_FLAG}"
        " > {log:q} 2>&1"
