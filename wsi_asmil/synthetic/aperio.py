"""Writing a slide as an Aperio-style pyramidal tiled-JPEG TIFF (``.svs``) that OpenSlide reads natively."""

from __future__ import annotations

import os
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from wsi_asmil.core.io import atomic_path
from wsi_asmil.synthetic.layout import Layout
from wsi_asmil.synthetic.pyramid import LevelFile, pyramid_downsamples, stream_level0
from wsi_asmil.synthetic.render import Renderer
from wsi_asmil.synthetic.spec import TILE, SlideSpec, SlideTruth

JPEG_QUALITY = 80
BIGTIFF_BYTES = 2**31


def _aperio_description(spec: SlideSpec, level_width: int, level_height: int) -> str:
    """The ImageDescription OpenSlide's Aperio driver recognises ('Aperio' prefix, ``|key = value``)."""
    w, h = spec.width, spec.height
    head = f"Aperio Image Library v12.0.15\r\n{w}x{h} [0,0 {w}x{h}] ({TILE}x{TILE})"
    if (level_width, level_height) != (w, h):
        head += f" -> {level_width}x{level_height}"
    mag = max(1, int(round(10.0 / spec.mpp)))
    return f"{head} JPEG/RGB Q={JPEG_QUALITY}|AppMag = {mag}|MPP = {spec.mpp:.4f}|ScanScope ID = SYNTHETIC"


#: How every level of a synthetic slide is written (also by the feature benchmark's slide writer).
TIFF_OPTIONS: dict[str, Any] = {
    "tile": (TILE, TILE),
    "photometric": "rgb",
    "compression": "jpeg",
    "compressionargs": {"level": JPEG_QUALITY},
    "metadata": None,
    "subfiletype": 0,
}


def write_slide(path: str | os.PathLike[str], spec: SlideSpec) -> SlideTruth:
    """Render ``spec`` to an Aperio-style pyramidal ``.svs`` at ``path`` (atomically) and return its truth.

    Level 0 streams tile by tile; lower levels go through scratch files next to the output,
    so memory stays bounded (a few hundred MB) for slides of any size.
    """
    final = Path(path)
    layout = Layout(spec)
    renderer = Renderer(spec, layout)
    bigtiff = spec.width * spec.height * 3 >= BIGTIFF_BYTES
    with ExitStack() as stack:
        tmp = stack.enter_context(atomic_path(final))
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=final.parent, prefix=".scratch-")))
        levels = []
        for d in pyramid_downsamples(spec.width, spec.height)[1:]:
            levels.append(LevelFile(d, spec.width, spec.height, scratch))
            stack.callback(levels[-1].close)
        with tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tw:
            tw.write(
                stream_level0(renderer, levels),
                shape=(spec.height, spec.width, 3),
                dtype=np.uint8,
                description=_aperio_description(spec, spec.width, spec.height),
                **TIFF_OPTIONS,
            )
            for level in levels:
                tw.write(
                    level.tiles(),
                    shape=(level.height, level.width, 3),
                    dtype=np.uint8,
                    description=_aperio_description(spec, level.width, level.height),
                    **TIFF_OPTIONS,
                )
    return layout.truth()
