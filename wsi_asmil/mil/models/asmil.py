"""ASMIL's online model: reduction, N FEAT tokens with private attention, token dropout, and a readout.

The paper's readout (``cls``) projects each token's attention-pooled tiles through values, an output
projection and a LayerNorm, and a CLS token attends over the token vectors before the classifier.
The other readouts each take one part of that away, to find which part stops attention learning:

``mean``
    the same token vectors, averaged instead of read by the CLS aggregator;
``linear_norm``
    each token's attention-pooled tiles (the mean over its heads), a LayerNorm, and a linear head
    per token; the slide's logits are the mean over the (kept) tokens;
``linear``
    the same without the LayerNorm: a linear readout, so the slide's logits are a sum over tiles of
    attention times a linear function of the tile, and the gradient on the attention never waits
    for a deep readout to learn (the ``asmil_linear`` model).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from wsi_asmil.core.devices import to_device
from wsi_asmil.mil.models.attention import MultiHeadCrossAttention
from wsi_asmil.mil.models.base import MILModel, SoftmaxPooling
from wsi_asmil.mil.models.norm import FeatureNorm

TOKEN_DROP_MODES = ("fixed", "bernoulli")
READOUTS = ("cls", "mean", "linear_norm", "linear")


def n_dropped(n_tokens: int, rate: float) -> int:
    """Tokens removed per bag in ``fixed`` mode: Python's ``round`` (half to even), as specified."""
    return round(rate * n_tokens)


