"""ACMIL (Zhang et al., ECCV 2024), gated-attention variant: the strongest baseline of the ASMIL paper.

K attention branches look at the same tiles. In training each branch's most-attended tiles are
randomly hidden (stochastic top-k instance masking), so no branch can rest on a handful of tiles;
every branch has its own classifier, and a diversity term pushes the branches' attention maps
apart. The slide prediction pools the tiles with the branches' mean attention.

As in the official code (dazhangyu123/ACMIL, ``ACMIL_GA`` and its training loop), the masking
reaches everything the branches feed in training: the branch classifiers, the slide pooling and
the diversity term all use the masked attention (its ``A_out``), and the reduction is the authors'
DimReduction (Linear without bias, ReLU). In eval mode nothing is masked.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from wsi_asmil.mil.models.base import MILModel, SoftmaxPooling
from wsi_asmil.mil.models.norm import FeatureNorm


def topk_mask(logits: torch.Tensor, k: int, drop: float) -> torch.Tensor:
    """Boolean (K, M) mask of tiles to hide: a random ``drop`` share of each branch's top ``k``.

    The share is truncated, ``int(k * drop)``, as the official code counts it.
    """
    k = min(k, logits.shape[-1])
    n_hide = int(k * drop)
    mask = torch.zeros_like(logits, dtype=torch.bool)
    if n_hide == 0 or logits.shape[-1] <= 1:
        return mask
    top = logits.topk(k, dim=-1).indices
    chosen = torch.rand(top.shape, device=logits.device).argsort(dim=-1)[:, :n_hide]
    mask.scatter_(-1, top.gather(-1, chosen), True)
    return mask


class ACMIL(MILModel, SoftmaxPooling):
    """``forward`` adds ``branch_logits`` (K, C) and ``masked_logits`` (K, M), the attention logits
    after training-time masking (hidden tiles at ``-inf``); ``attn_logits`` (1, K, M) is unmasked,
    so the instability metric and an anchor see the model's own scores."""

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        n_branches: int = 5,
        hidden: int = 128,
        inner_dim: int | None = None,
        mask_topk: int = 10,
        mask_drop: float = 0.6,
        dropout: float = 0.0,
        diversity_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if n_branches < 1:
            raise ValueError("n_branches must be >= 1")
        if not 0.0 <= mask_drop < 1.0:
            raise ValueError(f"mask_drop must be in [0, 1), got {mask_drop}")
        dim = in_dim // 2 if inner_dim is None else inner_dim
        self.in_dim = in_dim
        self.input_norm = FeatureNorm(in_dim)
        self.n_branches = n_branches
        self.mask_topk = mask_topk
        self.mask_drop = mask_drop
        self.diversity_weight = diversity_weight
        self.reduce = nn.Sequential(nn.Linear(in_dim, dim, bias=False), nn.ReLU(), nn.Dropout(dropout))
        self.attention_v = nn.Linear(dim, hidden)
        self.attention_u = nn.Linear(dim, hidden)
        self.attention_w = nn.Linear(hidden, n_branches)
        self.branch_weight = nn.Parameter(torch.empty(n_branches, n_classes, dim))
        self.branch_bias = nn.Parameter(torch.zeros(n_branches, n_classes))
        self.classifier = nn.Linear(dim, n_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each branch classifier initialised as an independent nn.Linear."""
        bound = self.branch_weight.shape[-1] ** -0.5
        nn.init.uniform_(self.branch_weight, -bound, bound)
        nn.init.uniform_(self.branch_bias, -bound, bound)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        gated = torch.tanh(self.attention_v(h)) * torch.sigmoid(self.attention_u(h))
        return self.attention_w(gated).T  # (K, M)

    def attention_logits(self, bag: torch.Tensor) -> torch.Tensor:
        return self._logits(self.reduce(self.prepare(bag))).unsqueeze(0)

    def forward(self, bag: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.reduce(self.prepare(bag))
        logits = self._logits(h)
        masked = logits
        if self.training and self.mask_drop > 0:
            masked = logits.masked_fill(topk_mask(logits.detach(), self.mask_topk, self.mask_drop), float("-inf"))
        weights = torch.softmax(masked, dim=-1)
        branch_feats = weights.to(h.dtype) @ h  # (K, D)
        per_branch = torch.einsum("kcd,kd->kc", self.branch_weight.to(h.dtype), branch_feats) + self.branch_bias
        return {
            "logits": self.logits_from_pooled(branch_feats),
            "attn_logits": logits.unsqueeze(0),
            "masked_logits": masked,
            "branch_logits": per_branch,
        }

    def pooling_terms(self, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.reduce(self.prepare(bag))
        return self._logits(h), h

    def logits_from_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """The slide pools with the branches' mean attention: the mean of the branches' pooled vectors."""
        return self.classifier(pooled.mean(dim=0))

    def auxiliary_loss(self, out: dict[str, torch.Tensor], label: torch.Tensor) -> torch.Tensor:
        """Mean CE of the branch classifiers plus the mean pairwise cosine of the branches' masked
        attention (what the official training loop computes from ``A_out``)."""
        branch = out["branch_logits"].float()
        ce = F.cross_entropy(branch, label.reshape(1).expand(branch.shape[0]))
        if self.n_branches < 2:
            return ce
        attn = F.normalize(torch.softmax(out["masked_logits"].float(), dim=-1), dim=-1)
        cos = attn @ attn.T
        pairs = torch.triu_indices(self.n_branches, self.n_branches, offset=1, device=cos.device)
        return ce + self.diversity_weight * cos[pairs[0], pairs[1]].mean()
