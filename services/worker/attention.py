"""Paged tree attention: the KV pool, one step's metadata, and the attention function HF models call.

The engine keeps the Hugging Face model code and owns the cache: the model is loaded with
`attn_implementation="apar_paged"`, and every attention layer calls `paged_attention` with the step's
`StepBatch` passed through `model(..., apar_step=...)`. Per layer the function first writes the new K/V
of every token into its slot (so a child's `[Child]` sees its parent's `[Fork]` written in the same step),
then lets each token attend to exactly its thread's context.

Backends: `TorchBackend` is portable PyTorch (gather the context slots, then SDPA); a faster GPU
backend implements the same `attend(query, k_pool, v_pool, step, scaling, window)` and is picked in
`StepBatch.backend`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

ATTN_NAME = "apar_paged"


class KVPool:
    """K and V of every layer in fixed-size blocks, allocated once: [num_blocks * block_size, Hkv, D]."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (num_blocks * block_size, kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


@dataclass(slots=True)
class DecodeGroup:
    """Threads feeding one token each. q_index: [T] rows of the flat batch; ctx: [T, C] slots (padded);
    bias: [T, 1, 1, C] additive mask (0 on the context, -inf on padding); pos: [T] query positions."""

    q_index: torch.Tensor
    ctx: torch.Tensor
    bias: torch.Tensor
    pos: torch.Tensor


@dataclass(slots=True)
class ChunkGroup:
    """One thread feeding several tokens (a prefill chunk). Rows [start, start + n) of the flat batch;
    ctx: [C] slots, the chunk being its last n; causal within the chunk."""

    start: int
    n: int
    ctx: torch.Tensor


@dataclass(slots=True)
class StepBatch:
    """Everything one forward pass needs beyond token ids and positions. write_slots: [N]."""

    pool: KVPool
    write_slots: torch.Tensor
    decode: DecodeGroup | None
    chunks: list[ChunkGroup]
    backend: "TorchBackend"


class TorchBackend:
    """Portable: gather each thread's context from the pool, then scaled-dot-product attention.

    Grouped-query attention without copying K/V per query head: the G query heads that share a KV head
    are laid out as G query rows of that KV head (q: [T, Hkv, G, D]), so SDPA reads each K/V once.
    """

    def attend(self, query: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, step: StepBatch,
               scaling: float, window: int | None) -> torch.Tensor:
        # query: [N, H, D] -> out: [N, H, D]
        n_tok, n_heads, dim = query.shape
        kv_heads = k_pool.shape[1]
        group = n_heads // kv_heads
        out = torch.empty_like(query)
        if step.decode is not None:
            g = step.decode
            n_thr = g.q_index.numel()
            q = query[g.q_index].view(n_thr, kv_heads, group, dim)  # [T, Hkv, G, D]
            k = _gather(k_pool, g.ctx).transpose(1, 2)  # [T, Hkv, C, D]
            v = _gather(v_pool, g.ctx).transpose(1, 2)
            bias = g.bias if window is None else _window_bias(g, window)  # [T, 1, 1, C]
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=scaling)
            out[g.q_index] = o.reshape(n_thr, n_heads, dim)
        for c in step.chunks:
            n_ctx = c.ctx.numel()
            q = query[c.start : c.start + c.n].view(c.n, kv_heads, group, dim).permute(1, 2, 0, 3)
            q = q.reshape(kv_heads, group * c.n, dim)  # [Hkv, G*n, D]: rows are (head in group, token)
            k = k_pool.index_select(0, c.ctx).transpose(0, 1)  # [Hkv, C, D]
            v = v_pool.index_select(0, c.ctx).transpose(0, 1)
            rows = torch.arange(n_ctx - c.n, n_ctx, device=query.device)[:, None]
            cols = torch.arange(n_ctx, device=query.device)[None, :]
            mask = cols <= rows  # [n, C]: causal within the chunk, all of the context before it
            if window is not None:
                mask = mask & (cols > rows - window)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.repeat(group, 1), scale=scaling)
            o = o.view(kv_heads, group, c.n, dim).permute(2, 0, 1, 3)  # [n, Hkv, G, D]
            out[c.start : c.start + c.n] = o.reshape(c.n, n_heads, dim)
        return out


def _gather(pool: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """pool: [S, Hkv, D], slots: [T, C] -> [T, C, Hkv, D] (index_select: much faster than pool[slots])."""
    return pool.index_select(0, slots.reshape(-1)).view(*slots.shape, *pool.shape[1:])


def _window_bias(g: DecodeGroup, window: int) -> torch.Tensor:
    cols = torch.arange(g.ctx.shape[1], device=g.ctx.device)
    outside = cols[None, :] <= g.pos[:, None] - window  # [T, C]
    return g.bias.masked_fill(outside[:, None, None, :], float("-inf"))


def paged_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                    **kwargs) -> tuple[torch.Tensor, None]:
    """The attention HF layers call. query: [1, H, N, D]; key, value: [1, Hkv, N, D] -> [1, N, H, D]."""
    step: StepBatch | None = kwargs.get("apar_step")
    if step is None:
        raise RuntimeError("apar_paged attention needs the engine's step (model(..., apar_step=...))")
    layer = module.layer_idx
    k_pool, v_pool = step.pool.k[layer], step.pool.v[layer]
    k_pool.index_copy_(0, step.write_slots, key[0].transpose(0, 1).to(k_pool.dtype))  # [N, Hkv, D]
    v_pool.index_copy_(0, step.write_slots, value[0].transpose(0, 1).to(v_pool.dtype))
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    window = kwargs.get("sliding_window")
    out = step.backend.attend(query[0].transpose(0, 1), k_pool, v_pool, step, scaling, window)  # [N, H, D]
    return out.unsqueeze(0), None


AttentionInterface.register(ATTN_NAME, paged_attention)
