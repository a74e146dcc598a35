"""Heatmap drawing (canvas, normalisation, outputs), QuPath GeoJSON and the report."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from geojson_check import read_tile_geojson, validate_tile_geojson
from hypothesis import given, settings
from hypothesis import strategies as st
from matplotlib import colormaps

from wsi_asmil.core.canvas import Grid, coverage_count, lookup_mask, mean_values, smooth, tile_spans
from wsi_asmil.core.io import write_csv
from wsi_asmil.maps.heatmap import Style, draw_slide, normalize, output_mpp, render
from wsi_asmil.maps.heatmap import main as heatmap_main
from wsi_asmil.maps.tile_geojson import write_tile_geojson
from wsi_asmil.report.build import choose_sample, paired_comparison, write_report
from wsi_asmil.slides.slide import Slide
from wsi_asmil.synthetic.scores import write_synthetic_scores

# --- normalisation ---------------------------------------------------------------------------------


def test_rank_normalisation() -> None:
    np.testing.assert_allclose(normalize(np.array([0.1, 0.7, 0.2]), "rank"), [0.0, 1.0, 0.5])
    assert normalize(np.array([1.0]), "rank").tolist() == [1.0]
    # Equal scores get equal colours (their mean rank), whatever their order.
    np.testing.assert_allclose(normalize(np.array([0.2, 0.1, 0.2, 0.5]), "rank"), [0.5, 0.0, 0.5, 1.0])
    with pytest.raises(ValueError, match="heatmap.normalize"):
        normalize(np.array([1.0]), "zscore")


def test_uniform_normalisation_is_centred_on_uniform_attention() -> None:
    m = 8
    flat = np.full(m, 1 / m)
    np.testing.assert_allclose(normalize(flat, "uniform", 10.0), 0.5)  # flat attention: mid-colour
    peaked = np.array([10 / m, 1 / (10 * m), 0.0, *([1 / m] * 5)])
    np.testing.assert_allclose(normalize(peaked, "uniform", 10.0), [1.0, 0.0, 0.0, *([0.5] * 5)], atol=1e-12)
    # The same scale for every slide: 2x uniform is the same colour whatever M.
    assert normalize(np.array([2 / 4, 0, 0, 0]), "uniform")[0] == pytest.approx(normalize(np.full(100, 0.0) + np.r_[2 / 100, np.zeros(99)], "uniform")[0])


# --- canvas ----------------------------------------------------------------------------------------


def naive_mean(coords: np.ndarray, extent: float, values: np.ndarray, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    total = np.zeros(grid.shape)
    count = np.zeros(grid.shape)
    for (x0, y0, x1, y1), v in zip(tile_spans(coords, extent, grid), values):
        total[max(y0, 0) : max(y1, 0), max(x0, 0) : max(x1, 0)] += v
        count[max(y0, 0) : max(y1, 0), max(x0, 0) : max(x1, 0)] += 1
    mean = np.divide(total, count, out=np.zeros_like(total), where=count > 0)
    return mean, count > 0


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 40), seed=st.integers(0, 10_000), ds=st.sampled_from([1.0, 3.0, 7.5, 16.0]),
    extent=st.sampled_from([20.0, 33.3, 64.0]), x0=st.integers(-5, 5), y0=st.integers(-5, 5),
)
def test_overlap_averaging_matches_a_naive_loop(n: int, seed: int, ds: float, extent: float, x0: int, y0: int) -> None:
    rng = np.random.default_rng(seed)
    coords = rng.integers(-30, 300, size=(n, 2))
    values = rng.random(n)
    grid = Grid(ds, 37, 29, x0, y0)
    mean, covered = mean_values(coords, extent, values, grid)
    ref_mean, ref_cov = naive_mean(coords, extent, values, grid)
    assert np.array_equal(covered, ref_cov)
    np.testing.assert_allclose(mean, ref_mean, atol=1e-6)


def test_hottest_pixel_is_the_top_scored_tile() -> None:
    thumb = np.full((100, 100, 3), 255, np.uint8)
    coords = np.array([[0, 0], [400, 0], [0, 400], [400, 400]])  # level 0, downsample 8, extent 400
    values = normalize(np.array([0.1, 0.4, 0.2, 0.3]), "rank")
    out = render(thumb, 8.0, coords, 400.0, values, "gray", 1.0)
    assert out[:50, 50:].min() == 255 and out[:50, :50].max() == 0  # 'gray': 1 is white, 0 black
    assert np.unravel_index(out[..., 0].argmax(), out.shape[:2])[1] >= 50


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), ds=st.sampled_from([4.0, 8.0, 13.7]))
def test_top_scored_tile_is_hottest_on_a_real_grid(seed: int, ds: float) -> None:
    """On a tiling grid with a fractional stride, the top tile's pixels carry the top colour."""
    rng = np.random.default_rng(seed)
    extent = 425.9
    xs = np.round(np.arange(6) * extent)
    coords = np.stack(np.meshgrid(xs, xs), -1).reshape(-1, 2).astype(np.int64)
    scores = rng.random(len(coords))
    values = normalize(scores, "rank")
    h = w = int(np.ceil(6 * extent / ds))
    out = render(np.zeros((h, w, 3), np.uint8), ds, coords, extent, values, "gray", 1.0)
    top = coords[scores.argmax()]
    cy, cx = int((top[1] + extent / 2) / ds), int((top[0] + extent / 2) / ds)
    assert out[cy, cx, 0] == out[..., 0].max() == 255


