"""`triton`: the cascade plan run by two Triton kernels straight over the paged pool, no gather.

The plan is cascade's (`plan_cascade`): a span of context that several decoding threads share is one
*group* part, read once for all of its readers; the rest of each thread's context is its private part.
Here both become *work items*: (a context-table row, positions [start, end) of it, up to QB reader
threads). One program per item and KV head reads the item's slots through the table row, tile by tile
(`BLOCK_N` positions), with every reader's query heads as rows of one matrix product (a shared prefix:
its K/V read once for all the threads of a family), and writes each reader's partial output and
log-sum-exp. A second kernel merges each thread's partials by log-sum-exp into the layer's output.
Long spans are cut into items of at most `SPLIT` positions, so that a few long contexts still fill the
GPU (split-KV).

    per step (host, O(threads x depth)): plan -> items [I, 6] int32 (row, start, end, q0, nq, part0),
    readers [Q] (threads), each thread's parts (offsets [T + 1], parts [P]) -> one upload
    per layer: partial kernel (private items, QB = 1), partial kernel (group items, QB >= readers),
    merge kernel (a program per thread)

Why not flex: its decode kernel checks a mask per (query, slot) inside every visited block, and a block of
the pool holds several threads' slots, so a thread's private blocks are read (and masked) for all the
queries of its element (docs/benchmarks.md, "Attention backends", has the measurements). Here a
program reads exactly its item's slots, and only the queries that read them are its rows.

Grids and buffers have fixed sizes per padded thread count when a CUDA graph replays the step
(`prepare(step, fixed=True)`: items beyond the plan are empty, start = end, nq = 0; one thread's graph
has no group items at all); a plan that does not fit them runs eagerly.

On the CPU the kernels run in Triton's interpreter (numpy, slow: for tests); float32 products are exact
(`ieee`) there and on a GPU, where other dtypes use the tensor cores.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from apar.engine.backends import cascade
from apar.engine.backends.base import AttentionBackend, ChunkMeta, ModelInputs
from apar.engine.backends.cascade import CascadePlan, Span, plan_cascade

SPLIT = 256  # positions per work item at most (a longer span is cut): each program's share of a context
# positions per tile of a program's loop: on a GPU, K and V tiles of BLOCK_N x D in registers; in the
# interpreter (CPU tests) one numpy op covers a whole tile, so few large tiles run fastest
BLOCK_N = 64
BLOCK_N_INTERPRETED = 128
# the partial kernel's launch on a GPU: the fastest of a sweep of tile sizes, warps, stages and SPLIT
# (docs/benchmarks.md, "Triton kernel tiles", has the sweep and its date)
NUM_WARPS = 4
NUM_STAGES = 2
MAX_ROWS = 64  # query rows (readers x query heads per KV head) in one program at most: its fp32
# accumulator, MAX_ROWS x head dim, stays in registers
ITEM = 6  # ints per work item: row, start, end, first reader (index into readers), reader count, first part


@dataclass(slots=True)
class _Items:
    """One kind of work item on the device: items [I, ITEM] int32, and QB (readers per item, padded)."""

    items: torch.Tensor
    qb: int


@dataclass(slots=True)
class TritonMeta:
    rows: torch.Tensor | None  # [T] decode rows of the flat batch (int32)
    lens: torch.Tensor | None  # [T] context lengths
    table: torch.Tensor | None  # the context table [rows, positions] int32
    kinds: list[_Items]  # private items (QB = 1), group items
    readers: torch.Tensor | None  # [Q] the thread of each reader slot of an item
    offsets: torch.Tensor | None  # [T + 1] each thread's parts: parts[offsets[t] : offsets[t + 1]]
    parts: torch.Tensor | None
    num_parts: int
    chunks: list[ChunkMeta] = field(default_factory=list)
    scratch: tuple[torch.Tensor, torch.Tensor] | None = None  # partial outputs and lse: every layer reuses them


@dataclass(slots=True)
class Layout:
    """A plan as work items, host side: private and group items (ITEM ints each), reader slots, each
    thread's parts (offsets, parts), the most readers of a group item."""

    private: list[int]
    group: list[int]
    readers: list[int]
    offsets: list[int]
    parts: list[int]
    widest: int

    def lists(self) -> list[list[int]]:
        return [self.private, self.group, self.readers, self.offsets, self.parts]


