"""What the ledger answers without changing anything: its counts and digest, a request's footprint, a
thread's blocks, and the room in its last block (what an append of n tokens would take).

`LedgerReads` is a part of `KVLedger` (a mixin over the ledger's own tables, as `PrefixCache` and
`LedgerState` are; not used alone): the scheduler plans and admits on `num_free`, `room` and
`blocks_needed`, the engine's usage and metrics read the counts and `blocks_read`, and the KV manager
compares `digest`s (docs/design.md, "Ledger invariants" and "Replication").
"""
from __future__ import annotations

from apar.engine.kv.contents import MASK
from apar.engine.kv.types import Digest, ThreadRef


class LedgerReads:
    """The ledger's queries (the `KVLedger` methods that read and never write)."""

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take: free ones and cached ones (evicted when needed)."""
        return len(self._free) + len(self._cache)

    @property
    def num_used(self) -> int:
        """Blocks some running thread reads or writes."""
        return len(self._blocks) - len(self._cache)

    @property
    def num_tokens(self) -> int:
        return self._tokens

    @property
    def num_requests(self) -> int:
        """Requests started and not released."""
        return len(self._request_blocks)

    def digest(self) -> Digest:
        nxt = self._free[0] if self._free else next(iter(self._cache.values())) if self._cache else -1
        return Digest(len(self._free), len(self._blocks), len(self._threads), self._tokens, nxt, len(self._named),
                      self._contents())

    def _contents(self) -> int:
        return self._h & MASK

    def open_threads(self) -> set[ThreadRef]:
        """The running threads whose next token fits in their last own block (unsealed, not full)."""
        return set(self._open)

    def blocks_of(self, request: str) -> int:
        """Blocks in use that belong to `request`'s threads (not the named prefix blocks it reads: those
        belong to no request, and stay cached when it ends)."""
        return self._request_blocks.get(request, 0)

    def blocks_read(self, request: str) -> int:
        """Blocks `request`'s threads hold: its own and the named prefix blocks its root reused or named
        (its footprint, for usage; shared ones count for every request that reads them). Only a root's
        prompt blocks are named, and every thread of a request reads its root's prompt, so they stay held
        until the request is released."""
        return self._request_blocks.get(request, 0) + self._request_named.get(request, 0)

    def context_blocks(self, ref: ThreadRef) -> list[int]:
        """The blocks of the thread's context, in reading order (refs then own)."""
        t = self._thread(ref)
        return t.refs + t.own

    def own_blocks(self, ref: ThreadRef) -> list[int]:
        return list(self._thread(ref).own)

    def refcount(self, block: int) -> int:
        b = self._blocks.get(block)
        return 0 if b is None else b.refcount

    def is_running(self, ref: ThreadRef) -> bool:
        t = self._threads.get(ref)
        return t is not None and t.running

    def room(self, ref: ThreadRef) -> int:
        """Tokens the thread can append without opening a block: what its last block has left, 0 when
        that block is sealed (a child reads it) or it has none."""
        t = self._thread(ref)
        if t.own and not t.sealed:
            return self.block_size - self._blocks[t.own[-1]].used
        return 0

    def blocks_needed(self, ref: ThreadRef | None, n_tokens: int) -> int:
        """New blocks that appending `n_tokens` to `ref` (or to a new thread if None) would take."""
        extra = max(0, n_tokens - (self.room(ref) if ref is not None else 0))
        return -(-extra // self.block_size)
