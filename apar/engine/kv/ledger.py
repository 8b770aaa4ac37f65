"""The KV ledger: which thread owns which KV block, who still reads it, and when it is free.

Plain Python bookkeeping (no torch, no gRPC): the worker asks it for slots, the engine's tensors never
come here. Data flows one way: the worker's scheduler calls `start`, `append`, `fork` and `finish` for
each step; the ledger answers with block ids and the ids it freed. A replica of the ledger (the KV
manager's) replays the decode step's one-token appends as one `advance`, and compares its `digest` with
the worker's after every step.

A thread's context in blocks (SPEC sections 2 and 5)::

    refs (ancestors' blocks, read only)   own (this thread's blocks, it writes the last one)
    [ root b0 | root b1 | parent b4 ]     [ b7 | b9 (partly filled) ]

`fork(parent, child)` is called right after the parent's `[Fork]` token got its slot. The child's refs are
the parent's refs + the parent's own blocks; nothing is copied. The parent's last block is then *sealed*:
the child reads it, so the parent's next token opens a fresh block. That keeps the rule "no block is
written while shared" without copy-on-write, at the cost of at most one partly filled block per fork.

Invariants (enforced where they apply, all checked by `check()`):
  I1. free + used == total, and the free list holds each free id once.
  I2. refcount(block) == (1 if its owner is running) + (number of running threads whose refs hold it);
      a block is freed exactly when its count reaches 0, never while referenced.
  I3. a thread only writes into its own last block, and only while that block's count is 1 (unshared).
  I4. after a request is released (ended, cancelled or failed) none of its blocks is in use.
  I5. a fork copies no KV: it only adds references.
  I6. `num_tokens` is the sum of the slots written in the blocks in use.
  I7. the open threads (below) are exactly those kept in `_open`.

A thread is *open* when it runs and its last own block is unsealed and not full: its next token goes
into that block, without taking one from the free list. Appends into open blocks commute with every
other thread's ops, which is why a step can carry them as one `advance` instead of one op per thread.

Prefix cache. A full block of a prompt can be *named* (`name`: its hash chain name, apar/engine/
prefix.py): from then on it belongs to no request, is never written, and when its count reaches 0 it
is *cached* instead of freed: kept with its KV, evictable, least recently cached first. A new root
`reuse`s cached (or in use) blocks by name as read-only refs, and allocation evicts a cached block only
when no block is free, so `num_free` counts free and cached blocks alike. A thread's blocks are
released deepest first, so a prefix's head is cached last and evicted last.
  I8. a block with count 0 is cached: named, in `_cache` (LRU order), and `_named` maps every name to
      its block, in use or cached; a named block has no owner and is full.
  I9. the contents hash (`Digest.contents`, apar/engine/kv/contents.py) sums every held block's
      owner or name, fill and count, whatever ops brought the ledger there.

`advance` is lazy, so a replica's decode step costs O(held + blocks filled), not O(open threads): the
ledger counts advances (`_tick`); an open thread's last block holds `used + (_tick - since)` tokens,
where `since` is the tick its count was last written down (`_settle`). Every method that reads or
writes a thread's last block settles that thread first, and each open thread is filed under the tick
at which its block fills (`_fills`), when it is settled and closed.
"""
from __future__ import annotations

from collections import OrderedDict, deque
from itertools import repeat
from dataclasses import dataclass, field
from typing import NamedTuple

from apar.engine.kv.contents import COUNT, MASK, USED, block_key, block_keys, name_weight, thread_key


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
class _Block:
    owner: ThreadRef | None  # None once named: a shared prefix block belongs to no request
    refcount: int = 1
    used: int = 0  # token slots written
    name: int | None = None  # its prefix name, once a prompt's block was named (see the docstring)


