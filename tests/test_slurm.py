"""The workflow on a Slurm cluster through profiles/slurm.

- ``test_slurm_profile_plans_every_job`` (default suite; needs only the executor plugin): a dry
  run through the profile on a tiny cohort shows per-rule memory and time, their growth on a retry
  (``attempt``), the GPU requests of the GPU rules and the account/batch-size environment variables;
  ``test_derived_rules_ask_like_their_parent`` checks the profile against the workflow's
  ``use rule X as Y``.
- ``test_workflow_on_a_real_slurm_cluster`` (marker ``slurm``, ``make test-slurm``, run by CI):
  starts a one-node Slurm cluster on localhost (tests/slurm/local_cluster.py), runs the tiny
  cohort through the profile, and checks that every job but the local ``all`` ran as a Slurm job
  (GPU rules in the GPU partition with one GPU, segment + tile batched in ``prep`` group jobs,
  drawings and truth masks in ``draw`` group jobs, features in batch jobs of several slides), that
  the outputs equal a local run's, and that the provenance manifest and store attrs name the run.
  It skips where Slurm, root or the plugin is missing, and fails instead when
  ``WSI_ASMIL_REQUIRE_SLURM=1`` (CI), so it can never pass silently by skipping there.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import CONFIG_FEATURES

from wsi_asmil.features import store

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(REPO)]
PROFILE = str(REPO / "profiles" / "slurm")
PROFILE_CONFIG = yaml.safe_load((Path(PROFILE) / "config.yaml").read_text())
#: The profile's rule -> Slurm group (batched per-slide jobs).
GROUPS: dict[str, str] = PROFILE_CONFIG["groups"]

_spec = importlib.util.spec_from_file_location("local_cluster", Path(__file__).parent / "slurm" / "local_cluster.py")
local_cluster = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(local_cluster)

N_SLIDES = 4
SLIDES_PER_JOB = 3  # batches of 3 and 1 slides: uneven on purpose (see wsi_asmil.pipeline.snakemake_fixes)
BATCH_SIZES = [1, 3]
MAPS_PER_JOB = 3  # drawings and truth masks per draw group job
BATCH_ENV = {"WSI_ASMIL_SLIDES_PER_JOB": str(SLIDES_PER_JOB), "WSI_ASMIL_MAPS_PER_JOB": str(MAPS_PER_JOB)}
TINY = {
    "demo": {"n_slides": N_SLIDES, "seed": 1, "width": 2048, "height": 2048},
    "split": {"folds": 2},
    "train": {"epochs": 2, "models": ["asmil"], "threads": 1},
    "heatmap": {"models": ["asmil"]},
    # one thread everywhere: the local and the cluster run compute bit-identical numbers; feature
    # batches of 3 and 1 slides (wsi_asmil.features.batch hashes the ids of demo_000..003 that way)
    "features": {"threads": 1, "slides_per_job": 2},
}
FEATURE_BATCHES = {"0-of-2": ["demo_000", "demo_001", "demo_003"], "1-of-2": ["demo_002"]}

# A job block of Snakemake's log: "rule NAME:" (possibly indented inside a group) and its fields.
_HEADER = re.compile(r"^(\s*)(rule|checkpoint|localrule|localcheckpoint) (\w+):\s*$")
_GROUP = re.compile(r"Group job (\w+)")


def plugin_installed() -> bool:
    return importlib.util.find_spec("snakemake_executor_plugin_slurm") is not None


def skip_or_fail(reason: str) -> None:
    if os.environ.get("WSI_ASMIL_REQUIRE_SLURM") == "1":
        pytest.fail(f"WSI_ASMIL_REQUIRE_SLURM=1 but the Slurm test cannot run: {reason}")
    pytest.skip(reason)


def write_config(tmp: Path, out_dir: Path, name: str) -> Path:
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "out_dir": str(out_dir)}))
    return cfg


def run(cmd: list[str], env: dict | None = None, timeout: float = 1500) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)


def check(proc: subprocess.CompletedProcess, what: str, extra: str = "") -> None:
    if proc.returncode != 0:
        raise AssertionError(
            f"{what} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-12000:]}\n{extra}"
        )


def _foreign(line: str) -> bool:
    """An unindented line that is not Snakemake's (a timestamp, a job header, the job stats).

    The executor plugin logs from another thread ("No SLURM account given, trying to guess.") into
    the middle of a job or group block: such a line is skipped, not taken as the block's end.
    """
    if not line or line[0].isspace() or _HEADER.match(line):
        return False
    return not line.startswith(("[", "Job stats", "Group job"))


def group_blocks(text: str, group: str) -> list[list[dict]]:
    """The member jobs of every "Group job" of ``group`` that Snakemake announces.

    A group's indented body ends at Snakemake's next top-level entry.
    """
    lines = text.splitlines()
    groups = []
    for i, line in enumerate(lines):
        m = _GROUP.search(line)
        if not m or m.group(1) != group:
            continue
        body = []
        for member in lines[i + 1 :]:
            if _foreign(member):
                continue
            if member and not member[0].isspace():
                break
            body.append(member)
        groups.append(job_blocks("\n".join(body)))
    return groups


def batch_sizes(groups: list[list[dict]]) -> list[int]:
    """Slides per prep job, each slide's segment, tile and dense-grid tiling in the same job."""
    sizes = []
    for members in groups:
        seg = sorted(b["wildcards"] for b in members if b["rule"] == "segment")
        assert seg == sorted(b["wildcards"] for b in members if b["rule"] == "tile"), members
        assert {b["wildcards"] for b in members if b["rule"] == "heatmap_tile"} <= set(seg), members
        assert {b["rule"] for b in members} <= {"segment", "tile", "heatmap_tile"}, members
        sizes.append(len(seg))
    return sorted(sizes)


