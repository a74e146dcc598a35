"""Normalized sigmoid (NSF): the anchor's target distribution over tiles.

Softmax at any single temperature either flattens the high-scoring tiles and lets the low ones
leak in, or suppresses the low ones and concentrates on one tile. Each sigmoid saturates on its own,
so after normalisation every clearly-positive tile gets a similar weight while clearly-negative
tiles stay small (Theorem 1 of the ASMIL paper; ``tests/test_models.py`` checks the bounds).
"""

from __future__ import annotations

import torch

NSF_EPS = 1e-8


def nsf(logits: torch.Tensor, tau: float = 0.5, dim: int = -1, eps: float = NSF_EPS) -> torch.Tensor:
    """``sigmoid(z / tau) / (sum_j sigmoid(z_j / tau) + eps)`` along ``dim``.

    ``eps`` keeps a bag whose sigmoids all underflow to zero at weight zero instead of NaN, so the
    result sums to slightly less than one, as in the released code.
    """
    if tau <= 0:
        raise ValueError(f"NSF temperature must be positive, got {tau}")
    s = torch.sigmoid(logits / tau)
    return s / (s.sum(dim=dim, keepdim=True) + eps)
