"""Two fixes for Snakemake (seen in 9.27), applied by the workflow (workflow/rules/execution.smk).

1. Batching of group jobs (``--group-components``). Snakemake caches group jobs by their set of
   jobs, and ``GroupJob.merge`` extends a cached group in place when ``group-components`` puts
   several slides in one batch. Whenever the DAG's groups are computed a second time -- at
   start-up whenever a checkpoint's output already exists (here: the cohort inventory, so on every
   run after the first), and after a checkpoint -- the cache hands back those enlarged groups:
   batches then overlap, the same slide is segmented by two Slurm jobs at once, the progress
   counter passes 100% and a dry run can loop forever. It shows when the slides do not divide
   evenly into batches (4 slides, 3 per job). Related upstream reports: snakemake/snakemake#1217
   and #4202. The fix: the factory returns a cached group only while it still holds exactly the
   jobs it was made for.

2. ``--list-changes params`` lists every output that has recorded params, changed or not: the
   "no change" result of a comparison still carries the file names, and the listing iterates over
   them. The fix returns an empty result when nothing changed (every other caller only tests
   the result's truth, which is unchanged).

Both change nothing else, and step aside (with a warning) if Snakemake's internals no longer look
as expected.
"""

from __future__ import annotations

import sys


def patch_group_job_factory() -> bool:
    """Apply fix 1 once; True if it is in place."""
    try:
        from snakemake import jobs
    except ImportError:  # not running under Snakemake
        return False
    factory = getattr(jobs, "GroupJobFactory", None)
    group_job = getattr(jobs, "GroupJob", None)
    if factory is None or group_job is None or not hasattr(factory, "new"):
        print("wsi-asmil: Snakemake's GroupJobFactory changed; group batch fix not applied", file=sys.stderr)
        return False
    if getattr(factory.new, "_wsi_asmil_fixed", False):
        return True

    def new(self, id, jobs_, resources):
        jobs_ = frozenset(jobs_)
        key = (id, jobs_)
        obj = self.cache.get(key)
        if obj is None or frozenset(obj.jobs) != jobs_:
            obj = jobs.GroupJob(id, jobs_, resources)
            self.cache[key] = obj
        return obj

    new._wsi_asmil_fixed = True
    factory.new = new
    return True


def patch_params_changed() -> bool:
    """Apply fix 2 once; True if it is in place."""
    try:
        from snakemake import persistence
    except ImportError:
        return False
    base = getattr(persistence, "PersistenceBase", None)
    no_change = getattr(persistence, "NO_PARAMS_CHANGE", None)
    if base is None or no_change is None or not hasattr(base, "params_changed"):
        print("wsi-asmil: Snakemake's persistence changed; --list-changes fix not applied", file=sys.stderr)
        return False
    original = base.params_changed
    if getattr(original, "_wsi_asmil_fixed", False):
        return True

    def params_changed(self, job, file=None):
        changes = original(self, job, file)
        return changes if changes else no_change

    params_changed._wsi_asmil_fixed = True
    base.params_changed = params_changed
    return True


def apply() -> None:
    """Both fixes (what the workflow calls)."""
    patch_group_job_factory()
    patch_params_changed()
