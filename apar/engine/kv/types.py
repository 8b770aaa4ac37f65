"""The KV ledger's small types: thread names, the digest, its errors, and its per-block and per-thread state."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple


class ThreadRef(NamedTuple):
    """A thread, named by its request and its id within the request (the root is 0)."""

    request: str
    thread: int


class Digest(NamedTuple):
    """A few O(1) facts of a ledger's whole state; two ledgers that went through the same ops agree on
    them, and a replica that missed or repeated an op almost surely does not."""

    free: int
    used: int  # in use or cached
    threads: int
    tokens: int
    next_free: int  # the id the next new block gets, -1 when none is free
    named: int = 0  # blocks with a prefix name, in use or cached
    contents: int = 0  # a hash of every held block's owner, name, fill and count (apar/engine/kv/contents.py)


class LedgerError(RuntimeError):
    """A call that would break an invariant: a bug in the caller, never silently accepted."""


class OutOfBlocks(LedgerError):
    """Not enough free blocks for an allocation; nothing was changed."""


@dataclass(slots=True)
class Block:
    owner: ThreadRef | None  # None once named: a shared prefix block belongs to no request
    refcount: int = 1
    used: int = 0  # token slots written
    name: int | None = None  # its prefix name, once a prompt's block was named (see prefix_cache.py)


@dataclass(slots=True)
class ThreadState:
    ref: ThreadRef
    refs: list[int]
    own: list[int] = field(default_factory=list)
    sealed: bool = False  # last own block shared with a child: the next token opens a new block
    running: bool = True
    since: int = 0  # a replica's, while open: its tick when the last block's `used` was written down
    fill: int = -1  # a replica's, while open: the tick its last block fills at (its key in `_fills`)
    key: int = 0  # contents.thread_key of its ref: the weight of the blocks it owns
    ctx: int = 0  # the sum of the block keys of `refs + own` (its references, in the contents hash)
