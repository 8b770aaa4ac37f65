"""What every attention backend gets from the engine, and what they share.

Data flow, once per step: the input builder (`apar/engine/input_builder.py`) turns the step's work into
a `ModelInputs`: the flat batch on the device and, per thread that computes tokens, where its context is (a
row of the context table and a length) and, on the host, its context as *runs* of positions by the thread
that wrote them (`Run`). The backend's `prepare(step)` turns that into its own metadata once; every layer
then calls `attend(meta, query, k_pool, v_pool, scaling, window)`.

Backends differ in how single-token queries (decode) read their contexts; a multi-token chunk (prefill,
recompute) is one thread's queries over its context with a causal mask, done the same way by all of them
(`attend_chunks`): gather the context once, then SDPA.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from apar.engine.context_table import ContextTable


@dataclass(frozen=True, slots=True)
class Run:
    """Positions [start, end) of a context, written by thread `writer` (a key unique within the step).
    Two threads whose contexts hold the same writer's run read the same slots there."""

    writer: int
    start: int
    end: int


@dataclass(slots=True)
class DecodeQueries:
    """T threads feeding one token each. rows: [T] rows of the flat batch; table_rows, lens: [T] int32
    (context length, the token itself included); host copies of both; families: per thread, a key shared
    by the threads that may share context (its request); runs: per thread, its context (when the backend
    `uses_runs`, else empty)."""

    rows: torch.Tensor
    table_rows: torch.Tensor
    lens: torch.Tensor
    host_rows: list[int]
    host_table_rows: list[int]
    host_lens: list[int]
    families: list[int]
    runs: list[tuple[Run, ...]]

    @property
    def count(self) -> int:
        return len(self.host_lens)

    @property
    def max_len(self) -> int:
        return max(self.host_lens)


@dataclass(frozen=True, slots=True)
class ChunkQuery:
    """One thread feeding n tokens: rows [start, start + n) of the flat batch, the last n positions of a
    context of `length` held in `table_row`."""

    start: int
    n: int
    table_row: int
    length: int


@dataclass(slots=True)
class ModelInputs:
    """One step's batch. input_ids, positions: [N] int32; write_slots: [N] int64 (the slot each token's
    K/V goes to); sample_rows: [S] int64 rows whose logits are sampled."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    write_slots: torch.Tensor
    sample_rows: torch.Tensor
    decode: DecodeQueries | None
    chunks: list[ChunkQuery]
    contexts: ContextTable

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @property
    def decode_only(self) -> bool:
        return not self.chunks and self.decode is not None


@dataclass(slots=True)
class ChunkMeta:
    """Per chunk: its context's slots [C] (int64) and masks [n, C] by window (None: causal only)."""

    chunk: ChunkQuery
    slots: torch.Tensor
    masks: dict[int | None, torch.Tensor] = field(default_factory=dict)

    def mask(self, window: int | None) -> torch.Tensor:
        if window not in self.masks:
            c = self.chunk
            dev = self.slots.device
            rows = torch.arange(c.length - c.n, c.length, device=dev)[:, None]
            cols = torch.arange(c.length, device=dev)[None, :]
            m = cols <= rows  # [n, C]: causal within the chunk, all of the context before it
            if window is not None:
                m = m & (cols > rows - window)
            self.masks[window] = m
        return self.masks[window]


SHORT_CHUNK = 17  # a chunk of at most this many queries (a draft with its pending token) joins the batch


class Chunks(list):
    """A step's `ChunkMeta`s; its short chunks (speculative drafts: few queries each, one per drafting
    thread) are attended together as one padded batch (`ShortChunks`), built once per step and window,
    instead of a few small operations per chunk and layer."""

    def short(self, group: int, window: int | None) -> ShortChunks | None:
        cache = self.__dict__.setdefault("_short", {})
        if (group, window) not in cache:
            short = [m for m in self if m.chunk.n <= SHORT_CHUNK]
            cache[(group, window)] = ShortChunks(short, [m for m in self if m.chunk.n > SHORT_CHUNK], group, window) \
                if len(short) > 1 else None
        return cache[(group, window)]


class ShortChunks:
    """B short chunks padded to n queries over C keys: one gather of their contexts and one SDPA a layer.
    Padding keys are masked; padding queries see key 0 only and are dropped."""

    def __init__(self, short: list[ChunkMeta], rest: list[ChunkMeta], group: int, window: int | None) -> None:
        self.rest = rest
        dev = short[0].slots.device
        n = max(m.chunk.n for m in short)
        c = max(m.chunk.length for m in short)
        slots = torch.zeros(len(short), c, dtype=torch.long, device=dev)  # [B, C]
        mask = torch.zeros(len(short), n, c, dtype=torch.bool, device=dev)  # [B, n, C]
        mask[:, :, 0] = True
        rows = []
        for b, m in enumerate(short):
            k = m.chunk
            slots[b, : k.length] = m.slots
            mask[b, : k.n, : k.length] = m.mask(window)
            rows.extend(range(k.start, k.start + k.n))
            rows.extend([k.start] * (n - k.n))
        self.n, self.c, self.b = n, c, len(short)
        self.slots = slots.view(-1)
        self.rows = torch.tensor(rows, device=dev)  # [B * n]: the query row of each (chunk, query)
        self.valid = torch.tensor([i < m.chunk.n for m in short for i in range(n)], device=dev)  # [B * n]
        self.out_rows = self.rows[self.valid]
        # [B, 1, G * n, C]: query rows ordered (head in group, token), as `attend_chunks` lays them out
        self.mask = mask.repeat(1, group, 1)[:, None]
        self.group = group

    def attend(self, query: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, scaling: float,
               out: torch.Tensor) -> None:
        n_heads, dim = query.shape[1:]
        kv_heads, b, n, g = k_pool.shape[0], self.b, self.n, self.group
        q = query.index_select(0, self.rows).view(b, n, kv_heads, g, dim).permute(0, 2, 3, 1, 4)
        q = q.reshape(b, kv_heads, g * n, dim)  # [B, Hkv, G*n, D]
        k = k_pool.index_select(1, self.slots).view(kv_heads, b, self.c, dim).transpose(0, 1)  # [B, Hkv, C, D]
        v = v_pool.index_select(1, self.slots).view(kv_heads, b, self.c, dim).transpose(0, 1)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, scale=scaling)  # [B, Hkv, G*n, D]
        o = o.view(b, kv_heads, g, n, dim).permute(0, 3, 1, 2, 4).reshape(b * n, n_heads, dim)
        out[self.out_rows] = o[self.valid]