def select_tokens(
    n_tokens: int, rate: float, mode: str, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Sorted indices of the tokens kept for one training bag.

    ``fixed`` removes exactly ``round(rate * n)`` tokens uniformly without replacement (the released
    code). ``bernoulli`` drops each token with probability ``rate``, redrawing when all would go,
    which samples the independent-drop distribution conditioned on at least one survivor.
    """
    if mode == "fixed":
        perm = torch.randperm(n_tokens, generator=generator)
        return perm[: n_tokens - n_dropped(n_tokens, rate)].sort().values
    if mode == "bernoulli":
        while True:
            keep = torch.rand(n_tokens, generator=generator) >= rate
            if keep.any():
                return keep.nonzero().flatten()
    raise ValueError(f"token_drop_mode must be one of {TOKEN_DROP_MODES}, got {mode!r}")


class ASMIL(MILModel, SoftmaxPooling):
    """Attention-Stabilized MIL online model (spec section 2).

    The anchor and the stabilisation loss live outside the model so the inference checkpoint holds
    only what heatmaps and prediction need.
    """

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        n_tokens: int = 8,
        token_drop: float = 0.5,
        token_drop_mode: str = "fixed",
        aggregator_depth: int = 1,
        inner_dim: int | None = None,
        n_heads: int = 8,
        dropout: float = 0.1,
        readout: str = "cls",
        token_std: float = 1e-6,
    ) -> None:
        super().__init__()
        if readout not in READOUTS:
            raise ValueError(f"readout must be one of {READOUTS}, got {readout!r}")
        if token_drop_mode not in TOKEN_DROP_MODES:
            raise ValueError(f"token_drop_mode must be one of {TOKEN_DROP_MODES}, got {token_drop_mode!r}")
        if not 0.0 <= token_drop < 1.0:
            raise ValueError(f"token_drop must be in [0, 1), got {token_drop}")
        if token_drop_mode == "fixed" and n_dropped(n_tokens, token_drop) >= n_tokens:
            raise ValueError(f"token_drop {token_drop} would drop all {n_tokens} tokens")
        if n_tokens < 1 or aggregator_depth < 1:
            raise ValueError("n_tokens and aggregator_depth must be >= 1")
        if token_std <= 0:
            raise ValueError(f"token_std must be positive, got {token_std}")
        dim = in_dim // 2 if inner_dim is None else inner_dim
        self.in_dim = in_dim
        self.input_norm = FeatureNorm(in_dim)
        self.dim = dim
        self.n_tokens = n_tokens
        self.token_drop = token_drop
        self.token_drop_mode = token_drop_mode
        self.readout = readout
        self.token_std = token_std
        self.reduce = nn.Sequential(nn.Linear(in_dim, dim, bias=False), nn.ReLU())
        self.tokens = nn.Parameter(torch.empty(n_tokens, dim))
        projected = readout in ("cls", "mean")
        self.token_attention = MultiHeadCrossAttention(dim, n_heads, n_tokens, dropout, project=projected)
        if readout == "cls":
            self.cls_token = nn.Parameter(torch.empty(1, dim))
            self.aggregator = nn.ModuleList(
                MultiHeadCrossAttention(dim, n_heads, 1, dropout) for _ in range(aggregator_depth)
            )
        if projected:
            self.classifier = nn.Linear(dim, n_classes)
        else:
            self.head_norm = nn.LayerNorm(dim) if readout == "linear_norm" else nn.Identity()
            self.head_weight = nn.Parameter(torch.empty(n_tokens, n_classes, dim))
            self.head_bias = nn.Parameter(torch.empty(n_tokens, n_classes))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise this module's own parameters (submodules reset themselves, as in torch.nn);
        each token's linear head as an nn.Linear of its own.

        The paper's tokens start at std 1e-6: every query is then its projection's bias, and the
        attention logits are a product of two small factors whose gradients each wait on the other
        (docs/model.md, the mechanism). ``token_std`` of order 1 starts the queries apart."""
        nn.init.normal_(self.tokens, std=self.token_std)
        if self.readout == "cls":
            nn.init.zeros_(self.cls_token)
        if hasattr(self, "head_weight"):
            bound = 1.0 / math.sqrt(self.dim)
            with torch.no_grad():
                for t in range(self.n_tokens):
                    nn.init.kaiming_uniform_(self.head_weight[t], a=math.sqrt(5))
                    nn.init.uniform_(self.head_bias[t], -bound, bound)

    def attention_logits(self, bag: torch.Tensor) -> torch.Tensor:
        return self.token_attention.attention_logits(self.tokens, self.reduce(self.prepare(bag)))

    def forward(self, bag: torch.Tensor) -> dict[str, torch.Tensor]:
        pooled, attn_logits = self.token_attention.pool(self.tokens, self.reduce(self.prepare(bag)))
        per_token = self.token_outputs(pooled)
        if self.training and self.token_drop > 0:
            keep = select_tokens(self.n_tokens, self.token_drop, self.token_drop_mode)
            per_token = per_token.index_select(0, to_device(keep, per_token.device))
        return {"logits": self.classify(per_token), "attn_logits": attn_logits}

    def token_outputs(self, pooled: torch.Tensor) -> torch.Tensor:
        """Each token's output from its pooled tiles (N, H, D): a token vector (N, dim) for the
        projected readouts, the token's class logits (N, C) for the linear ones."""
        if self.readout in ("cls", "mean"):
            return self.token_attention.project_pooled(pooled)
        read = self.head_norm(pooled.mean(dim=1))  # the token's head-averaged attention pools the tiles
        return torch.einsum("nd,ncd->nc", read, self.head_weight) + self.head_bias

    def classify(self, per_token: torch.Tensor) -> torch.Tensor:
        """Class logits (C,) from the kept tokens' outputs: the CLS token attends over the token
        vectors (never over the tiles), or their mean is classified, or the heads' logits averaged."""
        if self.readout == "cls":
            cls = self.cls_token
            for layer in self.aggregator:
                cls, _ = layer(cls, per_token)
            return self.classifier(cls[0])
        if self.readout == "mean":
            return self.classifier(per_token.mean(dim=0))
        return per_token.mean(dim=0)

    def pooling_terms(self, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows are the FEAT tokens' heads x tokens, in ``attention_logits`` order."""
        h = self.reduce(self.prepare(bag))
        return self.token_attention.attention_logits(self.tokens, h).flatten(0, 1), h

    def logits_from_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        att = self.token_attention
        per_token = pooled.view(att.n_heads, self.n_tokens, -1).transpose(0, 1)  # (N, H, D)
        return self.classify(self.token_outputs(per_token))
