"""Which KV manager shard holds a worker's replica: rendezvous (highest random weight) hashing.

Every worker and router is given the same list of shard addresses (`--kvmanager host1:p1,host2:p2`).
A worker hashes its id with each address and takes the shard that scores highest, so each shard owns
a stable share of the workers, and adding or removing a shard moves only the workers that go to or come
from it. Each shard keeps its ledgers under its own Redis prefix (or in its own Redis); the router asks
every shard for usage. A shard's restart touches only its own workers.
"""
from __future__ import annotations

import hashlib


def parse_shards(spec: str) -> list[str]:
    """`host1:p1,host2:p2` as a list of addresses (order does not matter; duplicates are dropped)."""
    shards = list(dict.fromkeys(a.strip() for a in spec.split(",") if a.strip()))
    if not shards:
        raise ValueError("no KV manager address given")
    return shards


def shard_for(worker_id: str, shards: list[str]) -> str:
    """The address of the shard that owns `worker_id`."""
    def score(shard: str) -> bytes:
        return hashlib.blake2b(f"{shard}\0{worker_id}".encode(), digest_size=8).digest()

    return max(shards, key=score)
