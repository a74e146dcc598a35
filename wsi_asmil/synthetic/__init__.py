"""Synthetic H&E-like whole-slide images with exact ground truth, for the demo and the tests.

Real cohorts cannot ship with the repository, yet every stage (tissue segmentation, tiling,
features, MIL training, heatmaps) needs slides whose answer is known. This package draws them:

* Each slide is an Aperio-style pyramidal tiled-JPEG TIFF (``.svs``) that OpenSlide reads
  natively (vendor ``aperio``, ``openslide.mpp-x``/``mpp-y``), so the pipeline exercises the
  same code path as for scanner output.
* Level 0 is rendered tile by tile and streamed to disk, so memory stays bounded for any size;
  the lower levels (downsamples 2, 8, 32, ...) are box means of the rendered level 0, built while
  it streams.
* Where things are is decided on a low-resolution *canvas* (``CANVAS_UM`` um per pixel, i.e. an
  integer level-0 downsample ``D``) of smooth scalar fields: tissue ``F``, tumour ``T``,
  lymphoid clusters ``L`` and stroma texture. A level-0 pixel is tissue when the bilinear
  interpolation of ``F`` at its centre is positive, and tumour when ``T`` and ``F`` both are.
  The truth masks are the very same rule evaluated at the centres of a coarser grid, so they
  are exact, not an approximation of the rendering.
* Cells (nuclei, fibres, dust) come from jittered lattices whose rows are seeded by
  ``(slide seed, population, row)``; a tile draws every item that overlaps it, so nuclei
  continue seamlessly across tile borders and the pixels do not depend on the tiling order.

Coordinates: truth-mask pixel ``(i, j)`` at downsample ``d`` covers level-0 pixels
``[j*d, (j+1)*d) x [i*d, (i+1)*d)`` and holds the rule's value at that block's centre.

The package, by module: ``spec`` (what a slide is), ``layout`` (canvas fields and pen strokes),
``sampling`` (the shared bilinear rule), ``cells`` (nuclei, dust and fibres), ``render``
(level-0 tiles), ``pyramid`` (lower levels), ``aperio`` (the ``.svs`` file), ``truth`` (masks
and their files), ``cohort`` (the demo cohort) and ``cli`` (``python -m wsi_asmil.synthetic``).
"""

from wsi_asmil.synthetic.aperio import write_slide
from wsi_asmil.synthetic.cli import main
from wsi_asmil.synthetic.cohort import (
    DEMO_HEIGHT,
    DEMO_WIDTH,
    demo_slide_ids,
    demo_specs,
    demo_tissue,
    write_cohort,
)
from wsi_asmil.synthetic.layout import CANVAS_UM
from wsi_asmil.synthetic.pyramid import pyramid_downsamples
from wsi_asmil.synthetic.spec import TILE, SlideSpec, SlideTruth
from wsi_asmil.synthetic.truth import read_truth, slide_truth, write_truth

__all__ = [
    "CANVAS_UM",
    "DEMO_HEIGHT",
    "DEMO_WIDTH",
    "TILE",
    "SlideSpec",
    "SlideTruth",
    "demo_slide_ids",
    "demo_specs",
    "demo_tissue",
    "main",
    "pyramid_downsamples",
    "read_truth",
    "slide_truth",
    "write_cohort",
    "write_slide",
    "write_truth",
]
