"""Train one fold of one MIL model on frozen tile features and write its evaluation artefacts.

Protocol (spec section 6): AdamW, cosine decay per step to zero without warm-up, global-norm
gradient clipping, one bag per step, everything seeded. Validation every epoch selects the epoch
with the highest val macro F1 + val AUC; the attention of val and test slides is recorded each
epoch for the instability (PI) metric. Usage::

    python -m wsi_asmil.train --features-dir DIR --split split.json --fold 0 --model asmil \\
        --params '{"epochs": 50}' --out-dir results/models/asmil/fold0
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
import os
import random
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from wsi_asmil.bag_source import (
    Bag,
    BagSource,
    InMemoryBags,
    SlideEntry,
    StreamingBags,
    check_dtype,
    choose_source,
    feature_dtype,
    feature_sums,
    label_index,
    ordered,
    read_host_bag,
    scan_slides,
)
from wsi_asmil.cli import setup_logging
from wsi_asmil.devices import resolve_device, to_device
from wsi_asmil.io import atomic_path, write_csv, write_json
from wsi_asmil.map_store import MapStore
from wsi_asmil.memory import BagMemoryError, oom_guard
from wsi_asmil.metrics import (
    attention_summary,
    classification_metrics,
    is_practically_uniform,
    last_mean,
    mean_jsd,
    summarize,
)
from wsi_asmil.models import (
    ANCHOR_DEFAULTS,
    MODELS,
    Anchor,
    MILLoss,
    MILModel,
    build_model,
    model_defaults,
    model_spec,
    save_checkpoint,
    target_distribution,
)

logger = logging.getLogger(__name__)

DEFAULT_PARAMS: dict[str, Any] = {
    "epochs": 20,  # demo default; the paper trains 50 (100 for SSL features)
    "lr": 1e-4,  # AdamW peak learning rate, cosine-decayed per step to 0, no warm-up
    "schedule": "cosine",  # "cosine" (the paper) or "constant" (a diagnostic: instability at full lr)
    "weight_decay": 1e-5,  # AdamW decoupled weight decay (betas fixed at 0.9 / 0.999)
    "grad_clip": 5.0,  # max global gradient norm; null or 0 disables clipping
    "seed": 0,  # seeds python, numpy and torch, the data order and the tile subsets
    "max_tiles": None,  # training-only cap on tiles per bag (random subset each step); null = all
    "amp": False,  # bf16 autocast on CUDA (ignored on CPU); weights stay fp32
    "standardize": True,  # per-dimension feature standardisation from the fold's training tiles
    # Speed only, never results: bytes ("8GiB", "500MB", a number) the fold's features may take in
    # memory, else they stream from disk; "auto" = half the available host (or GPU) memory.
    "memory_budget": "auto",
    # Each model's hyper-parameters and defaults come from its constructor (wsi_asmil.models).
    "models": {name: model_defaults(name) for name in MODELS},
}

ANCHOR_KEYS = tuple(ANCHOR_DEFAULTS)
SPLIT_PARTS = ("train", "val", "test")
SCHEDULES = ("cosine", "constant")
#: Slides whose gradients are split into the classification and the stabilisation part each epoch.
GRADIENT_PROBE_BAGS = 4
#: An epoch counts as high-learning-rate when its rate is at least this share of the peak.
HIGH_LR_SHARE = 0.5

AutocastFactory = Callable[[], contextlib.AbstractContextManager[Any]]


# --- out of memory -----------------------------------------------------------------------------------


def _train_advice(max_tiles: int | None) -> str:
    cap = f"lower train.max_tiles (now {max_tiles})" if max_tiles else "set train.max_tiles (for example 8000)"
    return (
        f"To fit, {cap}: training then uses a random subset of that many tiles per bag and step; "
        "or set train.device: cpu (slower, host memory); or free the GPU (another process may hold it)"
    )


_EVAL_ADVICE = (
    "Evaluation uses every tile of a bag (train.max_tiles only caps training): set train.device: cpu "
    "(host memory is usually larger), or free the GPU (another process may hold it)"
)


# --- parameters ------------------------------------------------------------------------------------


def resolve_params(params: Mapping[str, Any] | None) -> dict[str, Any]:
    """``DEFAULT_PARAMS`` overlaid with ``params``; an unknown key raises ValueError naming it.

    Strictness matters because a misspelt hyper-parameter would otherwise silently train with the
    default and produce a plausible but wrong result.
    """
    resolved = copy.deepcopy(DEFAULT_PARAMS)
    for key, value in (params or {}).items():
        if key not in resolved:
            raise ValueError(f"unknown training parameter {key!r}")
        if key != "models":
            resolved[key] = value
            continue
        for name, overrides in (value or {}).items():
            if name not in resolved["models"]:
                raise ValueError(f"unknown model {name!r} in params['models']")
            for sub_key, sub_value in (overrides or {}).items():
                if sub_key not in resolved["models"][name]:
                    raise ValueError(f"unknown parameter {sub_key!r} for model {name!r}")
                resolved["models"][name][sub_key] = sub_value
    return resolved


def split_model_params(model_params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Architecture kwargs (saved in the checkpoint) and anchor/loss settings (training only)."""
    arch = {k: v for k, v in model_params.items() if k not in ANCHOR_KEYS}
    anchor = {k: v for k, v in model_params.items() if k in ANCHOR_KEYS}
    return arch, anchor


