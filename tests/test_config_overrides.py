"""Command-line config values typed by the schema (wsi_asmil.pipeline.config_overrides)."""

from __future__ import annotations

from pathlib import Path

from wsi_asmil.pipeline.config_overrides import coerce_to_schema

SCHEMA = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"


def test_strings_become_what_the_schema_wants_and_nothing_else() -> None:
    config = {
        "tiling": {"tile_size": "256", "overlap": "0.5", "min_tissue_fraction": ".25"},
        "train": {"amp": "true", "max_tiles": "null", "grad_clip": "5", "models": ["asmil"], "device": "cuda:1",
                  "asmil": {"beta": "0", "anchor_mode": "ema", "inner_dim": "64"}},
        "features": {"batch_size": "auto", "encoder": "123", "threads": "many"},
        "heatmap": {"fold": "1", "localisation": {"top_k": ["5", "10"]}},
        "predict": {"fold": "ensemble"},
        "bogus": "1",
    }
    coerce_to_schema(config, SCHEMA)
    assert config["tiling"] == {"tile_size": 256, "overlap": 0.5, "min_tissue_fraction": 0.25}
    train = config["train"]
    assert train["amp"] is True and train["max_tiles"] is None and train["grad_clip"] == 5
    assert train["asmil"] == {"beta": 0, "anchor_mode": "ema", "inner_dim": 64} and train["device"] == "cuda:1"
    assert config["features"]["encoder"] == "123"  # the schema wants a string: kept
    assert config["features"]["threads"] == "many"  # not a number: left for validation to name
    assert config["features"]["batch_size"] == "auto"
    assert config["heatmap"]["localisation"]["top_k"] == [5, 10] and config["heatmap"]["fold"] == 1
    assert config["predict"]["fold"] == "ensemble"
    assert config["bogus"] == "1"  # unknown keys are validation's to refuse
