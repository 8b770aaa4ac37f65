"""`portable`: each decoding thread's context gathered from the pool, then SDPA with a padding bias.

Runs anywhere PyTorch does; every layer reads every thread's whole context (a shared prefix once per
thread). The step's metadata: the threads in a few buckets of similar context length (`length_buckets`),
per bucket its threads' context slots [Tb, Cb] (Cb its longest context) and the bias [1, Tb, 1, Cb]
that hides padding (and, per window size, positions out of the window).

Why buckets: padded to the step's longest context, every thread's gather and SDPA cost that length. An
APAR step mixes roots (prompt and a long answer) with children just forked (short), so a third or more
of the padded area was padding: on SmolLM2-135M at concurrency 16 the gather alone took half of a
layer's attention (docs/benchmarks.md, "Where an APAR step's time goes").
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from apar.engine.backends.base import AttentionBackend, ChunkMeta, ModelInputs


MAX_BUCKETS = 4
# a bucket's fixed cost, in padded (thread, position) cells: per layer it adds an index of the queries,
# one of the outputs, two gathers and an SDPA call (a dozen microseconds each on a CPU), about what 256
# cells of gather and attention cost there; a split must save more than that
BUCKET_CELLS = 256


def length_buckets(lens: list[int], max_buckets: int | None = None, cost: int | None = None) -> list[list[int]]:
    """The decode threads (indices into `lens`) in at most `max_buckets` (`MAX_BUCKETS`) groups of similar
    context length, each padded to its longest: starting from one group of all, the split that saves the
    most padded cells (beyond `cost`, `BUCKET_CELLS`) is made, while any does. O(buckets x threads) on the
    host. One group of all, in order, when no split pays."""
    max_buckets = MAX_BUCKETS if max_buckets is None else max_buckets
    cost = BUCKET_CELLS if cost is None else cost
    order = sorted(range(len(lens)), key=lens.__getitem__)
    sorted_lens = [lens[i] for i in order]
    cuts = [0, len(order)]  # bucket b: order[cuts[b]:cuts[b + 1]]
    while len(cuts) - 1 < max_buckets:
        best = (cost, None)  # (saving, cut)
        for lo, hi in zip(cuts, cuts[1:]):
            whole = (hi - lo) * sorted_lens[hi - 1]
            for c in range(lo + 1, hi):  # [lo, c) padded to sorted_lens[c - 1], [c, hi) to the longest
                saving = whole - (c - lo) * sorted_lens[c - 1] - (hi - c) * sorted_lens[hi - 1]
                if saving > best[0]:
                    best = (saving, c)
        if best[1] is None:
            break
        cuts = sorted(cuts + [best[1]])
    if len(cuts) == 2:
        return [list(range(len(lens)))]
    return [order[lo:hi] for lo, hi in zip(cuts, cuts[1:])]


@dataclass(slots=True)
class Bucket:
    """Decode threads of similar context length. rows: [Tb] their rows of the flat batch; slots: [Tb, Cb]
    int64, padding -> slot 0; keep: [Tb, Cb] bool, on the context; lens: [Tb] context lengths."""

    rows: torch.Tensor
    slots: torch.Tensor
    keep: torch.Tensor
    lens: torch.Tensor
    biases: dict = field(default_factory=dict)  # (window, dtype) -> [1, Tb, 1, Cb]

    def bias(self, window: int | None, dtype: torch.dtype) -> torch.Tensor:
        key = (window, dtype)
        if key not in self.biases:
            keep = self.keep
            if window is not None:
                cols = torch.arange(keep.shape[1], device=keep.device)  # column = position
                keep = keep & (cols[None, :] > (self.lens - 1 - window)[:, None])
            bias = torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, float("-inf"))
            self.biases[key] = bias[None, :, None, :]
        return self.biases[key]


def gather_contexts(step: ModelInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(slots [T, C] int64 with padding -> 0, keep [T, C] bool) of the decoding threads."""
    d = step.decode
    return _slots(step.contexts.table, d.table_rows, d.lens, d.max_len)


def _slots(table: torch.Tensor, table_rows: torch.Tensor, lens: torch.Tensor, width: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    ctx = table.index_select(0, table_rows)[:, :width]  # [T, C]
    keep = torch.arange(width, device=ctx.device)[None, :] < lens[:, None]
    return torch.where(keep, ctx, 0).long(), keep


def gather_buckets(step: ModelInputs) -> list[Bucket]:
    """The decoding threads' contexts in length buckets (`length_buckets`); their indices travel in one
    upload, and a single bucket (no split paid) needs none."""
    d = step.decode
    groups = length_buckets(d.host_lens)
    rows, table_rows, lens = d.rows.long(), d.table_rows, d.lens
    if len(groups) == 1:
        return [Bucket(rows, *_slots(step.contexts.table, table_rows, lens, d.max_len), lens)]
    out = []
    for group, index in zip(groups, step.contexts.uploader.upload(*groups)):
        index = index.long()
        width = max(d.host_lens[i] for i in group)
        b_lens = lens.index_select(0, index)
        out.append(Bucket(rows.index_select(0, index),
                          *_slots(step.contexts.table, table_rows.index_select(0, index), b_lens, width), b_lens))
    return out


def attend_buckets(buckets: list[Bucket], query: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                   scaling: float, window: int | None, out: torch.Tensor) -> None:
    """Each bucket's decode queries over its threads' gathered contexts, written into out: [N, H, D].
    GQA without copying K/V per query head: q is [Hkv, Tb, G, D], so SDPA reads each gathered K/V
    ([Hkv, Tb, Cb, D]) once for its G query heads."""
    n_heads, dim = query.shape[1:]
    kv_heads = k_pool.shape[0]
    for b in buckets:
        n_thr, width = b.slots.shape
        q = query[b.rows].view(n_thr, kv_heads, n_heads // kv_heads, dim).transpose(0, 1)  # [Hkv, Tb, G, D]
        k = k_pool.index_select(1, b.slots.view(-1)).view(kv_heads, n_thr, width, dim)  # [Hkv, Tb, Cb, D]
        v = v_pool.index_select(1, b.slots.view(-1)).view(kv_heads, n_thr, width, dim)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=b.bias(window, q.dtype), scale=scaling)
        out[b.rows] = o.transpose(0, 1).reshape(n_thr, n_heads, dim)


@dataclass(slots=True)
class PortableMeta:
    buckets: list[Bucket] | None  # None: no decode queries
    chunks: list[ChunkMeta]


class PortableBackend(AttentionBackend):
    """Gather + SDPA, per length bucket (`attend_buckets`)."""

    name = "portable"

    def prepare(self, step: ModelInputs, fixed: bool = False) -> PortableMeta:
        chunks = self.prepare_chunks(step)
        return PortableMeta(None if step.decode is None else gather_buckets(step), chunks)

    def attend(self, meta: PortableMeta, query, k_pool, v_pool, scaling, window):
        # query: [N, H, D] -> out: [N, H, D]
        out = torch.empty_like(query)
        if meta.buckets:
            attend_buckets(meta.buckets, query, k_pool, v_pool, scaling, window, out)
        self.attend_chunks(meta.chunks, query, k_pool, v_pool, scaling, window, out)
        return out
