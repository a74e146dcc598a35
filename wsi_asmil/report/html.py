"""The run's report as one self-contained HTML page: readable in any browser, without running code.

Figures and heatmaps are embedded as base64 images (the page can be mailed or archived alone);
heatmaps also link to their full-resolution files relative to the page (``../heatmaps/...``).
This module only formats; ``wsi_asmil.report.build`` gathers the numbers.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import cv2
import numpy as np
import pandas as pd

from wsi_asmil.core.canvas import Grid, lookup_mask
from wsi_asmil.maps.froc import FP_RATES

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{margin-top:2em;border-bottom:1px solid #ccc;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}th,td{border:1px solid #ddd;padding:.25em .6em;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
.note{color:#555;font-size:.9em}.grid{display:grid;gap:.6em}.cell{font-size:.8em;text-align:center}
.cell img{max-width:100%;border:1px solid #ccc}details{margin:.6em 0}summary{cursor:pointer;color:#0645ad}
.warn{color:#a40000}
"""


def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def png_data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def image_data_uri(rgb: np.ndarray, quality: int = 85) -> str:
    """An RGB uint8 image as an embedded JPEG."""
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return png_data_uri(buf.tobytes(), "image/jpeg")


def fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, (float, np.floating)):
        return "n/a" if math.isnan(v) else f"{v:.{digits}f}"
    return esc(v)


def mean_std(stat: Mapping[str, float] | None, digits: int = 3) -> str:
    if not stat or stat.get("mean") is None or (isinstance(stat["mean"], float) and math.isnan(stat["mean"])):
        return "n/a"
    return f"{stat['mean']:.{digits}f} ± {stat.get('std', math.nan):.{digits}f}"


def table(head: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """An HTML table; cells are already formatted and escaped."""
    out = ["<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>"]
    out += ["<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows]
    return "".join(out) + "</table>"


def frame_table(df: pd.DataFrame, digits: int = 3) -> str:
    return table(list(map(str, df.columns)), ([fmt(v, digits) for v in row] for row in df.itertuples(index=False)))


def instability_figure(histories: Mapping[str, Sequence[pd.DataFrame]]) -> bytes | None:
    """Per model, mean over folds (band: min to max) of the epoch-to-epoch attention JSD and of the
    validation AUC, against the epoch."""
    if not any(len(h) for h in histories.values()):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), dpi=100)
    for model, folds in histories.items():
        for ax, col in zip(axes, ("jsd", "val_auc")):
            frames = [f.set_index("epoch")[col] for f in folds if col in f.columns]
            if not frames:
                continue
            m = pd.concat(frames, axis=1).astype(float)
            mean = m.mean(axis=1)
            line, = ax.plot(mean.index, mean.values, label=model)
            ax.fill_between(m.index, m.min(axis=1), m.max(axis=1), alpha=0.15, color=line.get_color())
    from matplotlib.ticker import MaxNLocator

    axes[0].set_yscale("log")
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_title("attention instability: JSD between consecutive epochs")
    axes[1].set_title("validation AUC")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend()
    return _png(fig)


def _png(fig: Any) -> bytes:
    """A matplotlib figure as PNG bytes, the figure closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def froc_figure(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]]) -> bytes | None:
    """Each model's FROC curve: sensitivity against false positives per slide (log scale), the
    six rates the score averages marked."""
    if not any(len(fps) for fps, _ in curves.values()):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.4), dpi=100)
    for model, (fps, sens) in curves.items():
        ax.plot(np.maximum(fps, 1 / 64), sens, marker=".", label=model)  # 0 FPs drawn at 1/64
    for rate in FP_RATES:
        ax.axvline(rate, color="grey", linewidth=0.6, alpha=0.5)
    ax.set_xscale("log", base=2)
    ax.set_xlim(1 / 16, 16)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false positives per slide")
    ax.set_ylabel("lesion sensitivity")
    ax.set_title("lesion-level FROC")
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def outlined(image: np.ndarray, slide_size: tuple[int, int], width: int, truth: np.ndarray | None,
             truth_downsample: float | None) -> np.ndarray:
    """The heatmap resized to ``width`` px with the truth tumour outline drawn over it (white on black)."""
    h, w = image.shape[:2]
    if w > width:
        image = cv2.resize(image, (width, max(1, round(h * width / w))), interpolation=cv2.INTER_AREA)
    if truth is None or truth_downsample is None or not truth.any():
        return image
    grid = Grid(slide_size[0] / image.shape[1], image.shape[1], image.shape[0])
    mask = lookup_mask(truth, truth_downsample, grid).astype(np.uint8)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    out = image.copy()
    cv2.drawContours(out, contours, -1, (0, 0, 0), 3)
    cv2.drawContours(out, contours, -1, (255, 255, 255), 1)
    return out


def page(title: str, sections: Sequence[tuple[str, str]], subtitle: str = "") -> str:
    body = [f"<h1>{esc(title)}</h1>"]
    if subtitle:
        body.append(f"<p class='note'>{subtitle}</p>")
    body.append("<p>" + " · ".join(f"<a href='#s{i}'>{esc(name)}</a>" for i, (name, _) in enumerate(sections)) + "</p>")
    for i, (name, content) in enumerate(sections):
        body.append(f"<h2 id='s{i}'>{esc(name)}</h2>{content}")
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<meta name='viewport' content='width=device-width, initial-scale=1'><title>{esc(title)}</title>"
        f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>\n"
    )
