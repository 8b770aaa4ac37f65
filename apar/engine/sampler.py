"""Per-thread sampling with the APAR control-token rules (SPEC section 3).

Rules applied to a thread's logits before sampling:
  - `[Child]` is never sampled (it is only forced as a child's first token);
  - `[Fork]` is banned after `[Fork]` or `[Child]`, in auto-regressive mode, and when a limit is reached
    (threads per answer, fork depth, fewer than 3 tokens of the answer's budget or of the model's
    context: [Fork], [Child], one more).
Each request samples with its own generator, its threads in id order, so the same seed gives the same
answer whatever else shares the batch.
"""
from __future__ import annotations

import torch

from apar.engine.params import SamplingParams
from apar.engine.sequence import Request, Thread


def fork_allowed(req: Request, thread: Thread, fork_id: int, child_id: int, max_positions: int) -> bool:
    p = req.params
    last = thread.kv_tokens[-1]
    next_pos = thread.start_pos + len(thread.kv_tokens)  # where the [Fork] would sit
    return (
        p.auto_parallel
        and last not in (fork_id, child_id)
        and thread.n_prompt < len(thread.kv_tokens)  # not the very first token of the answer
        and req.answer_threads[thread.answer] < p.max_threads
        and thread.depth < p.max_depth
        and req.budget_left(thread.answer) >= 3
        and next_pos + 2 < max_positions  # room for the [Child] and one token of the child
    )


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """logits: [T, V] float32 with banned entries at -inf -> token ids [T]."""
    if params.greedy:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    if params.top_k:
        k = min(params.top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        cum = sorted_p.cumsum(dim=-1)
        drop = cum - sorted_p > params.top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
