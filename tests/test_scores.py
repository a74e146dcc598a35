"""The scores file pair: one writer, one strict reader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from wsi_asmil.maps.scores import ScoresFormatError, read_meta, read_scores, scores_paths, slide_id_of
from wsi_asmil.synthetic.scores import write_synthetic_scores


def test_round_trip_and_names(tmp_path: Path) -> None:
    coords = np.array([[0, 0], [448, 0], [0, 448]])
    write_synthetic_scores(tmp_path, "slide 1", coords, [0.5, 0.25, 0.25], 448.0)
    csv, js = scores_paths(tmp_path, "slide 1")
    assert (csv.name, js.name) == ("slide 1_scores.csv", "slide 1_scores.json")
    assert slide_id_of(js) == slide_id_of(csv) == "slide 1"
    s = read_scores(js)
    np.testing.assert_array_equal(s.coords, coords)
    np.testing.assert_allclose(s.scores, [0.5, 0.25, 0.25])
    assert s.slide_id == "slide 1" and s.tile_extent == 448.0 and s.meta["pred"] == "tumour"


def test_a_missing_field_is_an_error_naming_the_file(tmp_path: Path) -> None:
    write_synthetic_scores(tmp_path, "s", np.zeros((1, 2)), [1.0], 100.0)
    js = scores_paths(tmp_path, "s")[1]
    record = json.loads(js.read_text())
    del record["tile_extent"]
    js.write_text(json.dumps(record))
    with pytest.raises(ScoresFormatError, match=r"s_scores\.json: lacks tile_extent"):
        read_meta(js)


def test_the_table_must_match_its_record(tmp_path: Path) -> None:
    write_synthetic_scores(tmp_path, "s", np.zeros((2, 2)), [0.5, 0.5], 100.0, n_tiles=3)
    with pytest.raises(ScoresFormatError, match="2 tiles, but"):
        read_scores(scores_paths(tmp_path, "s")[1])
    scores_paths(tmp_path, "s")[0].unlink()
    with pytest.raises(ScoresFormatError, match="scores table missing"):
        read_scores(scores_paths(tmp_path, "s")[1])
    with pytest.raises(ScoresFormatError, match="not a scores file"):
        slide_id_of(tmp_path / "s.json")


def test_an_incomplete_record_is_never_written(tmp_path: Path) -> None:
    import pandas as pd

    from wsi_asmil.maps.scores import write_scores

    with pytest.raises(ScoresFormatError, match="lacks"):
        write_scores(tmp_path, pd.DataFrame({"x": [], "y": [], "score": []}), {"slide_id": "s"})
    assert not list(tmp_path.iterdir())
