"""Requests and their threads as the engine sees them: token lists, positions and counters.

A thread's *kv tokens* are the tokens whose KV it writes: for the root the prompt then its own tokens,
for a child its own tokens (the first is the forced `[Child]`). `computed` counts the kv tokens already
in the cache; a thread runs when `computed < len(kv_tokens)`. Positions are consecutive along the path
from the root, so a kv token's position is also its index in the thread's context (SPEC section 2).

A request for `n` answers has one tree per answer: the root (thread 0, holding the prompt) is answer 0;
the roots of answers 1..n-1 are the root's children that read its prompt and nothing more, their first
kv token sampled (no `[Child]`). A forked child belongs to its parent's answer.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from apar.engine.events import FinishReason, Usage
from apar.engine.params import SamplingParams


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
    # its context's slots live in a row of the device context table (apar/engine/context_table.py),
    # index = position, valid below n_ctx; `new_slots`: slots the ledger gave it, not yet laid out in a step
    row: int | None = None
    n_ctx: int = 0
    new_slots: list[int] = field(default_factory=list)
    replay: "ReplayCursor | None" = None
    children: list["Thread"] = field(default_factory=list)  # in fork order
    # after a preemption, a finished thread whose tokens a running descendant reads: the kv tokens to
    # recompute (up to the last such descendant's [Fork]); 0 when none, or once the ledger has it again
    recompute_to: int = 0
    recompute_mark: int = 0  # kv tokens below this index were computed before a preemption
    # root only: leading prompt blocks it reads from the prefix cache since its (next) start in the
    # ledger; their tokens count as computed, so its prefill starts after them
    reused: int = 0
    # when its request has a penalty: its row of the penalty tables, and where each token id of its
    # context sits in that row (apar/engine/penalties.py)
    penalty_row: int | None = None
    penalty_slots: dict[int, int] | None = None

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
        (the context table takes its row back at the next step)."""
        self.recompute_mark = max(self.recompute_mark, self.computed)
        self.computed = 0
        self.reused = 0
        self.n_ctx = 0
        self.new_slots.clear()
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


def random_tree(rng, plain: list[int], fork: int, depth: int, eos: int | None) -> ReplayNode:
    """A random thread for golden tests and checks: 3-12 plain tokens with up to 3 forks (nested while
    `depth` allows), ending with `eos` half the time. `rng` is a `random.Random`."""
    tokens: list[int] = []
    children = []
    for _ in range(rng.randint(1, 3) if depth > 0 else 0):
        tokens += rng.sample(plain, rng.randint(1, 4))
        tokens.append(fork)
        children.append(random_tree(rng, plain, fork, depth - 1, eos))
    tokens += rng.sample(plain, rng.randint(2, 6))
    if eos is not None and rng.random() < 0.5:
        tokens.append(eos)
    return ReplayNode(tokens, children)


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
