"""A workflow run's id, and the pointer from each store to that run's manifest.

The main Snakemake process makes the id and exports it with the manifest's path
(``WSI_ASMIL_RUN_ID``, ``WSI_ASMIL_MANIFEST``); every job inherits both, locally and on Slurm. Stores
read them here, below every stage, while the manifest itself is written by
:mod:`wsi_asmil.pipeline.provenance`, which knows the whole run.
"""

from __future__ import annotations

import datetime as _dt
import os
import secrets
from pathlib import Path

RUN_ID_ENV = "WSI_ASMIL_RUN_ID"
MANIFEST_ENV = "WSI_ASMIL_MANIFEST"
MANIFESTS_DIR = "manifests"


def new_run_id() -> str:
    """A sortable, unique run id: UTC time plus random hex, e.g. ``20260101T120000Z-3fa9c2``."""
    now = _dt.datetime.now(_dt.timezone.utc)
    return f"{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def manifest_path(out_dir: str | os.PathLike[str], run_id: str) -> Path:
    """Where the manifest of run ``run_id`` lives (absolute)."""
    return Path(out_dir).resolve() / MANIFESTS_DIR / f"{run_id}.json"


def run_environment(out_dir: str | os.PathLike[str], is_main_process: bool) -> str | None:
    """The run id of this Snakemake process, exported to its jobs.

    The main process (the one a user starts) makes a new id and sets ``WSI_ASMIL_RUN_ID`` and
    ``WSI_ASMIL_MANIFEST`` in its environment, which every job inherits. A Snakemake process
    started for a job (on a cluster node) keeps the inherited values and never makes its own:
    without them it returns None and stores get no manifest pointer rather than a wrong one.
    """
    if is_main_process:
        run_id = new_run_id()
        os.environ[RUN_ID_ENV] = run_id
        os.environ[MANIFEST_ENV] = str(manifest_path(out_dir, run_id))
        return run_id
    return os.environ.get(RUN_ID_ENV)


def store_pointer() -> dict[str, str | None]:
    """``run_id`` and ``manifest`` for a store's attrs: this workflow run's, or null for a stage run
    by hand (so a store never inherits the pointer of the store it was computed from)."""
    run_id = os.environ.get(RUN_ID_ENV) or None
    return {"run_id": run_id, "manifest": os.environ.get(MANIFEST_ENV) if run_id else None}
