"""Scoring with fold models and prediction on new slides: no labels, no retraining."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from wsi_asmil.features import store
from wsi_asmil.maps.scoring import choose_folds, parse_fold_mode, score_slides
from wsi_asmil.maps.scoring import main as scoring_main
from wsi_asmil.mil.models.registry import build_model, load_model, save_checkpoint
from wsi_asmil.report.predict import gather_predictions
from wsi_asmil.report.predict import main as predict_main

DIM = 16
CLASSES = ["normal", "tumour"]


def write_models(models_dir: Path, n_folds: int = 2, name: str = "abmil") -> None:
    for k in range(n_folds):
        torch.manual_seed(100 + k)
        model = build_model(name, DIM, len(CLASSES), hidden=8)
        save_checkpoint(models_dir / f"fold{k}" / "model.pt", model, model_name=name, model_kwargs={"hidden": 8},
                        classes=CLASSES, in_dim=DIM, epoch=1, params={})


def write_store(path: Path, n_tiles: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(n_tiles, DIM)).astype(np.float16)
    coords = np.stack([np.arange(n_tiles) * 100, np.zeros(n_tiles)], axis=1).astype(np.int64)
    attrs = {"slide_id": path.stem, "tile_extent": 100.0, "target_mpp": 0.5, "tile_size": 50, "mpp": 0.25,
             "slide_dimensions": [max(1, n_tiles) * 100, 100]}
    with store.feature_writer(path, coords, DIM, attrs) as w:
        if n_tiles:
            w.write(0, feats)
    return feats.astype(np.float32)


def test_fold_choice() -> None:
    split = {"folds": [{"test": ["a"]}, {"test": ["b"]}, {"test": []}]}
    assert choose_folds("test", "b", 3, split) == [1]
    assert choose_folds("test", "new slide", 3, split) == [0, 1, 2]  # unlabeled: the ensemble
    assert choose_folds("ensemble", "a", 3, split) == [0, 1, 2]
    assert choose_folds(2, "a", 3, None) == [2]
    assert parse_fold_mode("1") == 1 and parse_fold_mode("ensemble") == "ensemble"
    with pytest.raises(ValueError, match="does not exist"):
        choose_folds(3, "a", 3, None)
    with pytest.raises(ValueError, match="split"):
        choose_folds("test", "a", 3, None)
    with pytest.raises(ValueError, match="fold must be"):
        parse_fold_mode("best")


def test_ensemble_scores_of_unlabeled_slides(tmp_path: Path) -> None:
    models = tmp_path / "models" / "abmil"
    write_models(models)
    feats = write_store(tmp_path / "features" / "new slide é.zarr", 30, 0)
    write_store(tmp_path / "features" / "blank.zarr", 0, 1)
    out = tmp_path / "scores"
    scoring_main(["--features", str(tmp_path / "features" / "new slide é.zarr"), str(tmp_path / "features" / "blank.zarr"),
                  "--models-dir", str(models), "--folds", "2", "--fold", "ensemble", "--device", "cpu", "--out-dir", str(out)])
    table = pd.read_csv(out / "new slide é_scores.csv")
    rec = json.loads((out / "new slide é_scores.json").read_text())
    assert len(table) == 30 and table["score"].sum() == pytest.approx(1.0, abs=1e-5)
    # The ensemble is the mean of the fold models, each of which is the model's own attention.
    per_fold = []
    probs = []
    for k in range(2):
        model, _ = load_model(models / f"fold{k}" / "model.pt")
        per_fold.append(model.attention_scores(torch.from_numpy(feats)).numpy())
        probs.append(torch.softmax(model(torch.from_numpy(feats))["logits"], -1).detach().numpy())
        np.testing.assert_allclose(table[f"score_fold{k}"], per_fold[-1], rtol=1e-5)
    np.testing.assert_allclose(table["score"], np.mean(per_fold, axis=0), rtol=1e-5)
    assert rec["folds"] == [0, 1] and rec["model"] == "abmil" and rec["tile_extent"] == 100.0
    assert [rec["probs"][c] for c in CLASSES] == pytest.approx(np.mean(probs, axis=0).tolist(), rel=1e-5)
    assert rec["pred"] == CLASSES[int(np.argmax(np.mean(probs, axis=0)))] and rec["agreement"] in (0.5, 1.0)
    blank = json.loads((out / "blank_scores.json").read_text())
    assert blank["n_tiles"] == 0 and blank["probs"] is None and blank["pred"] is None
    assert len(pd.read_csv(out / "blank_scores.csv")) == 0


def test_test_fold_scoring_uses_only_the_model_that_tested_the_slide(tmp_path: Path) -> None:
    models = tmp_path / "abmil"
    write_models(models)
    write_store(tmp_path / "a.zarr", 12, 0)
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"folds": [{"test": ["x"]}, {"test": ["a"]}]}))
    (rec,) = score_slides([tmp_path / "a.zarr"], models, 2, tmp_path / "out", "test", split, "cpu")
    assert rec["folds"] == [1] and "score_fold1" not in pd.read_csv(tmp_path / "out" / "a_scores.csv").columns
    (single,) = score_slides([tmp_path / "a.zarr"], models, 2, tmp_path / "one", 1, None, "cpu")
    assert single["probs"] == rec["probs"]


def test_predictions_table_lists_every_new_slide(tmp_path: Path) -> None:
    models = tmp_path / "models"
    write_models(models / "abmil")
    write_store(tmp_path / "f" / "s1.zarr", 10, 0)
    write_store(tmp_path / "f" / "empty.zarr", 0, 0)
    score_slides([tmp_path / "f" / "s1.zarr", tmp_path / "f" / "empty.zarr"], models / "abmil", 2,
                 tmp_path / "scores" / "abmil", "ensemble", None, "cpu")
    inventory = tmp_path / "inventory.csv"
    inventory.write_text(
        "slide_id,path,status,message\ns1,/d/s1.svs,ok,\nempty,/d/empty.svs,ok,\n"
        "broken,/d/broken.svs,error,slide 'broken': file /d/broken.svs is empty (0 bytes)\n"
        "labeled,/d/labeled.svs,error,not a new slide\n"
    )
    predict_main(["--scores", str(tmp_path / "scores" / "abmil"), "--inventory", str(inventory),
                  "--slides", "s1", "empty", "broken", "--out", str(tmp_path / "predictions.csv")])
    table = pd.read_csv(tmp_path / "predictions.csv", keep_default_na=False).set_index("slide_id")
    assert sorted(table.index) == ["broken", "empty", "s1"]  # 'labeled' is not a slide to predict
    assert table.loc["s1", "status"] == "ok" and table.loc["s1", "path"] == "/d/s1.svs"
    assert float(table.loc["s1", "prob_normal"]) + float(table.loc["s1", "prob_tumour"]) == pytest.approx(1.0)
    assert table.loc["s1", "folds"] == "0;1"
    assert table.loc["empty", "status"] == "empty" and table.loc["empty", "pred"] == ""
    assert table.loc["broken", "status"] == "error" and "0 bytes" in table.loc["broken", "message"]
    assert list(pd.read_csv(tmp_path / "predictions.csv").columns[:8]) == [
        "slide_id", "path", "model", "status", "message", "n_tiles", "folds", "pred"]
    assert len(gather_predictions([tmp_path / "nothing"])) == 0


def test_out_of_memory_predicting_a_new_slide_is_a_message_not_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """The predict_attention rule's command (ensemble, no split) on a GPU that runs out of memory."""
    from wsi_asmil.mil.models.base import MILModel

    models = tmp_path / "models" / "abmil"
    write_models(models)
    write_store(tmp_path / "new.zarr", 25, 0)

    def oom(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 12.00 GiB")

    monkeypatch.setattr(MILModel, "prepare", oom)
    with pytest.raises(SystemExit) as err:
        scoring_main(["--features", str(tmp_path / "new.zarr"), "--models-dir", str(models), "--model-name", "abmil",
                      "--folds", "2", "--fold", "ensemble", "--device", "cpu", "--out-dir", str(tmp_path / "scores")])
    log = capsys.readouterr().err
    assert err.value.code == 1 and "Traceback" not in log
    assert "scoring slide 'new', a bag of 25 tiles" in log and "heatmap.device" in log
    assert not (tmp_path / "scores").exists() or list((tmp_path / "scores").iterdir()) == []
