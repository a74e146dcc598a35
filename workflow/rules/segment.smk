

rule segment:
    input:
        slide=slide_path,
    output:
        mask=f"{SEG_DIR}/mask.png",
        meta=f"{SEG_DIR}/mask.json",
        geojson=f"{SEG_DIR}/tissue.geojson",
        qc=f"{SEG_DIR}/qc.jpg",
    params:
        out_dir=lambda wc: f"{OUT}/segment/{wc.slide}",
        args=lambda wc: cli_args("segment"),
        mpp=mpp_args,
        version=VERSION,
    conda:
        ENV
    log:
        f"{OUT}/logs/segment/{{slide}}.log",
    benchmark:
        f"{OUT}/benchmarks/segment/{{slide}}.tsv"
    shell:
        "{PY} -m wsi_asmil.tissue.segment --slide {input.slide:q} --out-dir {params.out_dir:q}"
        " {params.args} {params.mpp} > {log:q} 2>&1"
