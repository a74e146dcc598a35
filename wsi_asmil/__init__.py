"""wsi-asmil: whole-slide images to tissue masks, tiles, features, ASMIL models and heatmaps."""

__version__ = "0.3.0"
