"""TransMIL (Shao et al., NeurIPS 2021): a two-layer Nystrom Transformer over the tiles of a bag.

The tiles are projected to ``dim`` (512) with a Linear + ReLU, the sequence is made square by
repeating its first tiles, a CLS token is prepended, and two pre-LayerNorm Transformer layers of
Nystrom self-attention (8 heads, ``dim / 2`` landmarks, 6 Moore-Penrose iterations, a depthwise
convolution over the values as a residual) run with a PPEG positional module between them: the
tile tokens laid row by row on the square grid, passed through depthwise 7x7, 5x5 and 3x3
convolutions, summed with the identity. A final LayerNorm and a Linear on the CLS token classify.
As in the paper the grid follows the bag order, not the tiles' positions on the slide, so the model
is not invariant to the order of the tiles. There is no attention-only head: the whole network runs
to get the attention.

One deliberate difference from the public reference code: it pads the sequence with zero tokens at
the front up to a multiple of the landmark count and lets them enter every softmax (for a bag of 7
tiles, 246 of the 256 keys are zeros). Here landmark means and softmaxes use the real tokens only,
and a sequence no longer than the landmark count gets exact softmax attention, which is what the
Nystrom formula gives when every token is its own landmark.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from wsi_asmil.mil.models.base import MILModel
from wsi_asmil.mil.models.norm import FeatureNorm

RESIDUAL_KERNEL = 33  # length of the depthwise value convolution of the Nystrom attention (reference)
PPEG_KERNELS = (7, 5, 3)


def iterative_pinv(a: torch.Tensor, iterations: int = 6) -> torch.Tensor:
    """Moore-Penrose pseudo-inverse of each (..., m, m) matrix by the Nystromformer's cubic iteration.

    ``Z <- Z (13 I - A Z (15 I - A Z (7 I - A Z))) / 4``, started from ``A^T / (||A||_1 ||A||_inf)``
    (per matrix), which converges for any non-singular ``A``.
    """
    norm_1 = a.abs().sum(dim=-2).amax(dim=-1, keepdim=True)  # max column sum
    norm_inf = a.abs().sum(dim=-1).amax(dim=-1, keepdim=True)  # max row sum
    z = a.transpose(-1, -2) / (norm_1 * norm_inf).unsqueeze(-1)
    eye = torch.eye(a.shape[-1], device=a.device, dtype=a.dtype)
    for _ in range(iterations):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


class NystromSelfAttention(nn.Module):
    """Multi-head self-attention of a sequence (n, dim) approximated with ``n_landmarks`` landmarks.

    The queries and keys are split into ``n_landmarks`` consecutive segments of ``ceil(n / m)``
    tokens (the first segment shorter when ``m`` does not divide ``n``); landmarks are the segment
    means. Attention is ``softmax(Q K~^T) pinv(softmax(Q~ K~^T)) softmax(Q~ K^T) V`` plus a depthwise
    convolution of V along the sequence, per head. The landmark arithmetic runs in float32 with
    autocast off: the pseudo-inverse iteration is not usable in bfloat16.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int = 8,
        n_landmarks: int = 256,
        pinv_iterations: int = 6,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"dim {dim} is not divisible by n_heads {n_heads}")
        if n_landmarks < 1 or pinv_iterations < 1:
            raise ValueError("n_landmarks and pinv_iterations must be >= 1")
        self.n_heads = n_heads
        self.head_dim = dim // n_heads
        self.n_landmarks = n_landmarks
        self.pinv_iterations = pinv_iterations
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.value_conv = nn.Conv2d(
            n_heads, n_heads, (RESIDUAL_KERNEL, 1), padding=(RESIDUAL_KERNEL // 2, 0), groups=n_heads,
            bias=False,
        )

    def forward(
        self, x: torch.Tensor, query: int | None = None, keys: slice | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns (output (n, dim), attention (H, len(keys)) of token ``query`` or None).

        The attention row is the Nystrom matrix's row restricted to ``keys``, computed without
        forming the (n, n) matrix; it is an approximation of softmax attention (exact when
        n <= n_landmarks), sums to about one over all n keys and may hold small negative values.
        """
        n, h, dh = x.shape[0], self.n_heads, self.head_dim
        q, k, v = self.qkv(x).view(n, 3, h, dh).permute(1, 2, 0, 3)  # each (H, n, dh)
        with torch.autocast(device_type=x.device.type, enabled=False):
            q, k, v = q.float() / math.sqrt(dh), k.float(), v.float()
            row = None
            if n <= self.n_landmarks:
                attn = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
                out = attn @ v
                if query is not None:
                    row = attn[:, query, keys]
            else:
                q_marks, k_marks = self._landmarks(q), self._landmarks(k)
                a1 = torch.softmax(q @ k_marks.transpose(-1, -2), dim=-1)  # (H, n, m)
                a2 = torch.softmax(q_marks @ k_marks.transpose(-1, -2), dim=-1)  # (H, m, m)
                a3 = torch.softmax(q_marks @ k.transpose(-1, -2), dim=-1)  # (H, m, n)
                a2_pinv = iterative_pinv(a2, self.pinv_iterations)
                out = a1 @ (a2_pinv @ (a3 @ v))  # this order never forms an (n, m) @ (m, m) product
                if query is not None:
                    row = ((a1[:, query].unsqueeze(1) @ a2_pinv) @ a3[:, :, keys]).squeeze(1)
            out = out + self.value_conv(v.unsqueeze(0))[0]
        out = out.transpose(0, 1).reshape(n, h * dh)
        return self.dropout(self.out(out)), row

    def _landmarks(self, t: torch.Tensor) -> torch.Tensor:
        """Means of ``n_landmarks`` consecutive segments (H, m, dh); front zero padding not counted."""
        h, n, dh = t.shape
        m = self.n_landmarks
        seg = math.ceil(n / m)
        pad = m * seg - n  # < seg, so every segment holds at least one real token
        sums = F.pad(t, (0, 0, pad, 0)).view(h, m, seg, dh).sum(dim=2)
        counts = torch.full((m, 1), float(seg), device=t.device, dtype=t.dtype)
        counts[0] = seg - pad
        return sums / counts


class TransLayer(nn.Module):
    """Pre-LayerNorm residual Nystrom attention (the reference has no feed-forward block)."""

    def __init__(self, dim: int, **attention: object) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attention = NystromSelfAttention(dim, **attention)  # type: ignore[arg-type]

    def forward(
        self, x: torch.Tensor, query: int | None = None, keys: slice | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        out, row = self.attention(self.norm(x), query, keys)
        return x + out.to(x.dtype), row


class PPEG(nn.Module):
    """Pyramid position encoding: identity + depthwise 7x7, 5x5 and 3x3 convolutions on the grid."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim) for k in PPEG_KERNELS)

    def forward(self, x: torch.Tensor, side: int) -> torch.Tensor:
        """``x`` is CLS + side * side tile tokens (row-major); the CLS token passes unchanged."""
        cls, tiles = x[:1], x[1:]
        grid = tiles.T.reshape(1, x.shape[1], side, side)
        grid = grid + sum(conv(grid) for conv in self.convs)
        return torch.cat([cls, grid.flatten(2)[0].T.to(cls.dtype)])


class TransMIL(MILModel):
    """TransMIL; ``forward`` returns ``logits`` (C,) and ``attn_logits`` (H, 1, M).

    ``attn_logits`` is the log of the CLS token's attention to the real tiles in the last layer,
    per head: the CLS row of the Nystrom attention matrix, computed for the M real tile columns
    only (the repeated tiles that square the grid and the CLS column are left out), clamped at the
    smallest positive float (the Nystrom row may dip slightly below zero) and logged, so that the
    softmax over tiles that evaluation, heatmaps and the instability metric apply to every model
    gives these weights renormalised to sum to one over the real tiles. This is an approximation
    of what the model attends to: the Nystrom matrix approximates softmax attention (exact for
    sequences no longer than the landmark count), the first layer and PPEG also mix the tiles, and
    the value convolution adds a local path that is not attention. TransMIL is trained with the
    slide cross-entropy only (no anchor).
    """

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        dim: int = 512,
        n_heads: int = 8,
        n_landmarks: int | None = None,
        pinv_iterations: int = 6,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.input_norm = FeatureNorm(in_dim)
        self.n_heads = n_heads
        attention = {
            "n_heads": n_heads,
            "n_landmarks": dim // 2 if n_landmarks is None else n_landmarks,
            "pinv_iterations": pinv_iterations,
            "dropout": dropout,
        }
        self.project = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(1, dim))
        self.layer1 = TransLayer(dim, **attention)
        self.ppeg = PPEG(dim)
        self.layer2 = TransLayer(dim, **attention)
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, n_classes)

    def _encode(self, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(CLS vector after the last layer, attention logits (H, 1, M))."""
        h = self.project(self.prepare(bag))
        m = h.shape[0]
        side = math.ceil(math.sqrt(m))
        repeat = torch.arange(side * side - m, device=h.device) % m
        x = torch.cat([self.cls_token.to(h.dtype), h, h[repeat]])
        x, _ = self.layer1(x)
        x = self.ppeg(x, side)
        x, row = self.layer2(x, query=0, keys=slice(1, m + 1))
        assert row is not None
        weights = row.float().clamp_min(torch.finfo(torch.float32).tiny)
        return x[0], weights.log().unsqueeze(1)

    def attention_logits(self, bag: torch.Tensor) -> torch.Tensor:
        return self._encode(bag)[1]

    def forward(self, bag: torch.Tensor) -> dict[str, torch.Tensor]:
        cls, attn_logits = self._encode(bag)
        return {"logits": self.classifier(self.norm(cls)), "attn_logits": attn_logits}
