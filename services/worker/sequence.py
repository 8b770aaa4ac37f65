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
    children: list["Thread"] = field(default_factory=list)  # in fork order
    # after a preemption, a finished thread whose tokens a running descendant reads: the kv tokens to
    # recompute (up to the last such descendant's [Fork]); 0 when none, or once the ledger has it again
    recompute_to: int = 0
    recompute_mark: int = 0  # kv tokens below this index were computed before a preemption

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

    @property
    def target(self) -> int:
        """The kv tokens that must be in the cache: all of a running thread's, and of a finished one the
        part a running descendant still reads while it is being recomputed."""
        return len(self.kv_tokens) if self.running else self.recompute_to

    @property
    def live(self) -> bool:
        """Running, or read by a running descendant."""
        return self.running or any(c.live for c in self.children)

    @property
    def fork_offset(self) -> int:
        """For a child: how many of its parent's kv tokens it reads (through its [Fork])."""
        return self.start_pos - self.parent.start_pos  # type: ignore[union-attr]

    def forget_kv(self) -> None:
        """Its KV is gone (the request was preempted): nothing computed, no slots, unknown to the ledger."""
        self.recompute_mark = max(self.recompute_mark, self.computed)
        self.computed = 0
        self.n_ctx = 0
        self.in_ledger = False

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
    preemptions: int = 0  # times its blocks were all freed under pressure and its KV recomputed later
    recomputed_tokens: int = 0  # tokens computed again after preemptions
    forks_refused: int = 0  # [Fork]s the model chose (or a replay held) that memory pressure refused

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
    arrival: int = 0
    admitted: bool = False  # admitted at least once (its root was announced)
    recomputing: bool = False  # readmitted after a preemption, its threads' KV not yet all recomputed

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
    """Feeds a known thread instead of sampling: its tokens in order, its children at each [Fork].

    A [Fork] the engine refuses (a limit, or memory pressure) is *inlined*: the thread goes on
    sequentially with that child's tokens (without its closing EOS), then with its own; the restored
    text stays the same. Frames: (node, next index, inlined); the top one feeds.
    """

    __slots__ = ("frames", "fork_id", "_last_child")

    def __init__(self, node: "ReplayNode", fork_id: int) -> None:
        self.frames: list[list] = [[node, 0, False]]
        self.fork_id = fork_id
        self._last_child: ReplayNode | None = None

    def next_token(self, eos_ids: frozenset[int] | set[int] = frozenset()) -> int | None:
        """The next token, or None when the thread's own tokens ran out."""
        while True:
            node, index, inlined = self.frames[-1]
            if inlined and (index >= len(node.tokens) or (index == len(node.tokens) - 1 and node.tokens[index] in eos_ids)):
                self.frames.pop()  # an inlined child ends: back to the thread that refused its fork
                continue
            if index >= len(node.tokens):
                return None
            token = node.tokens[index]
            self.frames[-1][1] = index + 1
            if token == self.fork_id:
                k = sum(1 for t in node.tokens[:index] if t == self.fork_id)
                self._last_child = node.children[k]
            return token

    def child(self) -> "ReplayNode":
        """The subtree of the [Fork] just fed (the engine forked)."""
        assert self._last_child is not None
        return self._last_child

    def inline(self) -> None:
        """The [Fork] just fed was refused: feed its child's tokens next, in this thread."""
        self.frames.append([self.child(), 0, True])


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
