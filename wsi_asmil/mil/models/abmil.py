"""Gated-attention ABMIL (Ilse et al. 2018), the baseline and the host of the Anchor + NSF plug-in."""

from __future__ import annotations

import torch
from torch import nn

from wsi_asmil.mil.models.base import MILModel, SoftmaxPooling
from wsi_asmil.mil.models.norm import FeatureNorm


class ABMIL(MILModel, SoftmaxPooling):
    """Instance embedding ``h = ReLU(W x)``, attention logits ``w^T (tanh(V h) * sigmoid(U h))``,
    softmax over tiles, attention-weighted mean of ``h``, Linear classifier.

    The embedding is the one Ilse et al. learn before pooling and the ASMIL authors' ABMIL baseline
    uses (their DimReduction: Linear without bias, ReLU, to ``D_feat // 2``): attention on the raw
    frozen features has no learned space in which to separate tiles. ``dropout`` acts on the pooled
    vector before the classifier only, as the authors' ``Classifier_1fc`` does.

    ``attn_logits`` is returned as (1, 1, M) so the stabilisation loss written for ASMIL's
    (H, N, M) applies unchanged when the anchor plug-in is enabled.
    """

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        hidden: int = 128,
        inner_dim: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        dim = in_dim // 2 if inner_dim is None else inner_dim
        self.in_dim = in_dim
        self.input_norm = FeatureNorm(in_dim)
        self.reduce = nn.Sequential(nn.Linear(in_dim, dim, bias=False), nn.ReLU())
        self.attention_v = nn.Linear(dim, hidden)
        self.attention_u = nn.Linear(dim, hidden)
        self.attention_w = nn.Linear(hidden, 1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(dim, n_classes)

    def _gated_logits(self, h: torch.Tensor) -> torch.Tensor:
        gated = torch.tanh(self.attention_v(h)) * torch.sigmoid(self.attention_u(h))
        return self.attention_w(gated).T.unsqueeze(0)

    def embed(self, bag: torch.Tensor) -> torch.Tensor:
        """The instance embeddings ``h`` (M, D) that attention scores and pools."""
        return self.reduce(self.prepare(bag))

    def attention_logits(self, bag: torch.Tensor) -> torch.Tensor:
        return self._gated_logits(self.embed(bag))

    def forward(self, bag: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.embed(bag)
        attn_logits = self._gated_logits(h)
        weights = torch.softmax(attn_logits[0, 0], dim=-1)
        pooled = self.dropout(weights.to(h.dtype) @ h)
        return {"logits": self.classifier(pooled), "attn_logits": attn_logits}

    def pooling_terms(self, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.embed(bag)
        return self._gated_logits(h)[0], h

    def logits_from_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(pooled[0]))
