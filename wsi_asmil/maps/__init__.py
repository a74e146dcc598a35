"""Where the models looked: every tile scored, the scores format, heatmaps (PNG, TIFF, GeoJSON,
Deep Zoom) and localisation against ground truth."""
