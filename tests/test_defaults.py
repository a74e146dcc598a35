"""Every default is written once, in the code that uses it; config.yaml and the schema must agree.

config.yaml is what users read and the schema fills in what they leave out, so each must state the
same value as the dataclass or constructor that applies it. A default changed in one place only
fails here, naming the key.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import yaml

from wsi_asmil.features.tile import TileParams
from wsi_asmil.maps.heatmap import Style
from wsi_asmil.maps.localisation import LocalisationParams
from wsi_asmil.mil.models import MODELS, model_defaults
from wsi_asmil.mil.params import DEFAULT_PARAMS
from wsi_asmil.tissue.segment import SegmentParams

REPO = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((REPO / "config.yaml").read_text())
SCHEMA = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())


def schema_default(path: str) -> Any:
    node = SCHEMA
    for key in path.split("."):
        node = node["properties"][key]
    return node["default"]


def config_value(path: str) -> Any:
    node = CONFIG
    for key in path.split("."):
        node = node[key]
    return node


def plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def owned_defaults() -> list[tuple[str, Any]]:
    """(config key, the default in the code that applies it) for every key a Python object owns."""
    owners = {
        "segment": asdict(SegmentParams()),
        "tiling": asdict(TileParams()),
        "heatmap.localisation": asdict(LocalisationParams()),
        "heatmap": asdict(Style()),
        "train": {k: v for k, v in DEFAULT_PARAMS.items() if k != "models"},
        **{f"train.{name}": model_defaults(name) for name in MODELS},
    }
    return [(f"{section}.{key}", plain(value)) for section, values in owners.items() for key, value in values.items()]


@pytest.mark.parametrize("key,default", owned_defaults(), ids=[k for k, _ in owned_defaults()])
def test_config_yaml_and_schema_state_the_code_default(key: str, default: Any) -> None:
    assert config_value(key) == default, f"config.yaml {key}"
    assert schema_default(key) == default, f"schema default of {key}"


def test_trainer_defaults_are_the_model_constructors() -> None:
    import inspect

    from wsi_asmil.mil.models import ANCHOR_DEFAULTS
    from wsi_asmil.mil.models.ema import Anchor

    assert set(DEFAULT_PARAMS["models"]) == set(MODELS)
    for name, spec in MODELS.items():
        signature = inspect.signature(spec.builder).parameters
        defaults = DEFAULT_PARAMS["models"][name]
        for key, param in signature.items():
            if key not in ("in_dim", "n_classes"):
                assert defaults[key] == param.default, (name, key)
        assert (set(ANCHOR_DEFAULTS) <= set(defaults)) == spec.anchored, name
    assert ANCHOR_DEFAULTS["anchor_momentum"] == inspect.signature(Anchor).parameters["momentum"].default
