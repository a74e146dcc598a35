"""Feature extraction for a batch of slides in one job: the model, its device copy and the torch
import are paid once per batch, not once per slide.

Starting a features job (a process, importing torch and timm, building the encoder and moving it
to the device) costs seconds, which on a GPU is as long as embedding a small slide. So the workflow
embeds ``features.slides_per_job`` slides per job. Each slide's store is still its own atomic,
resumable Zarr store (:func:`wsi_asmil.features.extract.extract_slide`), and the job's output for
Snakemake is a small JSON marker per batch, never the stores themselves: Snakemake deletes a job's
outputs before it reruns the job, which would throw away the finished stores of a batch rerun for
one new slide.

Reruns stay precise without Snakemake's help. Every store records a *request key* (attr
``request``; the marker lists it as each member's fingerprint): a hash of all that determines its
rows (the tiles store's content, the slide file, the encoder and the identity of its weights,
device, precision, reader, mpp settings, package version). A batch job first compares each
member's store with its key, without importing torch; members whose store matches are left alone,
and a job with nothing left to do ends there. A stale store is removed before it
is recomputed, so no consumer reads features of old settings.

Batch membership depends only on the slide's own id and on the number of batches, a power of two
(see :func:`n_batches`): adding a slide changes one batch, except when the cohort crosses a
power-of-two multiple of ``slides_per_job``; then every batch is re-formed once, and the re-formed
jobs skip their finished members.

A member that fails fails alone: the job embeds the others, logs the error under the slide's name,
writes the batch's errors beside the marker (``<batch>.errors.json``) instead of the marker, and
exits non-zero; Snakemake (keep-going) then reruns the batch next time, which redoes only that slide.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_asmil import __version__
from wsi_asmil.core.args import add_feature_args, optional_float, setup_logging
from wsi_asmil.core.io import sha256_of, write_json
from wsi_asmil.features import store
from wsi_asmil.features.packaged_weights import PYPI_IMAGENET, WeightsError, packaged_weights_id

log = logging.getLogger(__name__)

#: Slides per features job when ``features.slides_per_job`` is ``auto``. On a GPU a small slide
#: embeds in a second or two while the job's start costs ten or more, so batches are large; on a
#: CPU embedding dominates and smaller batches keep more jobs in parallel on a cluster.
AUTO_SLIDES_PER_JOB = {"gpu": 32, "cpu": 8}


def slides_per_job(setting: int | str, device: str) -> int:
    """``features.slides_per_job`` as a number: ``auto`` picks by ``features.device``."""
    if setting == "auto":
        return AUTO_SLIDES_PER_JOB["cpu" if device == "cpu" else "gpu"]
    if not isinstance(setting, int) or setting < 1:
        raise ValueError(f"config key 'features.slides_per_job' must be 'auto' or a whole number >= 1, got {setting!r}")
    return setting


def n_batches(n_slides: int, per_job: int) -> int:
    """The smallest power of two of batches that holds ``n_slides`` at ``per_job`` on average.

    A power of two, so that the count changes only when the cohort doubles: between doublings a
    new slide joins one batch and leaves the others' membership (their Snakemake params) alone.
    Batches then average between ``per_job / 2`` and ``per_job`` slides.
    """
    needed = max(1, math.ceil(n_slides / per_job))
    return 1 << (needed - 1).bit_length()


def batch_index(slide_id: str, batches: int) -> int:
    """The batch of a slide: a hash of its id alone (stable across runs, machines and cohorts)."""
    digest = hashlib.sha256(slide_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % batches


def batch_name(index: int, batches: int) -> str:
    """``<index>-of-<batches>``: a batch's name changes with the count, so markers of an older
    partition are never mistaken for the current one's."""
    return f"{index}-of-{batches}"


def assign_batches(slide_ids: Iterable[str], per_job: int) -> dict[str, list[str]]:
    """Batch name -> sorted slide ids, over every slide id of a cohort (empty batches left out)."""
    ids = sorted(set(slide_ids))
    k = n_batches(len(ids), per_job)
    out: dict[str, list[str]] = {}
    for sid in ids:
        out.setdefault(batch_name(batch_index(sid, k), k), []).append(sid)
    return dict(sorted(out.items()))


