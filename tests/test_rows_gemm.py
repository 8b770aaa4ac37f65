"""Products of a few rows on the CPU (apar/engine/rows_gemm.py): the kernel against a float64 reference,
each row the same bits whatever else is in its batch, torch's own products past its limits, and a model
routed through it giving the plain model's outputs."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from apar.engine import rows_gemm
from apar.engine.config import EngineConfig
from apar.engine.fusion import FusedHead, fuse_projections
from apar.engine.rows_gemm import MAX_PACKED_ROWS, MAX_ROWS, RowsLinear, linear, use_rows_kernel


@pytest.fixture(scope="module")
def kernel():
    # this project's machines and CI have AVX2 and a C++ compiler (.ci/run checks for g++); a machine
    # without them serves through torch's products, which the last test below covers
    assert rows_gemm.supported(), f"this CPU reports {torch.backends.cpu.get_cpu_capability()}, not AVX2"
    fn = rows_gemm.kernel()
    assert fn is not None, "the rows kernel did not build (see the warning logged above)"
    return fn


@pytest.mark.parametrize("rows,k,n", [(1, 576, 960), (2, 8, 1), (3, 13, 5), (5, 1536, 7), (7, 9, 4),
                                      (16, 100, 33), (32, 64, 3)])
def test_kernel_matches_a_float64_product(kernel, rows, k, n):
    g = torch.Generator().manual_seed(rows * 1000 + k + n)
    x, w, b = torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    want = F.linear(x.double(), w.double(), b.double())
    scale = (x.double().abs() @ w.double().abs().T).max().item()  # the sums' magnitude, for float32's error
    for bias, ref in ((None, want - b.double()), (b, want)):
        got = kernel(x, w, bias)
        assert got.shape == (rows, n) and got.dtype == torch.float32
        assert (got.double() - ref).abs().max().item() <= 1e-5 * scale + 1e-6


def test_a_row_gives_the_same_bits_alone_and_in_any_batch(kernel):
    g = torch.Generator().manual_seed(7)
    w = torch.randn(37, 584, generator=g)  # neither a multiple of the kernel's 4 weight rows nor of 8 lanes
    x = torch.randn(MAX_ROWS, 584, generator=g)
    alone = torch.cat([kernel(x[i:i + 1].contiguous(), w, None) for i in range(MAX_ROWS)])
    for rows in (2, 3, 4, 5, 8, 13, MAX_ROWS):
        for start in (0, MAX_ROWS - rows):
            got = kernel(x[start:start + rows].contiguous(), w, None)
            assert torch.equal(got, alone[start:start + rows]), (rows, start)


def test_the_avx512_kernel_runs_exactly_where_the_cpu_has_avx512(kernel):
    assert (rows_gemm.packed_kernel() is not None) == (torch.backends.cpu.get_cpu_capability() == "AVX512")


@pytest.mark.parametrize("n,k", [(960, 576), (64, 16), (128, 1536), (37, 584), (12, 24), (64, 7)])
def test_linear_matches_a_float64_product_and_keeps_a_rows_bits_in_any_batch(kernel, n, k):
    """Through `linear`: packed weights where the CPU has AVX-512 and the shape packs (N a multiple of
    64), the AVX2 kernel otherwise; either way every row alone and in batches of 2-16 (and up to 128)."""
    g = torch.Generator().manual_seed(n + k)
    w, b = torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    x = torch.randn(MAX_ROWS, k, generator=g)
    want = F.linear(x.double(), w.double(), b.double())
    scale = (x.double().abs() @ w.double().abs().T).max().item()
    packs = n % rows_gemm.PACK_BLOCK == 0 and rows_gemm.packed_kernel() is not None
    assert (rows_gemm.packed_weight(w) is not None) == packs
    alone = torch.cat([linear(x[i:i + 1], w, b) for i in range(MAX_ROWS)])
    assert (alone.double() - want).abs().max().item() <= 1e-5 * scale + 1e-6
    for rows in (2, 3, 4, 5, 6, 7, 8, 11, 13, MAX_ROWS):
        for start in (0, MAX_ROWS - rows):
            assert torch.equal(linear(x[start:start + rows], w, b), alone[start:start + rows]), (rows, start)
    many = torch.cat([x] * (MAX_PACKED_ROWS // MAX_ROWS))  # packed weights: the kernel's up to 128 rows
    got = linear(many, w, b)
    if packs:
        assert torch.equal(got, torch.cat([alone] * (MAX_PACKED_ROWS // MAX_ROWS)))
    assert (got.double() - F.linear(many.double(), w.double(), b.double())).abs().max().item() <= 1e-5 * scale + 1e-6


def test_a_packed_weight_is_made_once_and_again_after_it_changes(kernel):
    w3 = torch.randn(3, 64, 32)  # the hydra heads' weights: each head's a view of one parameter
    x = torch.randn(2, 32)
    first = rows_gemm.packed_weight(w3[1])
    if rows_gemm.packed_kernel() is None:  # an AVX2 machine: nothing is packed, weights are read as they are
        assert first is None
    else:
        assert first is not None and rows_gemm.packed_weight(w3[1]) is first  # a new view, the same copy
    before = linear(x, w3[1])
    w3.mul_(2)  # in place (the weights of a model being trained): the copy is made again
    assert torch.allclose(linear(x, w3[1]), 2 * before, atol=1e-5)


def test_linear_routes_few_float32_rows_and_leaves_the_rest_to_torch(kernel, monkeypatch):
    calls = []
    monkeypatch.setattr(rows_gemm, "_kernel", lambda *a: calls.append(a[0].shape) or kernel(*a))
    w, b = torch.randn(6, 16), torch.randn(6)  # 6 weight rows: never packed, so always the AVX2 kernel
    x = torch.randn(2, 3, 16)  # leading dimensions flattened into rows, and restored
    out = linear(x, w, b)
    assert out.shape == (2, 3, 6) and calls == [(6, 16)]
    assert torch.allclose(out, F.linear(x, w, b), atol=1e-5)
    strided, w8 = x[:, :, ::2], w[:, :8].contiguous()  # an input that is not contiguous
    assert torch.allclose(linear(strided, w8), F.linear(strided, w8), atol=1e-5)
    calls.clear()
    many = torch.randn(MAX_ROWS + 1, 16)
    assert torch.allclose(linear(many, w, b), F.linear(many, w, b))  # a prefill chunk: torch's product
    packed_calls = []
    if rows_gemm.packed_kernel() is not None:
        real = rows_gemm.packed_kernel()
        monkeypatch.setattr(rows_gemm, "_packed_kernel", lambda *a: packed_calls.append(a[0].shape) or real(*a))
    w64 = torch.randn(64, 16)  # a weight that packs: with AVX-512 the kernel's up to MAX_PACKED_ROWS rows
    for rows in (MAX_PACKED_ROWS, MAX_PACKED_ROWS + 1):
        xr = torch.randn(rows, 16)
        assert torch.allclose(linear(xr, w64), F.linear(xr, w64), atol=1e-5)
    assert packed_calls == ([] if rows_gemm.packed_kernel() is None else [(MAX_PACKED_ROWS, 16)])
    linear(x.double(), w.double())  # not float32
    linear(x, w.T.contiguous().T)  # a weight that is not contiguous
    xg = x.clone().requires_grad_()
    linear(xg, w).sum().backward()  # training needs autograd
    assert calls == [] and xg.grad is not None


def test_a_model_routed_through_the_kernel_gives_the_plain_models_outputs(kernel, llama_dir):
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(str(llama_dir), dtype=torch.float32).eval()
    routed = AutoModelForCausalLM.from_pretrained(str(llama_dir), dtype=torch.float32).eval()
    fuse_projections(routed)
    linears = sum(type(m) is nn.Linear for m in routed.modules())
    fused = sum(isinstance(m, FusedHead) for m in routed.modules())
    head = routed.lm_head.weight
    assert use_rows_kernel(routed) >= linears + fused > 0
    assert not any(type(m) is nn.Linear for m in routed.modules())
    assert isinstance(routed.lm_head, RowsLinear) and routed.lm_head.weight is head  # nothing copied
    assert all(m.product is linear for m in routed.modules() if isinstance(m, FusedHead))
    ids = torch.randint(0, plain.config.vocab_size, (1, 9))
    with torch.no_grad():
        want, got = plain(ids).logits, routed(ids).logits  # 9 rows: every product through the kernel
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_the_engine_uses_the_kernel_on_the_cpu_unless_told_not_to(kernel, llama_dir):
    from apar.engine.model_runner import ModelRunner

    on = ModelRunner(llama_dir, EngineConfig(num_blocks=8))
    off = ModelRunner(llama_dir, EngineConfig(num_blocks=8, rows_kernel=False))
    assert on.rows_kernel and isinstance(on.model.lm_head, RowsLinear)
    assert not off.rows_kernel and type(off.model.lm_head) is nn.Linear


def test_without_the_kernel_products_stay_torchs(monkeypatch, llama_dir):
    from apar.engine.model_runner import ModelRunner

    monkeypatch.setattr(rows_gemm, "_kernel", None)
    monkeypatch.setattr(rows_gemm, "_tried", True)  # as on a machine where it could not be built
    runner = ModelRunner(llama_dir, EngineConfig(num_blocks=8))
    assert not runner.rows_kernel and type(runner.model.lm_head) is nn.Linear
    x, w = torch.randn(3, 8), torch.randn(4, 8)
    assert torch.equal(linear(x, w), F.linear(x, w))


def test_drafters_route_their_products_and_guess_as_without(kernel):
    from apar.engine.eagle import EagleDrafter, EagleHeads
    from apar.engine.medusa import HydraHeads, MedusaDrafter

    torch.manual_seed(3)
    H, V = 32, 50
    table, embed = torch.randn(V, H), torch.randn(V, H)
    eagle, hydra = EagleHeads(H, 3, attn_heads=4), HydraHeads(H, 3)
    with torch.no_grad():
        for p in [*eagle.parameters(), *hydra.parameters()]:
            p.add_(torch.randn_like(p) * 0.3)
    keys, hidden = [("a", 0), ("b", 0)], torch.randn(7, H)
    tokens = torch.randint(0, V, (7,)).tolist()
    guesses = []
    for routed in (False, True):
        drafters = [EagleDrafter(eagle, table, None, [], embed, min_confidence=0.0),
                    MedusaDrafter(hydra, table, None, [], embed)]
        for d in drafters:
            d.min_confidence = 0.0
            if routed:
                d.use_rows_kernel()
                assert d.product is linear and not any(type(m) is nn.Linear for m in d.heads.modules())
                assert d.heads.product is linear if isinstance(d.heads, HydraHeads) else True
            d.propose(keys, [20, 30], hidden, tokens, [4, 3])  # two threads' runs of 4 and 3 rows
        guesses.append([d.proposals for d in drafters])
    for plain, routed in zip(*guesses):
        for key in keys:
            assert plain[key][:2] == routed[key][:2] and len(routed[key][1]) == 3  # length, tokens
            assert routed[key][2] == pytest.approx(plain[key][2], abs=1e-4)  # scores, to rounding


def test_bench_rows_times_both_products_and_refuses_bad_rows(kernel):
    import json
    import subprocess
    import sys

    def bench(*args):
        return subprocess.run([sys.executable, "-m", "apar.cli", "bench", "rows", "--layers", "1", "--vocab", "64",
                               "--repeats", "1", *args], capture_output=True, text=True, timeout=120)

    done = bench("--rows", "1,3", "--json")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)["rows"]
    assert json.loads(done.stdout)["kernel"] == ("avx2" if rows_gemm.packed_kernel() is None else "avx512")
    assert set(rows) == {"1", "3"} and all(r["torch_ms"] > 0 and r["kernel_ms"] > 0 for r in rows.values())
    for bad in ("257", "0", "two", ""):
        refused = bench("--rows", bad)
        assert refused.returncode != 0 and "--rows" in refused.stderr and "Traceback" not in refused.stderr
