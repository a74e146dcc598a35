"""A fix for Snakemake's batching of group jobs (``--group-components``), applied by the workflow.

Snakemake (seen in 9.27) caches group jobs by their set of jobs, and ``GroupJob.merge`` extends a
cached group in place when ``group-components`` puts several slides in one batch. Whenever the
DAG's groups are computed a second time -- at start-up whenever a checkpoint's output already
exists (here: the cohort inventory, so on every run after the first), and after a checkpoint --
the cache hands back those enlarged groups: batches then overlap, the same slide is segmented by
two Slurm jobs at once, the progress counter passes 100% and a dry run can loop forever. It shows
when the slides do not divide evenly into batches (4 slides, 3 per job). The related upstream
reports are snakemake/snakemake#1217 and #4202.

The fix: the factory returns a cached group only while it still holds exactly the jobs it was
made for. It changes nothing for workflows without groups, and it steps aside (with a warning)
if Snakemake's internals no longer look as expected.
"""

from __future__ import annotations

import sys


def patch_group_job_factory() -> bool:
    """Apply the fix once; True if it is in place."""
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
            obj = group_job(id, jobs_, resources)
            self.cache[key] = obj
        return obj

    new._wsi_asmil_fixed = True
    factory.new = new
    return True
