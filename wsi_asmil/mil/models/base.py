"""The contract every MIL model here honours, so training, the loss and heatmaps stay model-agnostic."""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from wsi_asmil.mil.models.norm import FeatureNorm


class MILModel(nn.Module, metaclass=abc.ABCMeta):
    """A bag (M, D_feat) in; ``forward`` returns ``{"logits": (C,), "attn_logits": (H, N, M)}``.

    ``attn_logits`` always has a head and a query axis (ABMIL uses (1, 1, M)) so one stabilisation
    loss and one instability metric serve every model.
    """

    in_dim: int
    input_norm: FeatureNorm

    @abc.abstractmethod
    def attention_logits(self, bag: torch.Tensor) -> torch.Tensor:
        """Pre-softmax attention (H, N, M) without the classification head (all the anchor needs)."""

    def prepare(self, bag: torch.Tensor) -> torch.Tensor:
        """Validate and standardise a bag; every model's entry points start here."""
        self.check_bag(bag)
        return self.input_norm(bag)

    def check_bag(self, bag: torch.Tensor) -> None:
        """Fail early with a readable message rather than deep inside an einsum."""
        if bag.ndim != 2 or bag.shape[1] != self.in_dim:
            raise ValueError(f"expected a bag of shape (M, {self.in_dim}), got {tuple(bag.shape)}")
        if bag.shape[0] == 0:
            raise ValueError("empty bag: a slide without tiles has no attention to compute")

    def auxiliary_loss(self, out: dict[str, torch.Tensor], label: torch.Tensor) -> torch.Tensor:
        """Model-specific training terms beyond CE and L_AS (ACMIL's branch and diversity losses)."""
        return out["logits"].new_zeros(())

    @torch.no_grad()
    def attention_scores(self, bag: torch.Tensor) -> torch.Tensor:
        """Per-tile score (M,): softmax over tiles, mean over heads and queries, in eval mode.

        Used by heatmaps and the instability metric, so it must not depend on the module's current
        mode or on token dropout; the previous mode is restored afterwards. The bag is moved to the
        model's device; the result stays there.
        """
        param = next(self.parameters())
        with self.evaluating():
            bag = torch.as_tensor(bag).to(device=param.device, dtype=torch.float32)
            logits = self.attention_logits(bag).float()
            return torch.softmax(logits, dim=-1).mean(dim=(0, 1))

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Eval mode for the block, then the previous mode back (scoring happens mid-training too)."""
        was_training = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was_training)


class SoftmaxPooling(abc.ABC):
    """A model whose slide logits see the tiles only through softmax-pooled sums.

    Each tile's attention logits depend on that tile alone, and everything after the softmax over
    the tiles sees only ``sum_i softmax(l)_ri v_i``. Such a model can be evaluated on a bag that
    arrives in chunks, exactly (``wsi_asmil.maps.scoring``), so memory is bounded by a chunk, not by the
    slide. The two methods describe the model in eval mode and must agree with its ``forward``:
    :func:`splits_at_softmax` trusts them only where ``forward`` is defined next to them.
    """

    @abc.abstractmethod
    def pooling_terms(self, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention logits (R, M) over the bag's tiles and the values (M, D) they pool."""

    @abc.abstractmethod
    def logits_from_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """The slide's class logits (C,) from the softmax-pooled values (R, D)."""


def splits_at_softmax(model: nn.Module) -> bool:
    """Whether ``model`` can be evaluated chunk by chunk through :class:`SoftmaxPooling`.

    Only where the class that defines ``forward`` also defines the split: a subclass that changes
    ``forward`` is evaluated whole unless it states its own split.
    """
    if not isinstance(model, SoftmaxPooling):
        return False
    owner = next(cls for cls in type(model).__mro__ if "forward" in vars(cls))
    return "logits_from_pooled" in vars(owner)
