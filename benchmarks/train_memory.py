"""Peak memory and epoch time of training in memory against training streamed from disk.

    python3 benchmarks/train_memory.py --scratch /tmp/train_memory            # defaults, a 2-core CPU
    python3 benchmarks/train_memory.py --scratch /data/tm --large-slides 3000 --large-in-memory no
                                                                              # past the host's memory

It writes two synthetic feature cohorts as ordinary per-slide Zarr stores (``store.feature_writer``:
float16, rows chunked, compressed as the pipeline writes them):

* ``fits``: small enough to hold in memory. It is trained once in memory (``memory_budget: auto``)
  and once streamed (``memory_budget: 0``): the epoch times and their ratio say what streaming
  costs where it is not needed;
* ``large``: ``--large-slides`` slides of the same size. It is trained streamed under a small budget
  (``--budget``), and, unless ``--large-in-memory no``, in memory too, for contrast.

Each run is a fresh process (so its peak RSS, ``getrusage`` ``ru_maxrss``, is its own) that loads
the fold as ``train_fold`` does, computes the standardisation statistics (dask over the stores) and
trains ``--epochs`` epochs of ABMIL: one training pass over the training bags plus evaluation of
validation and test and the attention instability against the previous epoch (maps on disk when
the fold streams), as ``run_epochs`` does. Bounded memory shows as a streamed peak RSS that does
not grow with the cohort. The cohort is larger than the machine's free memory only when
``--large-slides`` makes it so (the script prints both); with the defaults it is several times the
streaming budget instead. Timings on a shared machine are noisy: compare runs of one invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, installed or not

CLASSES = ["negative", "positive"]


def write_cohort(root: Path, n_slides: int, tiles: int, dim: int, seed: int) -> dict[str, Any]:
    """``n_slides`` stores of ``tiles`` +/- 25 % rows under ``root/features`` and a one-fold split
    (70 % train, 15 % val, 15 % test); positive slides shift 2 % of their tiles. Written once."""
    from wsi_asmil.features.store import ROWS_PER_CHUNK, feature_writer

    split_path = root / "split.json"
    if split_path.is_file():
        return json.loads(split_path.read_text())
    rng = np.random.default_rng(seed)
    ids, labels = [], {}
    for i in range(n_slides):
        slide_id = f"slide_{i:05d}"
        m = int(rng.integers(tiles * 3 // 4, tiles * 5 // 4 + 1))
        with feature_writer(root / "features" / f"{slide_id}.zarr", np.zeros((m, 2), np.int64), dim, {}) as writer:
            for start in range(0, m, ROWS_PER_CHUNK):
                rows = rng.standard_normal((min(ROWS_PER_CHUNK, m - start), dim), dtype=np.float32)
                if i % 2:
                    rows[: max(1, len(rows) // 50), :8] += 3.0
                writer.write(start, rows)
        ids.append(slide_id)
        labels[slide_id] = CLASSES[i % 2]
    n_train, n_val = int(0.7 * n_slides), int(0.15 * n_slides)
    split = {"classes": CLASSES, "labels": labels,
             "folds": [{"train": ids[:n_train], "val": ids[n_train:n_train + n_val], "test": ids[n_train + n_val:]}]}
    split_path.write_text(json.dumps(split))
    return split


def peak_rss() -> int:
    """This process's peak resident set size in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(root: Path, budget: str, epochs: int, threads: int) -> dict[str, Any]:
    """One run, in its own process: load, statistics, ``epochs`` epochs; prints its figures as JSON."""
    import dask.array  # noqa: F401  (imported before the clocks: the statistics' time is their work)
    import torch

    from wsi_asmil.mil.epochs import maps_scratch
    from wsi_asmil.mil.evaluate import evaluate
    from wsi_asmil.mil.fold_data import load_fold
    from wsi_asmil.mil.map_store import MapStore
    from wsi_asmil.mil.metrics import mean_jsd
    from wsi_asmil.mil.params import resolve_params
    from wsi_asmil.mil.trainer import build_trainer, train_one_epoch

    torch.set_num_threads(threads)
    device = torch.device("cpu")
    params = resolve_params({"epochs": epochs, "memory_budget": budget, "seed": 0})
    t0 = time.perf_counter()
    data = load_fold(root / "features", root / "split.json", 0, device, memory_budget=budget)
    t1 = time.perf_counter()
    trainer = build_trainer("abmil", data, params, device)  # the statistics: dask over the stores
    t2 = time.perf_counter()
    epoch_s, losses = [], []
    scratch, previous = maps_scratch(data), None  # the attention maps kept for the instability, as run_epochs
    for epoch in range(epochs):
        start = time.perf_counter()
        losses.append(train_one_epoch(trainer, data.bags["train"], desc=f"epoch {epoch}")["loss"])
        maps = MapStore(None if scratch is None else Path(scratch.name) / f"epoch{epoch}")
        for part in ("val", "test"):
            evaluate(trainer.model, data.bags[part], len(data.classes), trainer.autocast, maps)
        if previous is not None:
            mean_jsd(previous, maps)
            previous.discard()
        previous = maps
        epoch_s.append(time.perf_counter() - start)
    return {"mode": data.source["mode"], "feature_bytes": data.source["feature_bytes"], "load_s": t1 - t0,
            "stats_s": t2 - t1, "epoch_s": epoch_s, "losses": losses, "peak_rss": peak_rss()}


