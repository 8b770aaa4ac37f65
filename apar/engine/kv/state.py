"""The ledger's whole state at once: reset, snapshot and restore, and `check()` of every invariant.

`LedgerState` is a part of `KVLedger` (a mixin over the ledger's own state); it is not used alone. The
invariants it checks are listed in ledger.py and docs/design.md, "Ledger invariants".
"""
from __future__ import annotations

from collections import OrderedDict, deque

from apar.engine.kv.contents import COUNT, USED, name_weight, thread_key
from apar.engine.kv.types import Block, LedgerError, ThreadRef, ThreadState


class LedgerState:
    """Snapshot, restore and invariant checks (the `KVLedger` methods that read or write all of it)."""

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
        self._cache.clear()
        self._named.clear()
        self._h = 0

    def snapshot(self) -> dict:
        """The whole ledger as plain JSON-able data, every order kept (free list, thread and block lists).

        `from_snapshot(led.snapshot())` behaves exactly like `led` for every later call: the ledger is
        deterministic, so the KV manager restores a worker's ledger from a snapshot plus the ops since.
        """
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
    def from_snapshot(cls, data: dict):
        """Rebuild a ledger from `snapshot()`; raises LedgerError when the data breaks an invariant."""
        try:
            led = cls(int(data["num_blocks"]), int(data["block_size"]))
            led._free = deque(int(i) for i in data["free"])
            led._blocks = blocks = {}
            owners: dict = {}  # one ThreadRef per owner (a pool of 2^20 blocks has about 3,500)
            for row in data["blocks"]:
                i, r, t, c, u = row[:5]
                name = row[5] if len(row) == 6 else None  # no name: written before the prefix cache
                if len(row) not in (5, 6):
                    raise ValueError(f"a block is [id, request, thread, count, used, name], not {row!r}")
                if r is None:
                    owner = None
                else:
                    owner = owners.get((r, t))
                    if owner is None:
                        owner = owners[(r, t)] = ThreadRef(str(r), int(t))
                blocks[int(i)] = Block(owner, int(c), int(u), None if name is None else int(name))
            led._named = {b.name: i for i, b in led._blocks.items() if b.name is not None}
            led._cache = OrderedDict((led._blocks[int(i)].name, int(i)) for i in data.get("cache", []))
            led._threads = {}
            for r, t, refs, own, sealed, running in data["threads"]:
                ref = ThreadRef(str(r), int(t))
                led._threads[ref] = ThreadState(ref=ref, refs=[int(i) for i in refs], own=[int(i) for i in own],
                                            sealed=bool(sealed), running=bool(running), key=thread_key(*ref))
            led._request_blocks = {str(r): int(n) for r, n in data["requests"]}
            led._tokens = sum(b.used for b in led._blocks.values() if b.refcount)
            led._open = {t.ref: t for t in led._threads.values() if led._is_open(t)}
            for t in led._threads.values():
                led._request_threads.setdefault(t.ref.request, []).append(t.ref)
                if t.ref.thread == 0 and led._named:  # a root: the named blocks of its context are its request's
                    named = led._named_read(t)
                    if named:
                        led._request_named[t.ref.request] = named
            keys = led._keys
            for t in led._threads.values():
                t.ctx = sum([keys[i] for i in t.refs]) + sum([keys[i] for i in t.own])
            led._h = led._recount()
            led._restored()
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise LedgerError(f"malformed ledger snapshot: {exc}") from None
        if set(led._free) | set(led._blocks) != set(range(led.num_blocks)):
            raise LedgerError("I1: snapshot block ids are not 0..num_blocks-1")
        led.check()
        return led

    def _restored(self) -> None:
        """Called by `from_snapshot` once the state is in: a subclass rebuilds what it keeps beside it."""

    # ---- invariants --------------------------------------------------------------------------------
    def _recount(self) -> int:
        """The contents hash's sum (`_h`) from scratch, from the block ids and owners (`_keys[i]` is
        `block_key(i)`, computed once per process)."""
        h, weights, keys = 0, {}, self._keys
        for i, b in self._blocks.items():
            if b.name is not None:
                weight = name_weight(b.name)
            else:
                weight = weights.get(b.owner)
                if weight is None:
                    weight = weights[b.owner] = thread_key(*b.owner)
            h += keys[i] * (weight + USED * b.used + COUNT * b.refcount)
        return h

    def check(self) -> None:
        """Verify I1-I4 and I6-I9 from scratch; raises LedgerError naming the first broken one."""
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
                held = self._named_read(t) if self._named else 0
                if self._request_named.get(t.ref.request, 0) != held:
                    raise LedgerError(f"I8: request {t.ref.request} counts {self._request_named.get(t.ref.request, 0)} "
                                      f"named blocks, its root reads {held}")
        if self._h != self._recount():
            raise LedgerError("I9: the contents hash does not sum the blocks held")
        keys = self._keys
        if any(t.key != thread_key(*t.ref) or t.ctx != sum([keys[i] for i in t.refs + t.own])
               for t in self._threads.values()):
            raise LedgerError("I9: a thread's key or its context's key sum is wrong")
