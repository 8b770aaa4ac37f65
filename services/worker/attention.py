"""Paged tree attention: the KV pool, and the attention function HF models call.

The engine keeps the Hugging Face model code and owns the cache: the model is loaded with
`attn_implementation="apar_paged"`, and every attention layer calls `paged_attention` with the step's
`StepBatch` passed through `model(..., apar_step=...)`. Per layer the function first writes the new K/V
of every token into its slot (so a child's `[Child]` sees its parent's `[Fork]` written in the same step),
then hands the queries to the step's backend (`services/worker/backends/`), which lets each token attend
to exactly its thread's context using the metadata it prepared once for the step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface

from services.worker.backends.base import AttentionBackend

ATTN_NAME = "apar_paged"
SLOT_ALIGN = 128  # the pool's slots come in whole multiples of this (the flex backend's KV block)


class KVPool:
    """K and V of every layer in fixed-size blocks, allocated once: [Hkv, slots, D] per layer.

    Head-major: HF hands over a step's K/V as [Hkv, N, D], which goes in as it is; a gather of slots
    gives [Hkv, ..., D], ready for batched products over the heads without a transposing copy; the flex
    backend reads the pool itself as [1, Hkv, slots, D].

    slots = num_blocks * block_size rounded up to a multiple of `SLOT_ALIGN`, at least one more: the
    ledger hands out the first num_blocks * block_size; the last slot (`trash`) takes the K/V of padding
    rows (a CUDA graph's batch is padded to its size) and no context ever holds it."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self.slots = -(-(num_blocks * block_size + 1) // SLOT_ALIGN) * SLOT_ALIGN
        self.trash = self.slots - 1
        shape = (kv_heads, self.slots, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


@dataclass(slots=True)
class StepBatch:
    """What every layer needs beyond token ids and positions: write_slots [N] int64, and the backend
    with the metadata it prepared for this step."""

    pool: KVPool
    write_slots: torch.Tensor
    backend: AttentionBackend
    meta: Any


def paged_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                    **kwargs) -> tuple[torch.Tensor, None]:
    """The attention HF layers call. query: [1, H, N, D]; key, value: [1, Hkv, N, D] -> [1, N, H, D]."""
    step: StepBatch | None = kwargs.get("apar_step")
    if step is None:
        raise RuntimeError("apar_paged attention needs the engine's step (model(..., apar_step=...))")
    layer = module.layer_idx
    k_pool, v_pool = step.pool.k[layer], step.pool.v[layer]
    k_pool.index_copy_(1, step.write_slots, key[0].to(k_pool.dtype))  # [Hkv, N, D] into [Hkv, S, D]
    v_pool.index_copy_(1, step.write_slots, value[0].to(v_pool.dtype))
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    window = kwargs.get("sliding_window")
    out = step.backend.attend(step.meta, query[0].transpose(0, 1), k_pool, v_pool, scaling, window)  # [N, H, D]
    return out.unsqueeze(0), None


AttentionInterface.register(ATTN_NAME, paged_attention)
# the same function behind a graph break, for decoder layers under torch.compile (`EngineConfig.compile`): the
# step's metadata and the backends' kernels stay out of the compiled graphs
ATTN_NAME_COMPILED = "apar_paged_compiled"
AttentionInterface.register(ATTN_NAME_COMPILED, torch.compiler.disable(paged_attention))
