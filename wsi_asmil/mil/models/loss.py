"""Slide cross-entropy plus the attention-stabilisation loss L_AS = KL(NSF(anchor / tau) || softmax(online))."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from wsi_asmil.mil.models.nsf import nsf

AS_REDUCTIONS = ("distribution_mean", "element_mean")
TARGETS = ("nsf", "softmax", "nsf_uniform")


def target_distribution(anchor_logits: torch.Tensor, tau: float, target_fn: str) -> torch.Tensor:
    """The anchor's target over tiles, detached, in float32: NSF(z / tau), or softmax(z / tau).

    NSF is not shift-invariant: adding one constant to every logit changes how many tiles the
    target spreads over (all logits far above 0 give a uniform target, logits near 0 a target that
    follows the online softmax), so training reports the target's effective tile fraction.
    """
    anchor = anchor_logits.detach().float()
    if target_fn == "nsf":
        return nsf(anchor, tau)
    if target_fn == "nsf_uniform":
        # NSF with its zero at the uniform weight: log(M a_i) is 0 where tile i has 1/M of the
        # attention, so tiles above uniform saturate together and tiles below fade, whatever
        # level the logits drift to (softmax leaves that level free; NSF of raw logits depends on it)
        centred = torch.log_softmax(anchor, dim=-1) + math.log(anchor.shape[-1])
        return nsf(centred, tau)
    if target_fn == "softmax":
        return torch.softmax(anchor / tau, dim=-1)
    raise ValueError(f"target must be one of {TARGETS}, got {target_fn!r}")


def stabilization_loss(
    online_logits: torch.Tensor,
    anchor_logits: torch.Tensor,
    tau: float,
    reduction: str,
    target_fn: str,
) -> torch.Tensor:
    """L_AS over (H, N, M) logits; the target is detached and the maths runs in float32.

    ``distribution_mean`` is the paper's KL: summed over tiles, averaged over heads and tokens.
    ``element_mean`` reproduces the released code: the mean of ``-T * log P`` over all H*N*M
    elements, i.e. cross-entropy without the target-entropy constant and with an effective weight
    of 1/M. ``log P`` comes from ``log_softmax`` so it cannot underflow to ``-inf``.
    ``target_fn="softmax"`` replaces NSF by a tempered softmax: the paper's "without NSF" ablation.
    """
    target = target_distribution(anchor_logits, tau, target_fn)
    log_p = F.log_softmax(online_logits.float(), dim=-1)
    if reduction == "element_mean":
        return -(target * log_p).mean()
    if reduction == "distribution_mean":
        return (torch.xlogy(target, target) - target * log_p).sum(dim=-1).mean()
    raise ValueError(f"as_reduction must be one of {AS_REDUCTIONS}, got {reduction!r}")


class MILLoss(nn.Module):
    """``CE(slide logits, y) + beta * L_AS``; without anchor logits it is plain CE.

    Its keyword defaults are the paper's and the defaults of every anchored model
    (``wsi_asmil.mil.models.registry.ANCHOR_DEFAULTS`` reads them from here).
    """

    def __init__(
        self,
        beta: float = 1.0,
        tau: float = 0.5,
        reduction: str = "distribution_mean",
        target: str = "nsf",
    ) -> None:
        super().__init__()
        if reduction not in AS_REDUCTIONS:
            raise ValueError(f"as_reduction must be one of {AS_REDUCTIONS}, got {reduction!r}")
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        self.beta = beta
        self.tau = tau
        self.reduction = reduction
        self.target = target

    def forward(
        self,
        logits: torch.Tensor,
        label: torch.Tensor,
        attn_logits: torch.Tensor | None = None,
        anchor_logits: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Returns ``{"loss", "ce", "as"}``; ``as`` is zero when no anchor logits are given."""
        ce = F.cross_entropy(logits.float().unsqueeze(0), label.reshape(1))
        if anchor_logits is None or attn_logits is None:
            stab = torch.zeros((), device=ce.device)
        else:
            stab = stabilization_loss(attn_logits, anchor_logits, self.tau, self.reduction, self.target)
        return {"loss": ce + self.beta * stab, "ce": ce, "as": stab}
