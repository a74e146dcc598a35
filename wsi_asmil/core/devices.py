"""Where work runs: one reading of the ``device`` settings, the CPUs this process may use, and one
stall-free host-to-device copy."""

from __future__ import annotations

import os

import torch


def resolve_device(device: str) -> torch.device:
    """``auto`` is CUDA when present; asking for CUDA without it is an error, not a silent CPU run."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available")
    return dev


def usable_cores() -> int:
    """CPUs this process may run on: a Slurm job's allocation (its cpuset), not the whole node."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without stalling the host: pinned and asynchronous on CUDA.

    A plain ``.to("cuda")`` from pageable memory waits for the GPU to finish everything queued.
    The pinned block is recycled only after the copy completes (PyTorch records the copy's event).
    """
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