def layout(plan: CascadePlan, per_item: int, split: int) -> Layout:
    """Work items of the plan: every span cut into pieces of at most `split` positions; a group's readers
    in runs of at most `per_item`; reader slot j of an item is part part0 + j."""
    private: list[int] = []
    group: list[int] = []
    readers: list[int] = []
    owned: list[list[int]] = [[] for _ in plan.private]
    parts = 0

    def add(out: list[int], spans: list[Span], who: list[int] | tuple[int, ...]) -> None:
        nonlocal parts
        q0 = len(readers)
        readers.extend(who)
        for s in spans:
            for a in range(s.start, s.end, split):
                out += (s.row, a, min(a + split, s.end), q0, len(who), parts)
                for j, t in enumerate(who):
                    owned[t].append(parts + j)
                parts += len(who)

    for t, spans in enumerate(plan.private):
        if spans:
            add(private, spans, [t])
    widest = 0
    for who, spans in plan.groups:
        for c in range(0, len(who), per_item):
            add(group, spans, who[c : c + per_item])
            widest = max(widest, len(who[c : c + per_item]))
    offsets = [0]
    for mine in owned:
        offsets.append(offsets[-1] + len(mine))
    return Layout(private, group, readers, offsets, [p for mine in owned for p in mine], widest)


@dataclass(slots=True)
class _Static:
    """A CUDA graph's buffers for one padded thread count, in one int32 tensor laid out as
    [private items | group items | offsets | readers | parts], refilled every step: the items in full
    (those past the plan empty: start = end, no readers), the offsets in full, the readers and parts only
    as far as the items name them."""

    caps: tuple[int, ...]  # ints of each list, in `Layout.lists()` order
    flat: torch.Tensor
    private: torch.Tensor
    group: torch.Tensor
    offsets: torch.Tensor
    readers: torch.Tensor
    parts: torch.Tensor


