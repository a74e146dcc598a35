"""Fault injection for the reliability tests: kill or pause a stage process at an exact point.

Never installed and never imported outside the tests: a test puts this folder on ``PYTHONPATH``
(Python imports ``sitecustomize`` at start-up) and sets one of these variables for a Snakemake
run, whose jobs inherit them. Without them this module does nothing.

``WSI_ASMIL_KILL_BEFORE_RENAME=<text>``
    SIGKILL the process when an output whose path contains ``<text>`` is completely written to
    its temporary name but not yet renamed into place (``wsi_asmil.core.io.atomic_path``).
``WSI_ASMIL_KILL_AFTER_RENAME=<text>``
    SIGKILL right after such an output is in place, before the job's other outputs are.
``WSI_ASMIL_KILL_AFTER_ROWS=<text>:<n>``
    SIGKILL a features job whose command line contains ``<text>`` once ``n`` feature rows are
    checkpointed, in the middle of its store.
``WSI_ASMIL_ROWS_PER_CHUNK=<n>``
    Features stores chunked by ``n`` rows (the checkpoint unit), so tiny test slides have several.
``WSI_ASMIL_KILL_GROUP=1``
    Kill the whole process group (Snakemake and every job) instead of the one process: the
    machine-dies case, where nobody is left to clean up.
``WSI_ASMIL_GATE=<text>=<file>``
    Block before renaming an output whose path contains ``<text>`` until ``<file>`` exists.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from contextlib import contextmanager

_VARS = (
    "WSI_ASMIL_KILL_BEFORE_RENAME",
    "WSI_ASMIL_KILL_AFTER_RENAME",
    "WSI_ASMIL_KILL_AFTER_ROWS",
    "WSI_ASMIL_GATE",
    "WSI_ASMIL_ROWS_PER_CHUNK",
)


def _kill() -> None:
    sys.stderr.write(f"sitecustomize: SIGKILL pid {os.getpid()}\n")
    sys.stderr.flush()
    if os.environ.get("WSI_ASMIL_KILL_GROUP") == "1":
        os.killpg(os.getpgrp(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def _matches(var: str, path: object) -> bool:
    text = os.environ.get(var)
    return bool(text) and text in str(path)


def _install() -> None:
    from wsi_asmil.core import io  # patched before any module binds atomic_path by name

    original = io.atomic_path

    @contextmanager
    def atomic_path(path):  # type: ignore[no-untyped-def]
        with original(path) as tmp:
            yield tmp
            gate = os.environ.get("WSI_ASMIL_GATE")
            if gate:
                text, _, flag = gate.partition("=")
                if text in str(path):
                    while not os.path.exists(flag):
                        time.sleep(0.1)
            if _matches("WSI_ASMIL_KILL_BEFORE_RENAME", path):
                _kill()
        if _matches("WSI_ASMIL_KILL_AFTER_RENAME", path):
            _kill()

    io.atomic_path = atomic_path
    from wsi_asmil.features import store

    chunk = os.environ.get("WSI_ASMIL_ROWS_PER_CHUNK")
    if chunk:
        store.ROWS_PER_CHUNK = int(chunk)
    rows = os.environ.get("WSI_ASMIL_KILL_AFTER_ROWS")
    if rows:
        text, _, n = rows.rpartition(":")
        write = store.PartialFeatures.write_chunk

        def counting_write(self, start, batch, failed):  # type: ignore[no-untyped-def]
            write(self, start, batch, failed)
            if self.rows_done >= int(n) and text in " ".join(sys.argv):  # argv is set by now
                _kill()

        store.PartialFeatures.write_chunk = counting_write


if any(os.environ.get(v) for v in _VARS):
    _install()
