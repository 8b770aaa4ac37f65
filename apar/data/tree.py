"""Paragraph trees: the tree of threads of one answer, read as text (docs/design.md, "Words" and "Paragraph trees").

A `Node` is one thread. Its `parts` are, in reading order, plain text and `Fork`s; a `Fork` is the point
where the thread emits `[Fork]` and holds the child thread (`Fork.child`) spawned there:

    Node(["Tips:\\n1. Sleep:", Fork(Node([" Go to bed early."])), "\\n2. Eat:", Fork(...), "\\n"])

Data flows one way: the rules (`apar.data.rules`) build a tree from a response; `restore` turns it back
into the linear text (depth-first: the parent's text up to a fork, the child's whole restored text, the
parent's text after it), which must equal the response byte for byte; `thread_texts` lists the threads
with the control-token strings inserted, for training (`apar.data.packing`) and replay; `to_json` /
`from_json` store a tree as plain JSON (a node is a list of parts, a fork is `{"fork": node}`).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

FORK, CHILD = "[Fork]", "[Child]"


class TreeError(ValueError):
    """A tree that breaks a structural rule (empty child, fork right after a fork, control text, ...)."""


@dataclass(slots=True)
class Fork:
    """A `[Fork]` in the parent's text; the child thread it spawns writes `child`."""

    child: Node


@dataclass(slots=True)
class Node:
    """One thread: its text in order, with a `Fork` wherever a child thread is spawned."""

    parts: list[str | Fork] = field(default_factory=list)

    @property
    def forks(self) -> list[Fork]:
        return [p for p in self.parts if isinstance(p, Fork)]

    @property
    def num_threads(self) -> int:
        """This thread and all its descendants."""
        return 1 + sum(f.child.num_threads for f in self.forks)

    @property
    def depth(self) -> int:
        """Fork depth below this thread: 0 for a thread that never forks."""
        return max((1 + f.child.depth for f in self.forks), default=0)

    @property
    def own_text(self) -> str:
        """This thread's own text, without its children's (nor any control string)."""
        return "".join(p for p in self.parts if isinstance(p, str))


def linear(text: str) -> Node:
    """A tree of one thread that never forks."""
    return Node([text])


def restore(node: Node) -> str:
    """The linear text, depth-first: each child's restored text sits where its fork is."""
    out: list[str] = []
    _restore_into(node, out)
    return "".join(out)


def _restore_into(node: Node, out: list[str]) -> None:
    for part in node.parts:
        if isinstance(part, Fork):
            _restore_into(part.child, out)
        else:
            out.append(part)


def validate(node: Node, control: tuple[str, ...] = (FORK, CHILD)) -> None:
    """Raise `TreeError` unless every thread could have been decoded under the sampling rules.

    Each thread starts with text (a `[Fork]` never follows `[Child]` or the prompt directly), two forks
    are always separated by text (no `[Fork]` right after `[Fork]`), every child writes some visible text,
    and no text contains a control-token string (it would be read back as a control token).
    """
    _validate(node, control, path="root")


def _validate(node: Node, control: tuple[str, ...], path: str) -> None:
    if not node.parts or not isinstance(node.parts[0], str) or not node.parts[0]:
        raise TreeError(f"{path}: a thread must start with text, not a fork")
    previous_fork = False
    fork_no = 0
    for part in node.parts:
        if isinstance(part, Fork):
            if previous_fork:
                raise TreeError(f"{path}: two forks with no text between them")
            fork_no += 1
            child_path = f"{path}.fork{fork_no}"
            if not restore(part.child).strip():
                raise TreeError(f"{child_path}: a child thread with no visible text")
            _validate(part.child, control, child_path)
            previous_fork = True
        elif isinstance(part, str):
            if not part:
                raise TreeError(f"{path}: an empty text part")
            for token in control:
                if token in part:
                    raise TreeError(f"{path}: text contains the control token {token!r}")
            previous_fork = False
        else:
            raise TreeError(f"{path}: a part that is neither text nor a fork: {type(part).__name__}")


@dataclass(frozen=True, slots=True)
class ThreadText:
    """One thread as text with control strings, in pre-order (root first, each child after its parent).

    `parent` is the parent's index in the same list; `fork_ordinal` says which `[Fork]` of the parent
    (0-based, in its text order) spawned this thread. A child's text starts with the `[Child]` string.
    """

    index: int
    parent: int | None
    fork_ordinal: int | None
    text: str


def thread_texts(node: Node, fork: str = FORK, child: str = CHILD) -> list[ThreadText]:
    """Every thread of the tree, pre-order, with `fork`/`child` strings inserted where they are emitted."""
    out: list[ThreadText] = []
    _threads_into(node, None, None, "", fork, child, out)
    return out


def _threads_into(
    node: Node, parent: int | None, ordinal: int | None, prefix: str, fork: str, child: str,
    out: list[ThreadText],
) -> None:
    index = len(out)
    text = prefix + "".join(fork if isinstance(p, Fork) else p for p in node.parts)
    out.append(ThreadText(index, parent, ordinal, text))
    for k, f in enumerate(node.forks):
        _threads_into(f.child, index, k, child, fork, child, out)


def longest_chain(node: Node, count: Callable[[str], int]) -> int:
    """Generation steps a perfect APAR decode needs: tokens on the longest root-to-leaf chain.

    Counts each thread's text tokens (by `count`), one step per `[Fork]` and one for each thread's EOS;
    a child's forced `[Child]` is fed in the same step as its parent's `[Fork]`, so it costs no step.
    """
    steps = 0
    finish = 0
    for part in node.parts:
        if isinstance(part, Fork):
            steps += 1  # the [Fork] token
            finish = max(finish, steps + longest_chain(part.child, count))
        else:
            steps += count(part)
    return max(finish, steps + 1)  # + EOS


def to_json(node: Node) -> list:
    """A node as JSON: a list of parts, each a string or `{"fork": <child node>}`."""
    return [{"fork": to_json(p.child)} if isinstance(p, Fork) else p for p in node.parts]


def from_json(data: object) -> Node:
    """Inverse of `to_json`; raises `TreeError` on anything else."""
    if not isinstance(data, list):
        raise TreeError(f"a tree node must be a JSON list of parts, got {type(data).__name__}")
    parts: list[str | Fork] = []
    for item in data:
        if isinstance(item, str):
            parts.append(item)
        elif isinstance(item, dict) and set(item) == {"fork"}:
            parts.append(Fork(from_json(item["fork"])))
        else:
            raise TreeError(f"a tree part must be a string or {{\"fork\": [...]}}, got {item!r:.60}")
    return Node(parts)