class TritonBackend(AttentionBackend):
    name = "triton"
    uses_runs = True
    graphs = True

    def __init__(self, device: torch.device, query_group: int = 1, min_shared: int | None = None) -> None:
        self.device = device
        self.interpret = device.type != "cuda"
        self.block = BLOCK_N_INTERPRETED if self.interpret else BLOCK_N
        self.min_shared = cascade.MIN_SHARED if min_shared is None else min_shared
        self.query_group = query_group  # query heads per KV head: a program holds at most MAX_ROWS rows
        self._static: dict[int, _Static] = {}  # padded threads -> a graph's buffers
        self.shared_steps = 0  # steps that attended some span once for several threads
        from apar.engine.backends.triton_kernels import kernels

        self._partial, self._merge = kernels(self.interpret)

    # ---- per step ----------------------------------------------------------------------------------
    def prepare(self, step: ModelInputs, fixed: bool = False) -> TritonMeta | None:
        """The step's work items; `fixed`: in a graph's buffers (fixed grids, refilled in place), or None
        when they cannot hold them (the step runs eagerly)."""
        chunks = self.prepare_chunks(step)
        d = step.decode
        if d is None:
            return TritonMeta(None, None, None, [], None, None, None, 0, chunks)
        n = d.count
        if len(set(d.families)) < n:
            plan = plan_cascade(d.runs, d.host_table_rows, self.min_shared)
        else:  # one thread per request: nothing to share
            plan = CascadePlan([], [[Span(r, 0, length)] for r, length in zip(d.host_table_rows, d.host_lens)])
        self.shared_steps += bool(plan.groups)
        per_item = max(1, MAX_ROWS // self.query_group)
        if not fixed:
            lay = layout(plan, per_item, SPLIT)
            p_items, g_items, readers, offsets, parts = step.contexts.uploader.upload(*lay.lists())
            qb, num_parts = 1 << max(0, lay.widest - 1).bit_length(), len(lay.parts)
        else:
            buf = self._buffers(n, per_item)
            lay = self._fit(plan, per_item, buf.caps)
            if lay is None:
                return None
            head = (lay.private + [0] * (buf.caps[0] - len(lay.private)) + lay.group
                    + [0] * (buf.caps[1] - len(lay.group)) + lay.offsets + lay.readers)
            head_t, parts_t = step.contexts.uploader.upload(head, lay.parts)
            buf.flat[: len(head)].copy_(head_t, non_blocking=True)
            buf.parts[: len(lay.parts)].copy_(parts_t, non_blocking=True)
            p_items, g_items, readers, offsets, parts = buf.private, buf.group, buf.readers, buf.offsets, buf.parts
            qb, num_parts = per_item, buf.caps[4]
        kinds = [_Items(p_items.view(-1, ITEM), 1)]
        if g_items.numel():
            kinds.append(_Items(g_items.view(-1, ITEM), qb))
        return TritonMeta(d.rows, d.lens, step.contexts.table, kinds, readers, offsets, parts, num_parts, chunks)

    def _fit(self, plan: CascadePlan, per_item: int, caps: tuple[int, ...]) -> Layout | None:
        """The plan's layout in a graph's capacities: spans cut into longer pieces until it fits."""
        longest = max((s.length for spans in plan.private for s in spans), default=0)
        longest = max([longest] + [s.length for _, spans in plan.groups for s in spans])
        split = SPLIT
        while True:
            lay = layout(plan, per_item, split)
            if all(len(got) <= cap for got, cap in zip(lay.lists(), caps)):
                return lay
            if split >= longest:
                return None
            split *= 2

    def _buffers(self, n: int, per_item: int) -> _Static:
        """A graph's buffers for n (padded) threads: 2n + 8 private items, n + 8 group items (every one of
        them a program per KV head at every replay, most of them empty: few, and long spans cut less); at
        n = 1 no group items, and no group launch: one thread shares with no other (at batch 1 a launch of
        32 x 9 empty programs a layer would cost the AR step time for nothing)."""
        if n not in self._static:
            private, group = 2 * n + 8, (n + 8 if n > 1 else 0)
            readers = private + group * per_item
            caps = (private * ITEM, group * ITEM, readers, n + 1, readers)
            flat = torch.zeros(sum(caps), dtype=torch.int32, device=self.device)
            views, at = [], 0
            for c in (caps[0], caps[1], caps[3], caps[2], caps[4]):  # the memory order
                views.append(flat[at : at + c])
                at += c
            self._static[n] = _Static(caps, flat, *views)
        return self._static[n]

    # ---- per layer ---------------------------------------------------------------------------------
    def attend(self, meta: TritonMeta, query, k_pool, v_pool, scaling, window):
        # query: [N, H, D] -> out: [N, H, D]; pools: [Hkv, S, D]
        out = torch.empty_like(query)
        if meta.rows is not None:
            self._decode(meta, query, k_pool, v_pool, scaling, window, out)
        self.attend_chunks(meta.chunks, query, k_pool, v_pool, scaling, window, out)
        return out

    def _decode(self, meta: TritonMeta, query, k_pool, v_pool, scaling, window, out) -> None:
        n_heads, dim = query.shape[1:]
        kv_heads = k_pool.shape[0]
        group = n_heads // kv_heads
        if dim & (dim - 1):
            raise ValueError(f"triton attention needs a head dim that is a power of two, got {dim}: use --attention "
                             "flex or cascade")
        if query.stride(2) != 1:
            query = query.contiguous()
        if meta.scratch is None:  # (each layer's merge has read them before the next layer writes)
            meta.scratch = (torch.empty(meta.num_parts, n_heads, dim, dtype=torch.float32, device=query.device),
                            torch.empty(meta.num_parts, n_heads, dtype=torch.float32, device=query.device))
        part_out, part_lse = meta.scratch
        for kind in meta.kinds:
            if not kind.items.shape[0]:
                continue
            rows = max(16, 1 << (kind.qb * group - 1).bit_length())
            self._partial[(kind.items.shape[0], kv_heads)](
                query, k_pool, v_pool, meta.table, kind.items, meta.readers, meta.rows, meta.lens, part_out,
                part_lse, query.stride(0), query.stride(1), k_pool.stride(0), meta.table.stride(0), scaling,
                window or 0, H=n_heads, GROUP=group, QB=kind.qb, M=rows, D=dim, BLOCK=self.block,
                IEEE=query.dtype == torch.float32, WINDOWED=bool(window), num_warps=NUM_WARPS, num_stages=NUM_STAGES)
        self._merge[(meta.rows.shape[0],)](part_out, part_lse, meta.offsets, meta.parts, meta.rows, out,
                                           out.stride(0), out.stride(1), H=n_heads,
                                           HP=1 << (n_heads - 1).bit_length(), D=dim)