# --- data ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FoldData:
    """The bags of a fold's parts (a :class:`BagSource` each, or plain lists of bags), and how
    they are held: ``source`` is :func:`choose_source`'s decision, None for hand-made folds."""

    classes: list[str]
    bags: dict[str, Sequence[Bag] | BagSource]
    skipped: list[str]
    in_dim: int
    source: dict[str, Any] | None = None


def load_split(
    split: str | os.PathLike[str] | Mapping[str, Any], fold: int
) -> tuple[list[str], dict[str, str], dict[str, list[str]]]:
    """(classes, labels, {"train", "val", "test": slide ids}) of ``fold`` in a split file or dict."""
    data = split if isinstance(split, Mapping) else json.loads(Path(split).read_text())
    folds = data["folds"]
    if not 0 <= fold < len(folds):
        raise ValueError(f"fold {fold} out of range: the split has {len(folds)} folds")
    parts = {name: list(folds[fold].get(name, [])) for name in SPLIT_PARTS}
    return list(data["classes"]), dict(data["labels"]), parts


def load_bags(
    features_dir: str | os.PathLike[str],
    slide_ids: Sequence[str],
    labels: Mapping[str, str],
    classes: Sequence[str],
    device: torch.device,
    dtype: torch.dtype | None = None,
    tile_truth: Mapping[str, np.ndarray] | None = None,
) -> tuple[list[Bag], list[str]]:
    """Read each slide's features once onto ``device``; returns (bags, skipped empty slides).

    ``dtype`` defaults to :func:`feature_dtype`. Each bag is copied to the device once, here;
    training and evaluation then never move features between host and device.

    Per-tile truth, for the attention metrics only (never for training), comes from
    ``tile_truth`` (slide id -> values in row order, positive where > 0) or else from the store's
    own ``tile_truth`` array (the witness benchmark writes one); without either it is None.

    A slide without tissue (M = 0) has no attention distribution and no prediction, so it is left
    out of training and of every metric, with a warning rather than an error: one empty slide must
    not stop a cohort.
    """
    dtype = feature_dtype(device) if dtype is None else dtype
    check_dtype(dtype)
    bags, skipped = [], []
    for slide_id in slide_ids:
        label = label_index(slide_id, labels, classes)
        truth = tile_truth.get(slide_id) if tile_truth is not None else None
        features, truth = read_host_bag(Path(features_dir) / f"{slide_id}.zarr", slide_id, dtype, truth)
        if features.shape[0] == 0:
            logger.warning("slide %s has no tiles (M = 0): skipped", slide_id)
            skipped.append(slide_id)
            continue
        loaded = sum(int(b.features.shape[0]) for b in bags) + features.shape[0]
        with oom_guard(
            "loading the features of", slide_id, features.shape[0], device,
            f"Every bag of the fold is kept on the device ({loaded} tiles so far, "
            f"{features.shape[1]}-d): lower train.memory_budget (for example 0) to stream the bags "
            "from disk instead, or set train.device: cpu, or free the GPU",
        ):
            features_t = torch.from_numpy(features).to(device)
        bags.append(Bag(slide_id, label, features_t, torch.tensor(label, device=device), truth))
    return bags, skipped


