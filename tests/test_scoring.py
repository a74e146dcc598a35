"""Chunked scoring equals whole-bag scoring, and out of memory while scoring is a clear message."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from wsi_asmil.features import store
from wsi_asmil.maps.scoring import ModelScorer, SoftmaxPool, score_slides
from wsi_asmil.maps.scoring import main as scoring_main
from wsi_asmil.mil.models.abmil import ABMIL
from wsi_asmil.mil.models.base import MILModel, splits_at_softmax
from wsi_asmil.mil.models.registry import MODELS, build_model, load_model, save_checkpoint

DIM = 24
CLASSES = ["a", "b", "c"]
ARCH = {  # small, with several heads, tokens, branches and aggregator layers
    "asmil": {"n_tokens": 4, "n_heads": 4, "aggregator_depth": 2, "inner_dim": 16},
    "asmil_linear": {"n_tokens": 4, "n_heads": 4, "inner_dim": 16},
    "asmil_repaired": {"n_tokens": 4, "n_heads": 4, "inner_dim": 16},
    "acmil": {"n_branches": 3, "hidden": 8, "inner_dim": 12},
    "abmil": {"hidden": 8},
    "abmil_anchor": {"hidden": 8},
    "transmil": {"dim": 16, "n_heads": 2, "n_landmarks": 4},
}


def random_model(name: str, seed: int, scale: float = 0.5) -> MILModel:
    """Random weights well away from the near-uniform initial attention (ASMIL's tokens start at
    1e-6), and a random feature standardisation, so the comparison has something to compare."""
    torch.manual_seed(seed)
    model = build_model(name, DIM, len(CLASSES), **ARCH.get(name, {}))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * scale)
        model.input_norm.mean.copy_(torch.randn(DIM))
        model.input_norm.std.copy_(torch.rand(DIM) + 0.5)
    return model.eval()


def whole_bag(model: MILModel, bag: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The reference: the model's own scores and probabilities on the whole bag at once."""
    with torch.no_grad():
        scores = model.attention_scores(bag).numpy()
        probs = torch.softmax(model(bag)["logits"].float(), -1).numpy()
    return scores, probs


def chunked(model: MILModel, bag: torch.Tensor, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    scorer = ModelScorer(model)
    for start in range(0, len(bag), chunk):
        scorer.add(bag[start : start + chunk])
    return scorer.finish()


#: Registry names whose architecture is scored in chunks (TransMIL's self-attention mixes tiles, so
#: it is scored whole: see test_transmil_is_scored_whole).
NAMES = sorted(name for name in MODELS if splits_at_softmax(random_model(name, seed=0)))


def test_the_attention_pooling_models_have_a_chunked_path() -> None:
    assert set(NAMES) >= {"asmil", "asmil_linear", "asmil_repaired", "acmil", "abmil", "abmil_anchor"}


@pytest.mark.parametrize("readout", ["mean", "linear_norm"])
def test_every_asmil_readout_is_scored_in_chunks_exactly(readout: str) -> None:
    torch.manual_seed(3)
    model = build_model("asmil", DIM, len(CLASSES), readout=readout, **ARCH["asmil"])
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    bag = torch.randn(200, DIM)
    whole = whole_bag(model.eval(), bag)
    for got, want in zip(chunked(model, bag, 37), whole):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("m", "chunk"), [(1, 1), (7, 3), (300, 64), (300, 1000), (1000, 97)])
def test_chunked_scoring_equals_the_whole_bag(name: str, m: int, chunk: int) -> None:
    model = random_model(name, seed=m + chunk)
    bag = torch.from_numpy(np.random.default_rng(m).normal(size=(m, DIM)).astype(np.float32) * 2)
    ref_scores, ref_probs = whole_bag(model, bag)
    scores, probs = chunked(model, bag, chunk)
    assert scores.shape == (m,) and probs.shape == (len(CLASSES),)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(probs, ref_probs, rtol=1e-4, atol=1e-6)
    assert scores.sum() == pytest.approx(1.0, abs=1e-5)


def sharpen(model: MILModel) -> MILModel:
    """Attention logits in the hundreds: their exp() overflows float32 unless shifted first."""
    with torch.no_grad():
        if hasattr(model, "attention_w"):  # ABMIL, ACMIL: the last attention layer, plus an offset
            model.attention_w.weight.mul_(20.0)
            model.attention_w.bias.add_(300.0)
        else:  # ASMIL: logits are linear in the queries
            model.token_attention.q_weight.mul_(20.0)
            model.token_attention.q_bias.mul_(20.0)
    return model