class AttentionBackend:
    """The interface. `name` is what `--attention` calls it; `graphs` says whether its decode metadata
    has fixed shapes (then a CUDA graph may replay its decode steps, see `cuda_graphs.py`); `uses_runs`
    whether it reads the decoding threads' context runs (the builder computes them only then)."""

    name = "?"
    graphs = False
    uses_runs = False

    def prepare(self, step: ModelInputs, fixed: bool = False):
        """The step's metadata, built once (never per layer). `fixed`: a CUDA graph replays this step
        (`DecodeGraphs`), so a backend whose sizes vary per step keeps them fixed per thread count; it may
        answer None when the step does not fit them (the step then runs eagerly)."""
        raise NotImplementedError

    def attend(self, meta, query: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, scaling: float,
               window: int | None) -> torch.Tensor:
        """query: [N, H, D]; pools: [Hkv, S, D] (this step's K/V already written) -> [N, H, D]."""
        raise NotImplementedError

    # ---- shared: chunks ----------------------------------------------------------------------------
    @staticmethod
    def prepare_chunks(step: ModelInputs) -> list[ChunkMeta]:
        table = step.contexts.table
        return Chunks(ChunkMeta(c, table[c.table_row, : c.length].long()) for c in step.chunks)

    @staticmethod
    def attend_chunks(chunks: list[ChunkMeta], query: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                      scaling: float, window: int | None, out: torch.Tensor) -> None:
        """Each chunk's queries over its gathered context, causal; written into out: [N, H, D].

        Grouped-query attention without copying K/V per query head: the G query heads that share a KV
        head are laid out as G x n query rows of that KV head, so SDPA reads each K/V once."""
        n_heads, dim = query.shape[1:]
        kv_heads = k_pool.shape[0]
        group = n_heads // kv_heads
        batch = chunks.short(group, window) if isinstance(chunks, Chunks) else None
        if batch is not None:
            batch.attend(query, k_pool, v_pool, scaling, out)
            chunks = batch.rest
        for m in chunks:
            c = m.chunk
            q = query[c.start : c.start + c.n].view(c.n, kv_heads, group, dim).permute(1, 2, 0, 3)
            q = q.reshape(kv_heads, group * c.n, dim)  # [Hkv, G*n, D]: rows are (head in group, token)
            k = k_pool.index_select(1, m.slots)  # [Hkv, C, D]
            v = v_pool.index_select(1, m.slots)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=m.mask(window).repeat(group, 1), scale=scaling)
            o = o.view(kv_heads, group, c.n, dim).permute(2, 0, 1, 3)  # [n, Hkv, G, D]
            out[c.start : c.start + c.n] = o.reshape(c.n, n_heads, dim)


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, scaling: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention that also returns each row's log-sum-exp, so partial results over disjoint keys merge
    exactly (`merge_by_lse`).

    q: [Hkv, B, M, D] (M query rows per KV head); k, v: [Hkv, B, L, D]; keep: [B, M or 1, L] bool
    -> out [Hkv, B, M, D] float32, lse [Hkv, B, M] float32. A row that keeps nothing gets out 0 and lse
    -inf (it then weighs nothing in the merge)."""
    scores = torch.matmul(q, k.transpose(-1, -2)).float().mul_(scaling)  # [Hkv, B, M, L]
    scores.masked_fill_(~keep, float("-inf"))
    peak = scores.amax(-1, keepdim=True)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    p = torch.exp(scores.sub_(peak))
    total = p.sum(-1, keepdim=True)  # [Hkv, B, M, 1]
    out = torch.matmul(p.to(v.dtype), v).float() / total.clamp_min(torch.finfo(torch.float32).tiny)
    return out, (peak + torch.log(total)).squeeze(-1)


def merge_by_lse(parts_out: torch.Tensor, parts_lse: torch.Tensor, owner: torch.Tensor, count: int) -> torch.Tensor:
    """Combine partial attentions of the same queries over disjoint key sets.

    parts_out: [P, H, D], parts_lse: [P, H], owner: [P] (which of `count` queries each part belongs to)
    -> [count, H, D]: sum over a query's parts of exp(lse_part - lse_all) * out_part."""
    h = parts_lse.shape[1]
    idx = owner[:, None].expand(-1, h)
    peak = torch.full((count, h), float("-inf"), device=parts_lse.device).scatter_reduce(
        0, idx, parts_lse, reduce="amax")
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    w = torch.exp(parts_lse - peak[owner])  # [P, H]
    den = torch.zeros(count, h, device=w.device).index_add_(0, owner, w)
    num = torch.zeros(count, h, parts_out.shape[2], device=w.device).index_add_(0, owner, parts_out * w[..., None])
    return num / den.clamp_min(torch.finfo(torch.float32).tiny)[..., None]
