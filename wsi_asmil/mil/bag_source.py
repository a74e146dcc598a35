"""The features of one fold: where its bags come from, and its standardisation statistics.

A fold's bags either sit in memory for the whole run (:class:`InMemoryBags`, fast, bounded by the
memory of the host or the GPU) or are read from their Zarr stores each time they are visited
(:class:`StreamingBags`, bounded by a few bags, for cohorts whose features do not fit). Both give
the trainer the same :class:`Bag` objects in the order it asks for, so training, evaluation, the
gradient probe and the attention outputs do not know which one they use, and a run gives the same
numbers either way. :func:`choose_source` decides from ``train.memory_budget``.

The statistics of the fold's training tiles come from the stores opened as one lazy dask array
(:func:`feature_sums`), never from a concatenation of bags, so they cost the memory of a few slides
whatever the cohort's size.
"""

from __future__ import annotations

import abc
import logging
import os
import queue
import re
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

_NUMPY_DTYPES = {torch.float16: np.float16, torch.float32: np.float32}
#: Share of the available memory (host, or GPU when training there) that ``auto`` gives the features.
AUTO_SHARE = 0.5
#: Bags read ahead of the one in use; each costs one bag of host memory.
PREFETCH_BAGS = 2
#: Threads computing the statistics, and slides per dask computation (each slide is held in float64
#: twice while reduced): together they bound the statistics' memory.
STAT_WORKERS = 4
STAT_BATCH = 16
_UNITS = {
    "": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


@dataclass(frozen=True)
class Bag:
    """One slide's features and label, already on the training device.

    ``features`` may be float16 (see :func:`feature_dtype`); every consumer upcasts with
    ``.float()`` (a no-op on float32) so the maths is float32 either way.
    """

    slide_id: str
    label: int
    features: torch.Tensor
    target: torch.Tensor
    truth: np.ndarray | None = None  # per-tile positives (witness or tumour tiles), when known


@dataclass(frozen=True)
class SlideEntry:
    """What is known of a slide without reading its features: enough to plan and to stream."""

    slide_id: str
    label: int
    store: Path
    n_tiles: int
    dim: int


class BagReadError(RuntimeError):
    """A bag could not be read while streaming; the message names the slide and its store."""


def feature_dtype(device: torch.device) -> torch.dtype:
    """How a fold's features are held on ``device``: float16 on CUDA, float32 elsewhere.

    Feature stores hold float16 (store.py), so float16 on the GPU is exact, not a rounding (a bag
    whose values float16 cannot hold exactly stays float32): it halves the memory of a cohort kept
    on the GPU for the whole fold, and the trainer upcasts each bag to float32 on the device
    (microseconds) so results equal a float32 copy's. bfloat16 is not used: its 8-bit mantissa
    would round the stored values before standardisation. On the CPU the upcast would cost time
    every step and memory is rarely the limit, so float32 stays.
    """
    return torch.float16 if device.type == "cuda" else torch.float32


def check_dtype(dtype: torch.dtype) -> None:
    if dtype not in _NUMPY_DTYPES:
        raise ValueError(f"features can be held as float16 or float32, not {dtype}")


def read_host_bag(
    store_path: Path, slide_id: str, dtype: torch.dtype, truth: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """(features held as ``dtype`` where exact, else float32; per-tile truth or None) of one store.

    Truth comes from ``truth`` when given, else from the store's own ``tile_truth`` array.
    """
    from wsi_asmil.features import store  # zarr only where stores are read

    features, stored_truth = store.read_bag(store_path)
    truth = stored_truth if truth is None else truth
    if truth is not None:
        truth = np.asarray(truth) > 0
        if truth.shape != (features.shape[0],):
            raise ValueError(
                f"slide {slide_id!r}: per-tile truth has {truth.shape[0]} rows, its features {features.shape[0]}"
            )
    with np.errstate(over="ignore"):  # an overflow is not exact: that bag stays float32
        held = features.astype(_NUMPY_DTYPES[dtype], copy=False)  # converted on the host
    if held is features or np.array_equal(held, features):  # exact (always, for store.py's stores)
        features = held
    return features, truth


def label_index(slide_id: str, labels: Mapping[str, str], classes: Sequence[str]) -> int:
    """The class index of ``slide_id``; a missing or unknown label is an error naming the slide."""
    if slide_id not in labels:
        raise ValueError(f"slide {slide_id!r} has no label in the split")
    if labels[slide_id] not in classes:
        raise ValueError(f"slide {slide_id!r} has label {labels[slide_id]!r}, not one of {list(classes)}")
    return list(classes).index(labels[slide_id])


def scan_slides(
    features_dir: str | os.PathLike[str],
    slide_ids: Sequence[str],
    labels: Mapping[str, str],
    classes: Sequence[str],
) -> tuple[list[SlideEntry], list[str]]:
    """(entries of the non-empty slides, skipped empty slides), reading only each store's metadata."""
    from wsi_asmil.features import store

    entries, skipped = [], []
    for slide_id in slide_ids:
        label = label_index(slide_id, labels, classes)
        path = Path(features_dir) / f"{slide_id}.zarr"
        try:
            n_tiles, dim = (int(n) for n in store.lazy_features(path).shape)
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise ValueError(f"slide {slide_id!r}: cannot open the features store {path}: {exc}") from exc
        if n_tiles == 0:
            logger.warning("slide %s has no tiles (M = 0): skipped", slide_id)
            skipped.append(slide_id)
            continue
        entries.append(SlideEntry(slide_id, label, path, n_tiles, dim))
    return entries, skipped


# --- statistics ------------------------------------------------------------------------------------


def _slide_sums(block: np.ndarray) -> np.ndarray:
    """Per-dimension sum and sum of squares (2, D) of one slide's rows, in float64.

    The arithmetic is ``FeatureNorm.fit``'s on a float32 bag (torch's float64 reduction over the
    whole slide), so a fold standardised from its stores equals one standardised from its bags.
    """
    x = torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32)).double()
    return torch.stack([x.sum(0), x.pow(2).sum(0)]).numpy()