def test_tiles_that_touch_leave_no_seams() -> None:
    """Whole-pixel origins of a fractional stride must still tile the plane at any output scale."""
    extent = 425.9  # 224 px at 0.5 um/px on a 0.263 um/px scanner
    xs = np.round(np.arange(20) * extent)
    coords = np.stack(np.meshgrid(xs, xs), -1).reshape(-1, 2)
    for ds in (2.0, 8.0, 16.5, 32.0, 64.0):
        grid = Grid.covering(int(20 * extent), int(20 * extent), ds)
        covered = coverage_count(coords, extent, grid) > 0
        inner = covered[: int(19 * extent / ds), : int(19 * extent / ds)]
        assert inner.all(), f"seam at downsample {ds}"


def test_overlap_is_averaged_and_uncovered_pixels_untouched() -> None:
    thumb = np.full((40, 60, 3), 100, np.uint8)
    coords = np.array([[0, 0], [100, 0]])  # extent 200 at downsample 10: columns 0-19 and 10-29
    out = render(thumb, 10.0, coords, 200.0, np.array([0.0, 1.0]), "gray", 1.0)
    assert out[5, 5, 0] == 0 and out[5, 25, 0] == 255
    mid = round(255 * colormaps["gray"](0.5)[0])
    assert abs(int(out[5, 15, 0]) - mid) <= 1  # the shared columns show the mean
    assert (out[25:, :] == 100).all() and (out[:, 30:] == 100).all()


def test_single_tile_slide() -> None:
    out = render(np.zeros((10, 10, 3), np.uint8), 4.0, np.array([[8, 8]]), 16.0, normalize(np.array([1.0]), "rank"), "jet", 0.5)
    assert out[3, 3].any() and not out[0, 0].any()


def test_empty_slide_is_the_bare_thumbnail() -> None:
    thumb = np.full((5, 5, 3), 77, np.uint8)
    assert np.array_equal(render(thumb, 4.0, np.zeros((0, 2)), 16.0, np.zeros(0), "jet", 0.5), thumb)


