"""Checkpoints in the features' precision (float16) when, and only when, scoring cannot tell.

Features are stored as float16, so the inputs a model scores carry about three significant digits.
A checkpoint's weight matrices in float16 halve its size (ASMIL's 8 private attention modules at
inner_dim 640 are 60 MB in float32). Whether that is exact enough is measured on the fold's own
bags, not assumed: the model is run with its float32 weights and with the float16-rounded ones on
up to :data:`CHECK_BAGS` validation and test bags, and float16 is kept only if

* every slide probability moves by at most :data:`MAX_PROB_DIFF` (0.001), and
* every tile's attention score moves by at most :data:`MAX_ATTENTION_DIFF` (1 %) of the larger of
  its own weight and the uniform weight 1 / M: heatmaps colour the weight relative to uniform on a
  log scale, where 1 % is far below a colour step.

Otherwise the checkpoint stays float32. Only floating tensors of at least :data:`MIN_NUMEL`
elements are rounded: the standardisation statistics, biases and tokens stay float32, as they cost
nothing and set the scale of everything after them. Loading casts back to the model's float32
parameters (``load_state_dict`` copies across dtypes), so nothing downstream changes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from wsi_asmil.mil.bag_source import Bag, BagSource, ordered
from wsi_asmil.mil.models import MILModel

CHECK_BAGS = 8
MAX_PROB_DIFF = 1e-3
MAX_ATTENTION_DIFF = 1e-2
MIN_NUMEL = 1024


def rounded(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state with its large floating tensors in float16 (what the checkpoint would hold)."""
    return {
        k: v.to(torch.float16) if v.is_floating_point() and v.numel() >= MIN_NUMEL else v
        for k, v in state.items()
    }


@torch.no_grad()
def _scores(model: MILModel, bags: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    with model.evaluating():
        return [(torch.softmax(model(x)["logits"].float(), -1), model.attention_scores(x).float()) for x in bags]


def float16_differences(
    model: MILModel, state: Mapping[str, torch.Tensor], bags: Sequence[Bag] | BagSource
) -> dict[str, float]:
    """Largest change of a slide probability, and of a tile's attention relative to the larger of its
    weight and 1 / M, when ``state``'s weights are rounded to float16; on the first
    :data:`CHECK_BAGS` of ``bags``."""
    xs = [b.features.float() for b in ordered(bags, range(min(CHECK_BAGS, len(bags))))]
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    try:
        model.load_state_dict(state)
        exact = _scores(model, xs)
        model.load_state_dict(rounded(state))
        half = _scores(model, xs)
    finally:
        model.load_state_dict(original)
    prob = max((float((a[0] - b[0]).abs().max()) for a, b in zip(exact, half)), default=0.0)
    attention = max(
        (float(((a[1] - b[1]).abs() / a[1].clamp_min(1.0 / a[1].numel())).max()) for a, b in zip(exact, half)
         if a[1].numel()),
        default=0.0,
    )
    return {"max_prob_diff": prob, "max_attention_rel_diff": attention}


def checkpoint_state(
    model: MILModel, state: Mapping[str, torch.Tensor], bags: Sequence[Bag] | BagSource
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state to save, and the check's record (dtype and measured differences) for metrics.json."""
    diff = float16_differences(model, state, bags) if len(bags) else None
    ok = (diff is not None and diff["max_prob_diff"] <= MAX_PROB_DIFF
          and diff["max_attention_rel_diff"] <= MAX_ATTENTION_DIFF)
    record = {"dtype": "float16" if ok else "float32", "checked_bags": min(CHECK_BAGS, len(bags)), **(diff or {})}
    return (rounded(state) if ok else dict(state)), record
