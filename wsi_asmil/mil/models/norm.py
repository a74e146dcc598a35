"""Per-dimension feature standardisation carried inside the model.

Frozen-encoder features can sit on very different scales (random or self-supervised encoders give
tiny, skewed activations), which stalls attention MIL at the paper's learning rate. The statistics
come from the fold's training tiles only and live in the model's buffers, so every checkpoint
standardises exactly as in training, in heatmaps and prediction too, with no side file.
"""

from __future__ import annotations

import torch
from torch import nn


class FeatureNorm(nn.Module):
    """``(x - mean) / std`` with buffers; identity until :meth:`fit` is called."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    @torch.no_grad()
    def fit(self, bags: list[torch.Tensor]) -> None:
        """Statistics over every tile of ``bags``, accumulated in float64 (millions of tiles)."""
        total = sum(len(b) for b in bags)
        if total == 0:
            raise ValueError("cannot standardise features: no training tiles")
        s = sum(b.double().sum(0) for b in bags)
        ss = sum(b.double().pow(2).sum(0) for b in bags)
        self.fit_sums(s, ss, total)

    @torch.no_grad()
    def fit_sums(self, s: torch.Tensor, ss: torch.Tensor, total: int) -> None:
        """Statistics from float64 per-dimension sums ``s`` and sums of squares ``ss`` of ``total``
        tiles: what :meth:`fit` computes, for statistics gathered elsewhere (out of core)."""
        if total == 0:
            raise ValueError("cannot standardise features: no training tiles")
        mean = s.to(self.mean.device, torch.float64) / total
        var = (ss.to(self.mean.device, torch.float64) / total - mean.pow(2)).clamp_min(0)
        self.mean.copy_(mean.to(self.mean.dtype))
        self.std.copy_(var.sqrt().clamp_min(self.eps).to(self.std.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