def test_clipping_to_tissue_and_blur() -> None:
    thumb = np.full((20, 20, 3), 200, np.uint8)
    coords = np.array([[0, 0]])  # one tile covering the whole 20 x 20 canvas at downsample 1
    tissue = np.zeros((10, 10), bool)
    tissue[:, :5] = True  # left half at downsample 2
    out = render(thumb, 1.0, coords, 20.0, np.array([1.0]), "gray", 1.0, tissue=tissue, tissue_downsample=2.0)
    assert (out[:, :10] == 255).all() and (out[:, 10:] == 200).all()
    # Blur mixes covered pixels only: a constant field stays constant up to its edges.
    heat = np.zeros((20, 20), np.float32)
    covered = np.zeros((20, 20), bool)
    heat[5:15, 5:15], covered[5:15, 5:15] = 0.8, True
    np.testing.assert_allclose(smooth(heat, covered, 3.0)[covered], 0.8, atol=1e-5)


def test_mask_lookup_maps_any_resolution() -> None:
    mask = np.zeros((4, 4), bool)
    mask[1, 2] = True  # level-0 x 20-30, y 10-20 at downsample 10
    fine = lookup_mask(mask, 10.0, Grid(2.5, 16, 16))
    assert fine.sum() == 16 and fine[4:8, 8:12].all()
    coarse = lookup_mask(mask, 10.0, Grid(20.0, 2, 2))  # centres at 10 and 30: mask pixels 1 and 3
    assert coarse.tolist() == [[False, False], [False, False]]
    window = lookup_mask(mask, 10.0, Grid(10.0, 2, 2, x0=2, y0=1))
    assert window.tolist() == [[True, False], [False, False]]


def test_output_resolution_is_capped_by_max_edge() -> None:
    assert output_mpp((25_000.0, 20_000.0), 8.0, None) == 8.0
    assert output_mpp((25_000.0, 20_000.0), 8.0, 1000) == 25.0
    assert output_mpp((1_000.0, 800.0), 8.0, 1000) == 8.0


# --- QuPath GeoJSON --------------------------------------------------------------------------------


def test_geojson_validates_and_round_trips(tmp_path: Path) -> None:
    coords = np.array([[0, 0], [425, 0], [851, 426]])
    scores = np.array([0.2, 0.5, 0.3])
    path = tmp_path / "tiles.geojson"
    write_tile_geojson(path, coords, 425.9, {"attention": scores, "attention_percentile": normalize(scores, "rank") * 100})
    obj = json.loads(path.read_text())
    validate_tile_geojson(obj)
    f = obj["features"][1]
    assert f["properties"] == {"objectType": "tile", "measurements": {"attention": 0.5, "attention_percentile": 100.0}}
    assert f["geometry"]["coordinates"][0][0] == f["geometry"]["coordinates"][0][-1] == [425.0, 0.0]
    corners, sides, meas = read_tile_geojson(path)
    np.testing.assert_allclose(corners, coords)
    np.testing.assert_allclose(sides, 425.9)
    np.testing.assert_allclose(meas["attention"], scores)
    write_tile_geojson(path, coords[:0], 1.0, {"attention": scores[:0]}, object_type="detection")
    assert read_tile_geojson(path)[0].shape == (0, 2)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda o: o.update(type="Feature"), "FeatureCollection"),
        (lambda o: o["features"][0]["geometry"].update(type="Point"), "Polygon"),
        (lambda o: o["features"][0]["geometry"]["coordinates"][0].pop(), "closed"),
        (lambda o: o["features"][0]["properties"].pop("objectType"), "objectType"),
        (lambda o: o["features"][0]["properties"]["measurements"].update(attention="high"), "finite numbers"),
    ],
)
def test_geojson_validation_names_the_problem(tmp_path: Path, mutate, match: str) -> None:
    path = tmp_path / "t.geojson"
    write_tile_geojson(path, np.array([[0, 0]]), 10.0, {"attention": np.array([1.0])})
    obj = json.loads(path.read_text())
    mutate(obj)
    with pytest.raises(ValueError, match=match):
        validate_tile_geojson(obj)


def test_geojson_refuses_nan(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="non-finite"):
        write_tile_geojson(tmp_path / "t.geojson", np.array([[0, 0]]), 10.0, {"attention": np.array([np.nan])})
    assert not (tmp_path / "t.geojson").exists()


