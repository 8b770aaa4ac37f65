"""The KV manager's replica of a worker's ledger: a `KVLedger` that replays a compact step's decode
appends as one lazy `advance` (docs/design.md, "Replication").

The worker's ledger grows by appends (a rejected draft's `truncate` is an op of its own); a compact step (`apar.engine.kv.ops.record`) carries its
one-token appends into open blocks as one `Advance` and the ones that open a block as one
`AppendEach`. Only the replica replays those, so only it keeps the machinery below, out of the
worker's hot path. Both ledgers compute the same `digest` after the same step.

`advance` is lazy, so a replica's decode step costs O(held + blocks filled), not O(open threads): the
ledger counts advances (`_tick`); an open thread's last block holds `used + (_tick - since)` tokens,
where `since` is the tick its count was last written down (`_settle`). Every method that reads or
writes a thread's last block settles that thread first, and each open thread is filed under the tick
at which its block fills (`_fills`), when it is settled and closed.
  I7 (replica). each open thread is filed in `_fills` under the tick its last block fills at, and the
      open sums `_s1`, `_s2` are those of the open threads' last blocks (`check`).
"""
from __future__ import annotations

from apar.engine.kv.contents import COUNT, MASK, USED, block_key
from apar.engine.kv.ledger import KVLedger
from apar.engine.kv.types import Block, LedgerError, OutOfBlocks, ThreadRef, ThreadState