@pytest.mark.parametrize("name", NAMES)
def test_chunked_scoring_with_sharp_attention(name: str) -> None:
    """The online log-sum-exp must neither overflow nor lose the peak, wherever in the bag (first
    chunk, a later chunk) the maximum falls."""
    model = sharpen(random_model(name, seed=3))
    bag = torch.from_numpy(np.random.default_rng(1).normal(size=(500, DIM)).astype(np.float32) * 2)
    ref_scores, ref_probs = whole_bag(model, bag)
    with torch.no_grad():
        assert model.attention_logits(bag).abs().max() > 100
    assert np.isfinite(ref_scores).all() and ref_scores.max() > 20 / len(bag)  # peaked: over 20x uniform
    for chunk in (1, 33, 499):
        scores, probs = chunked(model, bag, chunk)
        np.testing.assert_allclose(scores, ref_scores, rtol=1e-4, atol=1e-9)
        np.testing.assert_allclose(probs, ref_probs, rtol=1e-4, atol=1e-6)


def test_scoring_is_in_eval_mode_and_restores_the_mode() -> None:
    model = random_model("asmil", seed=5)
    bag = torch.randn(50, DIM)
    ref = whole_bag(model, bag)
    model.train()  # token dropout and attention dropout would change every number
    scores, probs = chunked(model, bag, 16)
    assert model.training
    np.testing.assert_allclose(scores, ref[0], rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(probs, ref[1], rtol=1e-4, atol=1e-6)


def test_a_subclass_that_changes_forward_is_scored_whole() -> None:
    class Custom(ABMIL):  # its forward no longer matches ABMIL's split at the softmax
        def forward(self, bag: torch.Tensor) -> dict[str, torch.Tensor]:
            out = super().forward(bag)
            return {**out, "logits": out["logits"] * 2}

    class Renamed(ABMIL):  # the same forward: the split still holds
        pass

    assert splits_at_softmax(Renamed(DIM, len(CLASSES))) and not splits_at_softmax(Custom(DIM, len(CLASSES)))
    torch.manual_seed(0)
    model = Custom(DIM, len(CLASSES), hidden=8).eval()
    bag = torch.randn(40, DIM)
    scorer = ModelScorer(model)
    assert not scorer.chunked
    for start in range(0, 40, 7):
        scorer.add(bag[start : start + 7])
    scores, probs = scorer.finish()
    ref = whole_bag(model, bag)
    np.testing.assert_allclose(scores, ref[0], rtol=1e-6)
    np.testing.assert_allclose(probs, ref[1], rtol=1e-6)


def test_transmil_is_scored_whole() -> None:
    model = random_model("transmil", seed=3, scale=0.2)
    bag = torch.randn(50, DIM)
    scorer = ModelScorer(model)
    assert not scorer.chunked  # its self-attention mixes the tiles before any softmax over them
    scores, probs = chunked(model, bag, 16)
    ref = whole_bag(model, bag)
    np.testing.assert_allclose(scores, ref[0], rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(probs, ref[1], rtol=1e-5, atol=1e-7)


def test_softmax_pool_matches_softmax_at_extreme_logits() -> None:
    logits = torch.tensor([[1000.0, -1000.0, 999.0, 0.0, 1001.0], [-5.0, -5.0, -5.0, -5.0, -5.0]])
    values = torch.arange(10.0).view(5, 2)
    pool = SoftmaxPool()
    for start in range(0, 5, 2):
        pool.add(logits[:, start : start + 2], values[start : start + 2])
    weights = torch.softmax(logits, dim=-1)
    torch.testing.assert_close(pool.pooled(), weights @ values)
    torch.testing.assert_close(pool.weights_mean(), weights.mean(0))


# --- through the store and the command line --------------------------------------------------------


def write_models(models_dir: Path, name: str, n_folds: int = 2) -> None:
    for k in range(n_folds):
        save_checkpoint(models_dir / f"fold{k}" / "model.pt", random_model(name, seed=10 + k), model_name=name,
                        model_kwargs=ARCH.get(name, {}), classes=CLASSES, in_dim=DIM, epoch=1, params={})


def write_store(path: Path, n_tiles: int, seed: int = 0) -> np.ndarray:
    feats = (np.random.default_rng(seed).normal(size=(n_tiles, DIM)) * 2).astype(np.float16)
    coords = np.stack([np.arange(n_tiles) * 100, np.zeros(n_tiles)], axis=1).astype(np.int64)
    attrs = {"slide_id": path.stem, "tile_extent": 100.0, "target_mpp": 0.5, "tile_size": 50, "mpp": 0.25}
    with store.feature_writer(path, coords, DIM, attrs) as w:
        w.write(0, feats)
    return feats.astype(np.float32)


@pytest.mark.parametrize("name", ["asmil", "acmil", "abmil"])
def test_chunked_store_scoring_equals_the_whole_bag(tmp_path: Path, name: str) -> None:
    """Reading the Zarr store in row chunks smaller than its own chunks, two folds at once."""
    models = tmp_path / "models" / name
    write_models(models, name)
    feats = write_store(tmp_path / "s.zarr", 37)
    (rec,) = score_slides([tmp_path / "s.zarr"], models, 2, tmp_path / "out", "ensemble", None, "cpu", chunk_tiles=5)
    table = pd.read_csv(tmp_path / "out" / "s_scores.csv")
    probs = []
    for k in range(2):
        model, _ = load_model(models / f"fold{k}" / "model.pt")
        scores, p = whole_bag(model, torch.from_numpy(feats))
        np.testing.assert_allclose(table[f"score_fold{k}"], scores, rtol=1e-4, atol=1e-9)
        np.testing.assert_allclose(list(rec["probs_per_fold"][str(k)].values()), p, rtol=1e-4, atol=1e-6)
        probs.append(p)
    np.testing.assert_allclose(list(rec["probs"].values()), np.mean(probs, axis=0), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="chunk_tiles"):
        score_slides([tmp_path / "s.zarr"], models, 2, tmp_path / "o2", "ensemble", None, "cpu", chunk_tiles=0)


# --- out of memory ---------------------------------------------------------------------------------


def _raise(exc: BaseException):  # type: ignore[no-untyped-def]
    def fail(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise exc

    return fail


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir()) if out.exists() else []


@pytest.mark.parametrize(
    "exc",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
        RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to allocate 81920000000 bytes"),
        MemoryError(),
    ],
    ids=["cuda", "cpu-allocator", "MemoryError"],
)
def test_out_of_memory_while_scoring_names_slide_tiles_and_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exc: BaseException,
) -> None:
    from wsi_asmil.core.memory import BagMemoryError

    models = tmp_path / "models" / "asmil"
    write_models(models, "asmil")
    write_store(tmp_path / "big slide.zarr", 37)
    monkeypatch.setattr(MILModel, "prepare", _raise(exc))  # every model's forward starts here
    out = tmp_path / "out"
    with pytest.raises(BagMemoryError) as err:
        score_slides([tmp_path / "big slide.zarr"], models, 2, out, "ensemble", None, "cpu", chunk_tiles=16)
    message = str(err.value)
    assert "scoring slide 'big slide', a bag of 37 tiles" in message and "out of memory on cpu" in message
    assert "heatmap.device" in message and "--chunk-tiles" in message and "(now 16)" in message
    assert leftovers(out) == []  # no partial output, not even a temporary


