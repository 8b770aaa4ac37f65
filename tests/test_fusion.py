"""Sibling projections fused into one product (apar/engine/fusion.py): the same outputs as the separate
linears, in the model's call order and in any other, with no weight memory added."""
from __future__ import annotations

import torch
from torch import nn

from apar.engine.fusion import FusedHead, FusedTail, fuse_projections


class Attention(nn.Module):
    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(8, 12, bias=bias), nn.Linear(8, 4, bias=bias), \
            nn.Linear(8, 4, bias=bias)
        self.o_proj = nn.Linear(12, 8)


def test_fused_siblings_give_each_linears_output():
    torch.manual_seed(0)
    for bias in (False, True):
        layer = Attention(bias)
        x, y = torch.randn(5, 8), torch.randn(3, 8)
        want = [m(x) for m in (layer.q_proj, layer.k_proj, layer.v_proj)]
        want_y = layer.k_proj(y)
        want_v, want_vb = layer.v_proj.weight.detach().clone(), layer.v_proj.bias
        want_vb = None if want_vb is None else want_vb.detach().clone()
        assert fuse_projections(layer) == 1
        assert isinstance(layer.q_proj, FusedHead) and isinstance(layer.v_proj, FusedTail)
        assert isinstance(layer.o_proj, nn.Linear)  # no siblings: left as it is
        got = [layer.q_proj(x), layer.k_proj(x), layer.v_proj(x)]  # the model's order: one product
        assert all(torch.allclose(g, w, atol=1e-6) for g, w in zip(got, want))
        assert layer.q_proj.kept is None  # the last tail took its output
        assert torch.allclose(layer.k_proj(y), want_y, atol=1e-6)  # another input: its own rows' product
        layer.q_proj(x)
        assert torch.allclose(layer.v_proj(y), y @ want_v.T + (want_vb if bias else 0), atol=1e-6)  # kept: x's
        head = layer.q_proj.weight
        assert layer.k_proj.weight.untyped_storage().data_ptr() == head.untyped_storage().data_ptr()  # views


def test_unlike_siblings_stay_apart():
    layer = Attention(False)
    layer.v_proj = nn.Linear(8, 4, bias=True)  # a bias where the others have none
    assert fuse_projections(layer) == 0 and isinstance(layer.q_proj, nn.Linear)
