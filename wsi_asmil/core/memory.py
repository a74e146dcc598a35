"""Out-of-memory failures: recognised in one place and turned into advice instead of a traceback.

Torch is never imported here, so drawing (which does not load torch) uses the same test as
training, scoring and feature extraction.
"""

from __future__ import annotations

import contextlib
import errno
import sys
from collections.abc import Callable, Iterator
from typing import Any

_TEXTS = ("out of memory", "can't allocate memory", "cannot allocate memory", "insufficient memory",
          "failed to allocate")


class BagMemoryError(RuntimeError):
    """A bag (or a fold's bags) does not fit in memory; the message says what to change."""


def is_out_of_memory(exc: BaseException) -> bool:
    """A device or host allocation failure, in the forms torch (CUDA, CPU), NumPy, OpenCV and the
    OS raise it."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    if isinstance(exc, OSError) and exc.errno == errno.ENOMEM:
        return True
    if not isinstance(exc, Exception) or isinstance(exc, (KeyError, ValueError)):
        return False
    text = str(exc).lower()
    return any(t in text for t in _TEXTS) and (
        isinstance(exc, RuntimeError) or type(exc).__module__.startswith("cv2")
    )


@contextlib.contextmanager
def oom_guard(
    what: str, slide_id: str | None, n_tiles: int, device: Any, advice: str | Callable[[], str]
) -> Iterator[None]:
    """Turn an out-of-memory error into :class:`BagMemoryError` naming the slide, the bag size and
    the setting to change. Other errors pass through.

    ``what`` is the step ("training on", "scoring", ...); ``advice`` may be a callable, evaluated
    only on failure, so it can describe what was loaded by the time memory ran out.
    """
    try:
        yield
    except BagMemoryError:
        raise
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()
        subject = f"slide '{slide_id}'" if slide_id is not None else "the fold's slides"
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        text = advice() if callable(advice) else advice
        raise BagMemoryError(
            f"out of memory on {device} {what} {subject}, a bag of {n_tiles} tiles "
            f"({exc.__class__.__name__}: {first_line}). {text}"
        ) from exc