def check_draw_batches(groups: list[list[dict]], jobs: list[dict]) -> int:
    """Every drawing and truth job of ``jobs`` is in exactly one draw job of MAPS_PER_JOB members
    (one shorter); returns the number of draw jobs."""
    members = [(b["rule"], b["wildcards"]) for g in groups for b in g]
    expected = {(b["rule"], b["wildcards"]) for b in jobs if GROUPS.get(b["rule"]) == "draw"}
    assert {r for r, _ in expected} == {"heatmap", "truth"}, expected
    assert len(members) == len(set(members)) and set(members) == expected, (groups, expected)
    full, rest = divmod(len(expected), MAPS_PER_JOB)
    assert sorted(len(g) for g in groups) == sorted([MAPS_PER_JOB] * full + ([rest] if rest else [])), groups
    return len(groups)


def job_blocks(text: str) -> list[dict]:
    """Every job block of a Snakemake log: kind (rule/localrule/...), rule, wildcards, resources."""
    lines = text.splitlines()
    blocks = []
    for i, line in enumerate(lines):
        m = _HEADER.match(line)
        if not m:
            continue
        indent = len(m.group(1))
        block = {"kind": m.group(2), "rule": m.group(3), "wildcards": "", "resources": {}}
        for field in lines[i + 1 :]:
            if _foreign(field):
                continue
            if not field.strip() or len(field) - len(field.lstrip()) <= indent or _HEADER.match(field):
                break
            key, _, value = field.strip().partition(": ")
            if key == "wildcards":
                block["wildcards"] = value
            elif key == "resources":
                block["resources"] = dict(kv.split("=", 1) for kv in value.split(", ") if "=" in kv)
        blocks.append(block)
    return blocks


# --- the profile, without a cluster -----------------------------------------------------------------


