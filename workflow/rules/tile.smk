

rule tile:
    input:
        slide=slide_path,
        mask=rules.segment.output.mask,
        meta=rules.segment.output.meta,
    output:
        store=directory(TILES),
        qc=f"{OUT}/tiles/{TILING}/{{slide}}_grid.png",
    params:
        seg_dir=lambda wc: f"{OUT}/segment/{wc.slide}",
        args=lambda wc: cli_args("tiling"),
        mpp=mpp_args,
        version=VERSION,
    conda:
        ENV
    log:
        f"{OUT}/logs/tile/{TILING}/{{slide}}.log",
    benchmark:
        f"{OUT}/benchmarks/tile/{TILING}/{{slide}}.tsv"
    shell:
        "{PY} -m wsi_asmil.features.tile --slide {input.slide:q} --seg-dir {params.seg_dir:q}"
        " --out {output.store:q} --qc {output.qc:q} {params.args} {params.mpp} > {log:q} 2>&1"
