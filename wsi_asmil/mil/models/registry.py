"""Model factory and inference checkpoints: the single place that maps names to architectures."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from wsi_asmil.core.io import atomic_path
from wsi_asmil.mil.models.abmil import ABMIL
from wsi_asmil.mil.models.acmil import ACMIL
from wsi_asmil.mil.models.asmil import ASMIL
from wsi_asmil.mil.models.base import MILModel
from wsi_asmil.mil.models.ema import Anchor
from wsi_asmil.mil.models.loss import MILLoss
from wsi_asmil.mil.models.transmil import TransMIL


@dataclass(frozen=True)
class ModelSpec:
    """How to build a model and whether training pairs it with an anchor and the NSF loss."""

    builder: Callable[..., MILModel]
    anchored: bool
    #: Anchor and L_AS defaults of this model that differ from the paper's (ANCHOR_DEFAULTS).
    anchor_overrides: Mapping[str, Any] = field(default_factory=dict)
    #: The model's own learning rate, where it differs from train.lr (a key ``lr`` of its section).
    lr: float | None = None


MODELS: dict[str, ModelSpec] = {
    "asmil": ModelSpec(ASMIL, anchored=True),
    # ASMIL whose tokens read their attention-pooled tiles with linear heads (docs/model.md: why).
    "asmil_linear": ModelSpec(partial(ASMIL, readout="linear"), anchored=True),
    # ASMIL repaired (docs/model.md, the mechanism): the linear readout, tokens that start apart,
    # and the anchor's L_AS at a tenth of the paper's weight; FEAT tokens with their own attention,
    # token dropout, the EMA anchor and its NSF target as the paper's.
    # Its own lr: at the paper's 1e-4 its attention grows too slowly (docs/model.md, the claims).
    "asmil_repaired": ModelSpec(partial(ASMIL, readout="linear", token_std=1.0), anchored=True,
                                anchor_overrides={"beta": 0.1}, lr=1e-3),
    "acmil": ModelSpec(ACMIL, anchored=False),
    "abmil": ModelSpec(ABMIL, anchored=False),
    # The "Anchor + NSF" plug-in (spec section 8): same network as ABMIL, trained with the anchor.
    "abmil_anchor": ModelSpec(ABMIL, anchored=True),
    "transmil": ModelSpec(TransMIL, anchored=False),
}


def keyword_defaults(fn: Callable[..., Any], skip: Sequence[str] = ()) -> dict[str, Any]:
    """A constructor's keyword defaults: the one place each hyper-parameter's default is written."""
    return {
        k: p.default for k, p in inspect.signature(fn).parameters.items()
        if p.default is not inspect.Parameter.empty and k not in skip
    }


def _anchor_defaults() -> dict[str, Any]:
    anchor, loss = keyword_defaults(Anchor), keyword_defaults(MILLoss)
    return {
        "anchor_mode": anchor["mode"],
        "anchor_momentum": anchor["momentum"],
        # The EMA horizon in epochs instead of m: m = 1 - 1 / (horizon x steps per epoch); None keeps m.
        "anchor_horizon_epochs": None,
        # Epochs trained on the slide CE alone before L_AS joins; the anchor follows all along.
        "anchor_warmup_epochs": 0,
        "tau": loss["tau"],
        "beta": loss["beta"],
        "as_reduction": loss["reduction"],
        "target": loss["target"],
    }


#: The anchor and L_AS settings an anchored model trains with (not architecture: not in checkpoints).
ANCHOR_DEFAULTS: dict[str, Any] = _anchor_defaults()


def model_defaults(name: str) -> dict[str, Any]:
    """Every hyper-parameter of model ``name`` with its default, read from its constructor (and the
    anchor's and loss's, for anchored models), as timm keeps a model's config beside its class."""
    spec = model_spec(name)
    anchor = {**ANCHOR_DEFAULTS, **spec.anchor_overrides} if spec.anchored else {}
    return {**keyword_defaults(spec.builder), **anchor, **({"lr": spec.lr} if spec.lr is not None else {})}


def model_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}") from None


def build_model(name: str, in_dim: int, n_classes: int, **kwargs: Any) -> MILModel:
    """Instantiate model ``name``; ``kwargs`` are its architecture hyper-parameters only."""
    return model_spec(name).builder(in_dim, n_classes, **kwargs)


def save_checkpoint(
    path: str | os.PathLike[str],
    model: MILModel | Mapping[str, torch.Tensor],
    *,
    model_name: str,
    model_kwargs: Mapping[str, Any],
    classes: Sequence[str],
    in_dim: int,
    epoch: int,
    params: Mapping[str, Any],
) -> None:
    """Write an inference checkpoint atomically, holding only plain types and tensors.

    Plain contents keep it loadable with ``weights_only=True`` (no pickled code). ``model`` may be a
    module or an already-detached state dict (training keeps the best epoch's weights that way).
    """
    state = model.state_dict() if isinstance(model, torch.nn.Module) else model
    checkpoint = {
        "state_dict": {k: v.detach().cpu().clone() for k, v in state.items()},
        "model_name": model_name,
        "model_kwargs": dict(model_kwargs),
        "classes": list(classes),
        "in_dim": int(in_dim),
        "epoch": int(epoch),
        "params": dict(params),
    }
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)


def load_model(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> tuple[MILModel, dict[str, Any]]:
    """Rebuild the model of a checkpoint in eval mode; returns (model, checkpoint dict)."""
    checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    model = build_model(
        checkpoint["model_name"],
        checkpoint["in_dim"],
        len(checkpoint["classes"]),
        **checkpoint["model_kwargs"],
    )
    model.load_state_dict(checkpoint["state_dict"])
    return model.to(map_location).eval(), checkpoint