# --- a whole slide ---------------------------------------------------------------------------------


def fake_scores(tmp_path: Path, slide: Path, extent: float, stride: float | None = None) -> tuple[Path, np.ndarray, np.ndarray]:
    """A scores CSV + JSON over a regular tile grid of ``slide``, hottest in the middle."""
    with Slide(slide) as s:
        w, h = s.dimensions
        mpp = s.mpp
    stride = stride or extent
    xs = np.round(np.arange(0, w - extent + 1, stride))
    ys = np.round(np.arange(0, h - extent + 1, stride))
    coords = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2).astype(np.int64)
    centre = np.array([w / 2, h / 2])
    scores = np.exp(-np.linalg.norm(coords + extent / 2 - centre, axis=1) / 300.0)
    scores /= scores.sum()
    csv = tmp_path / "s_scores.csv"
    write_synthetic_scores(tmp_path, "s", coords, scores, extent, tile_size=64, mpp=mpp, slide_dimensions=[w, h])
    return csv, coords, scores


def test_draw_slide_writes_every_output(real_slide: Path, tmp_path: Path) -> None:
    extent = 128.0 * 0.5 / 0.499  # 128 px at 0.5 um/px
    csv, coords, scores = fake_scores(tmp_path, real_slide, extent, stride=extent / 2)  # overlap 0.5
    out = tmp_path / "out"
    info = draw_slide(
        real_slide, csv, out / "s.png", out_geojson=out / "s.geojson", out_gallery=out / "s_topk.jpg",
        out_tiff=out / "s_overlay.tif", style=Style(cmap="gray", alpha=1.0, clip_to_tissue=False),
        mpp=4.0, top_k=5, tiff_mpp=1.0,
    )
    img = cv2.imread(str(out / "s.png"))
    with Slide(real_slide) as s:
        assert img.shape[1] == round(s.dimensions[0] * s.mpp / 4.0)
    assert info["n_tiles"] == len(scores)
    # The hottest pixel of the PNG lies in the top-scored tile.
    top = coords[scores.argmax()] / info["downsample"]
    hot = np.argwhere(img[..., 0] == img[..., 0].max())
    side = extent / info["downsample"]
    assert ((hot[:, 1] >= top[0] - 1) & (hot[:, 1] <= top[0] + side + 1) & (hot[:, 0] >= top[1] - 1) & (hot[:, 0] <= top[1] + side + 1)).all()
    # The GeoJSON carries every tile with its score.
    corners, _, meas = read_tile_geojson(out / "s.geojson")
    assert len(corners) == len(scores)
    np.testing.assert_allclose(meas["attention"], scores, rtol=1e-9)
    np.testing.assert_allclose(meas["attention_x_M"], scores * len(scores), rtol=1e-9)
    gallery = cv2.imread(str(out / "s_topk.jpg"))
    assert gallery.shape[1] == 4 * 64 and gallery.shape[0] == 2 * (64 + 22)
    # The pyramidal TIFF opens as a slide with its physical scale and halving levels.
    with Slide(out / "s_overlay.tif") as t:
        assert t.mpp == pytest.approx(1.0, rel=1e-3)
        assert t.level_count >= 2 and t.level_downsamples[1] == pytest.approx(2.0, rel=0.01)
        tif = t.read_rgb(0, 0, 0, *t.dimensions)
    ty, tx = np.unravel_index(tif[..., 0].astype(int).argmax(), tif.shape[:2])
    top_um = coords[scores.argmax()] * 0.499
    assert top_um[0] - 2 <= tx <= top_um[0] + extent * 0.499 + 2 and top_um[1] - 2 <= ty <= top_um[1] + extent * 0.499 + 2


