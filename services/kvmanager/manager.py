"""The KV manager's domain: one ledger per registered worker, persisted before it changes.

Used two ways: behind the gRPC servicer (cluster mode, `store` = RedisStore) and in-process (embedded
`apar serve`, tests: `store=None`, memory only, registrations expire on this process's clock).

How a Step flows: check the fields -> find the worker's record -> a resend of the last seq gets the
stored answer -> otherwise the store persists the ops (ONE round trip) -> `ops.apply` changes the
ledger in memory -> the answer. Memory is never ahead of the store: when Redis fails the call raises
`StoreUnavailable` and nothing is applied. After any store failure the manager is in doubt and, before
its next store call, `_sync`s: it loads every ledger from Redis and keeps, per worker, the newer of
memory and store (`WorkerRecord.version`), writing memory back wherever Redis is behind (Redis restarted
empty) and taking Redis' version where it is ahead (a transaction that succeeded but whose reply was
lost). A ledger loaded at start gets a fresh registration time-to-live: while no manager ran, its
worker's heartbeats could not arrive, so it is reclaimed only if they stay away for a whole ttl after the
restart. One lock serializes every call: a step is a few microseconds of bookkeeping plus one round trip.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from services.kvmanager.codec import entry_to_json, ops_json
from services.kvmanager.ledger import KVLedger
from services.kvmanager.ops import Op, Release, StepAnswer
from services.kvmanager.records import (SeqConflict, StepResult, StoreUnavailable, UnknownWorker, Usage,
                                        WorkerRecord, WorkerSpec, apply_entry, check_ops, check_request_id,
                                        check_seq, check_worker_id)

if TYPE_CHECKING:
    from services.kvmanager.metrics import KVMetrics
    from services.kvmanager.store import RedisStore

log = logging.getLogger(__name__)


class KVManager:
    def __init__(self, store: RedisStore | None = None, metrics: KVMetrics | None = None,
                 clock=time.monotonic) -> None:
        self.store = store
        self.metrics = metrics
        self.clock = clock
        self._workers: dict[str, WorkerRecord] = {}
        self._lock = threading.Lock()
        self._doubt = store is not None  # nothing loaded yet: the first store call loads every ledger

    # ---- worker registration ----------------------------------------------------------------------
    def register(self, spec: WorkerSpec) -> tuple[bool, int]:
        """Lease a pool: (restored, free blocks). Restored when a live ledger of the same size exists
        (the worker reconnects after a manager restart); otherwise a fresh ledger replaces any other."""
        with self._lock:
            self._sync()
            rec = self._workers.get(spec.worker_id)
            if rec is not None and rec.spec.same_pool(spec) and self._alive(rec):
                if self.store is not None:
                    self._guard(self.store.renew, spec)
                rec.spec = spec
                rec.expires_at = self.clock() + spec.ttl_s
                return True, rec.ledger.num_free
            rec = WorkerRecord(spec=spec, ledger=KVLedger(spec.num_blocks, spec.block_size), born=time.time_ns(),
                               expires_at=self.clock() + spec.ttl_s)
            if self.store is not None:
                self._guard(self.store.save, rec, True)
            self._workers[spec.worker_id] = rec
            self._observe(rec)
            return False, rec.ledger.num_free

    def heartbeat(self, worker_id: str) -> bool:
        """Extend a registration; False when the worker is unknown or expired (it must register again)."""
        check_worker_id(worker_id)
        with self._lock:
            self._sync()
            rec = self._workers.get(worker_id)
            if rec is None:
                return False
            if self.store is not None:
                return self._guard(self.store.touch, rec.spec)
            if rec.expires_at <= self.clock():
                return False
            rec.expires_at = self.clock() + rec.spec.ttl_s
            return True

    def _alive(self, rec: WorkerRecord) -> bool:
        if self.store is not None:
            return self._guard(self.store.alive, [rec.worker_id])[1] == {rec.worker_id}
        return rec.expires_at > self.clock()

    # ---- ledger changes ---------------------------------------------------------------------------
    def step(self, worker_id: str, seq: int, ops: list[Op]) -> StepResult:
        """Apply one step's ops in order (see `ops.apply`): the answer has a slot list per append (None:
        out of blocks) and the ids freed; a refused op sets `error` and the ops after it are not applied.
        A resend of the last seq with the same ops answers the same again; any other seq at or below the
        last raises SeqConflict."""
        check_worker_id(worker_id)
        check_seq(seq)
        check_ops(ops)
        data, digest = ops_json(ops)
        with self._lock:
            for _ in range(2):  # a second try after Redis was found to have lost data
                self._sync()
                rec = self._record(worker_id)
                if seq == rec.seq:
                    if digest != rec.digest:
                        raise SeqConflict(f"step {seq} of {worker_id} was already applied with other ops")
                    if self.metrics is not None:
                        self.metrics.resent.inc()
                    return StepResult(rec.answer, rec.ledger.num_free, resent=True)
                if seq < rec.seq:
                    raise SeqConflict(f"step {seq} of {worker_id} is older than its last step {rec.seq}")
                if self._persist(rec, entry_to_json(rec.n + 1, seq, digest, data)):
                    answer = apply_entry(rec, seq, digest, ops)
                    self._applied(rec, answer)
                    return StepResult(answer, rec.ledger.num_free)
        raise StoreUnavailable("Redis lost the ledgers again while they were being rewritten")

    def release(self, worker_id: str, request: str) -> StepResult:
        """Free everything of one request of a worker (cancelled, failed or done); releasing a request the
        ledger does not hold frees nothing. Not part of the worker's seq numbering."""
        check_worker_id(worker_id)
        check_request_id(request)
        ops: list[Op] = [Release(request)]
        data, digest = ops_json(ops)
        with self._lock:
            for _ in range(2):  # a second try after Redis was found to have lost data
                self._sync()
                rec = self._record(worker_id)
                if self._persist(rec, entry_to_json(rec.n + 1, None, digest, data)):
                    answer = apply_entry(rec, None, digest, ops)
                    self._applied(rec, answer)
                    return StepResult(answer, rec.ledger.num_free)
        raise StoreUnavailable("Redis lost the ledgers again while they were being rewritten")

    def _persist(self, rec: WorkerRecord, entry: str) -> bool:
        """True: the entry is in the store (or there is no store). False: Redis lost data (the next
        `_sync` writes memory back)."""
        if self.store is None:
            return True
        if self._guard(self.store.append, rec, entry):
            return True
        log.warning("Redis no longer holds the ledger of %s: rewriting the store from memory", rec.worker_id)
        self._doubt = True
        return False

    def _applied(self, rec: WorkerRecord, answer: StepAnswer) -> None:
        if self.metrics is not None:
            self.metrics.steps.inc()
            self.metrics.freed.inc(len(answer.freed))
            self._observe(rec)

    # ---- read side ---------------------------------------------------------------------------------
    def usage(self) -> list[Usage]:
        """Every registered worker (memory only: no store call), sorted by id."""
        with self._lock:
            return [Usage(r.worker_id, r.spec.address, r.spec.num_blocks, r.ledger.num_free, len(r.requests))
                    for r in sorted(self._workers.values(), key=lambda r: r.worker_id)]

    def state(self, worker_id: str) -> dict:
        """A worker's ledger as `KVLedger.snapshot()` data (free list in allocation order, blocks in use)."""
        check_worker_id(worker_id)
        with self._lock:
            return self._record(worker_id).ledger.snapshot()

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
        nothing is reaped: the ledgers are written back from memory with fresh registrations instead."""
        with self._lock:
            self._sync()
            ids = sorted(self._workers)
            if self.store is not None:
                intact, alive = self._guard(self.store.alive, ids)
                if not intact:
                    self._doubt = True
                    self._sync()
                    return []
            else:
                now = self.clock()
                alive = {w for w in ids if self._workers[w].expires_at > now}
            dead = [w for w in ids if w not in alive]
            for w in dead:
                if self.store is not None:
                    self._guard(self.store.drop, w)
                del self._workers[w]
                if self.metrics is not None:
                    self.metrics.forget(w)
                log.info("worker %s expired: its ledger is dropped", w)
            return dead

    # ---- store plumbing ----------------------------------------------------------------------------
    def _record(self, worker_id: str) -> WorkerRecord:
        rec = self._workers.get(worker_id)
        if rec is None:
            raise UnknownWorker(f"worker {worker_id} is not registered (or its registration expired)")
        return rec

    def _guard(self, fn, *args):
        """A store call; on failure the manager is in doubt (sync before the next store call)."""
        try:
            return fn(*args)
        except StoreUnavailable:
            self._doubt = True
            if self.metrics is not None:
                self.metrics.store_errors.labels(getattr(fn, "__name__", "other")).inc()
            raise

    def sync(self) -> None:
        """Load or reconcile the ledgers now if a store call failed (or nothing was loaded yet)."""
        with self._lock:
            self._sync()

    def _sync(self) -> None:
        """After a store failure (or at start): reconcile memory with Redis, newer version wins."""
        if not self._doubt or self.store is None:
            return
        intact, stored = self._guard(self.store.load)
        for w in sorted(set(stored) | set(self._workers)):
            mem, red = self._workers.get(w), stored.get(w)
            if red is not None and (mem is None or red.version > mem.version):
                red.expires_at = self.clock() + red.spec.ttl_s
                self._workers[w] = red
                self._observe(red)
                if mem is None:  # loaded at start: its heartbeats failed while no manager ran
                    self._guard(self.store.renew, red.spec)
            elif intact and (red is None or red.version < mem.version):
                self._guard(self.store.save, mem, False)
        if not intact:  # Redis lost its data: write every ledger back, registrations renewed
            for rec in self._workers.values():
                self._guard(self.store.save, rec, True)
            self._guard(self.store.mark_intact)
        self._doubt = False
        log.info("ledgers in sync with Redis: %d workers", len(self._workers))

    def _observe(self, rec: WorkerRecord) -> None:
        if self.metrics is not None:
            self.metrics.ledger(rec.worker_id, rec.ledger.num_used, rec.ledger.num_free)


class InProcessClient:
    """A worker's handle on an in-process `KVManager` (embedded mode): the calls of the gRPC client
    `services.worker.kvclient.KVManagerClient` (register, start_heartbeat, step, state, close) without
    gRPC. A registration lives `ttl_s` (default a day) and needs no heartbeat unless something reaps."""

    def __init__(self, manager: KVManager, worker_id: str, worker_address: str, num_blocks: int, block_size: int,
                 ttl_s: int = 24 * 3600) -> None:
        self.manager = manager
        self.spec = WorkerSpec(worker_id, worker_address, num_blocks, block_size, ttl_s)

    def register(self, timeout: float | None = None) -> bool:
        return self.manager.register(self.spec)[0]

    def start_heartbeat(self) -> None:
        """Nothing to do in-process; `heartbeat()` extends the registration if a caller reaps."""

    def heartbeat(self) -> bool:
        return self.manager.heartbeat(self.spec.worker_id)

    def step(self, seq: int, ops: list[Op]) -> StepResult:
        """One step's ops; raises ConnectionError when the store is away (retry later), RuntimeError when
        the ledger refused an op (the worker's view and the manager's disagree)."""
        try:
            result = self.manager.step(self.spec.worker_id, seq, ops)
        except StoreUnavailable as exc:
            raise ConnectionError(str(exc)) from None
        if result.answer.error:
            raise RuntimeError(f"KV manager refused step {seq}: {result.answer.error}")
        return result

    def state(self) -> dict:
        return self.manager.state(self.spec.worker_id)

    def close(self) -> None:
        """Nothing to close in-process."""