def load_fold(
    features_dir: str | os.PathLike[str],
    split: str | os.PathLike[str] | Mapping[str, Any],
    fold: int,
    device: torch.device,
    dtype: torch.dtype | None = None,
    tile_truth: Mapping[str, np.ndarray] | None = None,
    memory_budget: float | str = "auto",
) -> FoldData:
    """The bags of one fold on ``device``: in memory when the fold's features fit
    ``memory_budget`` (no per-epoch I/O), else streamed from their stores (bounded memory).

    Both give the same results; :func:`~wsi_asmil.bag_source.choose_source` says which and why,
    from the stores' metadata alone.
    """
    classes, labels, parts = load_split(split, fold)
    dtype = feature_dtype(device) if dtype is None else dtype
    check_dtype(dtype)
    entries: dict[str, list[SlideEntry]] = {}
    skipped: list[str] = []
    for part, ids in parts.items():
        entries[part], part_skipped = scan_slides(features_dir, ids, labels, classes)
        skipped += [s for s in part_skipped if s not in skipped]
    if not entries["train"]:
        raise ValueError(f"fold {fold} has no non-empty training slide")
    dims = {e.dim for group in entries.values() for e in group}
    if len(dims) != 1:
        raise ValueError(f"feature dimensions differ between slides: {sorted(dims)}")
    source = choose_source([e for group in entries.values() for e in group], device, dtype, memory_budget)
    logger.info("fold %d: features %s: %s", fold, "in memory" if source["mode"] == "memory" else "streamed from disk",
                source["reason"])
    bags: dict[str, Sequence[Bag] | BagSource] = {}
    for part, group in entries.items():
        if source["mode"] == "stream":
            bags[part] = StreamingBags(group, device, dtype, tile_truth)
            continue
        ids = [e.slide_id for e in group]
        bags[part] = InMemoryBags(load_bags(features_dir, ids, labels, classes, device, dtype, tile_truth)[0], group)
    return FoldData(classes, bags, skipped, dims.pop(), source)


# --- optimisation ----------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast_factory(device: torch.device, amp: bool) -> AutocastFactory:
    """bf16 autocast on CUDA when asked; a no-op context otherwise (CPU runs stay exact fp32)."""
    if amp and device.type == "cuda":
        return lambda: torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def lr_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, kind: str = "cosine"
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step cosine decay from the base rate to 0 over ``total_steps``, without warm-up; or a
    constant rate, the diagnostic that shows instability where the rate never falls."""
    if kind == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    if kind != "cosine":
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}")
    total = max(1, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    )


def anchor_momentum(anchor_cfg: Mapping[str, Any], steps_per_epoch: int) -> float:
    """The EMA momentum m: ``anchor_momentum``, or derived from ``anchor_horizon_epochs``.

    The anchor averages the online model over about 1 / (1 - m) optimizer steps. At m = 0.999
    that is 2.5 epochs of the paper's 400 slides but about 67 epochs of a 15-slide fold, where the
    anchor then stays close to the initial model for the whole run. A horizon in epochs keeps the
    anchor's memory the same whatever the cohort's size.
    """
    horizon = anchor_cfg.get("anchor_horizon_epochs")
    if horizon is None:
        return float(anchor_cfg["anchor_momentum"])
    if float(horizon) <= 0:
        raise ValueError(f"anchor_horizon_epochs must be positive, got {horizon}")
    return max(0.0, 1.0 - 1.0 / (float(horizon) * max(1, steps_per_epoch)))


def horizon_epochs(momentum: float, steps_per_epoch: int) -> float:
    """The anchor's memory 1 / (1 - m) in epochs (infinite for m = 1: an anchor that never moves)."""
    return math.inf if momentum >= 1.0 else 1.0 / ((1.0 - momentum) * max(1, steps_per_epoch))


@dataclass
class Trainer:
    """The online model with everything that only exists during training."""

    model: MILModel
    anchor: Anchor | None
    loss_fn: MILLoss
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    rng: np.random.Generator
    params: dict[str, Any]
    autocast: AutocastFactory


def build_trainer(
    model_name: str, data: FoldData, params: dict[str, Any], device: torch.device
) -> Trainer:
    """Seed, then build model, anchor, loss, AdamW and schedule in a fixed order (reproducibility)."""
    arch_kwargs, anchor_cfg = split_model_params(params["models"][model_name])
    seed_everything(int(params["seed"]))
    model = build_model(model_name, data.in_dim, len(data.classes), **arch_kwargs).to(device)
    if params["standardize"]:
        train = data.bags["train"]
        if isinstance(train, BagSource):  # from the stores, with dask: never the whole fold at once
            model.input_norm.fit_sums(*feature_sums(train.entries))
        else:
            model.input_norm.fit([b.features for b in train])
    anchor, loss_fn = None, MILLoss()
    if model_spec(model_name).anchored and float(anchor_cfg["beta"]) > 0:
        momentum = anchor_momentum(anchor_cfg, len(data.bags["train"]))
        anchor = Anchor(model, anchor_cfg["anchor_mode"], momentum)
        anchor = anchor.to(device)
        loss_fn = MILLoss(
            float(anchor_cfg["beta"]), float(anchor_cfg["tau"]), anchor_cfg["as_reduction"],
            anchor_cfg["target"],
        )
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=float(params["lr"]),
        betas=(0.9, 0.999),
        weight_decay=float(params["weight_decay"]),
    )
    scheduler = lr_schedule(optimizer, int(params["epochs"]) * len(data.bags["train"]), params["schedule"])
    return Trainer(
        model, anchor, loss_fn, optimizer, scheduler, np.random.default_rng(int(params["seed"])),
        params, autocast_factory(device, bool(params["amp"])),
    )


