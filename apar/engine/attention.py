"""Paged tree attention: the KV pool, and the attention function HF models call.

The engine keeps the Hugging Face model code and owns the cache: the model is loaded with
`attn_implementation="apar_paged"`, and every attention layer calls `paged_attention`, which finds the
step's `AttentionInputs` in `CurrentStep` (`ModelRunner.call_model` sets it around the model call). Per layer
the function first writes the new K/V of every token into its slot (so a child's `[Child]` sees its
parent's `[Fork]` written in the same step), then hands the queries to the step's backend (`apar/engine/backends/`), which lets each token attend
to exactly its thread's context using the metadata it prepared once for the step. Compiled layers use
`paged_attention_compiled`, the same two parts traced without a graph break.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface

from apar.engine.backends.base import AttentionBackend

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
class AttentionInputs:
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
    step = _current()
    layer = module.layer_idx
    k_pool, v_pool = step.pool.k[layer], step.pool.v[layer]
    k_pool.index_copy_(1, step.write_slots, key[0].to(k_pool.dtype))  # [Hkv, N, D] into [Hkv, S, D]
    v_pool.index_copy_(1, step.write_slots, value[0].to(v_pool.dtype))
    return _attend(step, query, k_pool, v_pool, scaling, kwargs.get("sliding_window")), None


def _attend(step: AttentionInputs, query: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, scaling: float | None,
            window: int | None) -> torch.Tensor:
    """The step's backend over a layer's pools (the step's K/V written): [1, H, N, D] -> [1, N, H, D]."""
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    return step.backend.attend(step.meta, query[0].transpose(0, 1), k_pool, v_pool, scaling, window).unsqueeze(0)


class _CurrentStep(threading.local):
    """The step a model runs in this thread (`ModelRunner.call_model` sets it around the call): the
    attention functions, and the custom op `apar::attend` (which takes only tensors and numbers), find
    the backend and its metadata here."""

    step: AttentionInputs | None = None


CurrentStep = _CurrentStep()


def _current() -> AttentionInputs:
    step = CurrentStep.step
    if step is None:
        raise RuntimeError("apar_paged attention runs only inside ModelRunner.call_model")
    return step


@torch.library.custom_op("apar::attend", mutates_args=())
def attend_op(query: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, scaling: float,
              window: int) -> torch.Tensor:
    """The current step's attention over the pools: query [1, H, N, D] -> [1, N, H, D]. Opaque to
    torch.compile: the layer around it stays one graph."""
    return _attend(_current(), query, k_pool, v_pool, scaling, window or None).contiguous()


@attend_op.register_fake
def _(query, k_pool, v_pool, scaling, window):
    return query.new_empty(1, query.shape[2], query.shape[1], query.shape[3])


def paged_attention_compiled(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                             **kwargs) -> tuple[torch.Tensor, None]:
    """`paged_attention` for decoder layers under torch.compile (`EngineConfig.compile`), traced whole: the
    K/V write goes into the pools held as the attention module's buffers (`attach_pools`) at the slots
    passed as the tensor `apar_slots`, so inductor writes the rotated keys and the values in the kernel
    that computes them; the backend's attention is the custom op `apar::attend` (opaque, no graph break),
    so each decoder layer is one compiled graph."""
    slots = kwargs.get("apar_slots")
    if slots is None:
        raise RuntimeError("compiled apar_paged attention needs the step's write slots (model(..., apar_slots=...))")
    module.apar_k.index_copy_(1, slots, key[0].to(module.apar_k.dtype))
    module.apar_v.index_copy_(1, slots, value[0].to(module.apar_v.dtype))
    if scaling is None:  # (the op takes a number)
        scaling = query.shape[-1] ** -0.5
    return attend_op(query, module.apar_k, module.apar_v, scaling, kwargs.get("sliding_window") or 0), None


def attach_pools(attention_modules, pool: KVPool) -> None:
    """Each attention module holds its layer's K and V pools as buffers (not saved with the model), for
    `paged_attention_compiled`."""
    for module in attention_modules:
        module.register_buffer("apar_k", pool.k[module.layer_idx], persistent=False)
        module.register_buffer("apar_v", pool.v[module.layer_idx], persistent=False)


AttentionInterface.register(ATTN_NAME, paged_attention)
ATTN_NAME_COMPILED = "apar_paged_compiled"
AttentionInterface.register(ATTN_NAME_COMPILED, paged_attention_compiled)
