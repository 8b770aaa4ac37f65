"""Requests and their threads as the engine sees them: token lists, positions and counters.

A thread's *kv tokens* are the tokens whose KV it writes: for the root the prompt then its own tokens,
for a child its own tokens (the first is the forced `[Child]`). With speculation a thread may also hold
tokens *ahead*: verified by the model, not yet applied (docs/design.md, "Speculation"); its token
sequence is then `kv_tokens + ahead`, and `computed` counts the tokens of that sequence already in the
cache (all but the last: its pending token). A thread runs when `computed` is short of its sequence.
Positions are consecutive along the path from the root, so a kv token's position is also its index in
the thread's context (docs/design.md, "Threads and blocks").

A request for `n` answers has one tree per answer: the root (thread 0, holding the prompt) is answer 0;
the roots of answers 1..n-1 are the root's children that read its prompt and nothing more, their first
kv token sampled (no `[Child]`). A forked child belongs to its parent's answer.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from apar.engine.events import FinishReason, Usage
from apar.engine.params import SamplingParams

if TYPE_CHECKING:
    from apar.engine.replay import ReplayCursor


@dataclass(slots=True)
class ContextSlots:
    """Where a thread's context lives on the device: a row of the context table
    (apar/engine/context_table.py), index = position, valid below `n_ctx`; `new_slots`: slots the ledger
    gave it, not yet laid out in a step."""

    row: int | None = None
    n_ctx: int = 0
    new_slots: list[int] = field(default_factory=list)


@dataclass(slots=True)
class PenaltyRow:
    """A penalized thread's row of the penalty tables, and where each token id of its context sits in
    that row (apar/engine/penalties.py)."""

    row: int
    slots: dict[int, int]


@dataclass(slots=True)
class Recompute:
    """What a thread has of its KV when it starts (again) in the ledger: after a preemption, what to
    recompute and what was computed before; for a root, the prompt blocks the prefix cache gives it."""

    # a finished thread whose tokens a running descendant reads: the kv tokens to recompute (up to the
    # last such descendant's [Fork]); 0 when none, or once the ledger has it again
    to: int = 0
    mark: int = 0  # kv tokens below this index were computed before a preemption
    # root only: leading prompt blocks it reads from the prefix cache since its (next) start in the
    # ledger; their tokens count as computed, so its prefill starts after them
    reused: int = 0


@dataclass(slots=True, eq=False)
class Thread:
    id: int
    parent: "Thread | None"
    anchor: int  # index in the parent's output_tokens of the [Fork] that spawned it (-1: an answer's root)
    start_pos: int  # position of its first kv token
    depth: int
    kv_tokens: list[int]
    n_prompt: int = 0  # leading kv tokens that are prompt (root only)
    answer: int = 0  # which of the request's answers it belongs to
    computed: int = 0
    finish: FinishReason | None = None
    in_ledger: bool = False  # the ledger knows it: the root from admission, an answer root from its
    # creation, a child from the step its parent feeds the [Fork] (so that the [Fork] slot exists first)
    ctx: ContextSlots = field(default_factory=ContextSlots)  # its context's slots on the device
    replay: "ReplayCursor | None" = None  # replay.py: a known thread fed instead of sampled
    children: list["Thread"] = field(default_factory=list)  # in fork order
    recompute: Recompute = field(default_factory=Recompute)  # preemption's and the prefix cache's part
    penalty: PenaltyRow | None = None  # when its request has a penalty (apar/engine/penalties.py)
    # speculation (apar/engine/speculation.py): verified tokens not yet applied, oldest first, their KV
    # in the cache but the last's; whether each was an accepted draft token (usage counts it once
    # applied); and the logits row ([V], bans applied) a last `[Fork]` came from, should it be refused
    ahead: list[int] = field(default_factory=list)
    ahead_drafted: list[bool] = field(default_factory=list)
    ahead_row: torch.Tensor | None = None

    @property
    def running(self) -> bool:
        return self.finish is None

    @property
    def starts_answer(self) -> bool:
        """The root of an answer (thread 0 or an answer root): its first own token is sampled, where a
        forked child's is the forced [Child]."""
        return self.anchor < 0

    @property
    def output_tokens(self) -> list[int]:
        """What it reports: its own tokens without the forced [Child] (anchors index into this)."""
        return self.kv_tokens[self.n_prompt + (not self.starts_answer) :]

    @property
    def n_tokens(self) -> int:
        """Its kv tokens and the tokens ahead of them: the length of its token sequence."""
        return len(self.kv_tokens) + len(self.ahead)

    @property
    def tip(self) -> int:
        """The last token of its sequence (its pending token while it decodes)."""
        return self.ahead[-1] if self.ahead else self.kv_tokens[-1]

    def tokens(self, start: int, stop: int) -> list[int]:
        """Tokens start..stop-1 of its sequence (kv tokens, then those ahead)."""
        if stop <= len(self.kv_tokens) or not self.ahead:
            return self.kv_tokens[start:stop]
        return (self.kv_tokens + self.ahead)[start:stop]

    def drop_ahead(self) -> None:
        """Forget the tokens ahead (the thread ended or lost its KV; their blocks go with it)."""
        self.ahead.clear()
        self.ahead_drafted.clear()
        self.ahead_row = None

    @property
    def pending(self) -> int:
        return self.n_tokens - self.computed

    @property
    def in_prefill(self) -> bool:
        return self.computed < self.n_prompt

    @property
    def target(self) -> int:
        """The kv tokens that must be in the cache: all of a running thread's, and of a finished one the
        part a running descendant still reads while it is being recomputed."""
        return self.n_tokens if self.running else self.recompute.to

    @property
    def live(self) -> bool:
        """Running, or read by a running descendant."""
        return self.running or any(c.live for c in self.children)

    @property
    def fork_offset(self) -> int:
        """For a child: how many of its parent's kv tokens it reads (through its [Fork], or for an
        answer root the prompt)."""
        return self.start_pos - self.parent.start_pos  # type: ignore[union-attr]

    @property
    def last_reader(self) -> Thread | None:
        """The live child forked last: once it is forked again after a preemption, a finished thread's
        recomputed tokens have no other reader to wait for (answer roots share one fork offset)."""
        return next((c for c in reversed(self.children) if c.live), None)

    def forget_kv(self) -> None:
        """Its KV is gone (the request was preempted): nothing computed, no slots, unknown to the ledger
        (the context table takes its row back at the next step). The tokens ahead go too: from its last
        kv token on, it decodes them again."""
        self.recompute.mark = max(self.recompute.mark, min(self.computed, len(self.kv_tokens)))
        self.drop_ahead()
        self.computed = 0
        self.recompute.reused = 0
        self.ctx.n_ctx = 0
        self.ctx.new_slots.clear()
        self.in_ledger = False


