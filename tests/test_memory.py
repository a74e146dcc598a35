from __future__ import annotations

import errno

import cv2
import numpy as np
import pytest
import torch

from wsi_asmil.core.memory import BagMemoryError, is_out_of_memory, oom_guard


def _cv2_allocation_error() -> cv2.error:
    try:
        cv2.resize(np.zeros((4, 4), np.uint8), (1 << 30, 1 << 30))
    except cv2.error as exc:
        return exc
    pytest.skip("OpenCV allocated a 2^60-pixel image")


@pytest.mark.parametrize(
    "exc, expected",
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
        (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"), True),
        (MemoryError(), True),
        (OSError(errno.ENOMEM, "Cannot allocate memory"), True),
        (RuntimeError("shape mismatch"), False),
        (KeyError("out of memory"), False),  # a dictionary key, not an allocation
        (OSError(errno.ENOSPC, "No space left on device"), False),  # disk, handled elsewhere
    ],
)
def test_recognises_allocation_failures_only(exc: BaseException, expected: bool) -> None:
    assert is_out_of_memory(exc) is expected


def test_opencv_allocation_failure_is_recognised() -> None:
    exc = _cv2_allocation_error()
    assert is_out_of_memory(exc) == any(t in str(exc).lower() for t in ("insufficient memory", "failed to allocate", "out of memory"))


def test_guard_names_slide_size_and_advice_and_passes_other_errors() -> None:
    calls = []

    def advice() -> str:
        calls.append(1)
        return "lower train.max_tiles"

    with pytest.raises(BagMemoryError, match=r"out of memory on cuda:0 scoring slide 's1', a bag of 12 tiles .*lower train.max_tiles"):
        with oom_guard("scoring", "s1", 12, "cuda:0", advice):
            raise torch.OutOfMemoryError("CUDA out of memory.")
    assert calls == [1]
    with pytest.raises(ValueError):
        with oom_guard("scoring", "s1", 12, "cpu", advice):
            raise ValueError("not memory")
    assert calls == [1]  # advice is built only on failure
