"""The ledger's prefix cache: named prompt blocks, kept with their KV after use, reused by new roots.

A full block of a prompt can be *named* (`name`: its hash chain name, apar/engine/
prefix.py): from then on it belongs to no request, is never written, and when its count reaches 0 it
is *cached* instead of freed: kept with its KV, evictable, least recently cached first. A new root
`reuse`s cached (or in use) blocks by name as read-only refs, and allocation evicts a cached block only
when no block is free, so `num_free` counts free and cached blocks alike. A thread's blocks are
released deepest first, so a prefix's head is cached last and evicted last.
  I8. a block with count 0 is cached: named, in `_cache` (LRU order), and `_named` maps every name to
      its block, in use or cached; a named block has no owner and is full.
  I9. the contents hash (`Digest.contents`, contents.py) sums every held block's
      owner or name, fill and count, whatever ops brought the ledger there.

`PrefixCache` is a part of `KVLedger` (a mixin over the ledger's own state, docs/design.md, "Prefix
index"); it is not used alone.
"""
from __future__ import annotations

from apar.engine.kv.contents import COUNT, name_weight
from apar.engine.kv.types import LedgerError, ThreadRef, ThreadState


class PrefixCache:
    """Naming, caching and reusing full prompt blocks (the `KVLedger` methods of the prefix cache)."""

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

    def cached_names(self, names) -> list[int]:
        """Those of `names` (of held blocks) whose blocks are cached: `cached_among`'s, by name."""
        blocks, named = self._blocks, self._named
        return [name for name in names if blocks[named[name]].refcount == 0]

    def reusable(self, names, n_tokens: int) -> int:
        """The blocks a new root with this prompt (`n_tokens` tokens, `names` its full blocks' names)
        reuses: the cached prefix, leaving at least one prompt token to compute (its logits are needed)."""
        return min(self.cached_prefix(names), (n_tokens - 1) // self.block_size)

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

    def _named_read(self, t: ThreadState) -> int:
        """The named blocks in use among the thread's context (a finished thread's may be gone)."""
        return sum(self._blocks[i].name is not None for i in t.refs + t.own if i in self._blocks)