def test_heatmap_cli_legend_and_max_edge(real_slide: Path, tmp_path: Path) -> None:
    csv, _, _ = fake_scores(tmp_path, real_slide, 128.0)
    heatmap_main(["--legend", str(tmp_path / "legend.png"), "--normalize", "uniform", "--cmap", "viridis"])
    assert cv2.imread(str(tmp_path / "legend.png")) is not None
    heatmap_main(["--slide", str(real_slide), "--scores", str(csv), "--out", str(tmp_path / "h.png"),
                  "--max-edge", "100", "--no-clip-to-tissue"])
    assert max(cv2.imread(str(tmp_path / "h.png")).shape[:2]) <= 100
    with pytest.raises(SystemExit):
        heatmap_main(["--cmap", "jet"])  # neither a slide nor a legend
    with pytest.raises(ValueError, match="colour map"):
        heatmap_main(["--legend", str(tmp_path / "l.png"), "--cmap", "no_such_map"])


# --- the report ------------------------------------------------------------------------------------


def fake_fold(models: Path, model: str, k: int, acc: float, auc: float) -> None:
    d = models / model / f"fold{k}"
    d.mkdir(parents=True)
    test = {"acc": acc, "f1_macro": acc, "f1_micro": acc, "auc": auc}
    checkpoint = {"dtype": "float16" if k == 0 else "float32", "parameters": 1_500_000, "bytes": 3 * 2**20 * (k + 1)}
    (d / "metrics.json").write_text(json.dumps({"selected_epoch": 3, "test": test, "test_last": test,
                                                "instability_last10": 0.1 * (k + 1), "checkpoint": checkpoint}))
    pd.DataFrame({"slide_id": [f"s{k}"], "label": ["tumour"], "pred": ["tumour"], "prob_normal": [0.2], "prob_tumour": [0.8]}).to_csv(d / "predictions.csv", index=False)
    pd.DataFrame({"epoch": [1, 2, 3], "val_auc": [0.5, 0.7, 0.9], "jsd": [np.nan, 1e-3, 1e-4]}).to_csv(d / "history.csv", index=False)


def test_report_mean_and_std_over_folds(tmp_path: Path) -> None:
    for k, (acc, auc) in enumerate([(0.5, 0.6), (1.0, float("nan"))]):
        fake_fold(tmp_path / "models", "asmil", k, acc, auc)
    report = write_report(tmp_path / "models", ["asmil"], 2, tmp_path / "report")
    acc = report["asmil"]["test"]["acc"]
    assert acc["mean"] == 0.75 and acc["std"] == pytest.approx(math.sqrt(0.125))
    assert report["asmil"]["test"]["auc"]["n"] == 1  # the undefined AUC is left out, visibly
    assert report["asmil"]["instability_last10"]["mean"] == pytest.approx(0.15)
    preds = pd.read_csv(tmp_path / "report" / "predictions.csv")
    assert preds.columns[:5].tolist() == ["model", "fold", "slide_id", "label", "pred"] and len(preds) == 2
    table = (tmp_path / "report" / "metrics.md").read_text()
    assert "| asmil | 0.750 ± 0.354 |" in table
    assert report["asmil"]["checkpoint"] == {"parameters": 1_500_000, "bytes_per_fold": 4.5 * 2**20,
                                             "bytes_total": 9 * 2**20, "dtypes": ["float16", "float32"]}
    assert "4.5 MB (1.50 M params, float16/float32)" in (tmp_path / "report" / "index.html").read_text()
    html = (tmp_path / "report" / "index.html").read_text()
    assert "0.750 ± 0.354" in html and "data:image/png;base64," in html  # the instability curves
    assert "No ground truth" in html


