from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
from conftest import physical_pattern, write_generic_tiff

from wsi_asmil.mil.split import make_split
from wsi_asmil.slides.inventory import main, usable_ids


def test_inventory_lists_every_unusable_slide_with_its_reason(real_slide: Path, tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(real_slide, slides / "good one.svs")
    (slides / "empty.svs").write_bytes(b"")
    (slides / "not a slide.ndpi").write_text("hello\n" * 100)
    head = real_slide.read_bytes()[:4096]
    (slides / "truncated.svs").write_bytes(head)
    write_generic_tiff(slides / "no_mpp.tif", physical_pattern(300, 300, 0.5))
    write_generic_tiff(slides / "mpp_in_table.tif", physical_pattern(300, 300, 0.5))
    (slides / "notes.txt").write_text("not discovered")
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label,mpp\ngood one,a,\nmpp_in_table,b,0.5\n")
    out = tmp_path / "inventory.csv"
    main(["--slides-dir", str(slides), "--labels", str(labels), "--out", str(out)])
    table = pd.read_csv(out, keep_default_na=False).set_index("slide_id")
    assert sorted(table.index) == ["empty", "good one", "mpp_in_table", "no_mpp", "not a slide", "truncated"]
    assert usable_ids(out) == {"good one", "mpp_in_table"}
    assert table.loc["mpp_in_table", "mpp_source"] == "label-table"
    assert "empty (0 bytes)" in table.loc["empty", "message"]
    assert "not a slide" in table.loc["not a slide", "message"]
    assert table.loc["truncated", "status"] == "error" and "truncated" in table.loc["truncated", "message"]
    assert "mpp_fallback" in table.loc["no_mpp", "message"]
    main(["--slides-dir", str(slides), "--labels", str(labels), "--mpp-fallback", "0.5", "--out", str(out)])
    assert "no_mpp" in usable_ids(out)


def test_split_leaves_out_unusable_slides(tmp_path: Path) -> None:
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label\n" + "".join(f"s{i},{'ab'[i % 2]}\n" for i in range(8)))
    split = make_split(labels, "kfold", 2, 0.0, 0, usable={f"s{i}" for i in range(7)})
    assert "s7" not in split["labels"]
    assert sorted(s for f in split["folds"] for s in f["test"]) == [f"s{i}" for i in range(7)]
