"""The KV ledger: which thread owns which KV block, who still reads it, and when it is free.

Plain Python bookkeeping (no torch, no gRPC): the worker asks it for slots, the engine's tensors never
come here. Data flows one way: the worker's scheduler calls `start`, `append`, `fork` and `finish` for
each step (and `truncate` to take back the slots of a rejected draft); the ledger answers with block ids and the ids it freed. The KV manager keeps a replica of
each worker's ledger (`services/kvmanager/replica.py:ReplicaLedger`, a subclass that also replays the
decode step's one-token appends as one lazy `advance`) and compares its `digest` with the worker's.

A thread's context in blocks (docs/design.md, "Threads and blocks")::

    refs (ancestors' blocks, read only)   own (this thread's blocks, it writes the last one)
    [ root b0 | root b1 | parent b4 ]     [ b7 | b9 (partly filled) ]

`fork(parent, child)` is called right after the parent's `[Fork]` token got its slot. The child's refs are
the parent's refs + the parent's own blocks; nothing is copied. The parent's last block is then *sealed*:
the child reads it, so the parent's next token opens a fresh block. That keeps the rule "no block is
written while shared" without copy-on-write, at the cost of at most one partly filled block per fork.

Invariants (docs/design.md, "Ledger invariants"; enforced where they apply, all checked by `check()`):
  I1. free + used == total, and the free list holds each free id once.
  I2. refcount(block) == (1 if its owner is running) + (number of running threads whose refs hold it);
      a block is freed exactly when its count reaches 0, never while referenced.
  I3. a thread only writes into its own last block, and only while that block's count is 1 (unshared).
  I4. after a request is released (ended, cancelled or failed) none of its blocks is in use.
  I5. a fork copies no KV: it only adds references.
  I6. `num_tokens` is the sum of the slots written in the blocks in use.
  I7. the open threads (below) are exactly those kept in `_open`.
  I8, I9: the prefix cache and the contents hash (prefix_cache.py, state.py).

A thread is *open* when it runs and its last own block is unsealed and not full: its next token goes
into that block, without taking one from the free list. Appends into open blocks commute with every
other thread's ops, which is why a step can carry them as one `advance` instead of one op per thread
(`ops.record`). The hooks `_opened` and `_close` keep `_open`; the replica extends them.
"""
from __future__ import annotations

from collections import OrderedDict, deque
from itertools import repeat

from apar.engine.kv.contents import COUNT, USED, block_keys, name_weight, thread_key
from apar.engine.kv.prefix_cache import PrefixCache
from apar.engine.kv.reads import LedgerReads
from apar.engine.kv.state import LedgerState
from apar.engine.kv.types import Block, Digest, LedgerError, OutOfBlocks, ThreadRef, ThreadState

__all__ = ["Digest", "KVLedger", "LedgerError", "OutOfBlocks", "ThreadRef"]