@dataclass(frozen=True)
class Member:
    """One slide of a batch: where its slide, tiles and features store are."""

    slide_id: str
    slide: str
    tiles: str
    out: str
    slide_mpp: float | None = None


def parse_members(text: str) -> list[Member]:
    """The ``--members`` JSON: a list of objects with slide_id, slide, tiles, out (and slide_mpp)."""
    try:
        rows = json.loads(text)
        members = [Member(**row) for row in rows]
    except (ValueError, TypeError) as exc:
        raise ValueError(f"--members: expected a JSON list of {{slide_id, slide, tiles, out, slide_mpp}} ({exc})") from exc
    ids = [m.slide_id for m in members]
    if len(set(ids)) != len(ids):
        raise ValueError(f"--members: duplicate slide ids {sorted({i for i in ids if ids.count(i) > 1})}")
    return members


def members_json(
    slide_ids: Iterable[str],
    slide_of: Callable[[str], str],
    tiles_of: Callable[[str], str],
    out_of: Callable[[str], str],
    mpp_override: Mapping[str, float],
) -> str:
    """The ``--members`` argument of a batch (the workflow's rule param: a member added or
    removed changes it, and so reruns that batch alone)."""
    rows = [asdict(Member(s, str(slide_of(s)), str(tiles_of(s)), str(out_of(s)), mpp_override.get(s))) for s in slide_ids]
    return json.dumps(rows, ensure_ascii=False, separators=(",", ":"))


def weights_key(encoder: str, weights: str, seed: int) -> str:
    """The identity of the encoder's weights, found without importing torch."""
    if weights == "random":
        return f"random(seed={seed})"
    if weights == "hub":
        return f"hub:{encoder}"
    if weights == PYPI_IMAGENET:
        return packaged_weights_id(encoder)
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"features.weights: file {path} does not exist")
    return f"sha256:{sha256_of(path)}"


def request_key(member: Member, settings: dict[str, Any]) -> str:
    """A hash of everything that determines a member's feature rows (see the module docstring).

    ``settings``: the job's result-changing options (encoder, weights key, device, precision,
    reader, mpp fallback). The tiles store enters by content, the slide file by size and time of
    change (what Snakemake itself compares), so re-tiling with equal results costs nothing.
    """
    coords, _, tile_attrs = store.read_tiles(member.tiles)
    made = set(store.provenance())  # when, where and by which run the tiles were made: not what they are
    h = hashlib.sha256(np.ascontiguousarray(coords, dtype=np.int64).tobytes())
    stat = os.stat(member.slide)
    described = {
        "tiles": {k: v for k, v in tile_attrs.items() if k not in made},
        "slide": [member.slide_id, stat.st_size, stat.st_mtime_ns],
        "slide_mpp": member.slide_mpp,
        "settings": settings,
        "version": __version__,
    }
    h.update(json.dumps(described, sort_keys=True, default=str).encode())
    return h.hexdigest()


def store_is_current(out: str | os.PathLike[str], key: str) -> bool:
    """Whether a complete features store exists at ``out`` and was made for request ``key``."""
    try:
        return store.open_store(out).attrs.get("request") == key
    except Exception:  # missing, half-deleted or foreign: not current, so it is rebuilt
        return False


