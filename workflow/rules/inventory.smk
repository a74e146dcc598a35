# Every slide is opened once up front; unusable ones are listed, never scheduled (see wsi_asmil.slides.inventory).


checkpoint inventory:
    input:
        slides=[slide_file(s) for s in SLIDE_IDS],
        labels=LABELS,
    output:
        INVENTORY,
    params:
        slides_dir=SLIDES_DIR,
        mpp=mpp_options(None, {}, config["mpp_fallback"]),
        version=VERSION,
    conda:
        ENV
    log:
        f"{OUT}/logs/inventory.log",
    benchmark:
        f"{OUT}/benchmarks/inventory.tsv"
    shell:
        "{PY} -m wsi_asmil.slides.inventory --slides-dir {params.slides_dir:q} --labels {input.labels:q}"
        " {params.mpp} --out {output:q} > {log:q} 2>&1"