class ReplicaLedger(KVLedger):
    """A worker's ledger as the KV manager keeps it: `KVLedger` plus a lazy `advance`."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        super().__init__(num_blocks, block_size)
        self._tick = 0  # advances so far (see the module's docstring)
        self._fills: dict[int, set[ThreadRef]] = {}  # tick -> the open threads whose last block fills then
        # `_s1` and `_s2` sum block_key(last block) and block_key(last block) * since over the open
        # threads, whose blocks hold `tick - since` tokens more than written down
        self._s1 = self._s2 = 0

    def _contents(self) -> int:
        return (self._h + USED * (self._tick * self._s1 - self._s2)) & MASK

    # ---- the ledger's calls, each settling the threads it reads first ---------------------------------
    def room(self, ref: ThreadRef) -> int:
        self._settle(self._thread(ref))
        return super().room(ref)

    def append(self, ref: ThreadRef, n_tokens: int = 1, want_slots: bool = True) -> list[tuple[int, int]]:
        t = self._threads.get(ref)
        if t is not None and t.running:
            if ref in self._open:
                self._settle(t)
            else:
                t.since = self._tick  # (settled: nothing to write down for a thread that is not open)
        slots = super().append(ref, n_tokens, want_slots)
        if ref in self._open:  # still open, one token more: filed under its new fill tick
            self._file(t, self._blocks[t.own[-1]].used)
        return slots

    def fork(self, parent: ThreadRef, child: ThreadRef) -> None:
        p = self._threads.get(parent)
        if p is not None:
            self._settle(p)
        super().fork(parent, child)

    def truncate(self, ref: ThreadRef, n_tokens: int) -> list[int]:
        t = self._threads.get(ref)
        if t is not None and t.running:
            if ref in self._open:
                self._settle(t)
            else:
                t.since = self._tick  # (as in `append`: it may open again below)
        return super().truncate(ref, n_tokens)

    def finish(self, ref: ThreadRef) -> list[int]:
        t = self._threads.get(ref)
        if t is not None:
            self._settle(t)
        return super().finish(ref)

    # ---- the compact step's two ops -------------------------------------------------------------------
    def append_each(self, refs, starved: set[str], want_slots: bool = True) -> list[list[tuple[int, int]] | None]:
        """`append(ref, 1)` for each ref in order, answering each's slots, or None (its request added to
        `starved`) when no block was there for it; a ref of a starved request is skipped (None). The
        decode step's tokens that open a block (a compact step's `AppendEach`) take the fast lane here:
        a replica replays a few per step for every worker, so its bookkeeping is inlined; any other
        case (an open thread, an unknown one) goes through `append`."""
        out: list[list[tuple[int, int]] | None] = []
        threads, open_, blocks, free = self._threads, self._open, self._blocks, self._free
        request_blocks, tick, bs, keys = self._request_blocks, self._tick, self.block_size, self._keys
        fill = tick + bs - 1  # the tick a block opened now (one token in it) fills at
        bucket: set[ThreadRef] | None = None
        for ref in refs:
            request = ref.request
            if request in starved:
                out.append(None)
                continue
            t = threads.get(ref)
            if t is None or not t.running or ref in open_ or bs == 1 or not free:
                try:  # (an empty free list: `append` may evict a cached block)
                    out.append(self.append(ref, 1, want_slots))
                except OutOfBlocks:
                    starved.add(request)
                    out.append(None)
                bucket = None  # (`append` may have emptied and dropped it)
                continue
            block_id = free.popleft()
            key = keys[block_id]
            blocks[block_id] = Block(ref, 1, 1)  # (owner, refcount, used: by keyword it costs more)
            self._h += key * (t.key + USED + COUNT)
            t.ctx += key
            self._s1 += key  # open from `tick` on: since = tick
            self._s2 += key * tick
            request_blocks[request] += 1
            t.own.append(block_id)
            t.sealed = False
            t.since = tick
            self._tokens += 1
            open_[ref] = t  # (it was not open, so it was filed nowhere: I7)
            if bucket is None:
                bucket = self._fills.setdefault(fill, set())
            bucket.add(ref)
            t.fill = fill
            out.append([(block_id, 0)] if want_slots else [])
        return out

    def advance(self, held: frozenset[ThreadRef] | set[ThreadRef] = frozenset()) -> int:
        """One token for every open thread not in `held`, into its last block (never a new block, so the
        order among threads does not matter); returns how many threads advanced. Equal to `append(t, 1)`
        for each of them, in O(held + blocks filled) (the module's docstring says how)."""
        open_ = self._open
        stay = [open_[ref] for ref in held if ref in open_]
        for t in stay:  # their count written down now, and from the next tick on
            self._settle(t)
        self._tick += 1
        tick = self._tick
        blocks, keys = self._blocks, self._keys
        for t in stay:
            t.since = tick
            self._s2 += keys[t.own[-1]]  # (since one more)
            self._file(t, blocks[t.own[-1]].used)
        n = len(open_) - len(stay)
        for ref in self._fills.pop(tick, ()):  # their blocks are full now
            t = open_[ref]
            self._settle(t)
            key = keys[t.own[-1]]  # out of the open sums (`_unsum`, inlined: a block fills every few steps)
            self._s1 -= key
            self._s2 -= key * tick
            del open_[ref]
            t.fill = -1
        self._tokens += n
        return n

    def _settle(self, t: ThreadState) -> None:
        """Write down the tokens the advances since `t.since` put in an open thread's last block."""
        if t.since != self._tick:
            if t.ref in self._open:
                last = self._blocks[t.own[-1]]
                if last.refcount != 1:  # I3: an unsealed last block is never shared
                    raise LedgerError(f"write to shared block {t.own[-1]}")
                delta = self._tick - t.since
                last.used += delta
                key = self._keys[t.own[-1]]
                self._h += key * USED * delta  # the same contents: written down, and out of the open sums
                self._s2 += key * delta
            t.since = self._tick

    def _opened(self, t: ThreadState) -> None:
        """`t` (settled) is open, its last block as it is now: into `_open`, the open sums and `_fills`."""
        self._open[t.ref] = t
        key = self._keys[t.own[-1]]
        self._s1 += key
        self._s2 += key * t.since
        self._file(t, self._blocks[t.own[-1]].used)

    def _unsum(self, t: ThreadState) -> None:
        key = self._keys[t.own[-1]]
        self._s1 -= key
        self._s2 -= key * t.since

    def _file(self, t: ThreadState, used: int) -> None:
        """File a settled open thread under the tick its last block (`used` tokens now) fills at."""
        fill = self._tick + self.block_size - used
        if fill != t.fill:
            self._unfile(t)
            self._fills.setdefault(fill, set()).add(t.ref)
            t.fill = fill

    def _unfile(self, t: ThreadState) -> None:
        if t.fill >= 0:
            bucket = self._fills[t.fill]
            bucket.discard(t.ref)
            if not bucket:
                del self._fills[t.fill]
            t.fill = -1

    def _close(self, t: ThreadState) -> None:
        """`t` is open no more (settled first)."""
        self._unsum(t)
        del self._open[t.ref]
        self._unfile(t)

    # ---- whole state ----------------------------------------------------------------------------------
    def _settle_all(self) -> None:
        for t in self._open.values():
            self._settle(t)

    def reset(self) -> None:
        super().reset()
        self._fills.clear()
        self._tick = 0
        self._s1 = self._s2 = 0

    def snapshot(self) -> dict:
        self._settle_all()
        return super().snapshot()

    def _restored(self) -> None:
        self._s1, self._s2 = self._open_sums()
        for t in self._open.values():
            self._file(t, self._blocks[t.own[-1]].used)

    def _open_sums(self) -> tuple[int, int]:
        s1 = s2 = 0
        for t in self._open.values():
            key = block_key(t.own[-1])
            s1 += key
            s2 += key * t.since
        return s1, s2

    def check(self) -> None:
        self._settle_all()
        super().check()
        filed = {ref: tick for tick, refs in self._fills.items() for ref in refs}
        for t in self._open.values():
            if filed.pop(t.ref, None) != self._tick + self.block_size - self._blocks[t.own[-1]].used:
                raise LedgerError(f"I7: open thread {t.ref} not filed under the tick its block fills at")
        if filed:
            raise LedgerError(f"I7: threads {sorted(filed)} filed but not open")
        if (self._s1, self._s2) != self._open_sums():
            raise LedgerError("I9: the open sums of the contents hash are wrong")