def test_report_says_in_words_when_attention_is_practically_uniform(tmp_path: Path) -> None:
    flat = {"effective_fraction": 0.9999, "top_ratio": 1.02, "practically_uniform": True}
    peaked = {"effective_fraction": 0.05, "top_ratio": 40.0, "practically_uniform": False}
    for model, attention in (("asmil", flat), ("abmil", peaked)):
        for k in range(2):
            fake_fold(tmp_path / "models", model, k, 0.75, 0.8)
            path = tmp_path / "models" / model / f"fold{k}" / "metrics.json"
            path.write_text(json.dumps({**json.loads(path.read_text()), "attention": attention}))
    report = write_report(tmp_path / "models", ["asmil", "abmil"], 2, tmp_path / "report")
    assert report["asmil"]["uniform_folds"] == 2 and report["abmil"]["uniform_folds"] == 0
    assert report["asmil"]["attention"]["top_ratio"]["mean"] == pytest.approx(1.02)
    html = (tmp_path / "report" / "index.html").read_text().replace("&#x27;", "'")
    assert "asmil's attention is practically uniform in every fold" in html
    assert "1.02x the uniform weight" in html and "abmil's attention left uniform" in html


def loc_rows(model: str, dice: list[float]) -> pd.DataFrame:
    n = len(dice)
    return pd.DataFrame({
        "model": model, "slide_id": [f"s{i}" for i in range(n)], "has_tumour": [True] * (n - 1) + [False],
        "dice": dice, "iou": dice, "dice_topq": dice, "coverage_tumour_k": dice, "tile_auc": dice,
        "attention_in_tumour": dice, "dice_oracle": [0.9] * n, "threshold": "otsu",
    })


def test_paired_comparison_counts_wins_and_tests(tmp_path: Path) -> None:
    table = pd.concat([loc_rows("asmil", [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.0]), loc_rows("abmil", [0.1, 0.2, 0.3, 0.3, 0.5, 0.1, 0.9])])
    rows = {r["metric"]: r for r in paired_comparison(table, "asmil")}
    d = rows["dice"]
    assert d["n"] == 6 and (d["wins"], d["ties"], d["losses"]) == (5, 1, 0)  # the slide without tumour is left out
    assert d["mean_difference"] == pytest.approx(np.mean([0.8, 0.6, 0.4, 0.3, 0.0, 0.3]))
    assert 0 < d["wilcoxon_p"] < 0.1
    same = paired_comparison(pd.concat([loc_rows("asmil", [0.5] * 4), loc_rows("abmil", [0.5] * 4)]), "asmil")
    assert same[0]["wilcoxon_p"] == 1.0


def test_report_html_gathers_localisation_and_heatmaps(tmp_path: Path) -> None:
    models = tmp_path / "models"
    for model in ("asmil", "abmil"):
        for k in range(2):
            fake_fold(models, model, k, 0.5 + 0.25 * k, 0.8)
    loc = tmp_path / "loc"
    loc.mkdir()
    paths = []
    for model, dice in (("asmil", [0.9, 0.8, 0.7, 0.0]), ("abmil", [0.1, 0.2, 0.3, 0.0])):
        write_csv(loc / f"{model}.csv", loc_rows(model, dice))
        paths.append(loc / f"{model}.csv")
    heat, truth = tmp_path / "heatmaps", tmp_path / "truth"
    truth.mkdir()
    for i in range(4):
        mask = np.zeros((20, 30), np.uint8)
        if i < 3:
            mask[5 : 8 + i, 5:15] = 255
        cv2.imwrite(str(truth / f"s{i}.png"), mask)
        (truth / f"s{i}.json").write_text(json.dumps({"downsample": 10.0, "tumour_area_um2": float(mask.sum())}))
        for model in ("asmil", "abmil"):
            (heat / model / "scores").mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(heat / model / f"s{i}.png"), np.full((40, 60, 3), 128, np.uint8))
            write_synthetic_scores(heat / model / "scores", f"s{i}", np.zeros((1, 2)), [1.0], 10.0,
                                   slide_dimensions=[300, 200], folds=[1])
    inventory = tmp_path / "inventory.csv"
    inventory.write_text("slide_id,path,status,message\ns0,/x/s0.svs,ok,\nbad <one>,/x/bad.svs,error,slide 'bad <one>': file is empty\n")
    newp = tmp_path / "new.csv"
    newp.write_text("slide_id,model,status,pred\nnew,asmil,ok,tumour\n")
    write_report(models, ["asmil", "abmil"], 2, tmp_path / "report", localisation=paths, heatmaps_dir=heat,
                 heatmap_models=["asmil", "abmil"], truth_dir=truth, inventory=inventory, new_predictions=newp, sample=3)
    html = (tmp_path / "report" / "index.html").read_text()
    for section in ("Classification", "Attention instability", "Attention", "Localisation", "Heatmaps", "New slides", "Slides left out"):
        assert re.search(f">{re.escape(section)}[^<]*</h2>", html), section
    assert html.count("data:image/jpeg;base64,") == 6  # 3 slides x 2 models
    assert "href='../heatmaps/asmil/s2.png'" in html
    assert re.search(r"<h3>s2 ", html) and "<h3>s3 " in html  # largest tumours first, then one without
    assert "bad &lt;one&gt;" in html and "bad <one>" not in html  # escaped
    assert "0.800 ± 0.100" in html  # asmil Dice over the 3 tumour slides
    summary = json.loads((tmp_path / "report" / "localisation.json").read_text())
    assert summary["by_model"]["asmil"]["dice"]["n"] == 3 and summary["reference"] == "asmil"
    assert len(pd.read_csv(tmp_path / "report" / "localisation.csv")) == 8
    assert "## Localisation" in (tmp_path / "report" / "metrics.md").read_text()
    assert "viewer.html" not in html
    write_report(models, ["asmil", "abmil"], 2, tmp_path / "report", heatmaps_dir=heat, heatmap_models=["asmil"],
                 truth_dir=truth, sample=3, viewer="viewer.html")
    assert "<a href='viewer.html'>" in (tmp_path / "report" / "index.html").read_text()