@dataclass(slots=True, eq=False)
class Request:
    id: str
    prompt: list[int]
    params: SamplingParams
    threads: list[Thread] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    generator: torch.Generator | None = None
    finish: FinishReason | None = None
    error: str | None = None
    arrival: int = 0
    admitted: bool = False  # admitted at least once (its root was announced)
    recomputing: bool = False  # readmitted after a preemption, its threads' KV not yet all recomputed
    prompt_names: list[int] = field(default_factory=list)  # its prompt's full blocks' names (prefix cache)
    # per answer: completion tokens (control tokens included) and threads; `usage` holds the totals
    answer_tokens: list[int] = field(init=False)
    answer_threads: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.answer_tokens = [0] * self.params.n
        self.answer_threads = [0] * self.params.n

    @property
    def root(self) -> Thread:
        return self.threads[0]

    @property
    def running_threads(self) -> list[Thread]:
        return [t for t in self.threads if t.running]

    def budget_left(self, answer: int) -> int:
        """Tokens the answer may still produce (`max_tokens` is per answer)."""
        return self.params.max_tokens - self.answer_tokens[answer]

    def add_thread(self, t: Thread) -> None:
        self.threads.append(t)
        self.answer_threads[t.answer] += 1
        self.usage.threads += 1

    def spend(self, answer: int) -> None:
        """Count one completion token (sampled, or a forced [Child]) of the answer."""
        self.answer_tokens[answer] += 1
        self.usage.completion_tokens += 1


def context_tokens(thread: Thread) -> list[int]:
    """The token ids of the thread's context as one ordinary sequence (prompt, ancestors up to each
    [Fork], its own computed tokens, those ahead included): what the plain model must see to give the
    same logits."""
    own = thread.tokens(0, thread.computed)
    if thread.parent is None:
        return own
    parent_ctx = context_tokens_upto(thread.parent, thread.start_pos)
    return parent_ctx + own


def context_tokens_upto(thread: Thread, n: int) -> list[int]:
    """The first n tokens (positions 0..n-1) of the thread's context (its tokens ahead included)."""
    if thread.start_pos >= n:
        return context_tokens_upto(thread.parent, n)  # type: ignore[arg-type]
    head = [] if thread.parent is None else context_tokens_upto(thread.parent, thread.start_pos)
    return head + thread.tokens(0, n - thread.start_pos)