def test_out_of_memory_advice_on_a_gpu_and_for_whole_bag_models() -> None:
    from wsi_asmil.maps.scoring import scoring_advice

    advice = scoring_advice(torch.device("cuda"), 8192)
    assert "set heatmap.device: cpu" in advice and "free the GPU" in advice and "(now 8192)" in advice
    whole = scoring_advice(torch.device("cpu"), 8192, whole=True)
    assert "whole bag at once" in whole and "--chunk-tiles" not in whole and "heatmap.device: cpu" in whole


def test_out_of_memory_while_writing_leaves_neither_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from wsi_asmil.core.memory import BagMemoryError
    from wsi_asmil.maps import scores

    models = tmp_path / "models" / "abmil"
    write_models(models, "abmil")
    write_store(tmp_path / "s.zarr", 12)
    out = tmp_path / "out"
    score_slides([tmp_path / "s.zarr"], models, 2, out, 0, None, "cpu")
    assert leftovers(out) == ["s_scores.csv", "s_scores.json"]
    monkeypatch.setattr(scores, "write_json", _raise(MemoryError()))
    with pytest.raises(BagMemoryError, match="slide 's'"):
        score_slides([tmp_path / "s.zarr"], models, 2, out, 1, None, "cpu")
    assert leftovers(out) == []  # the new CSV is gone, and so is the old JSON it no longer matches


def test_other_errors_pass_through_and_the_cli_is_clean(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    models = tmp_path / "models" / "acmil"
    write_models(models, "acmil")
    write_store(tmp_path / "s.zarr", 20)
    args = ["--features", str(tmp_path / "s.zarr"), "--models-dir", str(models), "--folds", "2", "--fold", "ensemble",
            "--device", "cpu", "--out-dir", str(tmp_path / "out")]
    monkeypatch.setattr(MILModel, "prepare", _raise(ValueError("a real bug")))
    with pytest.raises(ValueError, match="a real bug"):
        scoring_main(args)
    monkeypatch.setattr(MILModel, "prepare", _raise(torch.OutOfMemoryError("CUDA out of memory.")))
    with pytest.raises(SystemExit) as err:
        scoring_main([*args, "--chunk-tiles", "4"])
    log = capsys.readouterr().err
    assert err.value.code == 1
    assert "slide 's', a bag of 20 tiles" in log and "heatmap.device" in log and "Traceback" not in log
    assert leftovers(tmp_path / "out") == []
    monkeypatch.undo()
    scoring_main([*args, "--chunk-tiles", "4"])
    assert json.loads((tmp_path / "out" / "s_scores.json").read_text())["n_tiles"] == 20
