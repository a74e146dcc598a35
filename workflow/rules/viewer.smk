# The report's zoomable viewer (report/viewer.html): Deep Zoom pyramids of the report's sampled slides,
# each model's heat overlay and the truth outline, shown with OpenSeadragon vendored from npm.
# The sample depends on the truth masks' tumour areas, so it is a checkpoint: the pyramids it asks
# for are planned once it has run. Its inputs are the split, the inventory and the truth masks only
# (not the scores), so it re-runs rarely and a dry run still lists the jobs downstream of it. The heatmap section's colour settings are params of the pyramids,
# so a colour-map edit re-draws them; heatmap.alpha is only the page's initial opacity.

VIEWER = config["viewer"]
VIEWER_ON = VIEWER["enabled"] and HEATMAP["report_sample"] > 0 and bool(HEATMAP_MODELS)
VIEWER_SLIDE = f"{REPORT}/viewer/slides/{{slide}}"


def viewer_slides(wildcards=None):
    """The sampled slides (after the sample checkpoint has run)."""
    return json.loads(Path(checkpoints.viewer_sample.get().output[0]).read_text())


def viewer_targets():
    """What `snakemake` (rule all) builds for the viewer: the page and every sampled slide's pyramids.

    The pyramids are named here, not only as the page's inputs: reached only through the page,
    Snakemake (9.27) plans them after the sample checkpoint and misses that new scores, masks or
    colour settings make them out of date."""
    if not VIEWER_ON:
        return []
    return [f"{REPORT}/viewer.html", *expand(VIEWER_SLIDE, slide=viewer_slides())]


def viewer_truth(wildcards):
    return f"{TRUTH_DIR}/{wildcards.slide}.png" if LOCALISE and wildcards.slide in TRUTH_SOURCES else []


def viewer_io(wildcards, input):
    """The per-model scores, the tissue mask and the truth, as options."""
    args = ["--scores", *(f"{m}={d}/{wildcards.slide}_scores.csv" for m, d in zip(HEATMAP_MODELS, input.scores))]
    if HEATMAP["clip_to_tissue"]:
        args += ["--tissue-mask", input.mask]
    if input.truth:
        args += ["--truth", input.truth]
    return shlex.join(args)


checkpoint viewer_sample:
    input:
        split=SPLIT,
        inventory=INVENTORY,
        truth=lambda wc: expand(f"{TRUTH_DIR}/{{slide}}.png", slide=usable(sorted(TRUTH_SOURCES))) if LOCALISE else [],
    output:
        f"{REPORT}/viewer/sample.json",
    params:
        candidates=shlex.join(TRAIN_IDS),
        n=HEATMAP["report_sample"],
        truth=shlex.join(["--truth-dir", TRUTH_DIR]) if LOCALISE else "",
        version=VERSION,
    conda:
        ENV
    log:
        f"{OUT}/logs/viewer/sample.log",
    benchmark:
        f"{OUT}/benchmarks/viewer/sample.tsv"
    shell:
        "{PY} -m wsi_asmil.report.viewer sample --candidates {params.candidates} --n {params.n} {params.truth}"
        " --split {input.split:q} --inventory {input.inventory:q} --out {output:q} > {log:q} 2>&1"


rule viewer_pyramids:
    input:
        slide=slide_path,
        scores=expand(DRAW_SCORES_DIR, model=HEATMAP_MODELS),
        mask=rules.segment.output.mask if HEATMAP["clip_to_tissue"] else [],
        meta=rules.segment.output.meta if HEATMAP["clip_to_tissue"] else [],
        truth=viewer_truth,
    output:
        directory(VIEWER_SLIDE),
    params:
        files=viewer_io,
        args=shlex.join(str(a) for a in [
            "--viewer-mpp", VIEWER["slide_mpp"], "--overlay-mpp", VIEWER["overlay_mpp"], "--quality", VIEWER["jpeg_quality"],
            "--normalize", HEATMAP["normalize"], "--uniform-range", HEATMAP["uniform_range"], "--cmap", HEATMAP["cmap"],
            "--blur-um", HEATMAP["blur_um"], "--clip-to-tissue" if HEATMAP["clip_to_tissue"] else "--no-clip-to-tissue"]),
        mpp=mpp_args,
        version=VERSION,
    conda:
        ENV
    log:
        f"{OUT}/logs/viewer/{{slide}}.log",
    benchmark:
        f"{OUT}/benchmarks/viewer/{{slide}}.tsv"
    shell:
        "{PY} -m wsi_asmil.report.viewer pyramids --slide {input.slide:q} --out-dir {output:q}"
        " {params.files} {params.args} {params.mpp} > {log:q} 2>&1"


rule viewer_page:
    input:
        sample=f"{REPORT}/viewer/sample.json",
        pyramids=lambda wc: expand(VIEWER_SLIDE, slide=viewer_slides()),
        split=SPLIT,
        legend=LEGEND,
    output:
        page=f"{REPORT}/viewer.html",
        osd=directory(f"{REPORT}/viewer/openseadragon"),
    params:
        alpha=HEATMAP["alpha"],
        version=VERSION,
    conda:
        ENV
    log:
        f"{OUT}/logs/viewer/page.log",
    benchmark:
        f"{OUT}/benchmarks/viewer/page.tsv"
    shell:
        "{PY} -m wsi_asmil.report.viewer page --report-dir {REPORT:q} --sample {input.sample:q} --alpha {params.alpha}"
        " --split {input.split:q} --legend {input.legend:q} > {log:q} 2>&1"
