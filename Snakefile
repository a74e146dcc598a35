# wsi-asmil: slides -> tissue masks -> tiles -> features -> ASMIL models -> report and heatmaps.
#   snakemake --cores 8                                    # the built-in demo cohort
#   snakemake --cores 8 --config slides_dir=DIR labels=CSV out_dir=DIR
# The logic lives in the wsi_asmil package; the rules only wire files to its command lines.

from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config.yaml"


from wsi_asmil.pipeline.config_overrides import coerce_to_schema

coerce_to_schema(config, f"{workflow.basedir}/workflow/schemas/config.schema.yaml")
validate(config, "workflow/schemas/config.schema.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/execution.smk"
include: "workflow/rules/demo.smk"
include: "workflow/rules/inventory.smk"
include: "workflow/rules/segment.smk"
include: "workflow/rules/tile.smk"
include: "workflow/rules/features.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/heatmap.smk"
include: "workflow/rules/predict.smk"
include: "workflow/rules/viewer.smk"
include: "workflow/rules/disk.smk"


rule all:
    input:
        all_outputs,
        # its own function: it waits for the viewer's sample checkpoint, and only its own files
        # may wait (a dry run still plans every other job)
        lambda wc: viewer_targets(),
    default_target: True


from wsi_asmil.pipeline.console import summary_lines as _summary_lines


def _print_summary(logs, success):
    if workflow.is_main_process:
        inventories = [INVENTORY] + ([PREDICT_INVENTORY] if PREDICT_FOLDER else [])
        print("\n".join(_summary_lines(f"{REPORT}/index.html", inventories, logs, success)), file=sys.stderr)


onsuccess:
    _print_summary(log, True)


onerror:
    _print_summary(log, False)
