"""Speculation inside a thread: a drafter proposes the thread's next tokens, one forward verifies them.

Data flows one way (docs/design.md, "Speculation"): before a step, a `Drafter` reads a decoding thread's
context (prompt, ancestors up to each `[Fork]`, its own tokens) and proposes up to K tokens; they enter
the step as extra query positions after the thread's pending token, so the forward gives K + 1 logits
rows for it. `accept_greedy` / `accept_sampled` keep the longest accepted prefix of the draft and add one
token from the model (the correction at the first rejection, or the bonus after a fully accepted
draft); the engine then rolls back the KV of the rejected positions (`apar.engine.kv.ops.Truncate`).

A draft never holds a control token: the drafter cuts it before a `[Fork]` or `[Child]`, so forks
happen exactly as without speculation (a `[Fork]` is only ever the model's own token, the last of a
verified run).

Acceptance keeps the model's output exactly:
- greedy: the draft's longest prefix equal to each row's argmax, then the argmax of the next row: the
  tokens greedy decoding would have produced one step at a time.
- sampling (Leviathan et al. 2023, Chen et al. 2023): draft token d at row i is accepted with
  probability min(1, p_i(d) / q_i(d)); at the first rejection the token is drawn from the normalised
  residual max(0, p_i - q_i); after a fully accepted draft, from p_K. Every emitted token is then
  distributed as the model's p. A deterministic drafter (ngram) has q_i a point mass on d: accept with
  p_i(d), resample from p_i with d removed.
"""
from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from apar.engine.config import SpeculativeConfig

class Drafter(Protocol):
    """Proposes a thread's next tokens from its context. (A drafter with `by_thread` true guesses per
    thread instead, from the step that gave the thread its pending token: `MedusaDrafter`, `EagleDrafter`,
    `ByThread` in apar/engine/medusa.py: `propose` after a step, or `skip` where the draft gate pauses its
    guesses, apar/engine/draft_policy.py.)"""

    def draft(self, context: Sequence[int], k: int) -> list[int]:
        """Up to `k` tokens that may follow `context` (the thread's whole context, its last token
        included); never a control token. An empty list: no guess."""
        ...


class NgramDrafter:
    """Prompt lookup (no model): the context's last n tokens, n from `max_n` down to `min_n`, are looked
    up in the context itself; the tokens that followed their latest earlier occurrence are the draft,
    cut before the first of `stop_ids` (the control tokens)."""

    by_thread = False

    def __init__(self, min_n: int = 1, max_n: int = 4, stop_ids: Sequence[int] = ()) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"ngram sizes must satisfy 1 <= min <= max, got {min_n}..{max_n}")
        self.min_n, self.max_n = min_n, max_n
        self.stop_ids = frozenset(stop_ids)

    def draft(self, context: Sequence[int], k: int) -> list[int]:
        n_ctx = len(context)
        if k <= 0 or n_ctx < self.min_n + 1:
            return []
        # the context as bytes, 4 per token: `bytes.rfind` does the search in C; a hit off a multiple
        # of 4 straddles two tokens and is skipped
        hay = array("i", context).tobytes()
        for n in range(min(self.max_n, n_ctx - 1), self.min_n - 1, -1):
            start = self._latest(hay, hay[4 * (n_ctx - n):], n_ctx)
            if start is not None:
                return self._cut(context[start + n: start + n + k])
        return []

    @staticmethod
    def _latest(hay: bytes, needle: bytes, n_ctx: int) -> int | None:
        """The token index of the latest occurrence of `needle` that ends before the context's last
        token (so that at least one token follows it), or None."""
        end = 4 * (n_ctx - 1)
        while True:
            at = hay.rfind(needle, 0, end)
            if at < 0:
                return None
            if at % 4 == 0:
                return at // 4
            end = at + len(needle) - 1  # the next candidate starts before `at`

    def _cut(self, tokens: Sequence[int]) -> list[int]:
        out = []
        for tok in tokens:
            if tok in self.stop_ids:
                break
            out.append(tok)
        return out


def make_drafter(config: SpeculativeConfig, stop_ids: Sequence[int], runner=None) -> Drafter | None:
    """The drafter `config` names; None when speculation is off. medusa loads the heads saved beside the
    model `runner` serves and has the runner keep its last hidden states (apar/engine/medusa.py)."""
    if config.method == "ngram":
        return NgramDrafter(config.min_ngram, config.max_ngram, stop_ids)
    if config.method == "medusa":
        from apar.engine.medusa import MedusaDrafter

        if runner is None:
            raise ValueError("medusa drafts need the model runner")
        drafter = MedusaDrafter.load(runner.path, runner.model.get_output_embeddings().weight, stop_ids,
                                     config.num_tokens, runner.model.get_input_embeddings().weight,
                                     rows_kernel=runner.rows_kernel)
        runner.keep_hidden()
        return drafter
    return None


# ---- verification ----------------------------------------------------------------------------------
@dataclass(slots=True)
class Verdict:
    """A verified draft: `accepted` draft tokens kept, then `tokens` (those plus one from the model)."""

    accepted: int
    tokens: list[int]


def accept_greedy(draft: Sequence[int], argmax: Sequence[int]) -> Verdict:
    """`argmax`: the argmax of the thread's K + 1 rows (row i follows the pending token and draft[:i]).
    Keeps the longest prefix of the draft equal to them, then the next row's argmax."""
    a = 0
    while a < len(draft) and draft[a] == argmax[a]:
        a += 1
    return Verdict(a, [*draft[:a], argmax[a]])


def accept_sampled(draft: Sequence[int], probs: torch.Tensor, generator: torch.Generator | None = None,
                   draft_probs: torch.Tensor | None = None) -> Verdict:
    """The speculative-sampling rule (the module's docstring).

    probs: [K + 1, V] the model's distributions, row i after draft[:i] (temperature, top-k/top-p and
    bans applied); draft_probs: [K, V] the drafter's, or None for a deterministic drafter (point masses
    on the draft). Draws K uniforms, then one token, from `generator`.
    """
    k = len(draft)
    if probs.shape[0] != k + 1:
        raise ValueError(f"{k} draft tokens need {k + 1} rows of probabilities, got {probs.shape[0]}")
    a = k
    if k:
        rows = torch.arange(k, device=probs.device)
        d = torch.tensor(draft, device=probs.device)  # [K]
        p_d = probs[rows, d].tolist()
        q_d = [1.0] * k if draft_probs is None else draft_probs[rows, d].tolist()
        u = torch.rand(k, generator=generator, device=probs.device).tolist()
        # accept iff u < p/q (q > 0 for a drafted token): the first that fails is rejected
        a = next((i for i in range(k) if u[i] * q_d[i] >= p_d[i]), k)
    if a == k:
        dist = probs[k]  # [V]
    elif draft_probs is None:
        dist = probs[a].clone()  # [V]: max(0, p - onehot(d)) is p without d
        dist[draft[a]] = 0.0
    else:
        dist = (probs[a] - draft_probs[a]).clamp_(min=0.0)  # [V]
    if a < k and not float(dist.sum()) > 0.0:  # (a rejection leaves mass, but for rounding: p(d) ~ q(d))
        dist = probs[a]
    tok = int(torch.multinomial(dist.float(), 1, generator=generator))  # (unnormalised weights)
    return Verdict(a, [*draft[:a], tok])
