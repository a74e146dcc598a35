"""The anchor: a gradient-free copy of the online model that supplies the stabilisation target."""

from __future__ import annotations

import copy

import torch
from torch import nn

ANCHOR_MODES = ("ema", "frozen_random")
# The frozen random anchor is drawn from its own stream: seed = the global seed + this offset.
ANCHOR_SEED_OFFSET = 1_000_003


def reinitialize(module: nn.Module) -> None:
    """Redraw every parameter the way its module's constructor would (``reset_parameters``)."""
    for sub in module.modules():
        reset = getattr(sub, "reset_parameters", None)
        if callable(reset):
            reset()


def reinitialize_aside(module: nn.Module) -> None:
    """:func:`reinitialize` from a private random stream, leaving the global generators untouched.

    Drawing the anchor from the global stream would shift every later draw (token dropout, ACMIL
    masking), so an anchor ablation would also change the online model's random choices and the
    comparison would mix the anchor's effect with a different random sequence. The private seed is
    derived from the global one, so the anchor stays reproducible.
    """
    cuda = torch.cuda.is_initialized()
    devices = list(range(torch.cuda.device_count())) if cuda else []
    seed = (torch.initial_seed() + ANCHOR_SEED_OFFSET) % 2**63
    with torch.random.fork_rng(devices=devices):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.manual_seed_all(seed)
        reinitialize(module)


class Anchor(nn.Module):
    """Holds the anchor copy of ``online``; never trained by the optimizer.

    ``ema`` (the paper): starts as an exact copy and follows the online weights by
    ``theta <- m * theta + (1 - m) * theta_online`` for every parameter and floating buffer after each
    optimizer step. ``frozen_random`` (the released code in practice): an independent random
    initialisation (from a private random stream, see :func:`reinitialize_aside`) that never
    changes, so its NSF target is near uniform and the loss acts as a pull-to-uniform regulariser.
    Not a submodule of the online model, so it is neither in its ``parameters()`` (hence not in
    the optimizer) nor in its checkpoint. Always in eval mode: its logits must not depend on
    dropout.
    """

    def __init__(self, online: nn.Module, mode: str = "ema", momentum: float = 0.999) -> None:
        super().__init__()
        if mode not in ANCHOR_MODES:
            raise ValueError(f"anchor mode must be one of {ANCHOR_MODES}, got {mode!r}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"anchor momentum must be in [0, 1], got {momentum}")
        self.mode = mode
        self.momentum = momentum
        model = copy.deepcopy(online)
        if mode == "frozen_random":
            reinitialize_aside(model)
        model.requires_grad_(False)
        self.model = model.eval()

    def train(self, mode: bool = True) -> Anchor:
        """Stay in eval mode whatever the caller asks: the target must be deterministic."""
        super().train(False)
        return self

    @torch.no_grad()
    def attention_logits(self, bag: torch.Tensor) -> torch.Tensor:
        return self.model.attention_logits(bag)

    @torch.no_grad()
    def update(self, online: nn.Module) -> None:
        """One EMA step towards ``online``; call after every optimizer step (no-op when frozen)."""
        if self.mode != "ema":
            return
        m = self.momentum
        mine, theirs = [], []
        for (name, a), (other_name, b) in zip(
            self.model.named_parameters(), online.named_parameters(), strict=True
        ):
            if name != other_name:
                raise ValueError(f"anchor and online parameters differ: {name} vs {other_name}")
            mine.append(a)
            theirs.append(b.detach())
        for a, b in zip(self.model.buffers(), online.buffers(), strict=True):
            if a.is_floating_point():
                mine.append(a)
                theirs.append(b.detach())
            else:
                a.copy_(b)
        # One fused kernel per operation for all tensors, not two per tensor: the same arithmetic.
        torch._foreach_mul_(mine, m)
        torch._foreach_add_(mine, theirs, alpha=1.0 - m)
