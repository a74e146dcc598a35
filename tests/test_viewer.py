"""The report's zoomable viewer: Deep Zoom geometry and tiles, the layers' colours, OpenSeadragon's
vendoring, and the page itself opened from file:// in a real headless Chromium (Debian's package).

Without Chromium the browser test is skipped, unless WSI_ASMIL_REQUIRE_CHROMIUM=1 (CI), where it
fails. Its screenshot is kept under $WSI_ASMIL_ARTIFACTS (default tests/artifacts/).
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import io
import json
import os
import re
import select
import shutil
import subprocess
import tarfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from conftest import physical_pattern, write_generic_tiff

from wsi_asmil.core.canvas import Grid, colour_table
from wsi_asmil.core.io import write_json
from wsi_asmil.maps.deepzoom import DZI_NS, Pyramid, write_dzi, write_tiles
from wsi_asmil.maps.heatmap import Style, normalize, render
from wsi_asmil.maps.scores import ScoresFormatError
from wsi_asmil.report import vendor, viewer
from wsi_asmil.slides.slide import Slide
from wsi_asmil.synthetic.scores import write_synthetic_scores

ARTIFACTS = Path(os.environ.get("WSI_ASMIL_ARTIFACTS") or Path(__file__).parent / "artifacts")


# --- Deep Zoom geometry ----------------------------------------------------------------------------


def test_levels_halve_down_to_one_pixel() -> None:
    p = Pyramid(1000, 600)
    assert p.max_level == 10 and list(p.levels) == list(range(11))
    assert p.level_size(10) == (1000, 600) and p.level_size(9) == (500, 300)
    assert p.level_size(1) == (2, 2) and p.level_size(0) == (1, 1)
    assert Pyramid(1024, 1).max_level == 10 and Pyramid(1025, 3).max_level == 11
    assert Pyramid(1, 1).max_level == 0 and Pyramid(1, 1).level_size(0) == (1, 1)
    # odd sizes round up at every level, like the format's reference encoders
    assert Pyramid(1001, 3).level_size(9) == (501, 2) and Pyramid(1001, 3).level_size(8) == (251, 1)


def test_tile_boxes_overlap_inside_and_stop_at_the_edges() -> None:
    p = Pyramid(600, 300, tile_size=254, overlap=1)
    assert p.tile_grid(10) == (3, 2)
    assert p.tile_box(10, 0, 0) == (0, 0, 255, 255)  # first tile: overlap only right and below
    assert p.tile_box(10, 1, 0) == (253, 0, 509, 255)  # interior: one pixel on both sides
    assert p.tile_box(10, 2, 1) == (507, 253, 600, 300)  # edge tile: cut at the image
    assert p.tile_grid(0) == (1, 1) and p.tile_box(0, 0, 0) == (0, 0, 1, 1)
    q = Pyramid(512, 512, tile_size=256, overlap=0)
    assert q.tile_box(9, 1, 1) == (256, 256, 512, 512)
    with pytest.raises(ValueError, match="at least 1 x 1"):
        Pyramid(0, 5)


def test_level_grids_follow_the_slide() -> None:
    # A 10001 x 3000 px slide at downsample 4: the full level is ceil(10001 / 4) wide, and every
    # level's canvas grid has the level's size and the matching level-0 downsample.
    p = Pyramid(2501, 750, downsample=4.0)
    for level in p.levels:
        g = p.level_grid(level)
        assert (g.width, g.height) == p.level_size(level)
        assert g.downsample == 4.0 * 2 ** (p.max_level - level)
        assert Grid.covering(10001, 3000, g.downsample).shape == g.shape


def coordinate_image(grid: Grid) -> np.ndarray:
    """Pixels that say where they are: (x mod 251, y mod 241, level-0 downsample), so any tile can
    be checked against the box it claims."""
    ys, xs = np.mgrid[grid.y0 : grid.y0 + grid.height, grid.x0 : grid.x0 + grid.width]
    level = np.full(xs.shape, int(np.log2(grid.downsample)) % 256)
    return np.stack([xs % 251, ys % 241, level], -1).astype(np.uint8)


@pytest.mark.parametrize("block_tiles", [1, 3, 50])
def test_every_tile_holds_exactly_its_box(tmp_path: Path, block_tiles: int) -> None:
    p = Pyramid(700, 450, tile_size=128, overlap=2)
    n = write_tiles(p, coordinate_image, tmp_path / "t_files", "png", block_tiles=block_tiles)
    assert n == sum(c * r for c, r in map(p.tile_grid, p.levels))
    for level in p.levels:
        cols, rows = p.tile_grid(level)
        names = sorted(f.name for f in (tmp_path / "t_files" / str(level)).iterdir())
        assert names == sorted(f"{c}_{r}.png" for c in range(cols) for r in range(rows))
        for c in range(cols):
            for r in range(rows):
                x0, y0, x1, y1 = p.tile_box(level, c, r)
                tile = cv2.cvtColor(cv2.imread(str(tmp_path / "t_files" / str(level) / f"{c}_{r}.png")), cv2.COLOR_BGR2RGB)
                expected = coordinate_image(Grid(p.level_grid(level).downsample, x1 - x0, y1 - y0, x0, y0))
                assert np.array_equal(tile, expected), (level, c, r)


def test_descriptor_and_dzi_file_agree(tmp_path: Path) -> None:
    p = Pyramid(300, 200, tile_size=254, overlap=1)
    source, n = write_dzi(tmp_path, "layer", p, lambda g: np.zeros((g.height, g.width, 3), np.uint8), "jpeg")
    root = ET.fromstring((tmp_path / "layer.dzi").read_text())
    assert root.tag == f"{{{DZI_NS}}}Image" and root.get("Format") == "jpeg"
    assert root.get("TileSize") == "254" and root.get("Overlap") == "1"
    size = root.find(f"{{{DZI_NS}}}Size")
    assert (size.get("Width"), size.get("Height")) == ("300", "200")
    assert source["Image"] == {"xmlns": DZI_NS, "Format": "jpeg", "Overlap": "1", "TileSize": "254",
                               "Size": {"Width": "300", "Height": "200"}, "Url": "layer_files/"}
    assert (tmp_path / "layer_files" / "9" / "1_0.jpeg").is_file() and n == 9 + 2  # levels 0-8: one tile each
    with pytest.raises(ValueError, match="format"):
        write_tiles(p, coordinate_image, tmp_path / "x", "webp")
    with pytest.raises(ValueError, match="render returned"):
        write_tiles(p, lambda g: np.zeros((1, 1, 3), np.uint8), tmp_path / "y", "png")


# --- the layers ------------------------------------------------------------------------------------


def tile_grid_scores(w: int, h: int, extent: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = np.arange(0, w - extent + 1, extent / 2), np.arange(0, h - extent + 1, extent / 2)
    coords = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2).round().astype(np.int64)
    scores = np.random.default_rng(seed).random(len(coords))
    return coords, scores / scores.sum()


def test_heat_layer_has_the_static_heatmaps_colours_and_is_transparent_elsewhere() -> None:
    w, h, extent = 3000, 2000, 160.0
    coords, scores = tile_grid_scores(w, h, extent)
    coords = coords[coords[:, 0] < 2200]  # the right of the slide has no tiles
    values = normalize(scores[: len(coords)], "rank")
    tissue = np.ones((h // 50, w // 50), bool)
    tissue[:, :10] = False  # nor does the left, clipped off by the tissue mask
    grid = Grid(4.0, 750, 500)
    lut = colour_table("viridis")
    rgba = viewer.heat_renderer(coords, extent, values, lut, 0.5, tissue=tissue, tissue_ds=50.0)(grid)
    # heatmap.render with full opacity over black: the colour where it shows the heat, black elsewhere
    static = render(np.zeros((500, 750, 3), np.uint8), 4.0, coords, extent, values, "viridis", 1.0,
                    tissue=tissue, tissue_downsample=50.0, grid=grid)
    shown = rgba[..., 3] == 255
    assert np.array_equal(rgba[..., :3][shown], static[shown])
    assert not static[~shown].any() and (rgba[~shown] == 0).all() and set(np.unique(rgba[..., 3])) == {0, 255}
    assert not shown[:, : 500 // 4 - 1].any() and not shown[:, 2200 // 4 + 41 :].any() and shown.mean() > 0.5


def test_heat_windows_join_without_seams_when_blurred() -> None:
    w, h, extent = 2000, 1600, 128.0
    coords, scores = tile_grid_scores(w, h, extent, seed=1)
    render_heat = viewer.heat_renderer(coords, extent, normalize(scores, "rank"), colour_table("jet"), 0.5, blur_um=40.0)
    whole = render_heat(Grid(2.0, 1000, 800))
    pieces = np.concatenate([np.concatenate([render_heat(Grid(2.0, 250, 200, x, y)) for x in range(0, 1000, 250)], 1)
                             for y in range(0, 800, 200)], 0)
    assert np.array_equal(whole, pieces)


def test_outline_path_follows_the_mask_border_in_level0_pixels() -> None:
    mask = np.zeros((40, 60), bool)
    mask[10:30, 20:50] = True
    mask[2:4, 2:5] = True  # a second piece: a second closed subpath
    path = viewer.outline_path(mask, 8.0)
    subpaths = re.findall(r"M([^Z]*)Z", path)
    assert len(subpaths) == 2 and path.count("M") == 2
    points = [np.array([[float(v) for v in p.split()] for p in sub.split("L")]) for sub in subpaths]
    rect = next(p for p in points if p[:, 0].max() > 100)
    # the centres of the border pixels, in level-0 pixels: columns 20..49, rows 10..29 at 8x
    assert rect[:, 0].min() == 20.5 * 8 and rect[:, 0].max() == 49.5 * 8
    assert rect[:, 1].min() == 10.5 * 8 and rect[:, 1].max() == 29.5 * 8
    assert viewer.outline_path(np.zeros((5, 5), bool), 8.0) == ""


def test_slide_layer_reads_in_bounded_pieces_with_the_same_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    slide = write_generic_tiff(tmp_path / "s.tif", physical_pattern(1200, 900, 0.5), 0.5)
    grid = Grid(4.0, 300, 225)
    with Slide(slide) as s:
        whole = viewer.slide_renderer(s)(grid)
        monkeypatch.setattr(viewer, "MAX_READ", 64)  # 16 output px per read at 4x
        pieces = viewer.slide_renderer(s)(grid)
        thumb, _ = s.thumbnail_at_mpp(2.0)
    assert whole.shape == pieces.shape == thumb.shape
    assert np.abs(whole.astype(int) - pieces.astype(int)).mean() < 2.0
    assert np.abs(whole.astype(int) - thumb.astype(int)).mean() < 2.0


# --- one slide's folder, the sample, the page -------------------------------------------------------


def small_case(root: Path) -> dict[str, Path]:
    """A 2048 x 1536 slide at 0.5 um/px, scores low on the left half and high on the right (so
    both ends of the colour map show), a tissue mask and a truth rectangle in the middle."""
    w, h, mpp, extent = 2048, 1536, 0.5, 128.0
    slide = write_generic_tiff(root / "slide é #1.tif", physical_pattern(w, h, mpp), mpp)
    xs, ys = np.arange(0, w - extent + 1, extent), np.arange(0, h - extent + 1, extent)
    coords = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2).astype(np.int64)
    scores = np.where(coords[:, 0] < w / 2, 0.001, 1.0)  # two values: rank gives each half one colour
    scores /= scores.sum()
    write_synthetic_scores(root, "s", coords, scores, extent)
    tissue = np.full((h // 16, w // 16), 255, np.uint8)
    tissue[:, -8:] = 0  # the last 128 level-0 px are glass
    cv2.imwrite(str(root / "mask.png"), tissue)
    write_json(root / "mask.json", {"downsample": 16.0})
    truth = np.zeros((h // 16, w // 16), np.uint8)
    truth[30:66, 40:90] = 255
    cv2.imwrite(str(root / "truth.png"), truth)
    write_json(root / "truth.json", {"downsample": 16.0, "tumour_area_um2": 1.0})
    return {"slide": slide, "scores": root / "s_scores.csv", "mask": root / "mask.png", "truth": root / "truth.png"}


def build(root: Path, report: Path) -> tuple[dict[str, Path], dict]:
    case = small_case(root)
    record = viewer.build_slide(case["slide"], report / viewer.SLIDES_FOLDER / case["slide"].stem,
                                {"asmil": case["scores"], "abmil": case["scores"]},
                                style=Style(normalize="rank", cmap="jet"), slide_mpp=1.0, overlay_mpp=2.0,
                                tissue_mask=case["mask"], truth_png=case["truth"])
    return case, record


def test_slide_folder_holds_every_layer(tmp_path: Path) -> None:
    case, record = build(tmp_path, tmp_path / "report")
    folder = tmp_path / "report" / viewer.SLIDES_FOLDER / case["slide"].stem
    assert json.loads((folder / "layers.json").read_text()) == record
    assert [(l["kind"], l["name"]) for l in record["layers"]] == [("slide", "slide"), ("heat", "asmil"), ("heat", "abmil"), ("truth", "truth")]
    assert record["slide_layer_mpp"] == 1.0 and record["overlay_mpp"] == 2.0
    *tiled, truth = record["layers"]
    sizes = {l["name"]: (l["source"]["Image"]["Size"], l["source"]["Image"]["Format"]) for l in tiled}
    assert sizes["slide"] == ({"Width": "1024", "Height": "768"}, "jpeg")
    assert sizes["asmil"] == sizes["abmil"] == ({"Width": "512", "Height": "384"}, "png")
    assert truth["path"] == viewer.outline_path(cv2.imread(str(case["truth"]), cv2.IMREAD_GRAYSCALE) > 0, 16.0)
    for layer in tiled:
        name = layer["source"]["Image"]["Url"].rstrip("/")
        assert (folder / name / "0" / "0_0.png").is_file() or (folder / name / "0" / "0_0.jpeg").is_file()
        assert (folder / (name.removesuffix("_files") + ".dzi")).is_file()
    top = cv2.imread(str(folder / "heat_asmil_files" / "9" / "1_0.png"), cv2.IMREAD_UNCHANGED)
    assert top.shape[2] == 4 and top[..., 3].max() == 255
    assert top[:, -2:, 3].max() == 0  # the glass the tissue mask left out is transparent
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temporaries


def test_a_failed_build_leaves_no_folder(tmp_path: Path) -> None:
    case = small_case(tmp_path)
    out = tmp_path / "report" / "viewer" / "slides" / "s"
    with pytest.raises(ScoresFormatError, match="missing"):
        viewer.build_slide(case["slide"], out, {"asmil": tmp_path / "missing_scores.csv"})
    assert not out.exists() and not list(out.parent.iterdir())


def test_sample_is_the_reports(tmp_path: Path) -> None:
    from wsi_asmil.report.build import choose_sample

    for sid, area in [("a", 5.0), ("b", 0.0), ("c", 9.0), ("d", 0.0)]:
        write_json(tmp_path / f"{sid}.json", {"tumour_area_um2": area})
    assert viewer.choose_slides(["d", "c", "b", "a"], 3, tmp_path, None) == choose_sample(
        ["a", "b", "c", "d"], 3, {"a": 5.0, "b": 0.0, "c": 9.0, "d": 0.0}, {}) == ["c", "a", "b"]
    # the workflow's command: slides the inventory could not open are no candidates
    inventory = tmp_path / "slides.csv"
    inventory.write_text("slide_id,path,status,message\na,a.svs,ok,\nb,b.svs,ok,\nc,c.svs,error,empty\nd,d.svs,ok,\n")
    viewer.main(["sample", "--candidates", "a", "b", "c", "d", "--n", "3", "--truth-dir", str(tmp_path),
                 "--inventory", str(inventory), "--out", str(tmp_path / "sample.json")])
    assert json.loads((tmp_path / "sample.json").read_text()) == ["a", "b", "d"]


def test_page_inlines_sources_and_points_nowhere_outside(tmp_path: Path) -> None:
    records = [{"slide_id": "a</script>", "layers": [], "base": "viewer/slides/a%3C%2Fscript%3E/", "label": "a"}]
    page = viewer.page_html(records, 0.4)
    assert page.count("</script>") == 2  # the script tag and the page's own script; the id is escaped
    urls = re.findall(r"(?:src|href)=['\"]([^'\"]+)", page)
    assert urls == ["viewer/openseadragon/openseadragon.min.js", "index.html"]
    assert "value='0.4'" in page and "//" not in "".join(urls)


# --- OpenSeadragon from the npm registry ------------------------------------------------------------


def fake_tarball(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_vendoring_checks_the_hash_and_keeps_script_images_and_licence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = fake_tarball({
        "package/build/openseadragon/openseadragon.min.js": b"var OpenSeadragon;",
        "package/build/openseadragon/openseadragon.js": b"// unminified, not kept",
        "package/build/openseadragon/images/home_rest.png": b"png",
        "package/LICENSE.txt": b"BSD-3-Clause",
        "package/package.json": b"{}",
    })
    integrity = "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()
    vendor.check_integrity(data, integrity)
    with pytest.raises(vendor.VendorError, match="sha512"):
        vendor.check_integrity(data + b"x", integrity)
    with pytest.raises(vendor.VendorError, match="sha512"):
        vendor.check_integrity(data)  # not the pinned release
    monkeypatch.setenv("WSI_ASMIL_VENDOR_DIR", str(tmp_path / "cache"))
    with pytest.raises(vendor.VendorError, match="make install.*python -m wsi_asmil.report.vendor.*viewer.enabled"):
        vendor.installed()
    vendor.unpack(data, vendor.vendor_dir())
    copy = vendor.copy_into(tmp_path / "report" / "viewer" / "openseadragon")
    assert sorted(str(p.relative_to(copy)) for p in copy.rglob("*") if p.is_file()) == [
        "LICENSE.txt", "images/home_rest.png", "openseadragon.min.js"]
    with pytest.raises(vendor.VendorError, match="lacks"):
        vendor.unpack(fake_tarball({"package/README.md": b""}), tmp_path / "other")
    assert not (tmp_path / "other").exists()


# --- the page in a real browser ---------------------------------------------------------------------


def chromium() -> str:
    found = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    required = os.environ.get("WSI_ASMIL_REQUIRE_CHROMIUM") == "1"
    if found is None:
        message = "no Chromium on PATH (Debian: apt-get install chromium)"
        pytest.fail(message) if required else pytest.skip(message)
    try:
        vendor.installed()
    except vendor.VendorError as exc:
        pytest.fail(str(exc)) if required else pytest.skip(str(exc))
    return found


class DevTools:
    """Headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``:
    NUL-terminated JSON on the browser's fds 3 and 4), so the test needs no package beyond Python."""

    def __init__(self, browser: str, profile: Path) -> None:
        cmd_read, self._cmd = os.pipe()
        self._out, out_write = os.pipe()
        # above fd 4, so that moving them onto 3 and 4 in the child cannot overwrite one another
        child = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (cmd_read, out_write)]
        os.close(cmd_read)
        os.close(out_write)

        def wire() -> None:
            os.dup2(child[0], 3)
            os.dup2(child[1], 4)

        self.proc = subprocess.Popen(
            [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
             "--remote-debugging-pipe", f"--user-data-dir={profile}", "about:blank"],
            # the test starts no threads, so the child's pre-exec step is safe
            preexec_fn=wire, close_fds=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # noqa: PLW1509
        for fd in child:
            os.close(fd)
        self._buffer, self._id, self.events = b"", 0, []

    def _message(self, timeout: float) -> dict:
        while b"\0" not in self._buffer:
            if not select.select([self._out], [], [], timeout)[0]:
                raise TimeoutError(f"Chromium did not answer within {timeout} s")
            chunk = os.read(self._out, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60) -> dict:
        self._id += 1
        request = {"id": self._id, "method": method, "params": params or {}, **({"sessionId": session} if session else {})}
        os.write(self._cmd, json.dumps(request).encode() + b"\0")
        while True:
            message = self._message(timeout)
            if message.get("id") == self._id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
            self.proc.wait(timeout=10)
        except (OSError, RuntimeError, TimeoutError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        os.close(self._cmd)
        os.close(self._out)


def test_viewer_in_headless_chromium_fetches_tiles_and_draws_the_overlay(tmp_path: Path) -> None:
    browser = chromium()
    report = tmp_path / "report"
    case, _ = build(tmp_path, report)
    page = viewer.write_page(report, [case["slide"].stem], alpha=1.0)
    assert (report / "viewer" / "openseadragon" / "LICENSE.txt").is_file()

    chrome = DevTools(browser, tmp_path / "profile")
    try:
        target = chrome.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = chrome.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        chrome.send("Network.enable", session=session)
        chrome.send("Emulation.setDeviceMetricsOverride", {"width": 1000, "height": 700, "deviceScaleFactor": 1,
                                                           "mobile": False}, session=session)
        chrome.send("Page.navigate", {"url": page.as_uri()}, session=session)
        deadline, state = time.monotonic() + 90, {}
        while time.monotonic() < deadline and state.get("ready") != "1":
            time.sleep(0.2)
            answer = chrome.send("Runtime.evaluate", {"expression": "JSON.stringify(document.body ? document.body.dataset : {})",
                                                      "returnByValue": True}, session=session)
            state = json.loads(answer["result"]["value"])
        shot = base64.b64decode(chrome.send("Page.captureScreenshot", {"format": "png"}, session=session)["data"])
    finally:
        chrome.close()
    (tmp_path / "viewer.png").write_bytes(shot)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "viewer_chromium.png").write_bytes(shot)

    # Every layer it shows was fetched, from file:// beside the page and nowhere else, and drawn.
    assert state.get("ready") == "1" and state["failed"] == "0", state
    urls = [e["params"]["request"]["url"] for e in chrome.events if e.get("method") == "Network.requestWillBeSent"]
    assert urls and all(u.startswith((report.as_uri() + "/", "data:")) for u in urls), urls
    fetched = {name: sum(f"/{name}_files/" in u for u in urls) for name in ("slide", "heat_asmil", "heat_abmil")}
    loaded, drawn = json.loads(state["tiles"]), json.loads(state["drawn"])
    assert fetched["slide"] >= 4 and fetched["heat_asmil"] >= 1 and fetched["heat_abmil"] == 0, fetched  # abmil is off
    assert loaded["slide"] == fetched["slide"] and loaded["asmil"] == fetched["heat_asmil"]
    assert drawn["slide"] >= 1 and drawn["asmil"] >= 1 and state["outline"] == "1", state

    # At full opacity the overlay's own colours cover the tissue: the cold half and the hot half,
    # and the truth outline is white inside the image.
    rgb = cv2.cvtColor(cv2.imdecode(np.frombuffer(shot, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB).astype(int)
    lut = colour_table("jet")
    values = normalize(pd.read_csv(case["scores"])["score"].to_numpy(), "rank")
    low, high = lut[int(np.rint(values.min() * 255))], lut[int(np.rint(values.max() * 255))]
    is_low, is_high = (np.abs(rgb - low).max(-1) <= 4), (np.abs(rgb - high).max(-1) <= 4)
    assert is_low.mean() > 0.1 and is_high.mean() > 0.1, (is_low.mean(), is_high.mean())
    ys, xs = np.nonzero(is_low | is_high)
    image = rgb[ys.min() : ys.max(), xs.min() : xs.max()]
    white = (image >= 245).all(-1)
    assert white.sum() > 500 and white.mean() < 0.05, white.sum()  # lines, not a blank view


def test_viewer_benchmark_runs(tmp_path: Path) -> None:
    """benchmarks/viewer_pyramid.py at toy size, so the CAMELYON-sized run is not broken by a change
    here (its scores are written as scoring writes them, through the strict reader's format)."""
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "viewer_pyramid.py"
    proc = subprocess.run([sys.executable, str(script), "--work", str(tmp_path), "--width", "4096", "--height", "3072"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    row = proc.stdout.strip().splitlines()[-1].strip("|").split("|")
    files, seconds, peak = int(row[4]), float(row[6]), float(row[7])
    assert files > 10 and seconds > 0 and peak > 0
    assert (tmp_path / "viewer_1_2_2" / "layers.json").is_file()