LOSS_KEYS = ("loss", "ce", "as", "aux")


def train_one_epoch(
    trainer: Trainer,
    bags: Sequence[Bag] | BagSource,
    desc: str = "train",
    step_losses: list[float] | None = None,
) -> dict[str, float]:
    """One pass over ``bags`` in a seeded random order, one bag per optimizer step.

    Returns the epoch's mean of each loss term. The per-step values stay on the device and reach
    the host once, at the end of the epoch, so on a GPU the host never waits inside a step and
    queues the next steps while the current one runs. They are summed on the host in step order in
    double precision, as ``float()`` per step did, so the means are bit for bit what they were.
    ``step_losses``, when given, receives each step's total loss. ``bags`` may stream from disk
    (:class:`~wsi_asmil.bag_source.StreamingBags`): the order is drawn first, as before, so the
    random numbers drawn are the same and so are the results.
    """
    t = trainer
    t.model.train()
    max_tiles = t.params["max_tiles"]
    per_step: list[torch.Tensor] = []
    order = t.rng.permutation(len(bags))
    for bag in tqdm(ordered(bags, order), desc=desc, total=len(order), leave=False, disable=None):
        x = bag.features
        if max_tiles and x.shape[0] > max_tiles:
            # Drawn on the host from the trainer's numpy generator (reproducible on every device).
            subset = np.sort(t.rng.choice(x.shape[0], size=max_tiles, replace=False))
            x = x.index_select(0, to_device(torch.from_numpy(subset), x.device))
        with oom_guard("training on", bag.slide_id, int(x.shape[0]), x.device, _train_advice(max_tiles)):
            x = x.float()  # float16-held features (feature_dtype) upcast on the device; float32: no-op
            with t.autocast():
                out = t.model(x)
                anchor_logits = t.anchor.attention_logits(x) if t.anchor is not None else None
            losses = t.loss_fn(out["logits"], bag.target, out["attn_logits"], anchor_logits)
            losses["aux"] = t.model.auxiliary_loss(out, bag.target)
            losses["loss"] = losses["loss"] + losses["aux"]
            t.optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
        if t.params["grad_clip"]:
            torch.nn.utils.clip_grad_norm_(t.model.parameters(), float(t.params["grad_clip"]))
        t.optimizer.step()
        t.scheduler.step()
        if t.anchor is not None:
            t.anchor.update(t.model)
        per_step.append(torch.stack([losses[key].detach().float() for key in LOSS_KEYS]))
    rows = torch.stack(per_step).cpu().tolist() if per_step else []  # the epoch's one host sync
    totals = dict.fromkeys(LOSS_KEYS, 0.0)
    for row in rows:
        for key, value in zip(LOSS_KEYS, row):
            totals[key] += value
    if step_losses is not None:
        step_losses.extend(row[0] for row in rows)
    return {key: value / len(bags) for key, value in totals.items()}


# --- evaluation ------------------------------------------------------------------------------------


@dataclass
class EvalResult:
    """One evaluation pass. ``attention`` is each slide's score map (M,), the mean of its
    attention maps; ``maps`` keeps every map (R, M) (head x token, branch) for the per-map
    instability (a :class:`MapStore`, possibly shared with another pass and on disk);
    ``summaries`` describe each slide's attention (:func:`attention_summary`)."""

    slide_ids: list[str]
    labels: np.ndarray
    probs: np.ndarray
    loss: float
    attention: dict[str, np.ndarray]
    maps: Mapping[str, np.ndarray]
    summaries: dict[str, dict[str, float]]
    n_positive: dict[str, int | None]

    def metrics(self) -> dict[str, float]:
        return {"loss": self.loss, **classification_metrics(self.labels, self.probs)}

    def attention_means(self) -> dict[str, float]:
        return mean_summaries(self.summaries)


