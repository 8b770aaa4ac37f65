"""`portable`: each decoding thread's context gathered from the pool, then SDPA with a padding bias.

Runs anywhere PyTorch does; every layer reads every thread's whole context (a shared prefix once per
thread). The step's metadata: the threads' context slots [T, C] (C the longest context) and the bias
[T, 1, 1, C] that hides padding (and, per window size, positions out of the window).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from apar.engine.backends.base import AttentionBackend, ChunkMeta, ModelInputs


@dataclass(slots=True)
class PortableMeta:
    rows: torch.Tensor | None  # [T] decode rows of the flat batch
    slots: torch.Tensor | None  # [T, C] int64, padding -> slot 0
    keep: torch.Tensor | None  # [T, C] bool: on the context
    chunks: list[ChunkMeta]
    lens: torch.Tensor | None = None  # [T] context lengths
    biases: dict = field(default_factory=dict)  # (window, dtype) -> [1, T, 1, C]

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
    width = d.max_len
    ctx = step.contexts.table.index_select(0, d.table_rows)[:, :width]  # [T, C]
    keep = torch.arange(width, device=ctx.device)[None, :] < d.lens[:, None]
    return torch.where(keep, ctx, 0).long(), keep


class PortableBackend(AttentionBackend):
    """Gather + SDPA. GQA without copying K/V per query head: q is [Hkv, T, G, D], so SDPA reads each
    gathered K/V ([Hkv, T, C, D]) once for its G query heads."""

    name = "portable"

    def prepare(self, step: ModelInputs, fixed: bool = False) -> PortableMeta:
        chunks = self.prepare_chunks(step)
        if step.decode is None:
            return PortableMeta(None, None, None, chunks)
        slots, keep = gather_contexts(step)
        return PortableMeta(step.decode.rows.long(), slots, keep, chunks, step.decode.lens)

    def attend(self, meta: PortableMeta, query, k_pool, v_pool, scaling, window):
        # query: [N, H, D] -> out: [N, H, D]
        n_heads, dim = query.shape[1:]
        kv_heads = k_pool.shape[0]
        out = torch.empty_like(query)
        if meta.rows is not None:
            n_thr, width = meta.slots.shape
            q = query[meta.rows].view(n_thr, kv_heads, n_heads // kv_heads, dim).transpose(0, 1)  # [Hkv, T, G, D]
            k = k_pool.index_select(1, meta.slots.view(-1)).view(kv_heads, n_thr, width, dim)  # [Hkv, T, C, D]
            v = v_pool.index_select(1, meta.slots.view(-1)).view(kv_heads, n_thr, width, dim)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=meta.bias(window, q.dtype), scale=scaling)
            out[meta.rows] = o.transpose(0, 1).reshape(n_thr, n_heads, dim)
        self.attend_chunks(meta.chunks, query, k_pool, v_pool, scaling, window, out)
        return out
