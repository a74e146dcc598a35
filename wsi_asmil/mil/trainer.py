"""The optimisation protocol (spec section 6): AdamW, cosine decay per step to zero without warm-up,
global-norm gradient clipping, one bag per step, everything seeded; the EMA anchor updated after
each step."""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from wsi_asmil.core.devices import to_device
from wsi_asmil.core.memory import oom_guard
from wsi_asmil.mil.bag_source import (
    Bag,
    BagSource,
    feature_sums,
    ordered,
)
from wsi_asmil.mil.fold_data import FoldData
from wsi_asmil.mil.models import (
    Anchor,
    MILLoss,
    MILModel,
    build_model,
    model_spec,
)
from wsi_asmil.mil.params import split_model_params

SCHEDULES = ("cosine", "constant")


AutocastFactory = Callable[[], contextlib.AbstractContextManager[Any]]


def _train_advice(max_tiles: int | None) -> str:
    cap = f"lower train.max_tiles (now {max_tiles})" if max_tiles else "set train.max_tiles (for example 8000)"
    return (
        f"To fit, {cap}: training then uses a random subset of that many tiles per bag and step; "
        "or set train.device: cpu (slower, host memory); or free the GPU (another process may hold it)"
    )


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
    #: Epochs trained on the slide CE alone before L_AS joins, and whether it has joined.
    warmup_epochs: int = 0
    stabilising: bool = True

    def begin_epoch(self, epoch: int) -> None:
        """Switch L_AS on from epoch ``warmup_epochs + 1`` (epochs count from 1). The anchor follows
        the online model through the warm-up, so when the term joins its target is the attention
        the model has grown, not the uniform attention it started with."""
        self.stabilising = self.anchor is not None and epoch > self.warmup_epochs


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
    anchor, loss_fn, warmup = None, MILLoss(), 0
    if model_spec(model_name).anchored and float(anchor_cfg["beta"]) > 0:
        warmup = int(anchor_cfg.get("anchor_warmup_epochs") or 0)
        if warmup < 0:
            raise ValueError(f"anchor_warmup_epochs must be >= 0, got {warmup}")
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
        params, autocast_factory(device, bool(params["amp"])), warmup, anchor is not None and warmup == 0,
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
    (:class:`~wsi_asmil.mil.bag_source.StreamingBags`): the order is drawn first, as before, so the
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
                anchor_logits = t.anchor.attention_logits(x) if t.stabilising else None
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