def mean_summaries(summaries: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Mean over slides of each attention summary, leaving out undefined values (a slide without
    truth has no positive mass; one without tumour no instance AUC)."""
    return {key: stat["mean"] for key, stat in summarize(list(summaries.values())).items()}


#: Attention values (maps and logits) an evaluation gathers on the device before one copy to the
#: host: 64M floats, 256 MB each, so a large val or test set (ASMIL: 64 maps per tile) reaches the
#: host in a few copies instead of one per slide or one of unbounded size.
EVAL_GATHER_ELEMENTS = 1 << 26


@torch.no_grad()
def evaluate(
    model: MILModel,
    bags: Sequence[Bag] | BagSource,
    n_classes: int,
    autocast: AutocastFactory,
    maps: MapStore | None = None,
) -> EvalResult:
    """Eval-mode probabilities, mean slide CE, and each slide's attention maps and their summary.

    The validation loss is the slide cross-entropy only: L_AS depends on the anchor, a training
    device that would make losses of different anchor settings incomparable. Each slide's maps go
    into ``maps`` (a new in-memory store when None).
    """
    model.eval()
    store = MapStore() if maps is None else maps
    losses, probs, ids, labels, truths = [], [], [], [], []
    attention: dict[str, np.ndarray] = {}
    summaries: dict[str, dict[str, float]] = {}
    pending: list[tuple[str, np.ndarray | None, torch.Tensor, torch.Tensor]] = []
    pending_elements = 0

    def gather() -> None:
        """Copy the pending slides' maps and logits to the host in one transfer and summarise them."""
        nonlocal pending_elements
        if not pending:
            return
        sizes = [int(w.shape[1]) for _, _, w, _ in pending]
        host_maps = torch.cat([w for _, _, w, _ in pending], dim=1).cpu().split(sizes, dim=1)
        host_logits = torch.cat([z for _, _, _, z in pending], dim=1).cpu().split(sizes, dim=1)
        for (slide_id, truth, _, _), w, z in zip(pending, host_maps, host_logits):
            store.put(slide_id, w.numpy())
            attention[slide_id] = w.mean(dim=0).numpy()
            summaries[slide_id] = attention_summary(w.numpy(), z.numpy(), truth)
        pending.clear()
        pending_elements = 0

    for bag in ordered(bags, range(len(bags))):  # each bag read once, when bags stream
        ids.append(bag.slide_id)
        labels.append(bag.label)
        truths.append(bag.truth)
        with oom_guard("evaluating", bag.slide_id, int(bag.features.shape[0]), bag.features.device, _EVAL_ADVICE):
            with autocast():
                out = model(bag.features.float())
        logits = out["logits"].float()
        losses.append(F.cross_entropy(logits[None], bag.target[None]))
        probs.append(torch.softmax(logits, dim=-1))
        attn_logits = out["attn_logits"].float().flatten(0, 1)  # (R, M): one row per map
        pending.append((bag.slide_id, bag.truth, torch.softmax(attn_logits, dim=-1), attn_logits))
        pending_elements += 2 * attn_logits.numel()
        if pending_elements >= EVAL_GATHER_ELEMENTS:
            gather()
    gather()
    loss, probs_h = math.nan, np.zeros((0, n_classes))
    if ids:
        loss = float(np.mean(torch.stack(losses).cpu().numpy().astype(np.float64)))
        probs_h = torch.stack(probs).cpu().numpy()
    return EvalResult(
        slide_ids=ids,
        labels=np.array(labels, dtype=np.int64),
        probs=probs_h,
        loss=loss,
        attention=attention,
        maps=store,
        summaries=summaries,
        n_positive={s: None if t is None else int(t.sum()) for s, t in zip(ids, truths)},
    )


def gradient_split(trainer: Trainer, bags: Sequence[Bag] | BagSource) -> dict[str, float]:
    """How much the anchor pulls: ||grad beta L_AS|| / ||grad CE|| over the model's parameters,
    and the anchor target's effective tile fraction, on up to ``GRADIENT_PROBE_BAGS`` training
    bags in eval mode (no dropout, every token: no random numbers drawn, so training is unchanged).

    A ratio near zero means the stabilisation term cannot move the model whatever beta says (the
    target equals the online attention where attention is flat); NaN without an anchor.
    """
    if trainer.anchor is None:
        return {"grad_ratio": math.nan, "target_effective_fraction": math.nan}
    model, loss_fn = trainer.model, trainer.loss_fn
    params = [p for p in model.parameters() if p.requires_grad]
    ratios, fractions = [], []
    model.eval()
    for bag in ordered(bags, range(min(GRADIENT_PROBE_BAGS, len(bags)))):
        x = bag.features.float()
        out = model(x)
        anchor_logits = trainer.anchor.attention_logits(x)
        losses = loss_fn(out["logits"], bag.target, out["attn_logits"], anchor_logits)
        norms = []
        for term, retain in ((losses["ce"], True), (loss_fn.beta * losses["as"], False)):
            grads = torch.autograd.grad(term, params, retain_graph=retain, allow_unused=True)
            norms.append(torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)))
        ratios.append(norms[1] / norms[0].clamp_min(1e-30))
        target = target_distribution(anchor_logits, loss_fn.tau, loss_fn.target).flatten(0, 1)
        fractions.append(torch.exp(-torch.xlogy(target, target).sum(-1)).mean() / target.shape[-1])
    model.train()
    ratio, fraction = torch.stack(ratios).mean().item(), torch.stack(fractions).mean().item()
    return {"grad_ratio": ratio, "target_effective_fraction": fraction}


