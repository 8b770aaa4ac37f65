"""Choosing each sampling thread's token from its logits row, once the bans are applied.

A replayed thread takes its next known token (replay.py); greedy rows take one argmax together; each
sampling request draws from its own generator, its threads in id order, so the same seed gives the same
answer whatever else shares the batch. The bans themselves (the control-token rules) are in forks.py.
"""
from __future__ import annotations

import torch

from apar.engine.params import SamplingParams
from apar.engine.sequence import Request, Thread


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """logits: [T, V] float32 with banned entries at -inf -> token ids [T]."""
    if params.greedy:
        return logits.argmax(dim=-1)
    return torch.multinomial(probabilities(logits, params), 1, generator=generator).squeeze(-1)


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits: [T, V] float32 with banned entries at -inf -> [T, V] the distributions a sampling request
    draws from (temperature, top-k, top-p applied): what speculative sampling verifies against."""
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
    return probs


def rows_index(logits: torch.Tensor, picked: list[int]) -> slice | torch.Tensor:
    """An index of these rows of `logits`: all of them (an AR batch) as a slice, no index tensor to upload
    (on a GPU an upload from the host waits for the device); else the rows on the logits' device."""
    return slice(None) if len(picked) == logits.shape[0] else torch.tensor(picked, device=logits.device)


def choose_tokens(logits: torch.Tensor, samplers: list[tuple[Request, Thread]],
                  eos_ids: frozenset[int] | set[int], skip: set[int] = frozenset()) -> list[int | None]:
    """One token per row of `logits` ([S, V], bans applied; row i for samplers[i]); None: a replayed
    thread whose tokens ran out, or a row in `skip` (a sampling thread's draft decides it, speculate.py)."""
    chosen: list[int | None] = [None] * len(samplers)
    greedy, by_request = [], {}
    for i, (req, t) in enumerate(samplers):
        if i in skip:
            continue
        if t.replay is not None:
            chosen[i] = t.replay.next_token(eos_ids)
        elif req.params.greedy:
            greedy.append(i)
        else:
            by_request.setdefault(req.id, []).append(i)
    if greedy:
        for i, tok in zip(greedy, logits[rows_index(logits, greedy)].argmax(dim=-1).tolist()):
            chosen[i] = tok
    for rows in by_request.values():
        req = samplers[rows[0]][0]
        for i, tok in zip(rows, sample(logits[rows], req.params, req.generator).tolist()):
            chosen[i] = tok
    return chosen