def result_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The job options that change feature values (speed options are left out on purpose)."""
    return {
        "encoder": args.encoder,
        "weights": weights_key(args.encoder, args.weights, args.seed),
        "device": args.device,
        "precision": args.precision,
        "reader": args.reader,
        "mpp_fallback": args.mpp_fallback,
    }


def run_batch(members: Sequence[Member], args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Embed every member whose store is missing or stale; slide id -> its status record.

    Status ``current`` (store kept), ``done`` (embedded now) or ``failed`` (with ``error``). torch is
    imported, and the model built, only when some member needs embedding.
    """
    settings = result_settings(args)
    status: dict[str, dict[str, Any]] = {}
    todo: list[tuple[Member, str]] = []
    for m in members:
        try:
            key = request_key(m, settings)
        except Exception as exc:  # a missing or unreadable tiles store or slide fails this member alone
            status[m.slide_id] = {"status": "failed", "error": f"slide '{m.slide_id}': {type(exc).__name__}: {exc}"}
            log.error("%s", status[m.slide_id]["error"])
            continue
        if store_is_current(m.out, key):
            status[m.slide_id] = {"status": "current", "fingerprint": key}
        else:
            todo.append((m, key))
    log.info("batch of %d slide(s): %d current, %d to embed", len(members), sum(
        s["status"] == "current" for s in status.values()), len(todo))
    if todo:
        status.update(_embed_members(todo, args))
    return {m.slide_id: {**status[m.slide_id], "store": m.out} for m in members}


def _embed_members(todo: Sequence[tuple[Member, str]], args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    started = time.perf_counter()
    from wsi_asmil.features import extract as features  # imports torch: only when there is work

    encoder, embedder, batch_size, num_workers = features.start_job(args)
    log.info("job start (torch import, encoder, device) took %.2f s", time.perf_counter() - started)
    out: dict[str, dict[str, Any]] = {}
    for m, key in todo:
        t0 = time.perf_counter()
        shutil.rmtree(m.out, ignore_errors=True)  # stale: never left for a consumer to read
        try:
            attrs = features.extract_slide(
                m.slide, m.tiles, m.out, encoder, batch_size=batch_size, num_workers=num_workers,
                mpp_override=m.slide_mpp, mpp_fallback=args.mpp_fallback, reader=args.reader,
                embedder=embedder, extra_attrs={"request": key},
            )
        except Exception as exc:  # one slide fails alone; the batch goes on and reports it
            message = str(exc) if m.slide_id in str(exc) else f"slide '{m.slide_id}': {type(exc).__name__}: {exc}"
            log.error("%s", message, exc_info=not isinstance(exc, (features.FeatureExtractionError, OSError)))
            out[m.slide_id] = {"status": "failed", "error": message}
            continue
        out[m.slide_id] = {"status": "done", "fingerprint": key, "failed_tiles": attrs["n_failed_tiles"],
                           "seconds": round(time.perf_counter() - t0, 3)}
    return out


def report_path(marker: str | os.PathLike[str]) -> Path:
    """Where a failed batch's record goes: beside its marker, never at it."""
    marker = Path(marker)
    return marker.with_name(f"{marker.stem}.errors.json")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m wsi_asmil.features.batch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--members", required=True,
                   help='JSON list of {"slide_id", "slide", "tiles", "out", "slide_mpp"}, one per slide')
    p.add_argument("--marker", required=True, help="batch marker (JSON) written when every member has its store")
    p.add_argument("--mpp-fallback", type=optional_float, default=None, help="config mpp_fallback")
    add_feature_args(p)
    args = p.parse_args(argv)
    setup_logging()
    try:
        members = parse_members(args.members)
        status = run_batch(members, args)
    except (ValueError, FileNotFoundError, WeightsError) as exc:  # the batch as a whole: arguments, weights
        log.error("%s", exc)
        raise SystemExit(1) from None
    failed = {sid: r for sid, r in status.items() if r["status"] == "failed"}
    record = {"members": status, "failed": sorted(failed)}
    counts = {s: sum(r["status"] == s for r in status.values()) for s in ("current", "done", "failed")}
    log.info("batch: %(done)d embedded, %(current)d already current, %(failed)d failed", counts)
    if failed:
        write_json(report_path(args.marker), record)
        for sid, r in failed.items():
            log.error("FAILED %s: %s", sid, r["error"])
        log.error("%d of %d slide(s) failed (%s); a rerun redoes only them", len(failed), len(status),
                  report_path(args.marker))
        sys.exit(1)
    report_path(args.marker).unlink(missing_ok=True)
    write_json(args.marker, record)


if __name__ == "__main__":
    main()
