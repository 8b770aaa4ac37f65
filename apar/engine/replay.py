"""Replay: a known answer tree fed to the engine instead of sampled tokens (golden tests, benchmarks).

A `ReplayNode` is a thread of a known answer; a thread carries a `ReplayCursor` over it, which the
sampler reads instead of drawing (`sampler.choose_tokens`) and which inlines a child whose [Fork] the
engine refuses (docs/design.md, "Fork rules").
"""
from __future__ import annotations

from dataclasses import dataclass, field


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

    def state(self) -> tuple:
        """Where it is, for `restore` (a thread's verified draft may give back tokens it read ahead)."""
        return [f[:] for f in self.frames], self._last_child

    def restore(self, state: tuple) -> None:
        frames, last = state
        self.frames = [f[:] for f in frames]
        self._last_child = last

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
