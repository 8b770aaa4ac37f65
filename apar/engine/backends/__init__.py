"""Attention backends: how a step's tokens attend their threads' contexts in the paged KV pool.

- `portable`: gather each thread's context, then SDPA (any device);
- `cascade`: spans shared by several threads attended once for all of them, merged by log-sum-exp;
- `flex`: FlexAttention over the pool with a block mask (compiled; fixed shapes, CUDA-graph friendly);
- `triton`: cascade's plan as work items of two Triton kernels over the pool (no gather; on the CPU they
  run in Triton's interpreter, for tests);
- `auto`: triton on CUDA (flex where the head dim is not a power of two), cascade on the CPU (measured:
  `apar bench attention`, `apar bench gpu-check`).

`base.py` holds the interface and the step data every backend gets.
"""
from __future__ import annotations

import torch

from apar.engine.backends.base import AttentionBackend
from apar.engine.config import ATTENTION_CHOICES as CHOICES

BACKENDS = tuple(c for c in CHOICES if c != "auto")


def native(device: torch.device) -> list[str]:
    """The backends that run at speed on `device` (on the CPU, triton's kernels run in Triton's interpreter:
    right, for tests, and far too slow to measure or serve)."""
    return [b for b in BACKENDS if device.type == "cuda" or b != "triton"]


def resolve(name: str, device: torch.device, head_dim: int | None = None) -> str:
    """The backend `name` means on `device` (`auto`: triton on CUDA, or flex for a head dim that is not
    a power of two, which triton's kernels refuse; cascade on the CPU). Why triton over flex on a GPU:
    docs/benchmarks.md, "Attention backends"."""
    if name != "auto":
        return name
    if device.type != "cuda":
        return "cascade"
    return "flex" if head_dim and head_dim & (head_dim - 1) else "triton"


def make_backend(name: str, device: torch.device, pool_slots: int, bytes_per_position: int,
                 query_group: int = 1) -> AttentionBackend:
    """pool_slots: slots per layer of the KV pool; bytes_per_position: K and V of one position, one layer;
    query_group: query heads per KV head."""
    if name == "portable":
        from apar.engine.backends.portable import PortableBackend

        return PortableBackend()
    if name == "cascade":
        from apar.engine.backends.cascade import CascadeBackend

        return CascadeBackend(bytes_per_position)
    if name == "flex":
        from apar.engine.backends.flex import FlexBackend

        return FlexBackend(device, pool_slots)
    if name == "triton":
        from apar.engine.backends.triton import TritonBackend

        return TritonBackend(device, query_group)
    raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(CHOICES)}")
