"""Every benchmark script still starts: its imports resolve and its options parse (`--help`).

Benchmarks run rarely and unattended (some only on the GPU machine), so an import they lost in a
refactor would otherwise surface there. The larger ones also have toy-size runs beside the code
they measure (test_features, test_bag_source, test_viewer, test_asmil_claims)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py"))


def test_there_are_benchmarks() -> None:
    assert len(BENCHMARKS) >= 9


@pytest.mark.parametrize("script", BENCHMARKS, ids=[p.stem for p in BENCHMARKS])
def test_benchmark_starts(script: Path) -> None:
    proc = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "usage:" in proc.stdout


def test_feature_batches_gpu_mode_stops_at_once_without_cuda(tmp_path: Path) -> None:
    """`--device cuda` runs unattended on the GPU node; elsewhere it must fail before building the
    cohort (minutes), naming the option."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    script = next(p for p in BENCHMARKS if p.stem == "feature_batches")
    proc = subprocess.run([sys.executable, str(script), "--work", str(tmp_path / "fb"), "--device", "cuda"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--device" in proc.stderr and "CUDA is not available" in proc.stderr, proc.stderr
    assert not (tmp_path / "fb").exists()
