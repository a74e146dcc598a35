"""Run provenance (wsi_asmil.pipeline.provenance) and the group-batching fix (wsi_asmil.pipeline.snakemake_fixes)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from wsi_asmil import __version__
from wsi_asmil.core import run_id as run_ids
from wsi_asmil.features import store
from wsi_asmil.features.encoders import sha256_of
from wsi_asmil.pipeline import provenance


def test_manifest_records_config_code_versions_weights_and_host(tmp_path: Path) -> None:
    config = {"out_dir": str(tmp_path), "features": {"encoder": "resnet18", "weights": "random", "seed": 3}}
    manifest = provenance.build_manifest(config, "r1", tmp_path, executor="local", command=["snakemake"])
    assert manifest["config"] == config and manifest["run_id"] == "r1" and manifest["executor"] == "local"
    assert manifest["wsi_asmil"]["version"] == __version__
    assert len(manifest["wsi_asmil"]["source_sha256"]) == 64
    commit = manifest["wsi_asmil"]["git_commit"]
    assert commit is None or len(commit) == 40
    for dist in ("python", "torch", "timm", "openslide-python", "zarr", "snakemake", "openslide-library"):
        assert manifest["versions"][dist], dist
    assert manifest["encoder"]["weights"] == "random(seed=3)"
    assert manifest["host"]["hostname"] and manifest["host"]["cpus"] >= 1
    assert isinstance(manifest["host"]["gpus"], list)
    json.dumps(manifest)  # plain JSON all the way down


def test_weights_identity_of_a_file_is_the_features_stores(tmp_path: Path) -> None:
    weights = tmp_path / "w.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, weights)
    ident = provenance.weights_identity({"encoder": "resnet18", "weights": str(weights)})
    assert ident["weights"] == f"sha256:{sha256_of(weights)}"
    missing = provenance.weights_identity({"encoder": "resnet18", "weights": str(tmp_path / "nope.pth")})
    assert missing["weights"] is None and "features.weights" in missing["error"]


def test_write_manifest_keeps_every_run_and_a_latest_copy(tmp_path: Path) -> None:
    for run_id in ("20260101T000000Z-aaaaaa", "20260102T000000Z-bbbbbb"):
        provenance.write_manifest({"run_id": run_id}, tmp_path)
    assert sorted(p.stem for p in (tmp_path / "manifests").glob("*.json")) == [
        "20260101T000000Z-aaaaaa", "20260102T000000Z-bbbbbb",
    ]
    assert json.loads((tmp_path / "manifest.json").read_text())["run_id"] == "20260102T000000Z-bbbbbb"


def test_run_id_reaches_the_stores_of_its_jobs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in (run_ids.RUN_ID_ENV, run_ids.MANIFEST_ENV):  # restored after the test
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    # a job's own Snakemake process without an inherited run id names none (never a new one)
    assert run_ids.run_environment(tmp_path, is_main_process=False) is None
    store.write_tiles(tmp_path / "by_hand.zarr", np.zeros((1, 2)), np.ones(1), {"slide_id": "s"})
    attrs = store.read_tiles(tmp_path / "by_hand.zarr")[2]
    assert attrs["run_id"] is None and attrs["manifest"] is None and attrs["host"]

    run_id = run_ids.run_environment(tmp_path, is_main_process=True)
    assert os.environ[run_ids.RUN_ID_ENV] == run_id
    assert run_ids.run_environment(tmp_path, is_main_process=False) == run_id  # inherited by jobs
    store.write_tiles(tmp_path / "in_run.zarr", np.zeros((1, 2)), np.ones(1), {"slide_id": "s"})
    attrs = store.read_tiles(tmp_path / "in_run.zarr")[2]
    assert attrs["run_id"] == run_id
    assert attrs["manifest"] == str(tmp_path.resolve() / "manifests" / f"{run_id}.json")


def test_group_job_factory_never_returns_an_enlarged_group() -> None:
    from snakemake import jobs

    from wsi_asmil.pipeline.snakemake_fixes import patch_group_job_factory

    assert patch_group_job_factory() and patch_group_job_factory()  # idempotent

    class FakeGroup:
        def __init__(self, id, jobs_, resources):
            self.groupid, self.jobs = id, frozenset(jobs_)

        def merge(self, other):  # what Snakemake's GroupJob.merge does: in place
            self.jobs = self.jobs | other.jobs

    real = jobs.GroupJob
    jobs.GroupJob = FakeGroup
    try:
        factory = jobs.GroupJobFactory()
        a = factory.new("prep", ["a"], None)
        b = factory.new("prep", ["b"], None)
        assert factory.new("prep", ["a"], None) is a  # cached while unchanged
        a.merge(b)
        fresh = factory.new("prep", ["a"], None)
        assert fresh is not a and set(fresh.jobs) == {"a"}
    finally:
        jobs.GroupJob = real


def test_fixes_apply_and_are_idempotent() -> None:
    from snakemake import persistence

    from wsi_asmil.pipeline import snakemake_fixes

    snakemake_fixes.apply()
    snakemake_fixes.apply()
    assert snakemake_fixes.patch_params_changed()
    assert persistence.PersistenceBase.params_changed._wsi_asmil_fixed
