from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from wsi_asmil.mil.split import make_split
from wsi_asmil.slides.cohort import LabelTableError, match_cohort, read_labels


def table(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "labels.csv"
    path.write_text(text)
    return path


def slides(*ids: str) -> dict[str, Path]:
    return {s: Path(f"/data/{s}.svs") for s in ids}


def test_read_labels_with_optional_columns(tmp_path: Path) -> None:
    df = read_labels(table(tmp_path, "slide_id,label,split,mpp\na,tumour,train,0.25\nb ,normal, TEST ,\nc,,,\n"))
    assert df["slide_id"].tolist() == ["a", "b", "c"]
    assert df["split"].tolist() == ["train", "test", ""]
    assert df["mpp"].iloc[0] == 0.25 and df["mpp"].isna().tolist() == [False, True, True]


@pytest.mark.parametrize(
    "text,match",
    [
        ("slide,label\na,x\n", "missing column"),
        ("slide_id,label\na,x\nb,y\na,y\n", "duplicate slide_id.*row 2.*row 4"),
        ("slide_id,label,split\na,x,training\n", "split must be one of.*row 2"),
        ("slide_id,label,mpp\na,x,-1\nb,x,abc\n", "mpp must be a positive number.*row 2.*row 3"),
    ],
)
def test_bad_tables_name_the_rows(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(LabelTableError, match=f"(?s){match}"):
        read_labels(table(tmp_path, text))


def test_match_cohort(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = table(tmp_path, "slide_id,label,mpp\na,tumour,0.5\nb,normal,\nc,,\n")
    cohort = match_cohort(path, slides("a", "b", "c", "d"))
    assert cohort.labels == {"a": "tumour", "b": "normal"}
    assert cohort.unlabeled == ["c", "d"] and "no label" in caplog.text
    assert cohort.mpp == {"a": 0.5}
    with pytest.raises(LabelTableError, match="not found in slides_dir: 'b'"):
        match_cohort(path, slides("a", "c"))


def test_kfold_each_slide_tested_once_and_stratified(tmp_path: Path) -> None:
    rows = [f"s{i:02d},{'tumour' if i % 3 == 0 else 'normal'}" for i in range(30)]
    path = table(tmp_path, "slide_id,label\n" + "\n".join(rows) + "\n")
    split = make_split(path, "kfold", 5, 0.2, seed=0)
    assert split["classes"] == ["normal", "tumour"]
    tested = [s for f in split["folds"] for s in f["test"]]
    assert sorted(tested) == sorted(split["labels"]) and len(set(tested)) == 30
    for fold in split["folds"]:
        parts = [set(fold[k]) for k in ("train", "val", "test")]
        assert sum(map(len, parts)) == 30 and not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
        assert Counter(split["labels"][s] for s in fold["test"]) == {"normal": 4, "tumour": 2}
        assert {split["labels"][s] for s in fold["val"]} == {"normal", "tumour"}
    assert make_split(path, "kfold", 5, 0.2, seed=0) == split
    assert make_split(path, "kfold", 5, 0.2, seed=1) != split


def test_kfold_too_few_slides_per_class(tmp_path: Path) -> None:
    path = table(tmp_path, "slide_id,label\na,x\nb,x\nc,x\nd,y\n")
    with pytest.raises(LabelTableError, match=r"split.folds = 2.*'y': 1"):
        make_split(path, "kfold", 2, 0.2, seed=0)


def test_fixed_split(tmp_path: Path) -> None:
    path = table(tmp_path, "slide_id,label,split\na,x,train\nb,y,train\nc,x,val\nd,y,test\ne,,\n")
    split = make_split(path, "fixed", 5, 0.2, seed=0)
    assert split["folds"] == [{"train": ["a", "b"], "val": ["c"], "test": ["d"]}]
    assert "e" not in split["labels"]
    missing = table(tmp_path, "slide_id,label,split\na,x,train\nb,y,\n")
    with pytest.raises(LabelTableError, match="'b' has none"):
        make_split(missing, "fixed", 5, 0.2, seed=0)
