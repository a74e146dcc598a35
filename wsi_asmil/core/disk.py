"""A full disk, named: which filesystem, which path, how much was free.

Every writer of the package goes through :func:`wsi_asmil.core.io.atomic_path` (or, for the
resumable features scratch, :func:`disk_errors_named`), and both turn a failed write on a full disk
into one :class:`DiskFullError` whose message reads
``no space left on /data (mounted at /data) writing results/models/asmil/fold0/model.pt (1.2 MB free)``.

Most libraries raise ``OSError(ENOSPC)`` and only lose the path. torch's checkpoint writer does
not: its C++ stream writer reports a short write as ``RuntimeError: [enforce fail at
inline_container.cc] . unexpected pos ...`` (or ``PytorchStreamWriter failed writing file``), which
says nothing about space; numpy's ``tofile`` (under tifffile) raises an ``OSError`` without errno.
Such an error counts as a full disk when the target's filesystem has less
than :data:`LOW_FREE_BYTES` free at the moment of the failure, before the writer's temporary is
removed; the message then reports what is free once it is gone.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: errnos that mean "no room": a full filesystem, or a full quota (cluster home and scratch disks).
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
#: What writers that lose the errno say of a short write: torch's checkpoint writer, and numpy's
#: ``tofile`` (which tifffile writes with: "196608 requested and 130656 written").
SHORT_WRITE = ("unexpected pos", "PytorchStreamWriter failed", "file write failed", "requested and")
#: Below this much free space a short write is a full disk, not some other failure.
LOW_FREE_BYTES = 64 * 2**20


class DiskFullError(OSError):
    """No space left for a write; ``errno`` is ENOSPC, ``filename`` the path being written."""

    def __init__(self, path: str | os.PathLike[str], free: int | None = None, note: str = "") -> None:
        self.path = Path(path)
        self.free = free_bytes(self.path) if free is None else free
        self.note = note
        super().__init__(errno.ENOSPC, str(self), str(self.path))

    def __str__(self) -> str:
        return describe(self.path, self.free) + (f"; {self.note}" if self.note else "")


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KB' (binary multiples, short unit names: what df -h prints)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def existing_ancestor(path: str | os.PathLike[str]) -> Path:
    """``path`` or its nearest existing parent: where a not-yet-written output's filesystem is."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def mount_point(path: str | os.PathLike[str]) -> Path:
    """The mount point of the filesystem that holds (or will hold) ``path``."""
    p = existing_ancestor(path).resolve()
    while not os.path.ismount(p):
        p = p.parent
    return p


def free_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes free to this user on ``path``'s filesystem (what a write may still use)."""
    st = os.statvfs(existing_ancestor(path))
    return st.f_bavail * st.f_frsize


def describe(path: str | os.PathLike[str], free: int) -> str:
    mount = mount_point(path)
    return f"no space left on {mount} writing {path} ({human_bytes(free)} free)"


def is_disk_full(exc: BaseException, path: str | os.PathLike[str]) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is a failed write for lack of space."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, DiskFullError):
            return True
        if isinstance(exc, OSError) and exc.errno in FULL_ERRNOS:
            return True
        if isinstance(exc, (RuntimeError, OSError)) and any(t in str(exc) for t in SHORT_WRITE):
            return free_bytes(path) < LOW_FREE_BYTES
        exc = exc.__cause__ or exc.__context__
    return False


@contextmanager
def disk_errors_named(path: str | os.PathLike[str], cleanup: Path | None = None) -> Iterator[None]:
    """Re-raise a full-disk failure inside the block as :class:`DiskFullError` naming ``path``.

    ``cleanup``, when given, is removed on any error (a half-written temporary): after the check,
    which must see the disk as the failed write left it, and before the free space is reported,
    which is what the disk has once this job's debris is gone.
    """
    try:
        yield
    except DiskFullError:
        raise
    except BaseException as exc:
        full = is_disk_full(exc, path)
        if cleanup is not None:
            remove(cleanup)
        if full:
            raise DiskFullError(path) from exc
        raise


def remove(path: Path, attempts: int = 20) -> None:
    """Delete a file or folder if it is there (a temporary on the error path: never raises).

    Zarr writes a store's chunks concurrently from its own event loop, and when one write fails the
    others may still land for a moment after the error reaches us; the folder is removed again
    until it stays gone (up to ``attempts`` tries, 50 ms apart)."""
    for _ in range(attempts):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        if not path.exists() and not path.is_symlink():
            time.sleep(0.05)
            if not path.exists():
                return
        else:
            time.sleep(0.05)
