"""Multiple-instance learning: the models, the cohort split, bags in memory or streamed from Zarr,
the training loop, evaluation and metrics."""
