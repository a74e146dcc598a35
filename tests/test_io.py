"""Outputs other tools read: strict JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from wsi_asmil.core.io import write_json


def _no_constants(name: str) -> None:
    raise ValueError(f"not strict JSON: {name}")


def test_non_finite_numbers_are_written_as_null(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    write_json(path, {"auc": math.nan, "folds": [0.5, math.inf, (-math.inf, 1.0)], "nested": {"f1": float("nan")}, "n": 3})
    data = json.loads(path.read_text(), parse_constant=_no_constants)
    assert data == {"auc": None, "folds": [0.5, None, [None, 1.0]], "nested": {"f1": None}, "n": 3}


@given(st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=20,
))
def test_any_value_reads_back_strictly_with_finite_numbers_kept(value: object) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "v.json"
        write_json(path, value)
        back = json.loads(path.read_text(), parse_constant=_no_constants)

    def same(a: object, b: object) -> bool:
        if isinstance(a, float) and not math.isfinite(a):
            return b is None
        if isinstance(a, dict):
            return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if isinstance(a, list):
            return isinstance(b, list) and len(a) == len(b) and all(map(same, a, b))
        return a == b

    assert same(value, back)


def test_numpy_values_are_refused_rather_than_guessed(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        write_json(tmp_path / "x.json", {"x": np.float32(1.0)})
    assert not list(tmp_path.iterdir())  # nothing half-written
