"""Training hyper-parameters: the defaults every fold starts from, and their strict overlay.

Each model's own hyper-parameters come from its constructor, so a default is stated once.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from wsi_asmil.mil.models import (
    ANCHOR_DEFAULTS,
    MODELS,
    model_defaults,
)

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
    "keep_last": False,  # also keep the last epoch's checkpoint (last.pt); its metrics are always kept
    # Speed only, never results: bytes ("8GiB", "500MB", a number) the fold's features may take in
    # memory, else they stream from disk; "auto" = half the available host (or GPU) memory.
    "memory_budget": "auto",
    # Each model's hyper-parameters and defaults come from its constructor (wsi_asmil.mil.models).
    "models": {name: model_defaults(name) for name in MODELS},
}


ANCHOR_KEYS = tuple(ANCHOR_DEFAULTS)


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
    """Architecture kwargs (saved in the checkpoint) and anchor/loss settings (training only); a
    model's own ``lr`` is neither (:func:`for_model` applies it)."""
    arch = {k: v for k, v in model_params.items() if k not in ANCHOR_KEYS and k != "lr"}
    anchor = {k: v for k, v in model_params.items() if k in ANCHOR_KEYS}
    return arch, anchor


def for_model(resolved: Mapping[str, Any], model_name: str) -> dict[str, Any]:
    """The training parameters of one model: its section's ``lr``, where it has one that is set,
    replaces ``lr`` (everything downstream, the optimizer, the schedule and the instability's
    high-rate epochs, then reads the rate the model trained at)."""
    own = resolved["models"].get(model_name, {}).get("lr")
    return {**resolved, "lr": float(own)} if own is not None else dict(resolved)
