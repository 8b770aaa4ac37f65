"""Stitching: the thread tree back into linear text, streamed append-only (docs/design.md, "Restoration and streaming").

Input: per-thread events in engine order (a thread starts with its parent and anchor, tokens arrive, it
finishes). Reading order is depth-first: a parent's tokens up to a `[Fork]`, then that child's whole
restored text, then the parent's tokens after the `[Fork]`. A cursor walks that order and stops at the
first token not produced yet; everything before the cursor is final, so `linear` deltas never change
what was sent. The tokens passed by the cursor go through one incremental detokenizer, so no byte is
lost or doubled where one thread's segment meets the next.

Pure Python over token ids and a tokenizer's `decode`: no torch, no gRPC.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Append token ids, get text deltas; holds back a delta that ends inside a multi-byte character."""

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self.ids: list[int] = []
        self._prefix = 0  # ids[_prefix:_read] is decoded context for the next delta
        self._read = 0
        self.text = ""

    def push(self, ids: Iterable[int]) -> str:
        self.ids.extend(ids)
        if len(self.ids) == self._read:
            return ""
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) <= len(before) or after.endswith(REPLACEMENT):
            return ""
        delta = after[len(before) :]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """Everything left, replacement characters included (the stream is over)."""
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        delta = after[len(before) :]
        self._prefix = self._read = len(self.ids)
        self.text += delta
        return delta


@dataclass(slots=True)
class _Node:
    id: int
    parent: int | None
    anchor: int
    tokens: list[int] = field(default_factory=list)
    children: dict[int, int] = field(default_factory=dict)  # anchor index -> child id
    finished: bool = False
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class ThreadDelta:
    """A `threads`-mode event: kind is started, delta or finished."""

    kind: str
    thread: int
    parent: int | None = None
    anchor: int = -1
    text: str = ""
    reason: str | None = None
    index: int = 0  # the answer it belongs to (n > 1)


class Stitcher:
    """Restores one request's linear text from its thread events."""

    def __init__(self, decode: Callable[[list[int]], str], fork_id: int | None, child_id: int | None,
                 hidden_ids: Iterable[int] = ()) -> None:
        self.fork_id, self.child_id = fork_id, child_id
        self.hidden = set(hidden_ids) | {t for t in (fork_id, child_id) if t is not None}  # None: a model without them
        self.nodes: dict[int, _Node] = {}
        self.linear = IncrementalDetokenizer(decode)
        self._decode = decode
        self._thread_detok: dict[int, IncrementalDetokenizer] = {}
        self._stack: list[tuple[int, int]] = []  # reading cursor: (thread, next token index) per level
        self._pending_threads: list[ThreadDelta] = []

    # ---- events in ---------------------------------------------------------------------------------
    def start(self, thread: int, parent: int | None, anchor: int) -> None:
        if thread in self.nodes:
            raise ValueError(f"thread {thread} started twice")
        if parent is not None:
            p = self.nodes.get(parent)
            if p is None:
                raise ValueError(f"thread {thread} names unknown parent {parent}")
            p.children[anchor] = thread
        elif self.nodes:
            raise ValueError("a second root thread")
        self.nodes[thread] = _Node(thread, parent, anchor)
        if parent is None:
            self._stack = [(thread, 0)]
        self._thread_detok[thread] = IncrementalDetokenizer(self._decode)
        self._pending_threads.append(ThreadDelta("started", thread, parent, anchor))

    def token(self, thread: int, token: int) -> None:
        self.nodes[thread].tokens.append(token)
        if token not in self.hidden:
            delta = self._thread_detok[thread].push([token])
            if delta:
                self._pending_threads.append(ThreadDelta("delta", thread, text=delta))

    def finish(self, thread: int, reason: str) -> None:
        node = self.nodes.get(thread)
        if node is None:  # a thread that never started (its request ended before admission)
            return
        node.finished, node.reason = True, reason
        rest = self._thread_detok[thread].flush()
        if rest:
            self._pending_threads.append(ThreadDelta("delta", thread, text=rest))
        self._pending_threads.append(ThreadDelta("finished", thread, reason=reason))

    # ---- text out ----------------------------------------------------------------------------------
    def linear_delta(self) -> str:
        """The final text added since the last call, in reading order."""
        return self.linear.push(self._advance())

    def thread_events(self) -> list[ThreadDelta]:
        out, self._pending_threads = self._pending_threads, []
        return out

    def done(self) -> bool:
        return bool(self.nodes) and all(n.finished for n in self.nodes.values()) and not self._stack

    def final_text(self) -> str:
        """The rest of the linear text once every thread finished; returns the whole text."""
        self.linear.push(self._advance())
        self.linear.flush()
        return self.linear.text

    def _advance(self) -> list[int]:
        """Move the reading cursor as far as the produced tokens allow; return the visible ids passed."""
        out: list[int] = []
        while self._stack:
            tid, i = self._stack[-1]
            node = self.nodes[tid]
            if i < len(node.tokens):
                tok = node.tokens[i]
                if tok == self.fork_id:
                    child = node.children.get(i)
                    if child is None:  # its start event has not arrived yet
                        break
                    self._stack[-1] = (tid, i + 1)
                    self._stack.append((child, 0))
                    continue
                self._stack[-1] = (tid, i + 1)
                if tok not in self.hidden:
                    out.append(tok)
            elif node.finished:
                self._stack.pop()
            else:
                break
        return out


def restore_tokens(threads: dict[int, tuple[list[int], dict[int, int]]], fork_id: int) -> list[int]:
    """Reading-order token ids of a finished tree: thread id -> (tokens, {anchor index: child id})."""
    out: list[int] = []

    def walk(tid: int) -> None:
        tokens, children = threads[tid]
        for i, tok in enumerate(tokens):
            if tok == fork_id:
                if i in children:
                    walk(children[i])
            else:
                out.append(tok)

    walk(0)
    return out