def run(root: Path, budget: str, epochs: int, threads: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", str(root), "--budget", budget, "--epochs", str(epochs),
           "--threads", str(threads)]
    out = subprocess.run(cmd, check=False, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def free_memory() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scratch", type=Path, help="folder for the cohorts (kept for reruns); required")
    p.add_argument("--tiles", type=int, default=2000, help="tiles per slide (+/- 25 %%)")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--fits-slides", type=int, default=60)
    p.add_argument("--large-slides", type=int, default=480)
    p.add_argument("--budget", default="256MiB", help="memory_budget of the streamed large run")
    p.add_argument("--large-in-memory", choices=["yes", "no"], default="yes")
    p.add_argument("--epochs", type=int, default=2, help="timed epochs per run (each reported)")
    p.add_argument("--threads", type=int, default=2, help="torch threads per run")
    p.add_argument("--json", type=Path, help="also write every figure to this file")
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.budget, args.epochs, args.threads)), flush=True)
        return []
    if args.scratch is None:
        p.error("--scratch is required")
    print(f"host: {os.cpu_count()} CPUs, {gib(free_memory())} available; torch threads {args.threads}", flush=True)
    cohorts = {"fits": args.fits_slides, "large": args.large_slides}
    for name, n in cohorts.items():
        start = time.perf_counter()
        write_cohort(args.scratch / name, n, args.tiles, args.dim, seed=len(name))
        disk = sum(f.stat().st_size for f in (args.scratch / name).rglob("*") if f.is_file())
        print(f"cohort {name}: {n} slides x ~{args.tiles} tiles x {args.dim}, {gib(disk)} on disk "
              f"(ready in {time.perf_counter() - start:.0f} s)", flush=True)
    plan = [("fits", "auto"), ("fits", "0"), ("large", args.budget)]
    if args.large_in_memory == "yes":
        plan.append(("large", "auto"))
    rows = []
    for cohort, budget in plan:
        result = {"cohort": cohort, "budget": budget, **run(args.scratch / cohort, budget, args.epochs, args.threads)}
        rows.append(result)
        print(f"  {cohort} budget {budget}: {result['mode']}, epochs "
              + ", ".join(f"{s:.1f}" for s in result["epoch_s"]) + f" s, peak RSS {gib(result['peak_rss'])}",
              flush=True)
    print()
    print(f"{'cohort':6s} {'budget':>8s} {'mode':>6s} {'features':>10s} {'load s':>7s} {'stats s':>8s} "
          f"{'s/epoch':>8s} {'peak RSS':>10s}")
    for r in rows:
        print(f"{r['cohort']:6s} {r['budget']:>8s} {r['mode']:>6s} {gib(r['feature_bytes']):>10s} {r['load_s']:7.1f} "
              f"{r['stats_s']:8.1f} {min(r['epoch_s']):8.2f} {gib(r['peak_rss']):>10s}")
    memory, stream = rows[0], rows[1]
    print(f"\nstreamed / in memory, cohort that fits: {min(stream['epoch_s']) / min(memory['epoch_s']):.2f}x "
          "epoch time (best epoch of each)")
    print(f"same losses streamed and in memory: {stream['losses'] == memory['losses']}")
    large = rows[2]
    print(f"streamed peak RSS: {gib(stream['peak_rss'])} on {gib(stream['feature_bytes'])} of features, "
          f"{gib(large['peak_rss'])} on {gib(large['feature_bytes'])} "
          f"({large['feature_bytes'] / parse_size(args.budget):.1f}x the budget {args.budget}; "
          f"{large['feature_bytes'] / max(1, free_memory()):.2f}x the memory available now)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


def parse_size(value: str) -> int:
    from wsi_asmil.mil.bag_source import parse_budget

    return parse_budget(value) or 1


if __name__ == "__main__":
    main()
