"""Complete scores files for made-up attention, for the tests and benchmarks of the stages that
read scores (drawing, localisation, the viewer, the report) without training a model first."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from wsi_asmil.maps.scores import write_scores


def write_synthetic_scores(out_dir: str | Path, slide_id: str, coords: np.ndarray, scores: np.ndarray,
                           extent: float, **fields: Any) -> None:
    """A slide's scores as scoring writes them, with a two-class prediction; ``fields`` override the record."""
    coords = np.asarray(coords).reshape(-1, 2)
    record = {
        "slide_id": slide_id, "model": "asmil", "fold_mode": "test", "folds": [0], "classes": ["normal", "tumour"],
        "n_tiles": len(coords), "probs": {"normal": 0.3, "tumour": 0.7} if len(coords) else None,
        "pred": "tumour" if len(coords) else None, "probs_per_fold": None, "agreement": 1.0 if len(coords) else None,
        "tile_extent": float(extent), "target_mpp": 0.5, "tile_size": 224, "mpp": 0.25,
        "slide_dimensions": None, "overlap": 0.0, "encoder": "test", "weights": "random", **fields,
    }
    table = pd.DataFrame({"x": coords[:, 0], "y": coords[:, 1], "score": np.asarray(scores, dtype=np.float64)})
    write_scores(out_dir, table, record)
