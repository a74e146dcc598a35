"""One epoch's attention maps of the val and test slides, kept until the next epoch's instability.

The instability metric (PI) compares each slide's (R, M) maps with the previous epoch's, so one
epoch's maps must outlive it. They are small beside the features for one map per tile (ABMIL: 4
bytes against 2 KiB of float32 features), not for ASMIL's 64 token maps (256 bytes per tile): 3,000
val and test slides of 20,000 tiles hold 15 GB. A fold whose features stream from disk therefore
keeps them on disk as well, one ``.npy`` per slide in a scratch folder, read back one slide at a
time; a fold held in memory keeps them in memory (64 maps against 512-d features: an eighth of the
val and test features' bytes).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np


class MapStore(Mapping[str, np.ndarray]):
    """Slide id -> (R, M) float32 attention maps, in memory or (``folder``) as files there.

    Files are named by insertion order, not by slide id, so any slide id is safe on any file system.
    """

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = folder
        self._maps: dict[str, np.ndarray | Path] = {}
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=False)

    def put(self, slide_id: str, maps: np.ndarray) -> None:
        if self.folder is None:
            self._maps[slide_id] = maps
            return
        path = self.folder / f"{len(self._maps)}.npy"
        np.save(path, maps, allow_pickle=False)
        self._maps[slide_id] = path

    def __getitem__(self, slide_id: str) -> np.ndarray:
        value = self._maps[slide_id]
        return np.load(value, allow_pickle=False) if isinstance(value, Path) else value

    def __contains__(self, slide_id: object) -> bool:
        return slide_id in self._maps  # without reading the file

    def __iter__(self) -> Iterator[str]:
        return iter(self._maps)

    def __len__(self) -> int:
        return len(self._maps)

    @property
    def on_disk(self) -> bool:
        return self.folder is not None

    def discard(self) -> None:
        """Forget every map (and delete the folder): called once the next epoch has compared with them."""
        self._maps.clear()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
