# How runs execute, whatever the executor:
# - provenance (wsi_asmil.pipeline.provenance): the main Snakemake process gets a run id, exported to every
#   job (locally and through sbatch) so that Zarr stores name their run in their attrs, and writes
#   {out_dir}/manifests/<run_id>.json plus {out_dir}/manifest.json before the first job (not in
#   dry runs, not when there is nothing to do);
# - fixes for Snakemake's batching of group jobs (group-components, used by profiles/slurm to run
#   segment + tile for a batch of slides in one Slurm job) and for `--list-changes params`:
#   see wsi_asmil.pipeline.snakemake_fixes.
from wsi_asmil.core import run_id as _run_id
from wsi_asmil.pipeline import provenance as _provenance
from wsi_asmil.pipeline import snakemake_fixes as _snakemake_fixes

_snakemake_fixes.apply()

RUN_ID = _run_id.run_environment(OUT, workflow.is_main_process)


onstart:
    check_disk()  # workflow/rules/disk.smk: a run that will not fit stops here, before any job
    _provenance.write_run_manifest(workflow, config, OUT, RUN_ID, disk=DISK_PLAN.to_json() if DISK_PLAN else None)