def test_report_pools_each_models_froc_over_its_slides(tmp_path: Path) -> None:
    models = tmp_path / "models"
    for k in range(2):
        fake_fold(models, "asmil", k, 0.5, 0.8)
    table = loc_rows("asmil", [0.9, 0.8, 0.7, 0.0]).assign(
        froc_detections=[2, 1, 0, 1], froc_lesions=[1, 1, 1, 0], froc_itc=0, froc_found=[1, 1, 0, 0],
        froc_fps=[1, 0, 0, 1], froc_lesion_scores=["8", "3", "0", ""], froc_fp_scores=["4", "", "", "2.5"])
    write_csv(tmp_path / "asmil.csv", table)
    write_report(models, ["asmil"], 2, tmp_path / "report", localisation=[tmp_path / "asmil.csv"])
    froc = json.loads((tmp_path / "report" / "localisation.json").read_text())["froc"]["asmil"]
    # 4 slides, 3 lesions: thresholds 8, 4, 3, 2.5 -> (0, 1/3), (1/4, 1/3), (1/4, 2/3), (1/2, 2/3)
    assert froc["n_slides"] == 4 and froc["n_lesions"] == 3
    assert froc["sensitivity_at"] == pytest.approx({"0.25": 2 / 3, "0.5": 2 / 3, "1": 2 / 3, "2": 2 / 3, "4": 2 / 3,
                                                    "8": 2 / 3})
    html = (tmp_path / "report" / "index.html").read_text()
    assert "<h3>Lesion-level FROC</h3>" in html and "alt='FROC curves'" in html
    assert "Lesion-level FROC" in (tmp_path / "report" / "metrics.md").read_text()


def test_sample_prefers_large_tumours_then_contrast() -> None:
    ids = ["a", "b", "c", "d", "e"]
    area = {"a": 0.0, "b": 5.0, "c": 9.0, "d": 0.0, "e": 1.0}
    assert choose_sample(ids, 3, area, {}) == ["c", "b", "a"]
    assert choose_sample(ids, 0, area, {}) == []
    labels = {"a": "x", "b": "y", "c": "x", "d": "y", "e": "x"}
    assert choose_sample(ids, 3, {}, labels) == ["a", "b", "c"]