def test_slurm_profile_plans_every_job(tmp_path: Path) -> None:
    if not plugin_installed():
        pytest.skip("snakemake-executor-plugin-slurm is not installed (pip install -e '.[slurm]')")
    out = tmp_path / "out"
    cfg = write_config(tmp_path, out, "tiny")
    # The inventory checkpoint decides the rest of the DAG: build it locally, then plan the rest.
    check(run([*SNAKEMAKE, "--cores", "2", "--configfile", str(cfg), "--until", "inventory"]), "local inventory")

    env = {**os.environ, "WSI_ASMIL_SLURM_ACCOUNT": "lab42", **BATCH_ENV}
    plans = {}
    # Several hash seeds: Snakemake's unpatched batching went wrong for some set orders only.
    for attempt, seed in ((1, "0"), (1, "1"), (1, "2"), (1, "4"), (2, "0")):
        try:
            proc = run(
                [*SNAKEMAKE, "--profile", PROFILE, "-n", "--configfile", str(cfg), "--attempt", str(attempt)],
                env={**env, "PYTHONHASHSEED": seed},
                timeout=120,
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"dry run through profiles/slurm hangs (PYTHONHASHSEED={seed}): group batching broken")
        check(proc, f"dry run through profiles/slurm (attempt {attempt}, PYTHONHASHSEED={seed})")
        text = proc.stdout + proc.stderr
        assert "Using profile" in text and "profiles/slurm" in text
        # segment + tile of SLIDES_PER_JOB slides per group job, every slide in exactly one
        assert batch_sizes(group_blocks(text, "prep")) == BATCH_SIZES, (seed, group_blocks(text, "prep"))
        plan = [b for b in job_blocks(text) if b["kind"] in ("rule", "checkpoint")]
        # every drawing and truth mask in exactly one batch of MAPS_PER_JOB
        check_draw_batches(group_blocks(text, "draw"), plan)
        plans[attempt] = plan

    first = plans[1]
    rules = {b["rule"] for b in first}
    assert {"segment", "tile", "heatmap_tile", "features", "split", "train", "heatmap", "truth", "report"} <= rules
    assert sorted(b["wildcards"] for b in first if b["rule"] == "features") == [f"batch={k}" for k in FEATURE_BATCHES]
    gpu_rules = {b["rule"] for b in first if b["resources"].get("gpu") == "1"}
    assert {"features", "train"} <= gpu_rules and not {"segment", "tile", "split", "report"} & gpu_rules
    for b in first:
        # no partition is pinned: partitions.yaml routes GPU requests (see the real cluster test)
        assert "slurm_partition" not in b["resources"], b
        assert b["resources"]["slurm_account"] == "lab42"
        assert int(b["resources"]["mem_mb"]) > 0 and int(b["resources"]["runtime"]) > 0
    by_rule = {b["rule"]: b["resources"] for b in first}
    assert int(by_rule["features"]["mem_mb"]) == 16000 and int(by_rule["segment"]["mem_mb"]) == 2000
    # a derived rule asks what its parent asks (the dense grid's feature batches embed 4x the tiles)
    assert by_rule["heatmap_features"] == by_rule["features"] and by_rule["heatmap_tile"] == by_rule["tile"]
    # a retry asks for twice the memory and time
    second = {(b["rule"], b["wildcards"]): b["resources"] for b in plans[2]}
    assert len(second) == len(first)
    for b in first:
        for key in ("mem_mb", "runtime"):
            assert int(second[b["rule"], b["wildcards"]][key]) == 2 * int(b["resources"][key]), b

    # rules told to run on the CPU ask for no GPU
    cpu_cfg = tmp_path / "cpu.yaml"
    cpu_cfg.write_text(yaml.safe_dump({**yaml.safe_load(cfg.read_text()),
                                       **{k: {**TINY.get(k, {}), "device": "cpu"} for k in ("features", "train", "heatmap")}}))
    proc = run([*SNAKEMAKE, "--profile", PROFILE, "-n", "--configfile", str(cpu_cfg)], env=env, timeout=120)
    check(proc, "dry run through profiles/slurm with every device: cpu")
    cpu_plan = [b for b in job_blocks(proc.stdout + proc.stderr) if b["kind"] in ("rule", "checkpoint")]
    assert {b["rule"] for b in cpu_plan} == rules
    assert not [b for b in cpu_plan if b["resources"].get("gpu", "0") != "0"]


