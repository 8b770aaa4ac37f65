"""`flex`: FlexAttention (`torch.nn.attention.flex_attention`, compiled) straight over the paged pool.

No gather: the decoding queries attend the pool itself, [1, Hkv, S, D], through a block mask. Queries
are packed into *elements* of up to `QUERIES` threads of one request (threads that may share context):
element e is batch entry e of the query, [E, H, QUERIES, D], and the pool is broadcast over the batch.
An element visits a KV block of the pool (`KV_BLOCK` slots) only when one of its threads reads a slot in
it, so a prefix its threads share is read once for all of them; inside a visited block the mask is exact:

    keep(e, q, slot) = pos(slot) <= pos(e, q)  and  table[row(e, q), pos(slot)] == slot  (and in the window)

where pos(slot) is the position whose K/V the slot holds (`slot_pos`, updated from every step's writes)
and table is the context table: a slot belongs to a query's context exactly when that context holds it
at its position. Stale slots (freed, or not yet written) never match: their position is either beyond the
query or points at another slot in the query's row. Padding reads row 0, which holds -1 everywhere.

Shapes are fixed so that the compiled kernel is reused and a CUDA graph can replay it: the element count
is the thread count's power of two, at least `MIN_ELEMENTS` (a request of many threads uses few of them;
an empty element visits no block), the block tables for each padded size live in place and are refilled every
step, the pool is the key. Each padded size and window size compiles once (seconds on the CPU; the
recompile limit is raised to allow it).

Chunks (prefill, recompute) take the shared gather + SDPA path.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch

from apar.engine.backends.base import AttentionBackend, ChunkMeta, ModelInputs

KV_BLOCK = 128  # slots per block of the block mask; the pool is allocated in whole multiples of it
QUERIES = 16  # threads per element: one kernel block of queries (a request's threads read a prefix once)
# the block mask's query block: one per element. The GPU decoding kernel tiles QUERIES x (query heads per
# KV head) rows and needs this to be a multiple of its tile: 1,024 allows up to 64 query heads per KV head
Q_BLOCK = 1024
# elements in a call at least: each count compiles once (and a count of elements with no thread visits
# no block), so small batches share one compiled kernel
MIN_ELEMENTS = 16
_NEVER = torch.iinfo(torch.int32).max  # slot_pos of a slot never written

_compiled = None


def flex_attention_fn():
    """flex_attention compiled once per process (static shapes: each padded size compiles anew)."""
    global _compiled
    if _compiled is None:
        from torch.nn.attention.flex_attention import flex_attention

        config = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit"):  # the name moved between releases
            if hasattr(config, name):
                setattr(config, name, max(getattr(config, name), 64))
        _compiled = torch.compile(flex_attention, dynamic=False)
    return _compiled


def _block_mask(num: torch.Tensor, idx: torch.Tensor, mask_mod, kv_len: int):
    from torch.nn.attention.flex_attention import BlockMask

    kwargs = {"BLOCK_SIZE": (Q_BLOCK, KV_BLOCK), "mask_mod": mask_mod, "seq_lengths": (QUERIES, kv_len)}
    if "compute_q_blocks" in inspect.signature(BlockMask.from_kv_blocks).parameters:
        kwargs["compute_q_blocks"] = False  # those serve the backward pass only
    return BlockMask.from_kv_blocks(num, idx, **kwargs)


def _mask_mod(table: torch.Tensor, slot_pos: torch.Tensor, q_row: torch.Tensor, q_pos: torch.Tensor,
              window: int | None):
    """q_row, q_pos: [E, QUERIES]."""
    def keep(b, h, q, kv):
        p = slot_pos[kv]
        qp = q_pos[b, q]
        hit = (p <= qp) & (table[q_row[b, q], torch.minimum(p, qp)] == kv)
        if window is not None:
            hit = hit & (p > qp - window)
        return hit

    return keep


@dataclass(slots=True)
class _Masks:
    """Static per padded element count E (a CUDA graph reads them by address): each decode query's place
    e * QUERIES + j [E * QUERIES] (the first T used), the queries' table rows and positions [E, QUERIES],
    and per window the block tables [E, 1, 1, S / KV_BLOCK] with the BlockMask built around them once."""

    place: torch.Tensor
    q_row: torch.Tensor
    q_pos: torch.Tensor
    tables: dict = field(default_factory=dict)  # window -> (num, idx, BlockMask)


@dataclass(slots=True)
class FlexMeta:
    rows: torch.Tensor | None  # [T] decode rows of the flat batch
    place: torch.Tensor | None  # [T] each decode query's place in the elements
    elements: int  # E (padded)
    masks: _Masks | None
    chunks: list[ChunkMeta]
    step: ModelInputs | None = None
    backend: "FlexBackend | None" = None
    element_of: torch.Tensor | None = None  # [T] each decode query's element

    def block_mask(self, window: int | None):
        if window not in self.masks.tables:  # a window the model did not announce (eager only)
            self.backend.fill(self.step, self.masks, self.elements, self.element_of, window)
        return self.masks.tables[window][2]


class FlexBackend(AttentionBackend):
    name = "flex"
    graphs = True

    def __init__(self, device: torch.device, pool_slots: int) -> None:
        if pool_slots % KV_BLOCK:
            raise ValueError(f"the pool's slots ({pool_slots}) must be a multiple of {KV_BLOCK}")
        self.device = device
        self.slot_pos = torch.full((pool_slots,), _NEVER, dtype=torch.int32, device=device)
        self.windows: set[int | None] = {None}  # the model's window sizes: their block tables are filled
        # in `prepare`, before the forward (a CUDA graph replays the forward only)
        self._masks: dict[int, _Masks] = {}
        self._version = -1
        self._flex = flex_attention_fn()

    def prepare(self, step: ModelInputs, fixed: bool = False) -> FlexMeta:
        self.slot_pos[step.write_slots] = step.positions
        chunks = self.prepare_chunks(step)
        d = step.decode
        if d is None:
            return FlexMeta(None, None, 0, None, chunks)
        if step.contexts.version != self._version:  # the table was reallocated: masks over the new one
            self._masks.clear()
            self._version = step.contexts.version
        place = _pack(d.families)
        elements = max(MIN_ELEMENTS, 1 << (d.count - 1).bit_length())  # enough for any packing; T alone
        masks = self._masks.get(elements)
        if masks is None:
            masks = _Masks(torch.zeros(elements * QUERIES, dtype=torch.long, device=self.device),
                           torch.zeros(elements, QUERIES, dtype=torch.int32, device=self.device),
                           torch.zeros(elements, QUERIES, dtype=torch.int32, device=self.device))
            self._masks[elements] = masks
        place_t, elem_t = (t.long() for t in step.contexts.uploader.upload(place, [p // QUERIES for p in place]))
        where = masks.place[: d.count]
        where.copy_(place_t)
        masks.q_row.zero_()
        masks.q_row.view(-1)[place_t] = d.table_rows
        masks.q_pos.zero_()
        masks.q_pos.view(-1)[place_t] = d.lens - 1
        for window in self.windows:
            self.fill(step, masks, elements, elem_t, window)
        return FlexMeta(d.rows, where, elements, masks, chunks, step, self, elem_t)

    def fill(self, step: ModelInputs, masks: _Masks, elements: int, elem: torch.Tensor, window: int | None) -> None:
        """The block tables of `window` for this step: which pool blocks each element visits."""
        d = step.decode
        n_kv = self.slot_pos.numel() // KV_BLOCK
        if window not in masks.tables:
            num = torch.zeros(elements, 1, 1, dtype=torch.int32, device=self.device)
            idx = torch.zeros(elements, 1, 1, n_kv, dtype=torch.int32, device=self.device)
            keep = _mask_mod(step.contexts.table, self.slot_pos, masks.q_row, masks.q_pos, window)
            masks.tables[window] = (num, idx, _block_mask(num, idx, keep, self.slot_pos.numel()))
        num, idx, _ = masks.tables[window]
        width = d.max_len
        ctx = step.contexts.table.index_select(0, d.table_rows)[:, :width]  # [T, C]
        cols = torch.arange(width, device=ctx.device)[None, :]
        on = (cols < d.lens[:, None]) & (ctx >= 0)
        if window is not None:
            on = on & (cols > (d.lens[:, None] - 1 - window))
        block = torch.where(on, ctx // KV_BLOCK, n_kv).long()  # off the context: a dummy column
        touched = torch.zeros(elements, n_kv + 1, dtype=torch.int32, device=ctx.device)
        touched[elem[:, None].expand_as(block), block] = 1
        touched = touched[:, :n_kv]
        num.copy_(touched.sum(-1).view(elements, 1, 1))
        idx.copy_(torch.argsort(touched, dim=-1, descending=True, stable=True).view(elements, 1, 1, n_kv))

    def attend(self, meta: FlexMeta, query, k_pool, v_pool, scaling, window):
        # query: [N, H, D] -> out: [N, H, D]; pools: [Hkv, S, D]
        out = torch.empty_like(query)
        if meta.rows is not None:
            n_heads, dim = query.shape[1:]
            q = query.new_zeros(meta.elements * QUERIES, n_heads, dim)
            q[meta.place] = query[meta.rows]
            q = q.view(meta.elements, QUERIES, n_heads, dim).transpose(1, 2)  # [E, H, QUERIES, D]
            o = self._flex(q, k_pool.unsqueeze(0), v_pool.unsqueeze(0), block_mask=meta.block_mask(window),
                           scale=scaling, enable_gqa=n_heads != k_pool.shape[0])  # [E, H, QUERIES, D]
            out[meta.rows] = o.transpose(1, 2).reshape(-1, n_heads, dim)[meta.place]
        self.attend_chunks(meta.chunks, query, k_pool, v_pool, scaling, window, out)
        return out


def _pack(families: list[int]) -> list[int]:
    """Each decode query's place e * QUERIES + j: threads of one family (request) fill an element
    before the next one opens (so at most one element per query)."""
    place: list[int] = []
    open_: dict[int, tuple[int, int]] = {}  # family -> (element, threads in it)
    used = 0
    for fam in families:
        e, n = open_.get(fam, (-1, QUERIES))
        if n == QUERIES:
            e, n = used, 0
            used += 1
        place.append(e * QUERIES + n)
        open_[fam] = (e, n + 1)
    return place
