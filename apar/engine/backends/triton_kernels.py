"""The Triton kernels of the `triton` backend (`triton.py` says what they compute).

`partial`: one program per work item and KV head: the item's reader threads' query heads of that KV head
as the rows of one matrix, over the item's positions [start, end) of a context-table row, tile by tile,
online softmax; writes each reader's partial output [D] and log-sum-exp per query head.
`merge`: one program per thread: its partials merged by log-sum-exp, every query head, into the layer's
output row (in the query's dtype).

Plain functions here, made kernels by `kernels()`: `triton.jit` for a GPU, Triton's interpreter for CPU
tensors (tests). The interpreter swaps `tl` in this module's globals while a kernel runs, so `tl` must
be imported at module level.
"""
from __future__ import annotations

import triton
import triton.language as tl
from triton.language import core as tl_core  # noqa: F401 - the interpreter patches what the kernels' globals hold

def partial(q_ptr, k_ptr, v_ptr, table_ptr, item_ptr, readers_ptr, qrow_ptr, lens_ptr, out_ptr, lse_ptr,
            stride_qn, stride_qh, stride_kh, stride_table, scale, window,
            H: tl.constexpr, GROUP: tl.constexpr, QB: tl.constexpr, M: tl.constexpr, D: tl.constexpr,
            BLOCK: tl.constexpr, IEEE: tl.constexpr, WINDOWED: tl.constexpr):
    item = tl.program_id(0)
    hkv = tl.program_id(1)
    it = item_ptr + item * 6
    row = tl.load(it).to(tl.int64)
    start = tl.load(it + 1)
    end = tl.load(it + 2)
    q0 = tl.load(it + 3)
    nq = tl.load(it + 4)
    part0 = tl.load(it + 5)
    r = tl.arange(0, M)  # query rows: reader j = r // GROUP, its query head hkv * GROUP + r % GROUP
    j = r // GROUP
    valid = (j < nq) & (j < QB)
    thread = tl.load(readers_ptr + q0 + j, mask=valid, other=0)
    qrow = tl.load(qrow_ptr + thread, mask=valid, other=0).to(tl.int64)
    qpos = tl.load(lens_ptr + thread, mask=valid, other=1) - 1
    head = hkv * GROUP + r % GROUP
    d = tl.arange(0, D)
    q = tl.load(q_ptr + qrow[:, None] * stride_qn + head[:, None] * stride_qh + d[None, :],
                mask=valid[:, None], other=0.0)
    m_i = tl.full([M], -1.0e30, dtype=tl.float32)
    l_i = tl.full([M], 0.0, dtype=tl.float32)
    acc = tl.full([M, D], 0.0, dtype=tl.float32)
    k_head = k_ptr + hkv.to(tl.int64) * stride_kh
    v_head = v_ptr + hkv.to(tl.int64) * stride_kh
    for s in range(start, end, BLOCK):
        p = s + tl.arange(0, BLOCK)
        on = p < end
        slot = tl.load(table_ptr + row * stride_table + p, mask=on, other=-1)
        on = slot >= 0  # past the span, or a padding query's row 0 (-1 everywhere)
        slot = tl.maximum(slot, 0).to(tl.int64)
        kv = slot[:, None] * D + d[None, :]
        k = tl.load(k_head + kv, mask=on[:, None], other=0.0)
        v = tl.load(v_head + kv, mask=on[:, None], other=0.0)
        if IEEE:
            scores = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            scores = tl.dot(q, tl.trans(k))
        if WINDOWED:
            keep = on[None, :] & (p[None, :] > qpos[:, None] - window)
        else:
            keep = on[None, :]
        scores = tl.where(keep, scores * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp(m_i - m_new)
        prob = tl.exp(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(prob, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(prob, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(prob.to(v.dtype), v)
        m_i = m_new
    some = l_i > 0.0
    out = acc / tl.where(some, l_i, 1.0)[:, None]
    lse = tl.where(some, m_i + tl.log(tl.where(some, l_i, 1.0)), float("-inf"))
    part = (part0 + j).to(tl.int64) * H + head
    tl.store(out_ptr + part[:, None] * D + d[None, :], out, mask=valid[:, None])
    tl.store(lse_ptr + part, lse, mask=valid)

def merge(out_ptr, lse_ptr, offsets_ptr, parts_ptr, qrow_ptr, dst_ptr, stride_dn, stride_dh,
          H: tl.constexpr, HP: tl.constexpr, D: tl.constexpr):
    thread = tl.program_id(0)
    first = tl.load(offsets_ptr + thread)
    last = tl.load(offsets_ptr + thread + 1)
    h = tl.arange(0, HP)
    on = h < H
    d = tl.arange(0, D)
    m = tl.full([HP], -1.0e30, dtype=tl.float32)
    total = tl.full([HP], 0.0, dtype=tl.float32)
    acc = tl.full([HP, D], 0.0, dtype=tl.float32)
    for i in range(first, last):
        part = tl.load(parts_ptr + i).to(tl.int64) * H + h
        lse = tl.load(lse_ptr + part, mask=on, other=float("-inf"))
        m_new = tl.maximum(m, lse)
        alpha = tl.exp(m - m_new)
        w = tl.exp(lse - m_new)
        total = total * alpha + w
        acc = acc * alpha[:, None] + w[:, None] * tl.load(out_ptr + part[:, None] * D + d[None, :], mask=on[:, None],
                                                          other=0.0)
        m = m_new
    res = acc / tl.where(total > 0.0, total, 1.0)[:, None]
    qrow = tl.load(qrow_ptr + thread).to(tl.int64)
    tl.store(dst_ptr + qrow * stride_dn + h[:, None] * stride_dh + d[None, :], res.to(dst_ptr.dtype.element_ty),
             mask=on[:, None])


_kernels: dict[bool, tuple] = {}


def kernels(interpret: bool) -> tuple:
    """(partial, merge): compiled for the GPU, or run by Triton's interpreter on CPU tensors."""
    if interpret not in _kernels:
        if interpret:
            _kernels[True] = (_Interpreted(partial), _Interpreted(merge))
        else:
            _kernels[False] = (triton.jit(partial), triton.jit(merge))
    return _kernels[interpret]


class _Interpreted:
    """A kernel run by Triton's interpreter, launched as `kernel[grid](...)`.

    Triton's library functions (`tl.sum`, `tl.zeros`, ...) are made interpretable only when
    TRITON_INTERPRET=1 is set before triton is first imported, and torch imports it whenever it compiles
    (flex attention on the CPU does). So during a launch, a library function called from the kernel runs
    interpreted as well, as it would have in that mode."""

    def __init__(self, fn) -> None:
        from triton.runtime.interpreter import InterpretedFunction

        self.kernel = InterpretedFunction(fn)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            from triton.runtime.interpreter import InterpretedFunction
            from triton.runtime.jit import JITFunction

            original = JITFunction.__call__
            JITFunction.__call__ = lambda fn, *a, **k: fn.fn(*a, **k)  # tl and tl.core are patched already
            try:
                return self.kernel[grid](*args, **kwargs)
            finally:
                JITFunction.__call__ = original

        return launch
