"""Sibling projections as one matrix product: a layer's q, k and v projections (and an MLP's gate and up)
read the same input, so their weights are concatenated once at load and a step multiplies once.

Why: at a decode step's small batch each projection is a matrix-vector product that reads its weight
once, and a small one (4096 x 4096, 32 MB) runs further below the copy bandwidth than a large one, each
with its own launch (docs/benchmarks.md, "Fused projections", has the measurements).

How, without touching the model's code: the first sibling (`q_proj`, `gate_proj`) becomes a `FusedHead`
that computes every sibling's product and keeps the others' outputs for the input it was given; the
others become `FusedTail`s that hand over their kept output when called with that same input tensor
(the model calls them in a row on one `hidden_states`), and otherwise compute their own product from
their rows of the concatenated weight (views: no memory is added). So any call order stays correct.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class FusedHead(nn.Module):
    def __init__(self, linears: list[nn.Linear]) -> None:
        super().__init__()
        self.sizes = [m.out_features for m in linears]
        self.in_features = linears[0].in_features
        self.out_features = self.sizes[0]
        self.weight = nn.Parameter(torch.cat([m.weight.detach() for m in linears]), requires_grad=False)
        bias = [m.bias for m in linears]
        self.bias = None if bias[0] is None else nn.Parameter(torch.cat([b.detach() for b in bias]),
                                                              requires_grad=False)
        self.kept: tuple[torch.Tensor, list[torch.Tensor]] | None = None  # (input, the tails' outputs)
        self.product = F.linear  # apar/engine/rows_gemm.py may route it through its kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, *rest = self.product(x, self.weight, self.bias).split(self.sizes, dim=-1)
        self.kept = (x, rest)
        return first


class FusedTail(nn.Module):
    def __init__(self, head: FusedHead, index: int) -> None:
        super().__init__()
        self.__dict__["head"] = head  # not a submodule: the head is its layer's own
        self.index = index
        a = sum(head.sizes[:index])
        b = a + head.sizes[index]
        self.in_features, self.out_features = head.in_features, head.sizes[index]
        self.weight = nn.Parameter(head.weight[a:b], requires_grad=False)  # views of the head's rows
        self.bias = None if head.bias is None else nn.Parameter(head.bias[a:b], requires_grad=False)
        self.last = index == len(head.sizes) - 1
        self.product = F.linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept = self.head.kept
        if kept is not None and kept[0] is x:
            out = kept[1][self.index - 1]
            if self.last:
                self.head.kept = None
            return out
        return self.product(x, self.weight, self.bias)


def fuse_projections(model: nn.Module) -> int:
    """Replace every group of sibling `nn.Linear`s (same input size, dtype and device, all with a bias or
    none) by a FusedHead and FusedTails; returns how many groups were fused."""
    fused = 0
    for module in list(model.modules()):
        for names in GROUPS:
            linears = [getattr(module, n, None) for n in names]
            if not all(type(m) is nn.Linear for m in linears):
                continue
            w0 = linears[0].weight
            if any(m.in_features != linears[0].in_features or m.weight.dtype != w0.dtype
                   or m.weight.device != w0.device or (m.bias is None) != (linears[0].bias is None) for m in linears):
                continue
            head = FusedHead(linears)
            setattr(module, names[0], head)
            for i, name in enumerate(names[1:], start=1):
                setattr(module, name, FusedTail(head, i))
            fused += 1
    return fused