def selection_score(val: Mapping[str, float]) -> float:
    """val macro F1 + val AUC; an undefined term (e.g. a single-class val set) counts as 0."""
    return sum(0.0 if math.isnan(val[k]) else val[k] for k in ("f1_macro", "auc"))


@dataclass
class Snapshot:
    """Everything reported about one epoch, so the selected epoch needs no re-evaluation.

    Without the per-map attention (``EvalResult.maps``): only the next epoch's instability needs
    it, and kept here it would hold R maps per val and test slide twice more for the whole run.
    """

    epoch: int
    state: dict[str, torch.Tensor]
    val: EvalResult
    test: EvalResult
    score: float


@dataclass
class RunResult:
    history: pd.DataFrame
    best: Snapshot
    last: Snapshot


def run_epochs(trainer: Trainer, data: FoldData, label: str) -> RunResult:
    """Train every epoch; evaluate val and test, track the instability and the selected epoch.

    Test slides are evaluated every epoch only because their attention enters the instability
    curve; only the snapshot chosen on validation (and the last one) is ever reported.
    """
    epochs = int(trainer.params["epochs"])
    if epochs < 1:
        raise ValueError("epochs must be >= 1")
    n_classes = len(data.classes)
    rows: list[dict[str, float]] = []
    previous: tuple[MapStore, dict[str, np.ndarray]] | None = None
    best: Snapshot | None = None
    scratch = maps_scratch(data)
    bar = tqdm(range(1, epochs + 1), desc=label, disable=None)
    for epoch in bar:
        lr = float(trainer.scheduler.get_last_lr()[0])
        stats = train_one_epoch(trainer, data.bags["train"], desc=f"epoch {epoch}")
        maps = MapStore(None if scratch is None else Path(scratch.name) / f"epoch{epoch}")
        val = evaluate(trainer.model, data.bags["val"], n_classes, trainer.autocast, maps)
        test = evaluate(trainer.model, data.bags["test"], n_classes, trainer.autocast, maps)
        pooled = {**val.attention, **test.attention}
        jsd = jsd_pooled = math.nan
        if previous is not None:
            jsd, jsd_pooled = mean_jsd(previous[0], maps), mean_jsd(previous[1], pooled)
            previous[0].discard()
        previous = (maps, pooled)
        vm = val.metrics()
        rows.append({
            "epoch": epoch, "lr": lr, "train_loss": stats["loss"], "train_ce": stats["ce"],
            "train_as": stats["as"], "train_aux": stats["aux"], "val_loss": vm["loss"],
            "val_acc": vm["acc"],
            "val_f1_macro": vm["f1_macro"], "val_auc": vm["auc"], "jsd": jsd, "jsd_pooled": jsd_pooled,
            **mean_summaries({**val.summaries, **test.summaries}),
            **gradient_split(trainer, data.bags["train"]),
        })
        logger.info(
            "%s epoch %d/%d lr %.3g loss %.4f (ce %.4f as %.4f) val loss %.4f acc %.3f f1 %.3f auc %.3f "
            "jsd %.4g effective tiles %.3f top %.2fx uniform grad ratio %.3g", label, epoch, epochs, lr,
            stats["loss"], stats["ce"], stats["as"], vm["loss"], vm["acc"], vm["f1_macro"], vm["auc"], jsd,
            rows[-1].get("effective_fraction", math.nan), rows[-1].get("top_ratio", math.nan),
            rows[-1]["grad_ratio"],
        )
        bar.set_postfix(loss=f"{stats['loss']:.3f}", val_f1=f"{vm['f1_macro']:.3f}")
        score = selection_score(vm)
        is_best = bool(data.bags["val"]) and (best is None or score > best.score)
        if is_best or epoch == epochs:
            state = {k: v.detach().cpu().clone() for k, v in trainer.model.state_dict().items()}
            snapshot = Snapshot(epoch, state, replace(val, maps={}), replace(test, maps={}), score)
            best = snapshot if is_best else best
    if scratch is not None:
        scratch.cleanup()
    if best is None:
        logger.warning("%s: no validation slides, selecting the last epoch", label)
        best = snapshot
    return RunResult(pd.DataFrame(rows), best, snapshot)


