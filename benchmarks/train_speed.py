"""Seconds per training epoch: our trainer against the authors' released loop design, same maths.

    python benchmarks/train_speed.py                                  # GPU machine: 400 bags of 8000 x 512
    python benchmarks/train_speed.py --bags 40 --tiles 2000 --epochs 2   # a 2-core CPU

The reference re-implements the design of the released ASMIL training loop around our own
weights: every bag copied to the device at every step, the N token attentions as N separate
modules run one after another (keys and values materialised), fp32, a NaN check over every
parameter and ``.item()`` host syncs at every step. Both start from identical weights, data order
and random streams (dropout 0 so the two execution orders draw the same numbers), so their loss
curves must agree to float tolerance; the script checks that before it prints any speed-up.
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import numpy as np
import torch
from torch import nn

from wsi_asmil.models import MILLoss
from wsi_asmil.models.asmil import ASMIL, select_tokens
from wsi_asmil.train import Bag, FoldData, build_trainer, resolve_params, train_one_epoch


class LoopedAttention(nn.Module):
    """One query's private multi-head cross-attention, computed the direct way."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, query: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m, d = x.shape
        dh = d // self.heads
        q = self.q(query).view(1, self.heads, dh)
        k = self.k(x).view(m, self.heads, dh)
        v = self.v(x).view(m, self.heads, dh)
        logits = torch.einsum("qhd,mhd->hqm", q, k) / math.sqrt(dh)
        out = torch.einsum("hqm,mhd->qhd", torch.softmax(logits, dim=-1), v).reshape(1, d)
        return self.norm(self.o(out)), logits


def looped_from(stacked: nn.Module, index: int, heads: int) -> LoopedAttention:
    """Weight set ``index`` of our stacked attention as a stand-alone module."""
    mod = LoopedAttention(stacked.dim, heads)
    with torch.no_grad():
        for name in ("q", "k", "v", "o"):
            getattr(mod, name).weight.copy_(getattr(stacked, f"{name}_weight")[index])
            getattr(mod, name).bias.copy_(getattr(stacked, f"{name}_bias")[index])
        mod.norm.weight.copy_(stacked.norm_weight[index])
        mod.norm.bias.copy_(stacked.norm_bias[index])
    return mod


class ReferenceASMIL(nn.Module):
    """The released code's structure: a Python loop over N attention modules."""

    def __init__(self, ours: ASMIL, heads: int) -> None:
        super().__init__()
        self.reduce = copy.deepcopy(ours.reduce)
        self.tokens = nn.Parameter(ours.tokens.detach().clone())
        self.token_modules = nn.ModuleList(looped_from(ours.token_attention, t, heads) for t in range(ours.n_tokens))
        self.cls_token = nn.Parameter(ours.cls_token.detach().clone())
        self.aggregator = nn.ModuleList(looped_from(layer, 0, heads) for layer in ours.aggregator)
        self.classifier = copy.deepcopy(ours.classifier)
        self.rate, self.mode = ours.token_drop, ours.token_drop_mode

    def attention_logits(self, bag: torch.Tensor) -> torch.Tensor:
        h = self.reduce(bag)
        return torch.cat([mod(self.tokens[t : t + 1], h)[1] for t, mod in enumerate(self.token_modules)], dim=1)

    def forward(self, bag: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.reduce(bag)
        vectors, logits = [], []
        for t, mod in enumerate(self.token_modules):
            v, lg = mod(self.tokens[t : t + 1], h)
            vectors.append(v)
            logits.append(lg)
        tokens = torch.cat(vectors)
        if self.training and self.rate > 0:
            tokens = tokens[select_tokens(len(self.token_modules), self.rate, self.mode).to(tokens.device)]
        cls = self.cls_token
        for layer in self.aggregator:
            cls, _ = layer(cls, tokens)
        return {"logits": self.classifier(cls[0]), "attn_logits": torch.cat(logits, dim=1)}


def reference_epoch(model, anchor, optimizer, scheduler, loss_fn, cpu_bags, labels, order, device, momentum):
    """One epoch as the released loop runs it; returns per-step losses."""
    model.train()
    losses = []
    for i in order:
        x = cpu_bags[i].to(device)
        y = torch.tensor(labels[i], device=device)
        out = model(x)
        with torch.no_grad():
            anchor_logits = anchor.attention_logits(x)
        loss = loss_fn(out["logits"], y, out["attn_logits"], anchor_logits)["loss"]
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            for p_anchor, p in zip(anchor.parameters(), model.parameters()):
                if torch.isnan(p).any():
                    raise FloatingPointError("NaN weight")
                p_anchor.mul_(momentum).add_(p, alpha=1 - momentum)
        losses.append(loss.item())
    return losses


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bags", type=int, default=400)
    p.add_argument("--tiles", type=int, default=8000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    rng = np.random.default_rng(0)
    cpu_bags = [torch.from_numpy(rng.standard_normal((args.tiles, args.dim), dtype=np.float32)) for _ in range(args.bags)]
    labels = rng.integers(0, 2, args.bags).tolist()
    base = {"epochs": args.epochs, "seed": 0, "standardize": False, "grad_clip": 5.0,
            "models": {"asmil": {"n_tokens": args.tokens, "dropout": 0.0}}}

    def our_data() -> FoldData:
        bags = [Bag(f"b{i}", labels[i], b.to(device), torch.tensor(labels[i], device=device)) for i, b in enumerate(cpu_bags)]
        return FoldData(["0", "1"], {"train": bags, "val": [], "test": []}, [], args.dim)

    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}), "
          f"{args.bags} bags of {args.tiles} x {args.dim}, N = {args.tokens}, {args.epochs} epochs")
    results = {}
    for label, amp in [("ours fp32", False), ("ours bf16", True)] if device.type == "cuda" else [("ours fp32", False)]:
        data = our_data()
        trainer = build_trainer("asmil", data, resolve_params({**base, "amp": amp}), device)
        if label == "ours fp32":
            initial = copy.deepcopy(trainer.model).cpu()
        torch.manual_seed(1)
        times, curve = [], []
        for _ in range(args.epochs):
            synchronize(device)
            t0 = time.perf_counter()
            stats = train_one_epoch(trainer, data.bags["train"], desc="ours")
            synchronize(device)
            times.append(time.perf_counter() - t0)
            curve.append(stats["loss"])
        results[label] = (times, curve)
        del data, trainer
    ref = ReferenceASMIL(initial, 8).to(device)
    anchor = copy.deepcopy(ref).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(ref.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-5)
    total = args.epochs * args.bags
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    order_rng = np.random.default_rng(0)
    torch.manual_seed(1)
    times, curve = [], []
    for _ in range(args.epochs):
        synchronize(device)
        t0 = time.perf_counter()
        losses = reference_epoch(ref, anchor, optimizer, scheduler, MILLoss(), cpu_bags, labels,
                                 order_rng.permutation(args.bags), device, 0.999)
        synchronize(device)
        times.append(time.perf_counter() - t0)
        curve.append(float(np.mean(losses)))
    results["released-code design"] = (times, curve)
    ref_time = np.median(results["released-code design"][0])
    for label, (times, curve) in results.items():
        print(f"{label:24s} {np.median(times):8.2f} s/epoch   x{ref_time / np.median(times):5.2f}   loss per epoch "
              + " ".join(f"{c:.6f}" for c in curve))
    same = np.allclose(results["ours fp32"][1], results["released-code design"][1], rtol=1e-4, atol=1e-5)
    print(f"fp32 loss curves agree with the reference (rtol 1e-4): {same}")
    if device.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
