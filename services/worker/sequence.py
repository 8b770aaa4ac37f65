"""Requests and their threads as the engine sees them: token lists, positions and counters.

A thread's *kv tokens* are the tokens whose KV it writes: for the root the prompt then its own tokens,
for a child its own tokens (the first is the forced `[Child]`). `computed` counts the kv tokens already
in the cache; a thread runs when `computed < len(kv_tokens)`. Positions are consecutive along the path
from the root, so a kv token's position is also its index in the thread's context (SPEC section 2).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from services.worker.config import SamplingParams


class FinishReason(enum.Enum):
    STOP = "stop"  # EOS or a stop token
    LENGTH = "length"  # max_tokens reached, or the model's context is full
    CANCELLED = "cancelled"
    ERROR = "error"


@dataclass(slots=True, eq=False)
class Thread:
    id: int
    parent: "Thread | None"
    anchor: int  # index in the parent's output_tokens of the [Fork] that spawned it (-1 for the root)
    start_pos: int  # position of its first kv token
    depth: int
    kv_tokens: list[int]
    n_prompt: int = 0  # leading kv tokens that are prompt (root only)
    computed: int = 0
    finish: FinishReason | None = None
    in_ledger: bool = False  # the ledger knows it: the root from admission, a child from the step its
    # parent feeds the [Fork] (so that the [Fork] slot exists first)
    # context slots in the KV pool, index = position; only [:n_ctx] is valid
    slots: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    n_ctx: int = 0
    replay: "ReplayCursor | None" = None

    @property
    def running(self) -> bool:
        return self.finish is None

    @property
    def output_tokens(self) -> list[int]:
        """What it reports: its own tokens without the forced [Child] (anchors index into this)."""
        return self.kv_tokens[self.n_prompt + (self.parent is not None) :]

    @property
    def pending(self) -> int:
        return len(self.kv_tokens) - self.computed

    @property
    def in_prefill(self) -> bool:
        return self.computed < self.n_prompt

    def push_slots(self, new: list[int]) -> None:
        need = self.n_ctx + len(new)
        if need > self.slots.numel():
            grown = torch.empty(max(need, 2 * self.slots.numel(), 64), dtype=torch.long)
            grown[: self.n_ctx] = self.slots[: self.n_ctx]
            self.slots = grown
        self.slots[self.n_ctx : need] = torch.tensor(new, dtype=torch.long)
        self.n_ctx = need


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0  # over all threads: sampled tokens (EOS included) and forced [Child]
    steps: int = 0  # steps in which the request produced at least one token
    threads: int = 0
    peak_kv_blocks: int = 0
    attended_tokens: int = 0  # sum over computed tokens of their context length, itself included
    forks: int = 0

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.__slots__}


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
    reserved_blocks: int = 0  # worst case the admission set aside
    arrival: int = 0

    @property
    def root(self) -> Thread:
        return self.threads[0]

    @property
    def running_threads(self) -> list[Thread]:
        return [t for t in self.threads if t.running]

    @property
    def budget_left(self) -> int:
        return self.params.max_tokens - self.usage.completion_tokens


class ReplayCursor:
    """Feeds a known thread instead of sampling: its tokens in order, its children at each [Fork]."""

    __slots__ = ("node", "index")

    def __init__(self, node: "ReplayNode") -> None:
        self.node = node
        self.index = 0

    def next_token(self) -> int | None:
        if self.index >= len(self.node.tokens):
            return None
        token = self.node.tokens[self.index]
        self.index += 1
        return token


@dataclass(slots=True)
class ReplayNode:
    """A thread of a known answer: its token ids (with [Fork] where it forks, ending with EOS or not)
    and one child per [Fork], in order. A child's tokens do not include the forced [Child]."""

    tokens: list[int]
    children: list["ReplayNode"] = field(default_factory=list)

    def count_forks(self, fork_id: int) -> int:
        return sum(1 for t in self.tokens if t == fork_id)

    def validate(self, fork_id: int) -> None:
        if self.count_forks(fork_id) != len(self.children):
            raise ValueError(f"replay node has {self.count_forks(fork_id)} forks but {len(self.children)} children")
        for child in self.children:
            child.validate(fork_id)

    def threads(self) -> int:
        return 1 + sum(c.threads() for c in self.children)


def context_tokens(thread: Thread) -> list[int]:
    """The token ids of the thread's context as one ordinary sequence (prompt, ancestors up to each
    [Fork], its own computed tokens): what the plain model must see to give the same logits."""
    own = thread.kv_tokens[: thread.computed]
    if thread.parent is None:
        return own
    parent_ctx = context_tokens_upto(thread.parent, thread.start_pos)
    return parent_ctx + own


def context_tokens_upto(thread: Thread, n: int) -> list[int]:
    """The first n tokens (positions 0..n-1) of the thread's context."""
    if thread.start_pos >= n:
        return context_tokens_upto(thread.parent, n)  # type: ignore[arg-type]
    head = [] if thread.parent is None else context_tokens_upto(thread.parent, thread.start_pos)
    return head + thread.kv_tokens[: n - thread.start_pos]