def test_slide_without_tiles_draws_the_bare_thumbnail(real_slide: Path, tmp_path: Path) -> None:
    write_synthetic_scores(tmp_path, "e", np.zeros((0, 2)), [], 128.0, tile_size=64)
    draw_slide(real_slide, tmp_path / "e_scores.csv", tmp_path / "e.png", out_geojson=tmp_path / "e.geojson",
               out_gallery=tmp_path / "e_topk.png", style=Style(clip_to_tissue=False), mpp=16.0)
    with Slide(real_slide) as s:
        thumb, _ = s.thumbnail_at_mpp(16.0)
    assert np.array_equal(cv2.cvtColor(cv2.imread(str(tmp_path / "e.png")), cv2.COLOR_BGR2RGB), thumb)
    assert read_tile_geojson(tmp_path / "e.geojson")[0].shape == (0, 2)


# --- out of memory ---------------------------------------------------------------------------------


def _raise(exc: BaseException):  # type: ignore[no-untyped-def]
    def fail(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise exc

    return fail


def test_out_of_memory_while_drawing_names_slide_and_settings_and_leaves_nothing(
    real_slide: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from wsi_asmil.maps import heatmap
    from wsi_asmil.maps.heatmap import HeatmapMemoryError

    csv, coords, _ = fake_scores(tmp_path, real_slide, 128.0)
    out = tmp_path / "out"
    outputs = {"out_geojson": out / "s.geojson", "out_gallery": out / "s_topk.jpg", "style": Style(clip_to_tissue=False)}
    # The gallery comes after the PNG is in place: the PNG must go too.
    monkeypatch.setattr(heatmap, "topk_gallery", _raise(MemoryError()))
    with pytest.raises(HeatmapMemoryError) as err:
        draw_slide(real_slide, csv, out / "s.png", mpp=16.0, **outputs)
    message = str(err.value)
    assert f"drawing the heatmap of slide 's', {len(coords)} tiles, an overlay of" in message
    assert "heatmap.mpp (now 16)" in message and "heatmap.max_edge (now null" in message
    assert "tiff_mpp" not in message
    assert list(out.iterdir()) == []
    monkeypatch.undo()
    # OpenCV's own allocation failure, in the pyramidal TIFF, names the TIFF's setting.
    import wsi_asmil.maps.overlay_tiff

    monkeypatch.setattr(wsi_asmil.maps.overlay_tiff, "write_overlay_tiff", _raise(
        cv2.error("OpenCV(4.10.0) error: (-4:Insufficient memory) Failed to allocate 8589934592 bytes in function 'OutOfMemoryError'")))
    with pytest.raises(HeatmapMemoryError, match=r"heatmap.tiff_mpp \(now 2\)"):
        draw_slide(real_slide, csv, out / "s.png", out_tiff=out / "s.tif", tiff_mpp=2.0, mpp=16.0, max_edge=500, **outputs)
    assert list(out.iterdir()) == []


def test_drawing_errors_pass_through_and_the_cli_is_clean(
    real_slide: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    from wsi_asmil.maps import heatmap

    csv, _, _ = fake_scores(tmp_path, real_slide, 128.0)
    out = tmp_path / "out"
    args = ["--slide", str(real_slide), "--scores", str(csv), "--out", str(out / "s.png"), "--gallery",
            str(out / "s_topk.jpg"), "--no-clip-to-tissue", "--mpp", "16"]
    monkeypatch.setattr(heatmap, "topk_gallery", _raise(ValueError("a real bug")))
    with pytest.raises(ValueError, match="a real bug"):
        heatmap_main(args)
    assert list(out.iterdir()) == []  # not an out-of-memory error, but still no half set of outputs
    monkeypatch.setattr(heatmap, "render", _raise(MemoryError()))
    with pytest.raises(SystemExit) as err:
        heatmap_main(args)
    log = capsys.readouterr().err
    assert err.value.code == 1 and "slide 's'" in log and "heatmap.mpp" in log and "Traceback" not in log
    assert list(out.iterdir()) == []
