"""The keys of a KV ledger's contents hash (`Digest.contents`): 64 bits that change with any block's owner,
name, fill or reference count, kept up to date by the ledger as ops apply, in O(1) per change.

    contents = sum over held blocks b (in use or cached) of
               block_key(b) * (weight(b) + USED * fill(b) + COUNT * refcount(b))      mod 2^64

where `weight(b)` is `thread_key(owner)` for a block a thread owns and `name_weight(name)` for a named
one. Every term is a block's own key times a linear form of its state, so a change to one block moves
the sum by `block_key(b) * delta`, and a change to a few blocks cancels out only by a coincidence of
pseudo-random 64-bit keys. Linearity in the fill is what lets the ledger keep the hash while its
`advance` is lazy (see `KVLedger.digest`). The keys are the same in every process (no salted `hash`):
a worker and the KV manager's replica of its ledger must agree.
"""
from __future__ import annotations

import threading
import zlib
from array import array

MASK = (1 << 64) - 1
USED = 0x9E3779B97F4A7C15  # per token slot written
COUNT = 0xC2B2AE3D27D4EB4F  # per reference
NAMED = 0x165667B19E3779F9  # a named block's weight is its name times this
THREAD = 0xD6E8FEB86659FD93  # a thread's weight: its request's key plus its number times this

_KEYS = array("Q")  # block_key(i) for every id below its length, shared by every ledger of the process
_KEYS_GROW = threading.Lock()  # one thread at a time extends it (the KV manager builds replicas in several)


def block_key(block_id: int) -> int:
    """A pseudo-random odd 64-bit key of a block id (the splitmix64 finaliser)."""
    x = (block_id + 0x9E3779B97F4A7C15) & MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK
    return (x ^ (x >> 31)) | 1


def block_keys(num_blocks: int) -> array:
    """The table of `block_key` for ids 0..num_blocks-1 (and maybe more): computed once per process
    (1 s for the largest pool), then a ledger reads a block's key as `table[id]`."""
    if len(_KEYS) < num_blocks:
        with _KEYS_GROW:  # two extending at once would append the same ids twice, shifting the rest
            if len(_KEYS) < num_blocks:
                _KEYS.extend(block_key(i) for i in range(len(_KEYS), num_blocks))
    return _KEYS


def thread_key(request: str, thread: int) -> int:
    """A thread's weight: 64 bits from two checksums of its request id, and its number."""
    data = request.encode("utf-8", "surrogatepass")
    return ((zlib.crc32(data) << 32 | zlib.adler32(data)) + thread * THREAD) & MASK


def name_weight(name: int) -> int:
    return (name * NAMED) & MASK
