"""The KV manager's domain: a replica of every registered worker's ledger, persisted in Redis a round after
it is acknowledged.

Used two ways: behind the gRPC servicer (cluster mode, `store` = RedisStore) and in-process (embedded
`apar serve`, tests: `store=None`, memory only, registrations expire on this process's clock).

How a worker's message flows: check the fields -> `records.apply_batch` applies it to the worker's
replica in memory, on the caller's thread (the gRPC event loop; the rules are in `replication`'s
docstring), and stages the log entry -> the ack, at once. Beside it the writer thread commits, in ONE
Redis transaction, every entry staged since its last round (rounds start at most every
`round_every_s`): under load Redis sees far fewer transactions than messages, and never more than one
per message. So an ack means "the replica holds it", and Redis holds it one round later; a message never
waits for Redis, and neither does the worker's lag. What a manager killed between the two loses, its
restart shows: the replica it loads is a few steps behind the worker's acknowledged ones, a gap the
worker cannot fill (it dropped the steps), and it sends its snapshot (`replication`: a manager restart
ends in a resync). A graceful stop (`close`) and `flush` write the last round first.

What the manager keeps in Redis, and how it recovers when Redis fails, is `persistence.StoreWriter`'s.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from apar.engine.kv.ledger import LedgerError
from apar.engine.kv.ops import MAX_NAMES
from services.kvmanager.json_forms import snapshot_from_parts
from services.kvmanager.persistence import StoreWriter
from services.kvmanager.records import (Applied, BadRequest, ResyncParts, StaleSession,
                                        UnknownWorker, Usage, WorkerIdTaken, WorkerRecord, WorkerSpec, add_part,
                                        apply_batch, check_batch, check_session, check_worker_id)
from services.kvmanager.replica import ReplicaLedger
from services.kvmanager.replication import Ack, LogBatch, Resync

if TYPE_CHECKING:
    from services.kvmanager.metrics import KVMetrics
    from services.kvmanager.store import RedisStore

log = logging.getLogger(__name__)


class KVManager:
    def __init__(self, store: RedisStore | None = None, metrics: KVMetrics | None = None,
                 clock=time.monotonic, round_every_s: float = 0.05) -> None:
        self.store = store
        self.metrics = metrics
        self.clock = clock
        self._workers: dict[str, WorkerRecord] = {}
        self._lock = threading.Lock()
        self._parts: dict[str, ResyncParts] = {}  # worker id -> the resync it is sending in parts
        # Rounds start at most every `round_every_s`. No ack waits for one, so this only bounds how far
        # Redis trails memory; each round takes in every message since the last (a round costs the writer
        # about the same for one message as for sixty-four).
        self._store = StoreWriter(store, self._workers, self._lock, clock, metrics, round_every_s)
        self._store_lock = self._store.store_lock
        self._guard = self._store.guard
        if metrics is not None:
            metrics.watch(self.usage, self.unpersisted)

    # ---- worker registration ----------------------------------------------------------------------
    def register(self, spec: WorkerSpec, session: int) -> tuple[bool, int]:
        """Lease a pool: (restored, free blocks). A worker id is bound to the session that registered it
        (1 or more: BadRequest for none, since two processes sending none could not be told apart).
        While that registration lives, the same session registering again (after a manager restart, a
        lost answer) keeps its ledger (restored) if the pool is the same size, and another session is
        refused with WorkerIdTaken, nothing changed: a second process with the id, or a replacement
        that came before the old registration expired. Otherwise a fresh ledger, bound to `session`
        at step 0, replaces any other (a stale process's steps are then refused: StaleSession)."""
        check_session(session)
        with self._store_lock:
            self._store.sync_reachable()
            with self._lock:
                return self._register(spec, session)

    def _register(self, spec: WorkerSpec, session: int) -> tuple[bool, int]:
        rec = self._workers.get(spec.worker_id)
        live = rec is not None and self._alive(rec)
        if live and rec.session != session:
            raise WorkerIdTaken(f"worker id {spec.worker_id} is held by another live process (its registration "
                                f"expires {rec.spec.ttl_s} s after its last heartbeat)")
        if live and rec.spec.same_pool(spec):
            if self.store is not None:
                self._guard(self.store.renew, spec)
            rec.spec = spec
            rec.expires_at = self.clock() + spec.ttl_s
            return True, rec.ledger.num_free
        rec = WorkerRecord(spec=spec, ledger=ReplicaLedger(spec.num_blocks, spec.block_size), born=time.time_ns(),
                           session=session, expires_at=self.clock() + spec.ttl_s)
        if self.store is not None:
            self._guard(self.store.save, rec, True)
        self._workers[spec.worker_id] = rec
        self._store.forget(spec.worker_id)
        self._parts.pop(spec.worker_id, None)
        return False, rec.ledger.num_free

    def heartbeat(self, worker_id: str, session: int) -> bool:
        """Extend a registration; False when the worker is unknown or expired, or registered by another
        session than `session`: it must register again. BadRequest without a session (one that named
        none would keep whichever process holds the id alive)."""
        check_worker_id(worker_id)
        check_session(session)
        with self._lock:
            rec = self._workers.get(worker_id)
            if rec is None or rec.session != session:
                return False
            if self.store is None:
                if rec.expires_at <= self.clock():
                    return False
                rec.expires_at = self.clock() + rec.spec.ttl_s
                return True
        return self._guard(self.store.touch, rec.spec)

    def _alive(self, rec: WorkerRecord) -> bool:
        if self.store is not None:
            return self._guard(self.store.alive, [rec.worker_id])[1] == {rec.worker_id}
        return rec.expires_at > self.clock()

    # ---- the replicas -----------------------------------------------------------------------------
    def submit(self, worker_id: str, batch: LogBatch) -> Ack:
        """Apply one message of a worker (`records.apply_batch`) and answer at once; the writer's next
        round puts it in Redis (`flush` waits for that)."""
        if worker_id not in self._workers:  # (a registered one was checked when it registered)
            check_worker_id(worker_id)
        check_batch(batch)
        if not self._store.loaded:
            self.sync()
        if batch.part is not None:
            whole = self._assemble(worker_id, batch)
            if whole is None:  # more parts to come: the replica as it is
                with self._lock:
                    return self._record(worker_id).ack()
            batch = whole
        with self._lock:
            ack = self._apply(worker_id, batch)
            self._store.wake()
        return ack

    def _assemble(self, worker_id: str, batch: LogBatch) -> LogBatch | None:
        """Keep one part of a resync (`records.add_part`); with the last, the whole batch (the snapshot
        decoded, and its replica built, outside the memory lock: for the largest pool that takes
        seconds, while other workers' messages go on). StaleSession for another session's parts."""
        p = batch.part
        with self._lock:
            rec = self._record(worker_id)
            if batch.session != rec.session:
                raise StaleSession(f"worker {worker_id} is registered by another process now: register again")
            data = add_part(self._parts, worker_id, batch.session, p)
            if data is None:
                return None
            pool = (rec.spec.num_blocks, rec.spec.block_size)
        try:
            ledger = snapshot_from_parts(data)
            # (apply_batch checks the snapshot against the registered pool again, under the lock)
            fits = isinstance(ledger, dict) and (ledger.get("num_blocks"), ledger.get("block_size")) == pool
            replica = ReplicaLedger.from_snapshot(ledger) if fits else None
        except (ValueError, LedgerError) as exc:
            raise BadRequest(f"resync: {exc}") from None
        return LogBatch(batch.session, batch.steps, Resync(p.seq, ledger, replica=replica))

    def flush(self) -> None:
        """Write what the messages applied so far changed to Redis now (a round of the caller's own);
        StoreUnavailable when Redis cannot take it (the writer goes on trying)."""
        self._store.flush()

    def close(self) -> None:
        """Stop the writer thread, then write the last round (a graceful stop loses nothing)."""
        self._store.close()

    def _apply(self, worker_id: str, batch: LogBatch) -> Ack:
        rec = self._record(worker_id)
        applied = apply_batch(rec, batch)
        self._applied(rec, applied)
        return applied.ack

    def _applied(self, rec: WorkerRecord, applied: Applied) -> None:
        self._store.stage(rec, applied)
        if self.metrics is not None:
            m = self.metrics
            m.messages.inc()
            m.steps.inc(len(applied.steps))
            if applied.duplicates:
                m.duplicates.inc(applied.duplicates)
            if applied.freed:
                m.freed.inc(applied.freed)
            if applied.resynced:
                m.resyncs.inc()

    # ---- read side ---------------------------------------------------------------------------------
    def unpersisted(self) -> int:
        """Messages acknowledged whose changes Redis does not hold yet (0 when all are written)."""
        return self._store.unpersisted

    @property
    def round_every_s(self) -> float:
        return self._store.round_every_s

    def usage(self) -> list[Usage]:
        """Every registered worker (memory only: no store call), sorted by id."""
        with self._lock:
            return [Usage(r.worker_id, r.spec.address, r.spec.num_blocks, r.ledger.num_free, r.ledger.num_requests,
                          r.spec.block_size, r.ledger.num_cached, r.spec.model, r.ledger.digest())
                    for r in sorted(self._workers.values(), key=lambda r: r.worker_id)]

    def prefix(self, names: list[int]) -> list[tuple[str, str, int]]:
        """(worker id, address, leading blocks of `names` it holds) for every worker, sorted by id. The
        replicas know each worker's named blocks from its Reuse and Name ops and, because allocation is
        deterministic, which were evicted: the index survives a restart with the ledgers themselves."""
        if len(names) > MAX_NAMES:
            raise BadRequest(f"at most {MAX_NAMES} block names")
        with self._lock:
            return [(r.worker_id, r.spec.address, r.ledger.cached_prefix(names))
                    for r in sorted(self._workers.values(), key=lambda r: r.worker_id)]

    def state(self, worker_id: str) -> dict:
        """A worker's ledger as `KVLedger.snapshot()` data (free list in allocation order, blocks in use)."""
        check_worker_id(worker_id)
        with self._lock:
            return self._record(worker_id).ledger.snapshot()

    def applied(self, worker_id: str) -> tuple[int, int]:
        """(session, last step applied) of a worker's replica."""
        check_worker_id(worker_id)
        with self._lock:
            rec = self._record(worker_id)
            return rec.session, rec.seq

    def workers(self) -> list[str]:
        with self._lock:
            return sorted(self._workers)

    def check(self) -> None:
        """Every ledger's invariants (KVLedger.check)."""
        with self._lock:
            for rec in self._workers.values():
                rec.ledger.check()

    # ---- expiry ------------------------------------------------------------------------------------
    def reap(self) -> list[str]:
        """Drop every worker whose registration expired, with all its blocks; returns their ids.

        With a store, a missing `intact` marker means Redis lost its data (registrations included), so
        nothing is reaped: the ledgers are written back from memory with fresh registrations instead.
        Memory is locked only to read the ids and to drop the dead: the workers' messages go on meanwhile."""
        with self._store_lock:
            self._store.sync_reachable()
            with self._lock:
                ids = sorted(self._workers)
            if self.store is not None:
                intact, alive = self._guard(self.store.alive, ids)
                if not intact:
                    with self._lock:
                        self._store.resync_all()
                    return []
            else:
                now = self.clock()
                alive = {w for w in ids if self._workers[w].expires_at > now}
            dead = [w for w in ids if w not in alive]
            for w in dead:
                if self.store is not None:
                    self._guard(self.store.drop, w)
                with self._lock:
                    del self._workers[w]
                    self._store.forget(w)
                    self._parts.pop(w, None)
                if self.metrics is not None:
                    self.metrics.reaped.inc()
                log.info("worker %s expired: its ledger is dropped", w)
            return dead

    # ---- store plumbing ----------------------------------------------------------------------------
    def _record(self, worker_id: str) -> WorkerRecord:
        rec = self._workers.get(worker_id)
        if rec is None:
            raise UnknownWorker(f"worker {worker_id} is not registered (or its registration expired)")
        return rec

    def sync(self) -> None:
        """Load or reconcile the ledgers now if a store call failed (or nothing was loaded yet)."""
        with self._store_lock:
            self._store.sync_reachable()
