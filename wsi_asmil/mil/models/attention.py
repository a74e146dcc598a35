"""Multi-head cross-attention of a few queries over the tiles of a bag.

ASMIL gives each FEAT token its own attention module. Holding the N modules as one stacked set of
parameters (leading axis = weight set) runs all tokens in one batched operation while staying
mathematically identical to N separate modules; with a single weight set the module is an ordinary
shared-weight cross-attention (the aggregator's).

Keys and values are never materialised. The attention weights sum to one and carry no dropout, so
``q . (W_k x + b_k)`` equals ``(W_k^T q) . x + q . b_k`` and ``sum_i a_i (W_v x_i + b_v)`` equals
``W_v (sum_i a_i x_i) + b_v``. Folding the queries into input space costs O(M*D*N*H) per bag instead
of O(M*D*D*N) and keeps memory linear in M, which matters for slides with tens of thousands of tiles.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_PROJECTIONS = ("q", "k", "v", "o")


class MultiHeadCrossAttention(nn.Module):
    """Queries (Q, D) attend over inputs (M, D); returns (outputs (Q, D), logits (H, Q, M)).

    q/k/v projections with bias, ``n_heads`` heads, scaled dot product, softmax over the inputs,
    output projection, dropout, LayerNorm. No residual and no feed-forward block (the ASMIL design).
    With ``n_weight_sets == 1`` all queries share the weights; otherwise query ``t`` uses set ``t``.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int = 8,
        n_weight_sets: int = 1,
        dropout: float = 0.1,
        eps: float = 1e-6,
        project: bool = True,
    ) -> None:
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"dim {dim} is not divisible by n_heads {n_heads}")
        if n_weight_sets < 1:
            raise ValueError(f"n_weight_sets must be >= 1, got {n_weight_sets}")
        self.dim = dim
        self.n_heads = n_heads
        self.head_dim = dim // n_heads
        self.n_weight_sets = n_weight_sets
        self.eps = eps
        #: Without values, output projection and norm the module only attends: a model that reads
        #: the pooled inputs itself (ASMIL's linear readouts) carries no unused weights.
        self.projections = _PROJECTIONS if project else _PROJECTIONS[:2]
        for name in self.projections:
            # (sets, out, in): the same orientation as nn.Linear.weight, so set t is a Linear's weight.
            setattr(self, f"{name}_weight", nn.Parameter(torch.empty(n_weight_sets, dim, dim)))
            setattr(self, f"{name}_bias", nn.Parameter(torch.empty(n_weight_sets, dim)))
        if project:
            self.norm_weight = nn.Parameter(torch.empty(n_weight_sets, dim))
            self.norm_bias = nn.Parameter(torch.empty(n_weight_sets, dim))
            self.dropout = nn.Dropout(dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's default initialisation, drawn independently for every weight set."""
        bound = 1.0 / math.sqrt(self.dim)
        with torch.no_grad():
            for name in self.projections:
                weight = getattr(self, f"{name}_weight")
                bias = getattr(self, f"{name}_bias")
                for s in range(self.n_weight_sets):
                    nn.init.kaiming_uniform_(weight[s], a=math.sqrt(5))
                    nn.init.uniform_(bias[s], -bound, bound)
            if "v" in self.projections:
                nn.init.ones_(self.norm_weight)
                nn.init.zeros_(self.norm_bias)

    def _per_query(self, t: torch.Tensor, n_queries: int) -> torch.Tensor:
        """View a per-set tensor with one entry per query (a broadcast view for a shared set)."""
        if self.n_weight_sets == 1:
            return t.expand(n_queries, *t.shape[1:])
        if n_queries != self.n_weight_sets:
            raise ValueError(f"{n_queries} queries for {self.n_weight_sets} weight sets")
        return t

    def _linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Row t of ``x`` through the ``name`` projection of weight set t."""
        weight = self._per_query(getattr(self, f"{name}_weight"), x.shape[0])
        bias = self._per_query(getattr(self, f"{name}_bias"), x.shape[0])
        return torch.einsum("qi,qoi->qo", x, weight) + bias

    def attention_logits(self, queries: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Pre-softmax logits (H, Q, M): what the anchor and the stabilisation loss need."""
        n_q, h, dh = queries.shape[0], self.n_heads, self.head_dim
        q = self._linear("q", queries).view(n_q, h, dh)
        k_weight = self._per_query(self.k_weight, n_q).view(n_q, h, dh, self.dim)
        k_bias = self._per_query(self.k_bias, n_q).view(n_q, h, dh)
        q_in = torch.einsum("qhe,qhed->qhd", q, k_weight)
        q_bias = torch.einsum("qhe,qhe->qh", q, k_bias)
        logits = torch.einsum("md,qhd->hqm", x, q_in) + q_bias.T.unsqueeze(-1)
        return logits / math.sqrt(dh)

    def forward(
        self, queries: torch.Tensor, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, logits = self.pool(queries, x)
        return self.project_pooled(pooled), logits

    def pool(self, queries: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The softmax-pooled inputs (Q, H, D) of each query and head, and the logits (H, Q, M)."""
        logits = self.attention_logits(queries, x)
        weights = torch.softmax(logits, dim=-1)
        return torch.einsum("hqm,md->qhd", weights.to(x.dtype), x), logits

    def project_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """The output (Q, dim) from the softmax-pooled inputs (Q, H, D): values, output projection
        and norm. Public so that ASMIL's chunked evaluation (``ASMIL.logits_from_pooled``) finishes here."""
        n_q, h, dh = pooled.shape[0], self.n_heads, self.head_dim
        v_weight = self._per_query(self.v_weight, n_q).view(n_q, h, dh, self.dim)
        v_bias = self._per_query(self.v_bias, n_q).view(n_q, h, dh)
        values = (torch.einsum("qhd,qhed->qhe", pooled, v_weight) + v_bias).reshape(n_q, self.dim)
        out = self.dropout(self._linear("o", values))
        out = F.layer_norm(out, (self.dim,), eps=self.eps)
        return out * self._per_query(self.norm_weight, n_q) + self._per_query(self.norm_bias, n_q)
