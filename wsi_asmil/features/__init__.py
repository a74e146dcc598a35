"""From tissue to embeddings: the tile grid, the Zarr stores of tiles and features, the frozen
encoders and their weights, extraction on one slide and batches of slides per job."""
