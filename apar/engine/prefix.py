"""Names of KV blocks by content, shared by the router, the workers and the KV manager (no torch).

A prompt's full blocks are named by a hash chain: block i's name hashes block i-1's name and block i's
token ids, so a name stands for the whole prefix up to the end of its block, and two prompts share the
names of exactly the blocks of their common prefix. BLAKE2b (8 bytes, as an unsigned 64-bit integer:
it fits a protobuf uint64 and a JSON number) is stable across processes and machines, which Python's
`hash` is not. The block size is part of every name: pools of different block sizes never match.

A `salt` (a 64-bit integer, 0 for none) is part of every name too: prompts with different salts never
share a block. The router salts each API key's prompts with the key's own value, so one key's requests
neither hit nor reveal (through `cached_tokens` or the time to the first token) another key's prompts.
"""
from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence


def block_hashes(token_ids: Sequence[int], block_size: int, limit: int | None = None, salt: int = 0) -> list[int]:
    """The names of the full blocks of `token_ids` (at most `limit` of them), in order, under `salt`."""
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    if not 0 <= salt < 1 << 64:
        raise ValueError("salt must be an unsigned 64-bit integer")
    n = len(token_ids) // block_size
    if limit is not None:
        n = min(n, limit)
    names: list[int] = []
    prev = block_size.to_bytes(8, "little") + (salt.to_bytes(8, "little") if salt else b"")
    for i in range(n):
        h = hashlib.blake2b(prev, digest_size=8)
        h.update(struct.pack(f"<{block_size}I", *token_ids[i * block_size:(i + 1) * block_size]))
        prev = h.digest()
        names.append(int.from_bytes(prev, "little"))
    return names
