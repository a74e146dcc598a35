"""MIL models (ASMIL, ABMIL, ABMIL + anchor, ACMIL, TransMIL), anchor, NSF, loss and the model registry."""

from wsi_asmil.mil.models.abmil import ABMIL
from wsi_asmil.mil.models.asmil import ASMIL, select_tokens
from wsi_asmil.mil.models.attention import MultiHeadCrossAttention
from wsi_asmil.mil.models.base import MILModel
from wsi_asmil.mil.models.ema import ANCHOR_MODES, Anchor
from wsi_asmil.mil.models.loss import AS_REDUCTIONS, MILLoss, stabilization_loss, target_distribution
from wsi_asmil.mil.models.nsf import nsf
from wsi_asmil.mil.models.registry import (
    ANCHOR_DEFAULTS,
    MODELS,
    build_model,
    load_model,
    model_defaults,
    model_spec,
    save_checkpoint,
)
from wsi_asmil.mil.models.transmil import TransMIL

__all__ = [
    "ABMIL",
    "ANCHOR_DEFAULTS",
    "ANCHOR_MODES",
    "AS_REDUCTIONS",
    "ASMIL",
    "MILLoss",
    "MILModel",
    "MODELS",
    "Anchor",
    "MultiHeadCrossAttention",
    "TransMIL",
    "build_model",
    "load_model",
    "model_defaults",
    "model_spec",
    "nsf",
    "save_checkpoint",
    "select_tokens",
    "stabilization_loss",
    "target_distribution",
]