def test_derived_rules_ask_like_their_parent() -> None:
    """A rule made with ``use rule X as Y`` is X's work on other files (the dense heatmap grid, new
    slides): in the Slurm profile it must ask for X's memory and time and join X's batches, or it
    silently falls back to the defaults (2 GB for a GPU feature batch) and one job per slide."""
    derived = {
        child: parent
        for p in (REPO / "workflow").rglob("*.smk")
        for parent, child in re.findall(r"^\s*use rule (\w+) as (\w+)", p.read_text(), re.M)
    }
    assert {"heatmap_tile", "heatmap_features", "predict_segment", "predict_heatmap"} <= set(derived)
    for child, parent in derived.items():
        assert PROFILE_CONFIG["set-resources"].get(child) == PROFILE_CONFIG["set-resources"][parent], (child, parent)
        assert GROUPS.get(child) == GROUPS.get(parent), (child, parent)


# --- the real cluster -------------------------------------------------------------------------------


def why_no_cluster() -> str | None:
    if not plugin_installed():
        return "snakemake-executor-plugin-slurm is not installed (pip install -e '.[slurm]')"
    missing = local_cluster.missing_tools()
    if missing:
        return (
            f"Slurm is not installed ({', '.join(missing)} missing): "
            "apt-get install --no-install-recommends slurmctld slurmd slurm-client munge"
        )
    if os.geteuid() != 0:
        return "starting slurmd and munged needs root"
    return None


def scontrol_jobs(cluster) -> dict[str, dict[str, str]]:
    """Every job the cluster knows (finished ones stay for MinJobAge), as key=value fields."""
    proc = cluster.run("scontrol", "show", "job", "--oneliner", check=False)
    jobs = {}
    for line in proc.stdout.splitlines():
        fields = dict(re.findall(r"(\S+?)=(\S*)", line))
        if "JobId" in fields:
            jobs[fields["JobId"]] = fields
    return jobs


def slurm_logs(logdir: Path) -> dict[str, list[dict]]:
    """Slurm job id -> the rule/checkpoint blocks its job printed (its --output file)."""
    return {p.stem: job_blocks(p.read_text(errors="replace")) for p in sorted(logdir.rglob("*.log"))}