def feature_sums(entries: Sequence[SlideEntry]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(sum, sum of squares, number of tiles) over every tile of ``entries``' stores, with dask.

    Each store is a lazy dask array with one block per slide, reduced to its per-slide sums; the
    per-slide sums are added in slide order on the host, the order ``FeatureNorm.fit`` adds its bags
    in. Memory: ``STAT_BATCH`` slides at most.
    """
    import dask
    import dask.array as da

    from wsi_asmil.features import store

    if not entries:
        raise ValueError("cannot standardise features: no training tiles")
    dims = {e.dim for e in entries}
    if len(dims) != 1:
        raise ValueError(f"feature dimensions differ between slides: {sorted(dims)}")
    dim = dims.pop()

    def batch_sums(batch: Sequence[SlideEntry]) -> np.ndarray:
        slides = [
            da.from_zarr(store.lazy_features(e.store), chunks=(e.n_tiles, dim)).map_blocks(
                _slide_sums, chunks=(2, dim), dtype=np.float64
            )
            for e in batch
        ]
        return da.concatenate(slides, axis=0).compute()

    # One graph per batch of slides: the scheduler would otherwise read slides far ahead of their
    # reduction (peak memory growing with the cohort), and slicing batches out of one cohort-wide
    # graph costs time growing with the cohort per batch (7 minutes for 4,480 slides, measured).
    with dask.config.set(scheduler="threads", num_workers=STAT_WORKERS):
        per_slide = np.concatenate(
            [batch_sums(entries[i : i + STAT_BATCH]) for i in range(0, len(entries), STAT_BATCH)]
        ).reshape(len(entries), 2, dim)
    total, squares = per_slide[0, 0], per_slide[0, 1]
    for row in per_slide[1:]:
        total, squares = total + row[0], squares + row[1]
    return torch.from_numpy(total), torch.from_numpy(squares), sum(e.n_tiles for e in entries)


# --- sources ---------------------------------------------------------------------------------------


class BagSource(abc.ABC):
    """The bags of one part of a fold (train, val or test), in the order the trainer asks for.

    ``iterate(order)`` yields the bags at the positions in ``order``; iterating the source itself
    yields them all in slide order. ``entries`` describe the slides without their features.
    """

    entries: list[SlideEntry]
    mode = "memory"

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[Bag]:
        return self.iterate(range(len(self)))

    @abc.abstractmethod
    def iterate(self, order: Iterable[int]) -> Iterator[Bag]:
        """The bags at the positions in ``order`` (repeats allowed), one at a time."""


class InMemoryBags(BagSource):
    """Every bag on the device for the whole run (the fastest path; today's behaviour)."""

    def __init__(self, bags: Sequence[Bag], entries: Sequence[SlideEntry]) -> None:
        self.bags = list(bags)
        self.entries = list(entries)

    def __getitem__(self, index: int) -> Bag:
        return self.bags[index]

    def iterate(self, order: Iterable[int]) -> Iterator[Bag]:
        return (self.bags[int(i)] for i in order)



class StreamingBags(BagSource):
    """Bags read from their stores each time they are visited, ``prefetch`` bags ahead.

    A background thread reads the next bags (Zarr decompression releases the GIL) into a bounded
    queue and, for a CUDA device, pins them, so the copy to the device is asynchronous and the
    device does not wait for the disk. A read error reaches the consumer as :class:`BagReadError`
    naming the slide; leaving an iteration early (an error, a ``break``) stops the thread.
    Memory: ``prefetch`` + 2 bags on the host (queued, being read, being handed over).
    """

    mode = "stream"

    def __init__(
        self,
        entries: Sequence[SlideEntry],
        device: torch.device,
        dtype: torch.dtype,
        tile_truth: Mapping[str, np.ndarray] | None = None,
        prefetch: int = PREFETCH_BAGS,
    ) -> None:
        check_dtype(dtype)
        if prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, got {prefetch}")
        self.entries = list(entries)
        self.device, self.dtype, self.prefetch = device, dtype, prefetch
        self.tile_truth = tile_truth or {}
        self.targets = [torch.tensor(e.label, device=device) for e in self.entries]

    def _read(self, index: int) -> tuple[torch.Tensor, np.ndarray | None]:
        entry = self.entries[index]
        try:
            features, truth = read_host_bag(entry.store, entry.slide_id, self.dtype, self.tile_truth.get(entry.slide_id))
        except Exception as exc:
            raise BagReadError(
                f"slide {entry.slide_id!r}: cannot read its features from {entry.store} while streaming "
                f"({exc.__class__.__name__}: {exc})"
            ) from exc
        if features.shape != (entry.n_tiles, entry.dim):
            raise BagReadError(
                f"slide {entry.slide_id!r}: its store {entry.store} changed during training: "
                f"{features.shape} features, {(entry.n_tiles, entry.dim)} when the fold was planned"
            )
        host = torch.from_numpy(features)
        return (host.pin_memory() if self.device.type == "cuda" else host), truth

    def _fill(self, order: list[int], out: queue.Queue[Any], stop: threading.Event) -> None:
        """The reader thread: every bag of ``order`` in turn; an error is handed over and ends it."""
        try:
            for index in order:
                if stop.is_set():
                    return
                self._put(out, (index, *self._read(index)), stop)
        except Exception as exc:  # the consumer raises it, in its own thread
            self._put(out, exc, stop)

    @staticmethod
    def _put(out: queue.Queue[Any], item: Any, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.05)
                return
            except queue.Full:
                continue

    def iterate(self, order: Iterable[int]) -> Iterator[Bag]:
        order = [int(i) for i in order]
        out: queue.Queue[Any] = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        reader = threading.Thread(target=self._fill, args=(order, out, stop), name="bag-prefetch", daemon=True)
        reader.start()
        try:
            for _ in order:
                item = out.get()
                if isinstance(item, Exception):
                    raise item
                index, host, truth = item
                entry = self.entries[index]
                features = host.to(self.device, non_blocking=True)
                yield Bag(entry.slide_id, entry.label, features, self.targets[index], truth)
        finally:
            stop.set()
            reader.join()


def ordered(bags: Sequence[Bag] | BagSource, order: Iterable[int]) -> Iterator[Bag]:
    """The bags at the positions in ``order``, from a source or a plain list of bags."""
    if isinstance(bags, BagSource):
        return bags.iterate(order)
    return (bags[int(i)] for i in order)


# --- the memory budget -----------------------------------------------------------------------------


def parse_budget(value: float | str) -> int | None:
    """Bytes of a ``train.memory_budget`` value: a number of bytes or a size such as ``"8GiB"``,
    ``"500 MB"``; None for ``"auto"``. Anything else is an error naming the key."""
    if isinstance(value, bool):
        raise ValueError(f"train.memory_budget must be a size or 'auto', got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"train.memory_budget must not be negative, got {value!r}")
        return int(value)
    text = str(value).strip().lower()
    if text == "auto":
        return None
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?", text)
    if match is None:
        raise ValueError(
            f"train.memory_budget must be 'auto', a number of bytes or a size like '8GiB' or '500MB', got {value!r}"
        )
    return int(float(match.group(1)) * _UNITS[match.group(2) or ""])


def available_memory(device: torch.device) -> int:
    """Bytes free for the features on ``device``: free GPU memory, else the host's available memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def choose_source(
    entries: Sequence[SlideEntry], device: torch.device, dtype: torch.dtype, budget: float | str
) -> dict[str, Any]:
    """Whether the fold's features (``entries``, held as ``dtype``) stay in memory or stream.

    They stream when they exceed the budget: ``budget`` bytes, or with ``"auto"`` ``AUTO_SHARE``
    of the memory available on the device they would be held on. Returns the decision with its
    figures, as metrics.json records it.
    """
    limit = parse_budget(budget)
    if limit is None:
        limit = int(AUTO_SHARE * available_memory(device))
        basis = f"auto: {AUTO_SHARE:.0%} of the available {'GPU' if device.type == 'cuda' else 'host'} memory"
    else:
        basis = f"train.memory_budget {budget}"
    itemsize = torch.empty((), dtype=dtype).element_size()
    size = sum(e.n_tiles * e.dim for e in entries) * itemsize
    mode = "memory" if size <= limit else "stream"
    reason = (
        f"the fold's features, {size / 2**30:.3g} GiB as {str(dtype).removeprefix('torch.')}, "
        f"{'fit' if mode == 'memory' else 'exceed'} the budget of {limit / 2**30:.3g} GiB ({basis})"
    )
    return {"mode": mode, "feature_bytes": size, "budget_bytes": limit, "budget": budget, "reason": reason}
