"""`cascade`: a span of context that several decoding threads share is attended once for all of them.

APAR's threads share long prefixes by construction: the prompt, and each ancestor's tokens up to the
fork. Reading such a prefix once per thread (what `portable` does) costs T times its K/V; here its K/V
is read once and all the threads' queries attend it in one matrix-matrix product. Each thread's own
suffix is attended separately, and the parts merge exactly by log-sum-exp.

Grouping rule (`plan_cascade`, host side, O(threads x depth) per step): from each thread's context runs
(which thread wrote which positions), a writer's positions are cut at every reader's reach, so each
piece has a fixed set of readers. A piece that two or more threads read and that holds at least
`min_shared` positions is attended once for its readers; pieces with the same set of readers form one
group. Everything else a thread reads (its own tokens, short shared pieces) is its private part, joined
into as few spans as its row allows. Every position of a thread's context lands in exactly one of its
parts, so the merged result equals attention over the whole context.

Per step the groups and private parts become padded slot tables, expanded from their spans on the
device (`_expand`), the private parts in buckets of similar length (`length_buckets`); per layer: one
batched product for all groups, one per private bucket, one merge.
A step where sharing saves too little takes `portable`'s path: each thread's context gathered, in
buckets of similar length (`gather_buckets`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from apar.engine.backends.base import (AttentionBackend, ChunkMeta, ModelInputs, Run, attention_with_lse,
                                           merge_by_lse)
from apar.engine.backends.portable import Bucket, attend_buckets, gather_buckets, length_buckets

MIN_SHARED = 32  # positions: a shorter shared span is cheaper to read per thread than as its own group
# K/V bytes per layer that sharing must save in a step (reads of the groups' spans by all but one reader),
# else the step takes the plain path (one gather per thread): the groups and the merge cost a dozen more
# ops per layer. Measured on 2 CPU cores (`apar bench overhead --model` of width 256, 64 threads sharing
# 33-token prompts, 2 MiB saved): the plain path was 6% faster; at 16 x 1,024 positions with 768 shared
# in the 7B shape (360 MiB saved) cascade is 3x faster (`apar bench attention`). On SmolLM2-135M (1.5 KB a
# position) a real APAR step at concurrency 16 saving 5 MiB was slower shared (2.10 against 1.71 ms a layer):
# SDPA's work does not shrink with sharing, only the gather (docs/benchmarks.md, "Where an APAR step's time goes").
MIN_SAVED_BYTES = 8 << 20


@dataclass(frozen=True, slots=True)
class Span:
    """Positions [start, end) of a context, whose slots are read from context-table row `row`."""

    row: int
    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass(slots=True)
class CascadePlan:
    """groups: (readers as indices of the decoding threads, the spans they share); private: per thread."""

    groups: list[tuple[tuple[int, ...], list[Span]]]
    private: list[list[Span]]


def plan_cascade(runs: list[tuple[Run, ...]], table_rows: list[int], min_shared: int = MIN_SHARED) -> CascadePlan:
    by_writer: dict[int, list[tuple[int, int, int]]] = {}  # writer -> [(end, reader, start)]
    for i, thread_runs in enumerate(runs):
        for r in thread_runs:
            if r.end > r.start:
                by_writer.setdefault(r.writer, []).append((r.end, i, r.start))
    shared: dict[tuple[int, ...], list[Span]] = {}
    private: list[list[Span]] = [[] for _ in runs]
    for entries in by_writer.values():
        first = entries[0][2]  # a writer's runs all begin at its first position
        cuts = _shared_pieces(entries, first, table_rows, min_shared, shared) if len(entries) > 1 else []
        for end, r, _ in entries:  # each reader's positions of this writer outside the shared pieces
            at = first
            for lo, hi in cuts:
                if hi > end:
                    break
                if lo > at:
                    private[r].append(Span(table_rows[r], at, lo))
                at = hi
            if end > at:
                private[r].append(Span(table_rows[r], at, end))
    groups = [(key, _joined(spans)) for key, spans in shared.items()]
    return CascadePlan(groups, [_joined(spans) for spans in private])


def _shared_pieces(entries: list[tuple[int, int, int]], first: int, table_rows: list[int], min_shared: int,
                   shared: dict[tuple[int, ...], list[Span]]) -> list[tuple[int, int]]:
    """Cut one writer's positions at its readers' reaches; add each piece that two or more read and that
    holds at least `min_shared` positions to `shared` (by reader set); return those pieces, ascending."""
    entries.sort(reverse=True)  # farthest reach first
    cuts: list[tuple[int, int]] = []
    readers: list[int] = []
    i = 0
    while i < len(entries):
        end = entries[i][0]
        while i < len(entries) and entries[i][0] == end:
            readers.append(entries[i][1])
            i += 1
        lo = entries[i][0] if i < len(entries) else first  # [lo, end) is read by every reader so far
        if len(readers) > 1 and end - lo >= min_shared:
            key = tuple(sorted(readers))
            shared.setdefault(key, []).append(Span(table_rows[key[0]], lo, end))
            cuts.append((lo, end))
    cuts.reverse()
    return cuts


def _joined(spans: list[Span]) -> list[Span]:
    """The same positions in fewer spans: neighbours read from the same row become one."""
    if len(spans) < 2:
        return spans
    spans.sort(key=lambda s: (s.row, s.start))
    out = spans[:1]
    for s in spans[1:]:
        last = out[-1]
        if s.row == last.row and s.start == last.end:
            out[-1] = Span(last.row, last.start, s.end)
        else:
            out.append(s)
    return out


@dataclass(slots=True)
class Parts:
    """Padded parts: slots [P, L] int64 (padding -> slot 0), positions [P, L], keep [P, L] bool."""

    slots: torch.Tensor
    positions: torch.Tensor
    keep: torch.Tensor


@dataclass(slots=True)
class CascadeMeta:
    rows: torch.Tensor | None  # [T] decode rows of the flat batch
    lens: torch.Tensor | None  # [T] context lengths
    private: list[tuple[torch.Tensor, Parts]] | None  # per length bucket: its threads [Tb], parts [Tb, Lb]
    shared: Parts | None  # [G, Ls]
    readers: torch.Tensor | None  # [G, R] decode indices, padding -> T (a zero query)
    valid: torch.Tensor | None  # [V] flat indices into [G * R] of real readers
    owners: torch.Tensor | None  # [Tp + V]: the thread each part belongs to (private parts first, by bucket)
    chunks: list[ChunkMeta] = field(default_factory=list)
    buckets: list[Bucket] | None = None  # the plain path (nothing shared): `portable`'s length buckets
    keeps: dict = field(default_factory=dict)  # window -> (private keeps, shared keep)

    def keep(self, window: int | None) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """per private bucket [Tb, 1, Lb], and [G, 1 or R, Ls] bool: on the context (and in the window)."""
        if window not in self.keeps:
            priv, shared = [], None
            qpos = self.lens - 1  # [T]
            for index, part in self.private or []:
                keep = part.keep[:, None, :]
                if window is not None:
                    keep = keep & (part.positions > (qpos[index] - window)[:, None])[:, None, :]
                priv.append(keep)
            if self.shared is not None:
                shared = self.shared.keep[:, None, :]
                if window is not None:
                    reader_pos = torch.cat([qpos, qpos.new_zeros(1)])[self.readers]  # [G, R]
                    shared = shared & (self.shared.positions[:, None, :] > (reader_pos - window)[:, :, None])
            self.keeps[window] = (priv, shared)
        return self.keeps[window]


class CascadeBackend(AttentionBackend):
    name = "cascade"
    uses_runs = True

    def __init__(self, bytes_per_position: int, min_shared: int | None = None,
                 min_saved_bytes: int | None = None) -> None:
        self.bytes_per_position = bytes_per_position  # K and V of one position in one layer
        self.min_shared = MIN_SHARED if min_shared is None else min_shared
        self.min_saved_bytes = MIN_SAVED_BYTES if min_saved_bytes is None else min_saved_bytes
        self.shared_steps = 0  # steps that attended some span once for several threads

    def prepare(self, step: ModelInputs, fixed: bool = False) -> CascadeMeta:
        chunks = self.prepare_chunks(step)
        d = step.decode
        if d is None:
            return CascadeMeta(None, None, None, None, None, None, None, chunks)
        rows, lens = d.rows.long(), d.lens.long()
        plan = CascadePlan([], [])
        if self._may_save(d.families, d.host_lens):
            plan = plan_cascade(d.runs, d.host_table_rows, self.min_shared)
        saved = sum((len(key) - 1) * s.length for key, spans in plan.groups for s in spans)
        if not saved or saved * self.bytes_per_position < self.min_saved_bytes:  # all private: plain attention
            return CascadeMeta(None, None, None, None, None, None, None, chunks, gather_buckets(step))
        self.shared_steps += 1
        n_thr = d.count
        width = max(len(key) for key, _ in plan.groups)
        flat = [r for key, _ in plan.groups for r in (*key, *[n_thr] * (width - len(key)))]
        where = [i for i, r in enumerate(flat) if r < n_thr]
        # private parts in length buckets, as `portable` buckets whole contexts: padded to the step's longest
        # private part (a thread not yet forked reads its whole context privately) most of the table was padding
        buckets = [b for b in length_buckets([sum(s.length for s in p) for p in plan.private])
                   if any(plan.private[i] for i in b)]  # a bucket of threads whose context is all shared: none
        *privs, shared, (readers, valid, *index) = _expand(
            step, [*[[plan.private[i] for i in b] for b in buckets], [spans for _, spans in plan.groups]],
            [flat, where, *buckets])
        readers = readers.long().view(len(plan.groups), width)
        valid = valid.long()
        private = [(i.long(), p) for i, p in zip(index, privs)]
        owners = torch.cat([*(i for i, _ in private), readers.view(-1)[valid]])
        return CascadeMeta(rows, lens, private, shared, readers, valid, owners, chunks)

    def _may_save(self, families: list[int], lens: list[int]) -> bool:
        """Whether sharing could reach `min_saved_bytes` at all: threads of one request share at most
        their shortest context, read once instead of by each (a bound, so no plan is made in vain)."""
        shortest: dict[int, int] = {}
        count: dict[int, int] = {}
        for fam, n in zip(families, lens):
            shortest[fam] = min(shortest.get(fam, n), n)
            count[fam] = count.get(fam, 0) + 1
        bound = sum((count[f] - 1) * shortest[f] for f in count)
        return bound > 0 and bound * self.bytes_per_position >= self.min_saved_bytes

    def attend(self, meta: CascadeMeta, query, k_pool, v_pool, scaling, window):
        # query: [N, H, D] -> out: [N, H, D]
        out = torch.empty_like(query)
        if meta.buckets is not None:
            attend_buckets(meta.buckets, query, k_pool, v_pool, scaling, window, out)
        elif meta.rows is not None:
            out[meta.rows] = self._decode(meta, query[meta.rows], k_pool, v_pool, scaling, window)
        self.attend_chunks(meta.chunks, query, k_pool, v_pool, scaling, window, out)
        return out

    def _decode(self, meta: CascadeMeta, q: torch.Tensor, k_pool, v_pool, scaling, window) -> torch.Tensor:
        # q: [T, H, D] -> [T, H, D]; pools: [Hkv, S, D]
        n_thr, n_heads, dim = q.shape
        kv_heads = k_pool.shape[0]
        group = n_heads // kv_heads
        keep_priv, keep_shared = meta.keep(window)
        outs, lses = [], []  # a thread in no private bucket (all its context shared) has no private part
        for (index, part), keep in zip(meta.private, keep_priv):
            n_b = index.shape[0]
            qh = q[index].view(n_b, kv_heads, group, dim).transpose(0, 1)  # [Hkv, Tb, G, D]
            o, lse = attention_with_lse(qh, _gather(k_pool, part.slots), _gather(v_pool, part.slots), keep, scaling)
            outs.append(o.transpose(0, 1).reshape(n_b, n_heads, dim))  # from [Hkv, Tb, G, D]
            lses.append(lse.transpose(0, 1).reshape(n_b, n_heads))
        n_groups, width = meta.readers.shape
        qs = torch.cat([q, q.new_zeros(1, n_heads, dim)])[meta.readers]  # [Gr, R, H, D]
        qs = qs.view(n_groups, width, kv_heads, group, dim).permute(2, 0, 1, 3, 4)  # [Hkv, Gr, R, G, D]
        qs = qs.reshape(kv_heads, n_groups, width * group, dim)
        if keep_shared.shape[1] > 1:  # per reader (a window): the same for its G query heads
            keep_shared = keep_shared[:, :, None, :].expand(-1, -1, group, -1).reshape(n_groups, width * group, -1)
        slots = meta.shared.slots
        o, lse = attention_with_lse(qs, _gather(k_pool, slots), _gather(v_pool, slots), keep_shared, scaling)
        o = o.view(kv_heads, n_groups, width, group, dim).permute(1, 2, 0, 3, 4)  # [Gr, R, Hkv, G, D]
        lse = lse.view(kv_heads, n_groups, width, group).permute(1, 2, 0, 3)
        outs.append(o.reshape(n_groups * width, n_heads, dim)[meta.valid])
        lses.append(lse.reshape(n_groups * width, n_heads)[meta.valid])
        merged = merge_by_lse(torch.cat(outs), torch.cat(lses), meta.owners, n_thr)
        return merged.to(q.dtype)


def _gather(pool: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """pool: [Hkv, S, D], slots: [P, L] -> [Hkv, P, L, D] (contiguous: ready for batched products)."""
    parts, width = slots.shape
    return pool.index_select(1, slots.view(-1)).view(pool.shape[0], parts, width, pool.shape[2])


def _expand(step: ModelInputs, families: list[list[list[Span]]], extra: list[list[int]]
            ) -> tuple[Parts | None, ...]:
    """Padded slot tables of each family of parts (a part: a list of spans), built on the device from
    the spans alone (the host sends O(spans) ints, never a context's slots), in one upload with `extra`
    (uploaded as they are, returned last) and one expansion for all families."""
    rows, starts, lens, dest = [], [], [], []
    shapes, base = [], 0
    for parts in families:
        width = max((sum(s.length for s in spans) for spans in parts), default=0)
        shapes.append((base, len(parts), width))
        for p, spans in enumerate(parts):
            at = base + p * width
            for s in spans:
                rows.append(s.row)
                starts.append(s.start)
                lens.append(s.length)
                dest.append(at)
                at += s.length
        base += len(parts) * width
    total = sum(lens)
    up = step.contexts.uploader.upload(rows, starts, lens, dest, *extra)
    rows_t, starts_t, lens_t, dest_t = (t.long() for t in up[:4])
    dev = lens_t.device
    span = torch.repeat_interleave(torch.arange(len(lens), device=dev), lens_t, output_size=total)  # [P]
    within = torch.arange(total, device=dev) - (torch.cumsum(lens_t, 0) - lens_t)[span]
    pos = starts_t[span] + within
    at = dest_t[span] + within
    slots = torch.zeros(base, dtype=torch.long, device=dev)
    slots[at] = step.contexts.table[rows_t[span], pos].long()
    positions = torch.zeros(base, dtype=torch.long, device=dev)
    positions[at] = pos
    keep = torch.zeros(base, dtype=torch.bool, device=dev)
    keep[at] = True
    out = []
    for start, count, width in shapes:
        if width == 0:
            out.append(None)
            continue
        cut = slice(start, start + count * width)
        out.append(Parts(*(t[cut].view(count, width) for t in (slots, positions, keep))))
    return (*out, up[4:])
