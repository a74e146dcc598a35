"""Evaluation passes: probabilities, the slide loss and every attention map of each slide, and the
gradient probe that measures how hard the anchor pulls."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from wsi_asmil.core.memory import oom_guard
from wsi_asmil.mil.bag_source import (
    Bag,
    BagSource,
    ordered,
)
from wsi_asmil.mil.map_store import MapStore
from wsi_asmil.mil.metrics import (
    attention_summary,
    classification_metrics,
    summarize,
)
from wsi_asmil.mil.models import (
    MILModel,
    target_distribution,
)
from wsi_asmil.mil.trainer import AutocastFactory, Trainer

#: Slides whose gradients are split into the classification and the stabilisation part each epoch.
GRADIENT_PROBE_BAGS = 4


_EVAL_ADVICE = (
    "Evaluation uses every tile of a bag (train.max_tiles only caps training): set train.device: cpu "
    "(host memory is usually larger), or free the GPU (another process may hold it)"
)


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
    if not trainer.stabilising:  # the anchor's warm-up: L_AS is not in the loss yet
        return {"grad_ratio": 0.0, "target_effective_fraction": math.nan}
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