def maps_scratch(data: FoldData) -> tempfile.TemporaryDirectory | None:
    """A scratch folder (under $TMPDIR, node-local on most clusters) for the epochs' attention
    maps when the fold streams its features from disk; None keeps them in memory."""
    if data.source is None or data.source.get("mode") != "stream":
        return None
    return tempfile.TemporaryDirectory(prefix="wsi-asmil-attention-maps-")


# --- outputs ---------------------------------------------------------------------------------------


def plot_curves(history: pd.DataFrame, selected_epoch: int, path: Path, title: str) -> None:
    """Loss, validation metrics and attention instability against epoch, selected epoch marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    panels = [
        ("loss", ["train_loss", "train_ce", "train_as", "train_aux", "val_loss"]),
        ("validation", ["val_acc", "val_f1_macro", "val_auc"]),
        ("attention instability (JSD, nats)", ["jsd", "jsd_pooled"]),
        ("attention (val + test)", ["effective_fraction", "positive_mass", "instance_auc", "grad_ratio"]),
    ]
    for ax, (name, columns) in zip(axes, panels):
        for column in columns:
            ax.plot(history["epoch"], history[column], marker=".", label=column)
        ax.axvline(selected_epoch, color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def predictions_frame(result: EvalResult, classes: Sequence[str]) -> pd.DataFrame:
    """One row per test slide: class names for label and prediction, one probability per class."""
    frame = pd.DataFrame({
        "slide_id": result.slide_ids,
        "label": [classes[i] for i in result.labels],
        "pred": [classes[i] for i in result.probs.argmax(axis=1)],
    })
    for c, name in enumerate(classes):
        frame[f"prob_{name}"] = result.probs[:, c]
    frame["split"] = "test"
    return frame


def instability_summary(history: pd.DataFrame, peak_lr: float) -> dict[str, float]:
    """The per-map JSD over the last 10 epochs (the paper's window) and over the epochs trained at
    a high rate (at least ``HIGH_LR_SHARE`` of the peak), and the pooled map's JSD for comparison.

    Under a cosine schedule the last 10 epochs run at a rate near 0, where every model's attention
    stops moving; instability is a property of the high-rate epochs.
    """
    high = history[history["lr"] >= HIGH_LR_SHARE * peak_lr]
    return {
        "instability_last10": last_mean(history["jsd"].tolist(), 10),
        "instability_high_lr": last_mean(high["jsd"].tolist(), len(high)),
        "instability_pooled_last10": last_mean(history["jsd_pooled"].tolist(), 10),
        "grad_ratio_high_lr": last_mean(high["grad_ratio"].tolist(), len(high)),
    }


def attention_frame(result: EvalResult, data: FoldData) -> pd.DataFrame:
    """One row per test slide at the selected epoch: its attention summary, tiles and positives."""
    rows = []
    for slide_id, label in zip(result.slide_ids, result.labels):
        positives = result.n_positive.get(slide_id)
        rows.append({
            "slide_id": slide_id, "label": data.classes[label],
            "n_tiles": len(result.attention[slide_id]),
            "n_positive": math.nan if positives is None else positives,
            **result.summaries[slide_id],
        })
    return pd.DataFrame(rows)


def write_outputs(
    out: Path,
    run: RunResult,
    data: FoldData,
    model_name: str,
    fold: int,
    params: dict[str, Any],
    anchor: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Every artefact of the fold, each written atomically; returns the metrics.json content."""
    meta = {
        "model_name": model_name,
        "model_kwargs": split_model_params(params["models"][model_name])[0],
        "classes": data.classes,
        "in_dim": data.in_dim,
        "params": params,
    }
    save_checkpoint(out / "model.pt", run.best.state, epoch=run.best.epoch, **meta)
    save_checkpoint(out / "last.pt", run.last.state, epoch=run.last.epoch, **meta)
    history = run.history
    write_csv(out / "history.csv", history)
    n_slides = len(data.bags["val"]) + len(data.bags["test"])
    instability = pd.DataFrame(
        {"epoch": history["epoch"], "jsd": history["jsd"], "n_slides": n_slides}
    )
    write_csv(out / "instability.csv", instability)
    write_csv(out / "predictions.csv", predictions_frame(run.best.test, data.classes))
    write_csv(out / "attention.csv", attention_frame(run.best.test, data))
    test_attention = run.best.test.attention_means()
    uniform = bool(test_attention) and is_practically_uniform(test_attention)
    metrics = {
        "model": model_name,
        "fold": fold,
        "seed": int(params["seed"]),
        "selected_epoch": run.best.epoch,
        "last_epoch": run.last.epoch,
        "test": run.best.test.metrics(),
        "test_last": run.last.test.metrics(),
        "val": run.best.val.metrics(),
        **instability_summary(history, float(params["lr"])),
        "attention": {**test_attention, "practically_uniform": uniform},
        "anchor": dict(anchor or {}),
        "skipped_empty_slides": data.skipped,
        # how the features were held, not the bytes "auto" found free: those vary run to run (the log has them)
        "features_source": {k: v for k, v in (data.source or {}).items() if k in ("mode", "budget", "feature_bytes")},
    }
    write_json(out / "metrics.json", metrics)
    plot_curves(history, run.best.epoch, out / "curves.png", f"{model_name} fold {fold}")
    return metrics


def train_fold(
    features_dir: str | os.PathLike[str],
    split: str | os.PathLike[str] | Mapping[str, Any],
    fold: int,
    model_name: str,
    params: Mapping[str, Any] | None,
    out_dir: str | os.PathLike[str],
    device: str = "auto",
    tile_truth: Mapping[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Train ``model_name`` on fold ``fold`` and write model.pt, last.pt, history.csv,
    instability.csv, attention.csv, predictions.csv, metrics.json and curves.png into ``out_dir``.

    ``tile_truth`` (slide id -> per-tile positives) feeds the attention metrics only; stores that
    carry their own truth need none. Returns the content of metrics.json (NaN where it has null).
    """
    model_spec(model_name)
    resolved = resolve_params(params)
    dev = resolve_device(device)
    data = load_fold(features_dir, split, fold, dev, tile_truth=tile_truth, memory_budget=resolved["memory_budget"])
    logger.info(
        "fold %d, %s on %s: %d train, %d val, %d test slides (%d empty skipped)",
        fold, model_name, dev, *(len(data.bags[p]) for p in SPLIT_PARTS), len(data.skipped),
    )
    trainer = build_trainer(model_name, data, resolved, dev)
    anchor = None
    if trainer.anchor is not None:
        steps = len(data.bags["train"])
        anchor = {"mode": trainer.anchor.mode, "momentum": trainer.anchor.momentum,
                  "horizon_epochs": horizon_epochs(trainer.anchor.momentum, steps), "steps_per_epoch": steps}
        logger.info("anchor %s, momentum %.6g: horizon %.3g epochs of %d steps", anchor["mode"],
                    anchor["momentum"], anchor["horizon_epochs"], steps)
    run = run_epochs(trainer, data, f"{model_name} fold {fold}")
    metrics = write_outputs(Path(out_dir), run, data, model_name, fold, resolved, anchor)
    test = metrics["test"]
    logger.info(
        "selected epoch %d: test acc %.3f macro F1 %.3f AUC %.3f",
        run.best.epoch, test["acc"], test["f1_macro"], test["auc"],
    )
    return metrics


# --- command line ----------------------------------------------------------------------------------


def _parse_params(text: str) -> dict[str, Any]:
    """``--params`` is a JSON file path or a JSON object literal (what Snakemake passes)."""
    if not text.lstrip().startswith("{") and Path(text).is_file():
        text = Path(text).read_text()
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError("--params must be a JSON object")
    return value


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m wsi_asmil.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--features-dir", required=True, help="folder of <slide_id>.zarr stores")
    parser.add_argument("--split", required=True, help="split JSON (classes, labels, folds)")
    parser.add_argument("--fold", type=int, required=True)
    parser.add_argument("--model", required=True, choices=sorted(MODELS))
    parser.add_argument("--params", default="{}", help="training params: JSON file or string")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "--memory-budget", help="train.memory_budget, overriding --params (speed only: auto, bytes, '8GiB')"
    )
    args = parser.parse_args(argv)
    setup_logging()
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm():
        try:
            params = _parse_params(args.params)
            if args.memory_budget is not None:
                params["memory_budget"] = args.memory_budget
            train_fold(args.features_dir, args.split, args.fold, args.model, params, args.out_dir, args.device)
        except BagMemoryError as exc:  # the message says what to change; no CUDA traceback
            logger.error("%s", exc)
            raise SystemExit(1) from None


if __name__ == "__main__":
    main()
