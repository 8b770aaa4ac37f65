"""Redis persistence of every worker's ledger: a snapshot plus a log of the messages applied since.

Keys (P is the prefix, default `apar:`; W a worker id)::

    P kv:workers        hash  W -> spec JSON (address, pool size, ttl): which ledgers exist
    P kv:w:W:snap       hash  base -> n of the snapshot, data -> snapshot JSON (json_forms.snapshot_to_json)
    P kv:w:W:log        list  entries base+1, base+2, ... (json_forms.entry_to_json), one per message applied
    P kv:w:W:alive      string with EX ttl: the worker's registration, refreshed by Heartbeat
    P kv:intact         set once the store holds every ledger; gone means Redis lost its data

Each shard of KV managers has its own prefix (or its own Redis). Data flows one way: the manager applies
messages in memory and acknowledges them, then its writer `commit`s what every message of the round
changed in ONE pipelined MULTI/EXEC round trip (a worker's log entries pushed, or, every
`snapshot_every` entries and after a resync, its fresh snapshot written and its log emptied). The
transaction also reads `intact` and each snapshot's base, and RPUSH answers the log's length: if Redis
restarted empty or from an old dump, `commit` names the records it found behind, and the manager
rewrites the store from memory. `load` rebuilds every ledger from its snapshot and log; entries are
numbered, so one pushed twice (a retried EXEC whose reply was lost) is skipped.

Every Redis error becomes `StoreUnavailable`; redis-py reconnects by itself on the next call, with a few
retries and exponential backoff inside each call.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from services.kvmanager.json_forms import entry_from_json, record_from_json, snapshot_to_json, spec_from_json, spec_to_json
from services.kvmanager.records import StoreUnavailable, WorkerRecord, WorkerSpec, replay_entry
from services.security import mask_url

log = logging.getLogger(__name__)


def connect(url: str) -> redis.Redis:
    """A client that fails fast (1 s to connect) and retries a call 3 times with backoff (20 ms..400 ms)."""
    return redis.Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=2.0,
                                retry=Retry(ExponentialBackoff(cap=0.4, base=0.02), 3),
                                retry_on_error=[RedisConnectionError, RedisTimeoutError])


@dataclass(slots=True)
class Write:
    """What one commit writes for one record: its new log entries, or (snapshot set) its whole state,
    as of entry `n`; `base` is the snapshot's n the store should hold before it. The manager takes a
    snapshot as `json_forms.snapshot_of` data under its lock and encodes it (`snapshot_to_json`) after."""

    rec: WorkerRecord
    n: int
    base: int
    entries: list[str]
    snapshot: str | dict | None = None


class RedisStore:
    def __init__(self, url: str = "redis://127.0.0.1:6379/0", prefix: str = "apar:", snapshot_every: int = 256,
                 on_round_trip: Callable[[], None] | None = None, client: redis.Redis | None = None) -> None:
        if snapshot_every < 1:
            raise ValueError("snapshot_every must be 1 or more")
        self.url = mask_url(url)  # for messages: the password never leaves `connect`
        self.client = client if client is not None else connect(url)
        self.prefix = prefix
        self.snapshot_every = snapshot_every
        self.on_round_trip = on_round_trip
        self._workers = f"{prefix}kv:workers"
        self._intact = f"{prefix}kv:intact"

    def _key(self, worker_id: str, part: str) -> str:
        return f"{self.prefix}kv:w:{worker_id}:{part}"

    def _run(self, build: Callable) -> list:
        """Queue commands with `build(pipe)` and send them as ONE MULTI/EXEC round trip."""
        try:
            pipe = self.client.pipeline(transaction=True)
            build(pipe)
            if self.on_round_trip is not None:
                self.on_round_trip()
            return pipe.execute()
        except RedisError as exc:
            raise StoreUnavailable(f"Redis at {self.url}: {type(exc).__name__}: {exc}") from None

    # ---- one round trip each -----------------------------------------------------------------------
    def commit(self, writes: list[Write]) -> list[WorkerRecord]:
        """Persist every write in ONE transaction; returns the records Redis turned out not to hold up to
        their `base` (it lost data): the manager rewrites those from memory."""
        def build(p) -> None:
            p.exists(self._intact)
            for w in writes:
                snap, logkey = self._key(w.rec.worker_id, "snap"), self._key(w.rec.worker_id, "log")
                p.hget(snap, "base")
                if w.snapshot is not None:  # the state at n, so the log restarts with entry n + 1
                    p.hset(snap, mapping={"base": w.n, "data": w.snapshot})
                    p.delete(logkey)
                else:
                    p.rpush(logkey, *w.entries)

        out = self._run(build)
        intact, lost, i = bool(out[0]), [], 1
        for w in writes:
            base = out[i]
            if w.snapshot is not None:
                ok, i = True, i + 3
            else:
                ok, i = out[i + 1] >= w.n - w.base, i + 2
            if not (intact and ok and base is not None and int(base) == w.base):
                lost.append(w.rec)
            elif w.snapshot is not None:
                w.rec.base = w.n
        return lost

    def save(self, rec: WorkerRecord, set_alive: bool) -> None:
        """Write a record whole (fresh registration, or a rewrite from memory) and empty its log."""
        def build(p) -> None:
            p.delete(self._key(rec.worker_id, "log"))
            p.hset(self._key(rec.worker_id, "snap"), mapping={"base": rec.n, "data": snapshot_to_json(rec)})
            p.hset(self._workers, rec.worker_id, spec_to_json(rec.spec))
            if set_alive:
                p.set(self._key(rec.worker_id, "alive"), 1, ex=rec.spec.ttl_s)

        self._run(build)
        rec.base = rec.n

    def renew(self, spec: WorkerSpec) -> None:
        """A known worker registered again: keep its ledger, store its (maybe new) address and ttl."""
        self._run(lambda p: (p.hset(self._workers, spec.worker_id, spec_to_json(spec)),
                             p.set(self._key(spec.worker_id, "alive"), 1, ex=spec.ttl_s)))

    def touch(self, spec: WorkerSpec) -> bool:
        """Heartbeat: extend the registration; False when it had already expired."""
        return bool(self._run(lambda p: p.expire(self._key(spec.worker_id, "alive"), spec.ttl_s))[0])

    def alive(self, worker_ids: list[str]) -> tuple[bool, set[str]]:
        """(store intact, the workers whose registration has not expired)."""
        out = self._run(lambda p: [p.exists(self._intact), *(p.exists(self._key(w, "alive")) for w in worker_ids)])
        return bool(out[0]), {w for w, n in zip(worker_ids, out[1:]) if n}

    def drop(self, worker_id: str) -> None:
        self._run(lambda p: (p.delete(*(self._key(worker_id, k) for k in ("snap", "log", "alive"))),
                             p.hdel(self._workers, worker_id)))

    def ping(self) -> None:
        self._run(lambda p: p.ping())

    def mark_intact(self) -> None:
        self._run(lambda p: p.set(self._intact, 1))

    # ---- restore ----------------------------------------------------------------------------------
    def load(self) -> tuple[bool, dict[str, WorkerRecord]]:
        """(store intact, every worker's record rebuilt from snapshot + log). Two round trips."""
        intact, specs = self._run(lambda p: (p.exists(self._intact), p.hgetall(self._workers)))
        ids = sorted(k.decode() for k in specs)
        out = self._run(lambda p: [(p.hgetall(self._key(w, "snap")), p.lrange(self._key(w, "log"), 0, -1))
                                   for w in ids])
        records: dict[str, WorkerRecord] = {}
        for i, w in enumerate(ids):
            try:
                records[w] = self._rebuild(specs[w.encode()], out[2 * i], out[2 * i + 1])
            except Exception as exc:  # a record that does not load is reported, never half-restored
                log.error("ledger of worker %s could not be restored: %s: %s", w, type(exc).__name__, exc)
        return bool(intact), records

    @staticmethod
    def _rebuild(spec_json: bytes, snap: dict, entries: list[bytes]) -> WorkerRecord:
        if b"data" not in snap:
            raise ValueError("no snapshot")
        rec = record_from_json(spec_from_json(spec_json), snap[b"data"])
        for text in entries:
            n, steps = entry_from_json(text)
            if n <= rec.n:  # pushed twice by a retried transaction
                continue
            if n != rec.n + 1:
                raise ValueError(f"log jumps from entry {rec.n} to {n}")
            replay_entry(rec, steps)
        return rec
