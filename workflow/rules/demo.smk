# The synthetic demo cohort, generated only when slides_dir is null.


rule demo_cohort:
    output:
        slides=expand(f"{OUT}/demo/slides/{{slide}}.svs", slide=SLIDE_IDS if DEMO else []),
        labels=f"{OUT}/demo/labels.csv",
    params:
        out=f"{OUT}/demo",
        args=lambda wc: cli_args("demo"),
        version=VERSION,
    threads: 2
    conda:
        ENV
    log:
        f"{OUT}/logs/demo_cohort.log",
    benchmark:
        f"{OUT}/benchmarks/demo_cohort.tsv"
    shell:
        "{PY} -m wsi_asmil.synthetic --out {params.out:q} {params.args} --workers {threads} > {log:q} 2>&1"