class KVLedger(LedgerReads, PrefixCache, LedgerState):
    """Block ownership and reference counts for every thread of every request (its queries: reads.py)."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))  # allocate from the left, freed ids go right
        self._blocks: dict[int, Block] = {}
        self._threads: dict[ThreadRef, ThreadState] = {}
        self._request_blocks: dict[str, int] = {}  # blocks in use owned by each request's threads
        self._tokens = 0  # slots written in the blocks in use (I6)
        self._open: dict[ThreadRef, ThreadState] = {}  # the open threads (I7), kept up to date by every write
        self._request_threads: dict[str, list[ThreadRef]] = {}  # every thread of each request, in start order
        self._request_named: dict[str, int] = {}  # named blocks each request's root reused or named
        self._cache: OrderedDict[int, int] = OrderedDict()  # name -> cached block (count 0), LRU first
        self._named: dict[int, int] = {}  # name -> block, in use or cached
        self.evictions = 0  # cached blocks taken for new ones, so far
        self._h = 0  # the contents hash (`digest`): every held block's term (contents.py)
        self._keys = block_keys(num_blocks)  # block id -> contents.block_key

    # ---- write side --------------------------------------------------------------------------------
    def start(self, ref: ThreadRef) -> None:
        """Register a root thread (no context yet); its prompt and tokens come by `append`."""
        if ref in self._threads:
            raise LedgerError(f"thread {ref} already exists")
        self._threads[ref] = ThreadState(ref=ref, refs=[], key=thread_key(*ref))
        self._request_blocks.setdefault(ref.request, 0)
        self._request_threads.setdefault(ref.request, []).append(ref)

    def append(self, ref: ThreadRef, n_tokens: int = 1, want_slots: bool = True) -> list[tuple[int, int]]:
        """Give `n_tokens` new tokens of a running thread their slots: a list of (block id, offset).

        Fills the thread's last block when it is unsealed, then opens fresh blocks. All or nothing:
        raises OutOfBlocks without changing anything when the free list is too short. A replica, which
        writes no KV, passes `want_slots=False` and gets an empty list.
        """
        t = self._threads.get(ref)
        if t is None or not t.running:
            raise LedgerError(f"append to {'finished' if t else 'unknown'} thread {ref}")
        if ref in self._open and n_tokens == 1:  # the decode step's case: one token, in the last block
            last = self._blocks[t.own[-1]]
            last.used += 1
            self._tokens += 1
            self._h += self._keys[t.own[-1]] * USED
            if last.used == self.block_size:
                self._close(t)
            return [(t.own[-1], last.used - 1)] if want_slots else []
        if n_tokens == 1 and ref not in self._open:  # a decode token that opens a block
            if not self._free and not self._cache:
                raise OutOfBlocks("1 block needed, 0 free")
            block_id = self._take()
            self._blocks[block_id] = Block(owner=ref, used=1)
            key = self._keys[block_id]
            self._h += key * (t.key + USED + COUNT)
            t.ctx += key
            self._request_blocks[ref.request] += 1
            t.own.append(block_id)
            t.sealed = False
            self._tokens += 1
            if self.block_size > 1:
                self._opened(t)
            return [(block_id, 0)] if want_slots else []
        need = self.blocks_needed(ref, n_tokens)
        if need > self.num_free:
            raise OutOfBlocks(f"{need} blocks needed, {self.num_free} free")
        slots: list[tuple[int, int]] = []
        remaining = n_tokens
        if ref in self._open:  # its last block may change below: open again after, if it still is
            self._close(t)
        if t.own and not t.sealed and self._blocks[t.own[-1]].used < self.block_size:
            last = self._blocks[t.own[-1]]  # (a full one may be shared: a named prompt block others reuse)
            if last.refcount != 1:  # I3
                raise LedgerError(f"write to shared block {t.own[-1]}")
            take = min(remaining, self.block_size - last.used)
            if want_slots:
                slots.extend(zip(repeat(t.own[-1]), range(last.used, last.used + take)))
            last.used += take
            self._h += self._keys[t.own[-1]] * USED * take
            remaining -= take
        while remaining:
            block_id = self._take()
            take = min(remaining, self.block_size)
            self._blocks[block_id] = Block(owner=ref, used=take)
            key = self._keys[block_id]
            self._h += key * (t.key + USED * take + COUNT)
            t.ctx += key
            self._request_blocks[ref.request] += 1
            t.own.append(block_id)
            t.sealed = False
            if want_slots:
                slots.extend(zip(repeat(block_id), range(take)))
            remaining -= take
        self._tokens += n_tokens
        if self._is_open(t):
            self._opened(t)
        return slots

    def _is_open(self, t: ThreadState) -> bool:
        return t.running and bool(t.own) and not t.sealed and self._blocks[t.own[-1]].used < self.block_size

    def _opened(self, t: ThreadState) -> None:
        """`t` is open, its last block as it is now."""
        self._open[t.ref] = t

    def _close(self, t: ThreadState) -> None:
        """`t` is open no more."""
        del self._open[t.ref]

    def truncate(self, ref: ThreadRef, n_tokens: int) -> list[int]:
        """Take back the thread's last `n_tokens` slots (a rejected draft's KV, apar/engine/speculate.py);
        returns the ids of the blocks that emptied, freed at once (a draft may have opened them).

        Only slots of the thread's own blocks with count 1 (unshared, unnamed: I3) can be taken back;
        all or nothing: LedgerError, nothing changed, otherwise. If whole blocks go and the thread's new
        last block is shared (a child reads it), the thread is sealed again, as it was before they opened.
        """
        t = self._threads.get(ref)
        if t is None or not t.running:
            raise LedgerError(f"truncate of {'finished' if t else 'unknown'} thread {ref}")
        if n_tokens <= 0:
            raise LedgerError(f"truncate of {n_tokens} tokens")
        blocks = self._blocks
        left, i = n_tokens, len(t.own)
        while left > 0:
            i -= 1
            if i < 0:
                raise LedgerError(f"truncate of {n_tokens} tokens: {ref} wrote fewer in its own blocks")
            b = blocks[t.own[i]]
            if b.refcount != 1 or b.name is not None:  # I3
                raise LedgerError(f"truncate into shared block {t.own[i]}")
            left -= b.used
        if ref in self._open:
            self._close(t)
        freed: list[int] = []
        left = n_tokens
        while left:
            block_id = t.own[-1]
            b = blocks[block_id]
            take = min(left, b.used)
            key = self._keys[block_id]
            if take == b.used:  # the block empties: free (never cached: it has no name)
                self._h -= key * (t.key + USED * b.used + COUNT)
                t.ctx -= key
                del blocks[block_id]
                t.own.pop()
                self._request_blocks[ref.request] -= 1
                self._free.append(block_id)
                freed.append(block_id)
            else:
                b.used -= take
                self._h -= key * USED * take
            self._tokens -= take
            left -= take
        if freed and t.own:
            t.sealed = blocks[t.own[-1]].refcount > 1
        if self._is_open(t):
            self._opened(t)
        return freed

    def fork(self, parent: ThreadRef, child: ThreadRef) -> None:
        """Spawn `child` reading all of `parent`'s context so far (which ends with its `[Fork]`).

        Copies no KV (I5): the child's refs are block ids whose counts go up by one. The parent's last
        block is sealed, so it is never written while shared (I3).
        """
        p = self._thread(parent)
        if not p.running:
            raise LedgerError(f"fork from finished thread {parent}")
        if child in self._threads:
            raise LedgerError(f"thread {child} already exists")
        if child.request != parent.request:
            raise LedgerError("a child belongs to its parent's request")
        refs = p.refs + p.own
        blocks = self._blocks
        for block_id in refs:
            blocks[block_id].refcount += 1
        self._h += p.ctx * COUNT
        p.sealed = True
        if parent in self._open:
            self._close(p)
        self._threads[child] = ThreadState(ref=child, refs=refs, key=thread_key(*child), ctx=p.ctx)
        self._request_threads[child.request].append(child)

    def finish(self, ref: ThreadRef) -> list[int]:
        """End a thread: drop its owner reference and its context references; return the freed ids."""
        t = self._thread(ref)
        if not t.running:
            raise LedgerError(f"thread {ref} finished twice")
        t.running = False
        if ref in self._open:
            self._close(t)
        freed: list[int] = []
        blocks = self._blocks
        self._h -= t.ctx * COUNT
        for block_id in reversed(t.refs + t.own):  # deepest first: a prefix's head is cached last
            b = blocks[block_id]
            if b.refcount > 1:  # still read by others: `_unref`'s common case, inlined
                b.refcount -= 1
            else:
                self._unref(block_id, freed)
        return freed

    def release(self, request: str) -> list[int]:
        """End every running thread of a request (done, cancelled or failed) and forget it.

        Returns the ids freed by this call; afterwards none of the request's blocks is in use (I4).
        """
        refs = self._request_threads.pop(request, [])
        self._request_named.pop(request, None)
        freed: list[int] = []
        # children first, so freed ids come out leaf to root
        for ref in sorted(refs, key=lambda r: -r.thread):
            if self._threads[ref].running:
                freed.extend(self.finish(ref))
        for ref in refs:
            del self._threads[ref]
        left = self._request_blocks.pop(request, 0)
        if left:
            raise LedgerError(f"request {request} leaked {left} blocks")
        return freed

    def _unref(self, block_id: int, freed: list[int]) -> None:
        """One reference less (the caller takes its count out of the contents hash)."""
        b = self._blocks[block_id]
        b.refcount -= 1
        if b.refcount < 0:
            raise LedgerError(f"block {block_id} dereferenced below zero")
        if b.refcount == 0:
            self._tokens -= b.used
            if b.name is not None:  # kept with its KV, evictable
                self._cache[b.name] = block_id
                return
            self._h -= self._keys[block_id] * (self._threads[b.owner].key + USED * b.used)
            del self._blocks[block_id]
            self._request_blocks[b.owner.request] -= 1
            self._free.append(block_id)
            freed.append(block_id)

    def _take(self) -> int:
        """A block for a new allocation: a free one, else the least recently cached one (evicted)."""
        if self._free:
            return self._free.popleft()
        name, block_id = self._cache.popitem(last=False)
        del self._named[name]
        b = self._blocks.pop(block_id)
        self._h -= self._keys[block_id] * (name_weight(name) + USED * b.used)
        self.evictions += 1
        return block_id

    def _thread(self, ref: ThreadRef) -> ThreadState:
        try:
            return self._threads[ref]
        except KeyError:
            raise LedgerError(f"unknown thread {ref}") from None
