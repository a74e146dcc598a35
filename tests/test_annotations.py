"""Ground truth from GeoJSON, ASAP XML, mask images and the demo's truth, as masks on a known grid."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from wsi_asmil.core.canvas import Grid
from wsi_asmil.tissue.annotations import (
    AnnotationError,
    find_annotation,
    load_tumour_mask,
    main,
    rasterise,
)
from wsi_asmil.tissue.masks import read_tumour_mask


def square(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def feature(rings: list, cls: object = None, kind: str = "Polygon") -> dict:
    props = {"objectType": "annotation"}
    if cls is not None:
        props["classification"] = cls
    return {"type": "Feature", "geometry": {"type": kind, "coordinates": rings}, "properties": props}


def test_polygon_with_hole_and_island_in_any_order() -> None:
    grid = Grid(1.0, 100, 100)
    outer = [np.array(square(10, 10, 90, 90)), np.array(square(30, 30, 70, 70))]  # a ring with a hole
    island = [np.array(square(45, 45, 55, 55))]
    for polys in ([outer, island], [island, outer]):
        mask = rasterise(polys, grid)
        assert mask.sum() == 80 * 80 - 40 * 40 + 10 * 10
        assert mask[20, 20] and not mask[35, 35] and mask[50, 50]


def test_rasterise_follows_pixel_centres_at_any_downsample() -> None:
    poly = [[np.array(square(0, 0, 160, 80))]]  # one polygon of one ring
    assert rasterise(poly, Grid(16.0, 20, 20)).sum() == 10 * 5
    assert rasterise(poly, Grid(16.0, 5, 5, x0=8, y0=0)).sum() == 2 * 5  # a window sees its part only


def test_qupath_geojson_classes(tmp_path: Path) -> None:
    feats = [
        feature([square(0, 0, 100, 100)], {"name": "Tumor", "colorRGB": -1}),
        feature([square(200, 0, 300, 100)], "Stroma"),
        feature([[square(0, 200, 100, 300)], [square(200, 200, 300, 300)]], {"names": ["Tumor", "Grade 2"]}, "MultiPolygon"),
        feature([square(40, 40, 60, 60)], {"name": "Ignore*"}),
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [5, 5]}, "properties": {}},
    ]
    path = tmp_path / "s.geojson"
    path.write_text(json.dumps(feats))  # QuPath 0.2 writes a bare list of features
    every = load_tumour_mask(path, (400, 400), 10.0).mask
    assert every.sum() == 100 + 100 + 2 * 100 - 4  # all polygons but the Ignore* square
    tumour = load_tumour_mask(path, (400, 400), 10.0, include=["tumor*"]).mask
    assert tumour.sum() == 100 + 2 * 100 - 4 and not tumour[5, 25]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    assert np.array_equal(load_tumour_mask(path, (400, 400), 10.0, include=["tumor*"]).mask, tumour)


def test_asap_xml_subtracts_camelyon_exclusions(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    def ann(group: str, pts: list[list[float]]) -> str:
        coords = "".join(f'<Coordinate Order="{i}" X="{x}" Y="{y}"/>' for i, (x, y) in enumerate(pts[:-1]))
        return f'<Annotation Name="a" Type="Polygon" PartOfGroup="{group}"><Coordinates>{coords}</Coordinates></Annotation>'

    xml = ("<?xml version='1.0'?><ASAP_Annotations><Annotations>"
           + ann("_0", square(0, 0, 200, 200)) + ann("_2", square(50, 50, 150, 150)) + ann("_1", square(300, 0, 400, 100))
           + "</Annotations><AnnotationGroups/></ASAP_Annotations>")
    path = tmp_path / "tumor_001.xml"
    path.write_text(xml)
    mask = load_tumour_mask(path, (500, 300), 10.0).mask
    assert mask.shape == (30, 50)
    assert mask.sum() == 400 - 100 + 100 and not mask[10, 10] and mask[2, 2] and mask[5, 35]
    # A class filter that drops every polygon is said out loud (CAMELYON16 groups are _0/_1, not "Tumor").
    with caplog.at_level("WARNING"):
        assert not load_tumour_mask(path, (500, 300), 10.0, include=["tumor"]).mask.any()
    assert "_0" in caplog.text and "heatmap.localisation.include" in caplog.text
    path.write_text("<ASAP_Annotations><Annotation")
    with pytest.raises(AnnotationError, match="tumor_001.xml"):
        load_tumour_mask(path, (500, 300), 10.0)


def test_mask_images_at_any_resolution(tmp_path: Path) -> None:
    full = np.zeros((300, 400), np.uint8)
    full[100:200, 0:100] = 1  # level-0 mask, values 0/1 like CAMELYON's
    cv2.imwrite(str(tmp_path / "a_mask.png"), cv2.resize(full * 255, (100, 75), interpolation=cv2.INTER_NEAREST))
    png = load_tumour_mask(tmp_path / "a_mask.png", (400, 300), 10.0)
    assert png.mask.shape == (30, 40) and png.mask.sum() == 10 * 10 and png.kind == "mask-image"
    # A pyramidal TIFF: the coarsest level still at least as fine as the grid is the one read.
    with tifffile.TiffWriter(tmp_path / "b_mask.tif") as tw:
        tw.write(full, tile=(64, 64), subifds=1)
        tw.write(full[::4, ::4], tile=(32, 32), subfiletype=1)
    tif = load_tumour_mask(tmp_path / "b_mask.tif", (400, 300), 10.0)
    assert np.array_equal(tif.mask, png.mask)
    cv2.imwrite(str(tmp_path / "c.png"), np.zeros((10, 40), np.uint8))
    with pytest.raises(AnnotationError, match="aspect ratio"):
        load_tumour_mask(tmp_path / "c.png", (400, 300), 10.0)


def test_demo_truth_is_read_exactly(demo_slides: dict[str, Path]) -> None:
    from wsi_asmil.synthetic import read_truth

    sid, slide = next(iter(demo_slides.items()))
    truth_dir = slide.parent.parent / "truth"
    truth = read_truth(truth_dir, sid)
    loaded = load_tumour_mask(truth_dir / f"{sid}.json", (truth.width, truth.height), truth.downsample)
    assert loaded.kind == "synthetic" and np.array_equal(loaded.mask, truth.tumour)


def test_find_annotation_prefers_vector_formats(tmp_path: Path) -> None:
    assert find_annotation(tmp_path, "s 1") is None
    (tmp_path / "s 1.png").write_bytes(b"")
    (tmp_path / "s 1.xml").write_text("")
    assert find_annotation(tmp_path, "s 1").name == "s 1.xml"
    with pytest.raises(AnnotationError, match="unsupported"):
        load_tumour_mask(tmp_path / "x.docx", (10, 10), 1.0)


def test_cli_writes_the_mask_and_its_sidecar(real_slide: Path, tmp_path: Path) -> None:
    # 2220 x 2967 px at 0.499 um/px; a tumour square of 499 um.
    path = tmp_path / "s.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [feature([square(0, 0, 1000, 1000)], "Tumor")]}))
    main(["--slide", str(real_slide), "--annotation", str(path), "--mpp", "8", "--out", str(tmp_path / "t.png")])
    mask, side = read_tumour_mask(tmp_path / "t.png", tmp_path / "t.json")
    assert side["downsample"] == pytest.approx(8 / 0.499) and side["format"] == "geojson"
    assert mask.shape == (int(np.ceil(2967 / side["downsample"])), int(np.ceil(2220 / side["downsample"])))
    assert side["tumour_area_um2"] == pytest.approx(499.0**2, rel=0.05)
