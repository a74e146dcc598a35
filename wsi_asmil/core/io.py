"""Atomic file output: a killed job never leaves a file or folder that looks complete.

Every writer goes through :func:`atomic_path`: the content is written to a dot-prefixed temporary
sibling and renamed into place only when complete. Snakemake also deletes outputs of failed jobs,
but these guarantees hold when a stage is run by hand or killed with SIGKILL.

A killed job's temporary stays behind (nothing can remove it at SIGKILL). The next writer of the
same output removes it: a temporary's name carries the host and process that wrote it, and one
whose process is gone from this host is left over. Temporaries of other hosts (a cluster's shared
disk) are never touched, since their process cannot be checked from here.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from wsi_asmil.core.disk import disk_errors_named

_HOST = socket.gethostname()


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


#: ``.<output name>.tmp-<host>-<pid>-<random>``, as :func:`_tmp_sibling` names them.
_TMP_NAME = re.compile(r"\.(?P<name>.+)\.tmp-(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{8}")
#: Per directory, the temporaries of dead writers found there, by output name. Each directory is
#: listed once per process: a job writing thousands of outputs into one folder (scores, tiles)
#: would otherwise list it once per output.
_leftovers: dict[Path, dict[str, list[Path]]] = {}


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _dead_writers_temporaries(directory: Path) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {}
    with os.scandir(directory) as entries:
        for entry in entries:
            m = _TMP_NAME.fullmatch(entry.name)
            if m is None or m["host"] != _HOST:
                continue
            pid = int(m["pid"])
            if pid != os.getpid() and not _process_alive(pid):
                found.setdefault(m["name"], []).append(Path(entry.path))
    return found


def remove_leftover_temporaries(path: Path) -> list[Path]:
    """Remove the temporaries of ``path`` left by killed writers on this host; return them."""
    if path.parent not in _leftovers:
        _leftovers[path.parent] = _dead_writers_temporaries(path.parent)
    removed = _leftovers[path.parent].pop(path.name, [])
    for tmp in removed:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
    return removed


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; on success move it into place, on error delete it.

    An earlier complete output survives a failed rewrite until the very last rename. A write that
    fails for lack of space ends as :class:`~wsi_asmil.core.disk.DiskFullError`, naming ``path``,
    its filesystem and the space left.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_leftover_temporaries(final)
    tmp = _tmp_sibling(final)
    with disk_errors_named(final, cleanup=tmp):  # on any error: the temporary goes, then re-raise
        yield tmp
        if final.is_dir() and not final.is_symlink():
            old = _tmp_sibling(final)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)


def strict_json(value: Any) -> Any:
    """NaN and infinities become null: JSON has no such numbers, and jq, JavaScript or R reject the
    ``NaN`` that Python would write (an AUC on a fold with one class is NaN)."""
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Strict JSON (see :func:`strict_json`), written atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(strict_json(obj), indent=2, allow_nan=False) + "\n")


def write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_csv(path: str | os.PathLike[str], df: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def write_image(path: str | os.PathLike[str], image: np.ndarray) -> None:
    """Write an RGB (or grey) uint8 image; the format follows the final path's extension."""
    final = Path(path)
    arr = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(final.suffix, arr)
    if not ok:
        raise OSError(f"cannot encode image for {final}")
    with atomic_path(final) as tmp:
        tmp.write_bytes(buf.tobytes())


def sha256_of(path: str | os.PathLike[str]) -> str:
    """Content hash of a file, read in blocks (weights files run to gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