@pytest.mark.slurm
@pytest.mark.timeout(2400)
def test_workflow_on_a_real_slurm_cluster(tmp_path: Path) -> None:
    reason = why_no_cluster()
    if reason:
        skip_or_fail(reason)
    timings = {}

    # 1. the reference: the same cohort on this machine
    local_out = tmp_path / "local"
    t0 = time.monotonic()
    local = run([*SNAKEMAKE, "--cores", "2", "--configfile", str(write_config(tmp_path, local_out, "local"))])
    check(local, "local reference run")
    timings["local run"] = time.monotonic() - t0
    local_jobs = {
        (b["rule"], b["wildcards"])
        for b in job_blocks(local.stdout + local.stderr)
        if b["kind"].startswith("local") and b["rule"] != "all"
    }
    assert len(local_jobs) > 4 * N_SLIDES

    # 2. the same through profiles/slurm on a one-node cluster
    slurm_out = tmp_path / "slurm"
    slurm_cfg = write_config(tmp_path, slurm_out, "slurm")
    logdir = tmp_path / "slurm_logs"
    t0 = time.monotonic()
    # as many CPUs as the profile lets one job ask for (`cores`), more than this machine may have
    # (Slurm is told to trust the config): a prep job of 3 slides runs its 6 tilings at once
    cpus = max(PROFILE_CONFIG["cores"], os.cpu_count() or 1)
    with local_cluster.local_cluster(tmp_path / "cluster", cpus=cpus) as cluster:
        timings["cluster start"] = time.monotonic() - t0
        env = {**cluster.env, **BATCH_ENV}
        t0 = time.monotonic()
        proc = run(
            [
                "timeout", "-s", "INT", "1200",  # INT makes the plugin scancel its jobs
                *SNAKEMAKE, "--profile", PROFILE, "--configfile", str(slurm_cfg),
                "--slurm-init-seconds-before-status-checks", "2",
                "--slurm-keep-successful-logs", "--slurm-logdir", str(logdir),
            ],
            env=env,
        )
        timings["cluster run"] = time.monotonic() - t0
        records = scontrol_jobs(cluster)
        cluster_logs = cluster.logs()
        check(proc, "snakemake --profile profiles/slurm", cluster_logs)
        # nothing is left to do: the cluster run recorded the same params, code and inputs
        again = run([*SNAKEMAKE, "--profile", PROFILE, "-n", "--configfile", str(slurm_cfg)], env=env)
        check(again, "dry run after the cluster run")
        assert "Nothing to be done" in again.stdout + again.stderr, again.stdout[-3000:]
        # re-segment and re-tile every slide: a second run (inventory already there) batches the
        # same way, each slide once
        t0 = time.monotonic()
        redo = run(
            [
                "timeout", "-s", "INT", "600",
                *SNAKEMAKE, "--profile", PROFILE, "--configfile", str(slurm_cfg), "--forcerun", "segment",
                "--until", "tile", "--slurm-init-seconds-before-status-checks", "2",
                "--slurm-keep-successful-logs", "--slurm-logdir", str(tmp_path / "slurm_logs_redo"),
            ],
            env=env,
        )
        timings["cluster re-run of segment + tile"] = time.monotonic() - t0
        check(redo, "second cluster run (--forcerun segment --until tile)", cluster.logs())
        redo_records = {k: v for k, v in scontrol_jobs(cluster).items() if k not in records}
    print("\nSlurm test timings (s): " + json.dumps({k: round(v, 1) for k, v in timings.items()}))
    text = proc.stdout + proc.stderr

    # 3. every job but the local `all` ran as a Slurm job
    main_blocks = job_blocks(text)
    assert {b["rule"] for b in main_blocks if b["kind"].startswith("local")} == {"all"}
    submitted = [b for b in main_blocks if b["kind"] in ("rule", "checkpoint")]
    assert {(b["rule"], b["wildcards"]) for b in submitted} == local_jobs
    logs = slurm_logs(logdir)
    assert logs and set(logs) <= set(records), (sorted(logs), sorted(records))
    assert len(records) == len(logs)  # no job ran without leaving its log, none was resubmitted
    ran_in_slurm = {(b["rule"], b["wildcards"]) for blocks in logs.values() for b in blocks if b["kind"] in ("rule", "checkpoint")}
    assert ran_in_slurm == local_jobs

    gpu_rules = {b["rule"] for b in submitted if b["resources"].get("gpu") == "1"}
    assert {"features", "train"} <= gpu_rules
    group_jobs = {"prep": [], "draw": []}
    for job_id, blocks in logs.items():
        record = records[job_id]
        assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", record
        rules = {b["rule"] for b in blocks if b["kind"] in ("rule", "checkpoint")}
        if rules & gpu_rules:
            assert rules <= gpu_rules
            assert record["Partition"] == local_cluster.GPU_PARTITION and "gpu:1" in record.get("TresPerJob", ""), record
        else:
            assert record["Partition"] == local_cluster.CPU_PARTITION and "gpu" not in record.get("TresPerJob", ""), record
        groups = {GROUPS.get(r) for r in rules}
        assert len(groups) == 1, rules  # a job is one group's batch or one ungrouped rule
        group = groups.pop()
        if group is None:
            assert len(rules) == 1 and record["Comment"].startswith(f"rule_{rules.pop()}")
        else:  # a batch in one Slurm job: a CPU and a member's memory per member it runs at once
            assert record["Comment"].startswith(f"rule_{group}"), record
            per_member = {int(PROFILE_CONFIG["set-resources"][r]["mem_mb"].split("*")[0]) for r in rules}
            assert len(per_member) == 1, rules
            assert record["MinMemoryNode"] == f"{per_member.pop() * int(record['NumCPUs'])}M", record
            group_jobs[group].append([b for b in blocks if b["kind"] == "rule"])
    assert len(group_jobs["prep"]) == math.ceil(N_SLIDES / SLIDES_PER_JOB)
    assert batch_sizes(group_jobs["prep"]) == BATCH_SIZES
    assert batch_sizes(group_blocks(text, "prep")) == BATCH_SIZES
    # heatmaps and truth masks: MAPS_PER_JOB per Slurm job, each drawn once
    assert check_draw_batches(group_blocks(text, "draw"), submitted) == len(group_jobs["draw"])
    assert sorted({(b["rule"], b["wildcards"]) for g in group_jobs["draw"] for b in g}) == sorted(
        (b["rule"], b["wildcards"]) for g in group_blocks(text, "draw") for b in g
    )
    # features: one GPU job per batch of slides, each writing every member's store
    feature_jobs = [blocks for blocks in logs.values() if {b["rule"] for b in blocks} == {"features"}]
    assert len(feature_jobs) == len(FEATURE_BATCHES)  # a job's log shows its block more than once
    assert sorted({b["wildcards"] for blocks in feature_jobs for b in blocks}) == [f"batch={k}" for k in FEATURE_BATCHES]
    markers = slurm_out / "features" / "0.5mpp_224px" / CONFIG_FEATURES["encoder"] / "batches"
    for batch, members in FEATURE_BATCHES.items():
        record = json.loads((markers / f"{batch}.json").read_text())
        assert sorted(record["members"]) == members and record["failed"] == []
        assert {m["status"] for m in record["members"].values()} == {"done"}

    # the second run: two batch jobs again, every slide once
    redo_text = redo.stdout + redo.stderr
    assert batch_sizes(group_blocks(redo_text, "prep")) == BATCH_SIZES
    assert len(redo_records) == len(BATCH_SIZES), redo_records
    assert all(r["JobState"] == "COMPLETED" and r["Comment"].startswith("rule_prep") for r in redo_records.values())
    redo_logs = slurm_logs(tmp_path / "slurm_logs_redo")
    assert batch_sizes([[b for b in blocks if b["kind"] == "rule"] for blocks in redo_logs.values()]) == BATCH_SIZES

    # 4. the same results as the local run
    ids = [f"demo_{i:03d}" for i in range(N_SLIDES)]
    tiling, encoder = "0.5mpp_224px", CONFIG_FEATURES["encoder"]
    runs = sorted((slurm_out / "manifests").glob("*.json"))
    assert len(runs) == 2  # the cluster run and the re-run of segment + tile, each recorded
    assert json.loads((slurm_out / "manifest.json").read_text()) == json.loads(runs[-1].read_text())
    for sid in ids:
        c_local, f_local, _ = store.read_tiles(local_out / "tiles" / tiling / f"{sid}.zarr")
        c_slurm, f_slurm, _ = store.read_tiles(slurm_out / "tiles" / tiling / f"{sid}.zarr")
        assert np.array_equal(c_local, c_slurm) and np.array_equal(f_local, f_slurm)
        x_local, xy_local, _ = store.read_features(local_out / "features" / tiling / encoder / f"{sid}.zarr")
        x_slurm, xy_slurm, attrs = store.read_features(slurm_out / "features" / tiling / encoder / f"{sid}.zarr")
        assert len(x_slurm) > 0 and np.array_equal(x_local, x_slurm) and np.array_equal(xy_local, xy_slurm)
        # provenance: the store names the cluster run that wrote it, and that run's manifest
        manifest = json.loads(Path(attrs["manifest"]).read_text())
        assert attrs["run_id"] == manifest["run_id"] == runs[0].stem
        assert attrs["weights"] == manifest["encoder"]["weights"] and manifest["executor"] == "slurm"
        assert manifest["config"]["demo"]["n_slides"] == N_SLIDES and manifest["versions"]["snakemake"]
        assert store.read_tiles(slurm_out / "tiles" / tiling / f"{sid}.zarr")[2]["run_id"] == runs[1].stem
    assert json.loads((local_out / "splits" / "split.json").read_text()) == json.loads(
        (slurm_out / "splits" / "split.json").read_text()
    )
    for rel in ["report/metrics.json", *(f"models/asmil/fold{k}/metrics.json" for k in range(2))]:
        assert json.loads((local_out / rel).read_text()) == json.loads((slurm_out / rel).read_text()), rel
    pd.testing.assert_frame_equal(
        pd.read_csv(local_out / "report" / "predictions.csv"), pd.read_csv(slurm_out / "report" / "predictions.csv")
    )