@dataclass(slots=True)
class _Thread:
    ref: ThreadRef
    refs: list[int]
    own: list[int] = field(default_factory=list)
    sealed: bool = False  # last own block shared with a child: the next token opens a new block
    running: bool = True
    since: int = 0  # open: the ledger's tick when its last block's `used` was written down
    fill: int = -1  # open: the tick its last block fills at (its key in `_fills`)
    key: int = 0  # contents.thread_key of its ref: the weight of the blocks it owns
    ctx: int = 0  # the sum of the block keys of `refs + own` (its references, in the contents hash)


class KVLedger:
    """Block ownership and reference counts for every thread of every request."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))  # allocate from the left, freed ids go right
        self._blocks: dict[int, _Block] = {}
        self._threads: dict[ThreadRef, _Thread] = {}
        self._request_blocks: dict[str, int] = {}  # blocks in use owned by each request's threads
        self._tokens = 0  # slots written in the blocks in use (I6)
        self._open: dict[ThreadRef, _Thread] = {}  # the open threads (I7), kept up to date by every write
        self._request_threads: dict[str, list[ThreadRef]] = {}  # every thread of each request, in start order
        self._request_named: dict[str, int] = {}  # named blocks each request's root reused or named
        self._cache: OrderedDict[int, int] = OrderedDict()  # name -> cached block (count 0), LRU first
        self._named: dict[int, int] = {}  # name -> block, in use or cached
        self.evictions = 0  # cached blocks taken for new ones, so far
        self._tick = 0  # advances so far (see the module's docstring)
        self._fills: dict[int, set[ThreadRef]] = {}  # tick -> the open threads whose last block fills then
        # the contents hash (`digest`): `_h` sums every held block's term with the fills written down;
        # `_s1` and `_s2` sum block_key(last block) and block_key(last block) * since over the open
        # threads, whose blocks hold `tick - since` tokens more than written down
        self._h = self._s1 = self._s2 = 0
        self._keys = block_keys(num_blocks)  # block id -> contents.block_key

    # ---- read side ---------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks an allocation can take: free ones and cached ones (evicted when needed)."""
        return len(self._free) + len(self._cache)

    @property
    def num_used(self) -> int:
        """Blocks some running thread reads or writes."""
        return len(self._blocks) - len(self._cache)

    @property
    def num_cached(self) -> int:
        return len(self._cache)

    def cached_prefix(self, names) -> int:
        """How many of `names` (a prompt's block names, in order) this ledger holds, from the first on."""
        n = 0
        for name in names:
            if name not in self._named:
                break
            n += 1
        return n

    def cached_among(self, names) -> int:
        """How many of the held blocks named `names` are cached (no thread reads them): what reusing them
        takes from `num_free`. One that a running thread reads is shared, and takes nothing."""
        blocks, named = self._blocks, self._named
        return sum(blocks[named[name]].refcount == 0 for name in names)

    def reusable(self, names, n_tokens: int) -> int:
        """The blocks a new root with this prompt (`n_tokens` tokens, `names` its full blocks' names)
        reuses: the cached prefix, leaving at least one prompt token to compute (its logits are needed)."""
        return min(self.cached_prefix(names), (n_tokens - 1) // self.block_size)

    @property
    def num_tokens(self) -> int:
        return self._tokens

    @property
    def num_requests(self) -> int:
        """Requests started and not released."""
        return len(self._request_blocks)

    def digest(self) -> Digest:
        nxt = self._free[0] if self._free else next(iter(self._cache.values())) if self._cache else -1
        contents = (self._h + USED * (self._tick * self._s1 - self._s2)) & MASK
        return Digest(len(self._free), len(self._blocks), len(self._threads), self._tokens, nxt, len(self._named),
                      contents)

    def open_threads(self) -> set[ThreadRef]:
        """The running threads whose next token fits in their last own block (unsealed, not full)."""
        return set(self._open)

    def _is_open(self, t: _Thread) -> bool:
        return t.running and bool(t.own) and not t.sealed and self._blocks[t.own[-1]].used < self.block_size

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
            self._settle(t)
            return self.block_size - self._blocks[t.own[-1]].used
        return 0

    def blocks_needed(self, ref: ThreadRef | None, n_tokens: int) -> int:
        """New blocks that appending `n_tokens` to `ref` (or to a new thread if None) would take."""
        extra = max(0, n_tokens - (self.room(ref) if ref is not None else 0))
        return -(-extra // self.block_size)

    # ---- write side --------------------------------------------------------------------------------
    def start(self, ref: ThreadRef) -> None:
        """Register a root thread (no context yet); its prompt and tokens come by `append`."""
        if ref in self._threads:
            raise LedgerError(f"thread {ref} already exists")
        self._threads[ref] = _Thread(ref=ref, refs=[], key=thread_key(*ref))
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
        if ref in self._open:
            self._settle(t)
            if n_tokens == 1:  # the decode step's case: one token, in the last block
                last = self._blocks[t.own[-1]]
                last.used += 1
                self._tokens += 1
                self._h += self._keys[t.own[-1]] * USED
                if last.used == self.block_size:
                    self._close(t)
                else:
                    self._file(t, last.used)
                return [(t.own[-1], last.used - 1)] if want_slots else []
        else:
            t.since = self._tick  # (settled: nothing to write down for a thread that is not open)
            if n_tokens == 1:  # a decode token that opens a block
                if not self._free and not self._cache:
                    raise OutOfBlocks("1 block needed, 0 free")
                block_id = self._take()
                self._blocks[block_id] = _Block(owner=ref, used=1)
                key = self._keys[block_id]
                self._h += key * (t.key + USED + COUNT)
                t.ctx += key
                self._request_blocks[ref.request] += 1
                t.own.append(block_id)
                t.sealed = False
                self._tokens += 1
                if self.block_size > 1:
                    self._opened(t)
                    self._file(t, 1)
                return [(block_id, 0)] if want_slots else []
        need = self.blocks_needed(ref, n_tokens)
        if need > self.num_free:
            raise OutOfBlocks(f"{need} blocks needed, {self.num_free} free")
        slots: list[tuple[int, int]] = []
        remaining = n_tokens
        was_open = ref in self._open
        if was_open:  # (settled) its last block may change below: out of the open sums until then
            self._unsum(t)
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
            self._blocks[block_id] = _Block(owner=ref, used=take)
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
            self._file(t, self._blocks[t.own[-1]].used)
        elif was_open:
            del self._open[ref]
            self._unfile(t)
        return slots

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
            blocks[block_id] = _Block(ref, 1, 1)  # (owner, refcount, used: by keyword it costs more)
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

    def _settle(self, t: _Thread) -> None:
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

    def _opened(self, t: _Thread) -> None:
        """`t` (settled) is open, its last block as it is now: into `_open` and the open sums."""
        self._open[t.ref] = t
        key = self._keys[t.own[-1]]
        self._s1 += key
        self._s2 += key * t.since

    def _unsum(self, t: _Thread) -> None:
        key = self._keys[t.own[-1]]
        self._s1 -= key
        self._s2 -= key * t.since

    def _file(self, t: _Thread, used: int) -> None:
        """File a settled open thread under the tick its last block (`used` tokens now) fills at."""
        fill = self._tick + self.block_size - used
        if fill != t.fill:
            self._unfile(t)
            self._fills.setdefault(fill, set()).add(t.ref)
            t.fill = fill

    def _unfile(self, t: _Thread) -> None:
        if t.fill >= 0:
            bucket = self._fills[t.fill]
            bucket.discard(t.ref)
            if not bucket:
                del self._fills[t.fill]
            t.fill = -1

    def _close(self, t: _Thread) -> None:
        """`t` is open no more (settled first)."""
        self._unsum(t)
        del self._open[t.ref]
        self._unfile(t)

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
        self._settle(p)
        refs = p.refs + p.own
        blocks = self._blocks
        for block_id in refs:
            blocks[block_id].refcount += 1
        self._h += p.ctx * COUNT
        p.sealed = True
        if parent in self._open:
            self._close(p)
        self._threads[child] = _Thread(ref=child, refs=refs, key=thread_key(*child), ctx=p.ctx)
        self._request_threads[child.request].append(child)

    def finish(self, ref: ThreadRef) -> list[int]:
        """End a thread: drop its owner reference and its context references; return the freed ids."""
        t = self._thread(ref)
        if not t.running:
            raise LedgerError(f"thread {ref} finished twice")
        self._settle(t)
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

    # ---- prefix cache ------------------------------------------------------------------------------
    def reuse(self, ref: ThreadRef, names) -> None:
        """A root just started (no blocks yet) begins its context with the blocks named `names`, as
        read-only refs: cached ones come back into use. All or nothing: LedgerError if one is not held."""
        t = self._thread(ref)
        if not t.running or t.refs or t.own:
            raise LedgerError(f"reuse by {ref}: only a running root with no blocks yet can reuse blocks")
        ids = [self._named.get(name) for name in names]
        if None in ids:
            raise LedgerError(f"reuse by {ref}: block named {names[ids.index(None)]} is not held")
        for name, block_id in zip(names, ids):
            b = self._blocks[block_id]
            if b.refcount == 0:
                del self._cache[name]
                self._tokens += b.used
            b.refcount += 1
        keys = self._keys
        t.ctx = sum([keys[i] for i in ids])
        self._h += t.ctx * COUNT
        t.refs = ids
        self._request_named[ref.request] = self._request_named.get(ref.request, 0) + len(ids)

    def name(self, ref: ThreadRef, first: int, names) -> int:
        """Name the thread's context blocks `first ..` (full blocks of its own) `names`, in order; a name
        another block already holds is skipped (that block stays unnamed). Returns how many were named."""
        t = self._thread(ref)
        ctx = t.refs + t.own
        if first < len(t.refs) or first + len(names) > len(ctx):
            raise LedgerError(f"name by {ref}: blocks {first}..{first + len(names) - 1} are not its own")
        blocks = [self._blocks[block_id] for block_id in ctx[first:first + len(names)]]
        if any(b.used != self.block_size or b.name is not None for b in blocks):
            raise LedgerError(f"name by {ref}: only full, unnamed blocks can be named")
        named = 0
        for name, block_id, b in zip(names, ctx[first:], blocks):
            if name in self._named:
                continue
            b.name = name
            self._named[name] = block_id
            self._request_blocks[b.owner.request] -= 1
            self._h += self._keys[block_id] * (name_weight(name) - t.key)  # (its own block: `t` owns it)
            b.owner = None
            named += 1
        if named:
            self._request_named[ref.request] = self._request_named.get(ref.request, 0) + named
        return named

    def _named_read(self, t: _Thread) -> int:
        """The named blocks in use among the thread's context (a finished thread's may be gone)."""
        return sum(self._blocks[i].name is not None for i in t.refs + t.own if i in self._blocks)

    def _thread(self, ref: ThreadRef) -> _Thread:
        try:
            return self._threads[ref]
        except KeyError:
            raise LedgerError(f"unknown thread {ref}") from None

    # ---- snapshot and restore ------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget everything: all blocks free in id order, as a new ledger of the same size."""
        self._free = deque(range(self.num_blocks))
        self._blocks.clear()
        self._threads.clear()
        self._request_blocks.clear()
        self._tokens = 0
        self._open.clear()
        self._request_threads.clear()
        self._request_named.clear()
        self._fills.clear()
        self._tick = 0
        self._cache.clear()
        self._named.clear()
        self._h = self._s1 = self._s2 = 0

    def _settle_all(self) -> None:
        for t in self._open.values():
            self._settle(t)

    def snapshot(self) -> dict:
        """The whole ledger as plain JSON-able data, every order kept (free list, thread and block lists).

        `from_snapshot(led.snapshot())` behaves exactly like `led` for every later call: the ledger is
        deterministic, so the KV manager restores a worker's ledger from a snapshot plus the ops since.
        """
        self._settle_all()
        return {
            "num_blocks": self.num_blocks,
            "block_size": self.block_size,
            "free": list(self._free),
            "blocks": [[i, *(b.owner or (None, None)), b.refcount, b.used, b.name] for i, b in self._blocks.items()],
            "cache": list(self._cache.values()),  # cached blocks, least recently cached first
            "threads": [[t.ref.request, t.ref.thread, list(t.refs), list(t.own), t.sealed, t.running]
                        for t in self._threads.values()],
            "requests": [[r, n] for r, n in self._request_blocks.items()],
        }

    @classmethod
    def from_snapshot(cls, data: dict) -> KVLedger:
        """Rebuild a ledger from `snapshot()`; raises LedgerError when the data breaks an invariant."""
        try:
            led = cls(int(data["num_blocks"]), int(data["block_size"]))
            led._free = deque(int(i) for i in data["free"])
            led._blocks = {}
            for i, r, t, c, u, *name in data["blocks"]:  # no name: written before the prefix cache
                name = name[0] if name else None
                led._blocks[int(i)] = _Block(owner=None if r is None else ThreadRef(str(r), int(t)), refcount=int(c),
                                             used=int(u), name=None if name is None else int(name))
            led._named = {b.name: i for i, b in led._blocks.items() if b.name is not None}
            led._cache = OrderedDict((led._blocks[int(i)].name, int(i)) for i in data.get("cache", []))
            led._threads = {}
            for r, t, refs, own, sealed, running in data["threads"]:
                ref = ThreadRef(str(r), int(t))
                led._threads[ref] = _Thread(ref=ref, refs=[int(i) for i in refs], own=[int(i) for i in own],
                                            sealed=bool(sealed), running=bool(running), key=thread_key(*ref))
            led._request_blocks = {str(r): int(n) for r, n in data["requests"]}
            led._tokens = sum(b.used for b in led._blocks.values() if b.refcount)
            led._open = {t.ref: t for t in led._threads.values() if led._is_open(t)}
            for t in led._threads.values():
                led._request_threads.setdefault(t.ref.request, []).append(t.ref)
                if t.ref.thread == 0:  # a root: the named blocks of its context are its request's
                    named = led._named_read(t)
                    if named:
                        led._request_named[t.ref.request] = named
            for t in led._open.values():
                led._file(t, led._blocks[t.own[-1]].used)
            keys = led._keys
            for t in led._threads.values():
                t.ctx = sum([keys[i] for i in t.refs]) + sum([keys[i] for i in t.own])
            led._h, led._s1, led._s2 = led._recount()
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise LedgerError(f"malformed ledger snapshot: {exc}") from None
        if set(led._free) | set(led._blocks) != set(range(led.num_blocks)):
            raise LedgerError("I1: snapshot block ids are not 0..num_blocks-1")
        led.check()
        return led

    # ---- invariants --------------------------------------------------------------------------------
    def _recount(self) -> tuple[int, int, int]:
        """The contents hash's sums (`_h`, `_s1`, `_s2`) from scratch, from the block ids and owners."""
        h, weights = 0, {}
        for i, b in self._blocks.items():
            if b.name is not None:
                weight = name_weight(b.name)
            else:
                weight = weights.get(b.owner)
                if weight is None:
                    weight = weights[b.owner] = thread_key(*b.owner)
            h += block_key(i) * (weight + USED * b.used + COUNT * b.refcount)
        s1 = s2 = 0
        for t in self._open.values():
            key = block_key(t.own[-1])
            s1 += key
            s2 += key * t.since
        return h, s1, s2

    def check(self) -> None:
        """Verify I1-I4 and I6-I9 from scratch; raises LedgerError naming the first broken one."""
        self._settle_all()
        free = list(self._free)
        if len(set(free)) != len(free):
            raise LedgerError("I1: a block is on the free list twice")
        if set(free) & set(self._blocks):
            raise LedgerError("I1: a block is both free and in use")
        if len(free) + len(self._blocks) != self.num_blocks:
            raise LedgerError("I1: free + used + cached != total")
        expected: dict[int, int] = {}
        for t in self._threads.values():
            if not t.running:
                continue
            for block_id in t.own:
                expected[block_id] = expected.get(block_id, 0) + 1
            for block_id in t.refs:
                expected[block_id] = expected.get(block_id, 0) + 1
        for block_id, b in self._blocks.items():
            if b.refcount != expected.get(block_id, 0):
                raise LedgerError(
                    f"I2: block {block_id} count {b.refcount}, expected {expected.get(block_id, 0)}"
                )
        missing = set(expected) - set(self._blocks)
        if missing:
            raise LedgerError(f"I2: referenced blocks {sorted(missing)} are free")
        per_request: dict[str, int] = {}
        for b in self._blocks.values():
            if b.owner is not None:
                per_request[b.owner.request] = per_request.get(b.owner.request, 0) + 1
        for request, n in self._request_blocks.items():
            if per_request.get(request, 0) != n:
                raise LedgerError(f"I4: request {request} counts {n} blocks, owns {per_request.get(request, 0)}")
        orphans = set(per_request) - set(self._request_blocks)
        if orphans:
            raise LedgerError(f"I4: blocks of released requests {sorted(orphans)} still in use")
        written = sum(b.used for b in self._blocks.values() if b.refcount)
        if self._tokens != written:
            raise LedgerError(f"I6: {self._tokens} tokens counted, {written} written")
        really_open = {t.ref for t in self._threads.values() if self._is_open(t)}
        if really_open != set(self._open):
            raise LedgerError(f"I7: open threads {sorted(really_open ^ set(self._open))} not kept as such")
        filed = {ref: tick for tick, refs in self._fills.items() for ref in refs}
        for t in self._open.values():
            if filed.pop(t.ref, None) != self._tick + self.block_size - self._blocks[t.own[-1]].used:
                raise LedgerError(f"I7: open thread {t.ref} not filed under the tick its block fills at")
        if filed:
            raise LedgerError(f"I7: threads {sorted(filed)} filed but not open")
        zero = {i for i, b in self._blocks.items() if b.refcount == 0}
        if zero != set(self._cache.values()) or len(self._cache) != len(zero):
            raise LedgerError(f"I8: blocks {sorted(zero ^ set(self._cache.values()))} unreferenced but not cached, "
                              "or cached but referenced")
        if any(self._blocks[i].name != name for name, i in self._cache.items()):
            raise LedgerError("I8: a cached block is filed under another name")
        names = {b.name: i for i, b in self._blocks.items() if b.name is not None}
        if names != self._named:
            raise LedgerError("I8: the name index does not match the named blocks")
        for i in names.values():
            b = self._blocks[i]
            if b.owner is not None or b.used != self.block_size:
                raise LedgerError(f"I8: named block {i} has an owner or is not full")
        for t in self._threads.values():
            if t.ref.thread == 0 and t.running:
                held = self._named_read(t)
                if self._request_named.get(t.ref.request, 0) != held:
                    raise LedgerError(f"I8: request {t.ref.request} counts {self._request_named.get(t.ref.request, 0)} "
                                      f"named blocks, its root reads {held}")
        if (self._h, self._s1, self._s2) != self._recount():
            raise LedgerError("I9: the contents hash does not sum the blocks held")
        if any(t.key != thread_key(*t.ref) or t.ctx != sum(block_key(i) for i in t.refs + t.own)
               for t in self._threads.values()):
            raise LedgerError("I9: a thread's key or its context's key sum is wrong")
