"""Config sections as command-line options: the one translation from config.yaml to a stage's CLI.

Rules pass these strings as ``params``, so Snakemake re-runs a job exactly when a setting it reads
changes. Every stage's ``main()`` names its options after the config keys (``tile_size`` is
``--tile-size``; a boolean ``exclude_pen`` is ``--exclude-pen`` / ``--no-exclude-pen``), so one rule
covers them all; ``None`` means "the stage's default" and passes no option.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Collection, Mapping
from typing import Any


def options(section: Mapping[str, Any], *, only: Collection[str] | None = None, exclude: Collection[str] = ()) -> str:
    """``section`` (keys in its order) as shell-quoted ``--key value`` options."""
    args: list[str] = []
    for key, value in section.items():
        if key in exclude or (only is not None and key not in only) or value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, (list, tuple)):
            args += [flag, *map(str, value)]
        elif isinstance(value, Mapping):
            raise TypeError(f"config key '{key}' is a mapping; pass it as JSON (see train_params)")
        else:
            args += [flag, str(value)]
    return shlex.join(args)


def mpp_options(slide_id: str | None, overrides: Mapping[str, float], fallback: float | None) -> str:
    """A slide's mpp from the label table (``--slide-mpp``) and config ``mpp_fallback``; ``slide_id``
    None for jobs that see no label table (the inventories, a prediction folder's slides)."""
    args: list[str] = []
    if slide_id is not None and slide_id in overrides:
        args += ["--slide-mpp", str(overrides[slide_id])]
    if fallback is not None:
        args += ["--mpp-fallback", str(fallback)]
    return shlex.join(args)


#: Train keys that are not training parameters: the model list, and settings that change where or how
#: fast training runs, never its results (their own options, so editing them re-runs nothing).
NOT_TRAIN_PARAMS = ("models", "device", "threads", "memory_budget")


def train_params(train: Mapping[str, Any], model: str, skip: Collection[str] = NOT_TRAIN_PARAMS) -> str:
    """The train section for one model's jobs, as the JSON ``wsi_asmil.mil.train --params`` reads.

    Only that model's own section is kept (the per-model sections are the section's mappings), so
    editing another model's hyper-parameters does not retrain this one.
    """
    models = {k for k, v in train.items() if isinstance(v, Mapping)}
    params = {k: v for k, v in train.items() if k not in skip and k not in models}
    params["models"] = {model: train[model]}
    return json.dumps(params, sort_keys=True)
