"""The KV manager's Redis side: stages what the workers' messages changed, commits it in rounds on a
writer thread, and reconciles memory with Redis after a store failure (`KVManager` holds one).

Memory may be ahead of Redis, never behind once loaded: after a store failure the manager is in doubt:
the writer stages nothing more (memory holds it all) and, with backoff, `sync`s: it loads every ledger
from Redis and, per worker, keeps the newer of memory and store (`WorkerRecord.version`), writing
memory back wherever Redis is behind (a failed transaction, or Redis restarted empty). While Redis is
away the workers' messages go on being applied and acknowledged; registrations wait for it. A ledger
loaded at start gets a fresh registration time-to-live: while no manager ran, its worker's heartbeats
could not arrive, so it is reclaimed only if they stay away for a whole ttl after the restart.

Two locks: `lock` (the manager's) guards memory (every record, the staged entries), held for
microseconds but while a sync rewrites the store; `store_lock` makes one thread at a time write to the
store (a round, a sync, a registration, a reap). Always taken store lock first, then memory lock.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from services.kvmanager.json_forms import entry_to_json, snapshot_of, snapshot_to_json
from services.kvmanager.records import Applied, StoreUnavailable, WorkerRecord

if TYPE_CHECKING:
    from services.kvmanager.metrics import KVMetrics
    from services.kvmanager.store import RedisStore, Write

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Pending:
    """What a record's messages changed since the last commit."""

    rec: WorkerRecord
    entries: list[str] = field(default_factory=list)
    snapshot: bool = False  # resynced: its whole state is written


class StoreWriter:
    """Keeps Redis a round behind the manager's memory (`workers`, guarded by `lock`). With `store=None`
    every call is a no-op: memory is all there is."""

    def __init__(self, store: RedisStore | None, workers: dict[str, WorkerRecord], lock: threading.Lock,
                 clock, metrics: KVMetrics | None, round_every_s: float) -> None:
        self.store = store
        self.workers = workers  # the manager's dict (shared, never rebound)
        self.lock = lock
        self.store_lock = threading.Lock()
        self.clock = clock
        self.metrics = metrics
        self.round_every_s = round_every_s
        self._pending: dict[str, _Pending] = {}
        self._work = threading.Condition(lock)  # wakes the writer
        self._writer_idle = False  # the writer waits on `_work`: the next message wakes it (only then)
        self._writer: threading.Thread | None = None
        self._closing = False
        self.loaded = store is None  # nothing loaded yet: the first store call loads every ledger
        self.doubt = False  # a store call failed: Redis may be behind memory
        self.unpersisted = 0  # messages acknowledged that changed a replica Redis does not hold yet

    # ---- staging (called with the memory lock held) ---------------------------------------------------
    def stage(self, rec: WorkerRecord, applied: Applied) -> None:
        """Note what one applied message changed, for the writer's next round."""
        if self.store is None or not (applied.steps or applied.resynced):
            return
        if self._writer is None:  # (under the memory lock: one writer)
            self._writer = threading.Thread(target=self._write_loop, name="apar-kv-writer", daemon=True)
            self._writer.start()
        self.unpersisted += 1
        if not self.doubt:  # (in doubt the next sync writes all memory holds: nothing to stage)
            pending = self._pending.get(rec.worker_id)
            if pending is None or pending.rec is not rec:
                pending = self._pending[rec.worker_id] = _Pending(rec)
            if applied.resynced:
                pending.snapshot = True
            if applied.steps:
                pending.entries.append(entry_to_json(rec.n, applied.steps))

    def wake(self) -> None:
        """Wake an idle writer when there is work (a busy one takes it in its next round unasked)."""
        if self.store is not None and self._writer_idle and (self._pending or self.doubt):
            self._work.notify()

    def forget(self, worker_id: str) -> None:
        """Drop what is staged for a worker (re-registered or reaped)."""
        self._pending.pop(worker_id, None)

    # ---- the writer ---------------------------------------------------------------------------------
    def flush(self) -> None:
        if self.store is not None:
            self._round()

    def close(self) -> None:
        """Stop the writer thread, then write the last round (a graceful stop loses nothing)."""
        with self.lock:
            self._closing = True
            self._work.notify()
        if self._writer is not None:
            self._writer.join(timeout=10)
        try:
            self.flush()
        except StoreUnavailable as exc:
            log.warning("KV manager stopped with changes Redis does not hold (%s): their workers resync", exc)

    def _write_loop(self) -> None:
        started, backoff = 0.0, 0.0
        while True:
            with self.lock:
                while not (self._pending or self.doubt) and not self._closing:
                    self._writer_idle = True
                    self._work.wait()
                    self._writer_idle = False
                delay = max(backoff, started + self.round_every_s - time.monotonic())
                if delay > 0 and not self._closing:
                    self._work.wait(delay)  # (only `close` wakes it early)
                if self._closing:
                    return  # `close` writes the last round
            started = time.monotonic()
            try:
                self._round()
                backoff = 0.0
            except Exception as exc:  # StoreUnavailable (in doubt: memory holds it all, the next round syncs), or a bug
                backoff = min(2.0, max(0.05, 2 * backoff))
                if isinstance(exc, StoreUnavailable):
                    log.warning("Redis unreachable (%s); writing again in %.2f s", exc, backoff)
                else:
                    log.exception("KV manager writer")

    def _round(self) -> None:
        """Persist in ONE transaction what the messages applied so far changed; in doubt (a store call
        failed), sync instead (which writes back whatever memory holds that Redis does not)."""
        with self.store_lock:
            if self.doubt:
                self.sync_reachable()
                return
            with self.lock:
                writes, taken = self._take_pending(), self.unpersisted
            for w in writes:  # encoded outside the memory lock: the workers' messages go on meanwhile
                if isinstance(w.snapshot, dict):
                    w.snapshot = snapshot_to_json(w.snapshot)
            lost = self.guard(self.store.commit, writes) if writes else []
            with self.lock:
                self.unpersisted -= taken
            if lost:
                log.warning("Redis no longer holds the ledgers of %s: rewriting the store from memory",
                            ", ".join(r.worker_id for r in lost))
                with self.lock:
                    self.resync_all()

    def _take_pending(self) -> list[Write]:
        from services.kvmanager.store import Write

        live = [p for w, p in self._pending.items() if self.workers.get(w) is p.rec]  # not re-registered, reaped
        # A resync's snapshot is written at once (no log entry holds it). A log that reached
        # `snapshot_every` entries is folded into a fresh snapshot, the longest first, one per round:
        # workers that started together reach it together, and encoding all of theirs in one round
        # would stall every message for that long.
        due = sorted((p for p in live if not p.snapshot and p.rec.n - p.rec.base >= self.store.snapshot_every),
                     key=lambda p: p.rec.base - p.rec.n)
        for p in due[:1]:
            p.snapshot = True
        writes = [Write(p.rec, p.rec.n, p.rec.base, [], snapshot_of(p.rec)) if p.snapshot
                  else Write(p.rec, p.rec.n, p.rec.base, p.entries) for p in live]
        self._pending = {}
        return writes

    # ---- store calls and reconciliation ---------------------------------------------------------------
    def guard(self, fn, *args):
        """A store call; on failure the manager is in doubt (sync before the next acknowledgement)."""
        try:
            return fn(*args)
        except StoreUnavailable:
            self.doubt = True
            if self.metrics is not None:
                self.metrics.store_errors.labels(getattr(fn, "__name__", "other")).inc()
            raise

    def sync_reachable(self) -> None:
        """`_sync`, once Redis answers a ping made with the memory lock free: while Redis is away, the
        workers' messages go on being applied. Called with the store lock held."""
        if self.store is None or (self.loaded and not self.doubt):
            return
        self.guard(self.store.ping)
        with self.lock:
            self._sync()

    def resync_all(self) -> None:
        """Redis lost data: reconcile now, writing memory back. Called with both locks held."""
        self.doubt = True
        self._sync()

    def _sync(self) -> None:
        """At start, or after a store failure: reconcile memory with Redis, newer version wins. Called
        with both locks held."""
        if self.store is None or (self.loaded and not self.doubt):
            return
        intact, stored = self.guard(self.store.load)
        for w in sorted(set(stored) | set(self.workers)):
            mem, red = self.workers.get(w), stored.get(w)
            if red is not None and (mem is None or red.version > mem.version):
                red.expires_at = self.clock() + red.spec.ttl_s
                self.workers[w] = red
                if mem is None:  # loaded at start: its heartbeats failed while no manager ran
                    self.guard(self.store.renew, red.spec)
            elif intact and (red is None or red.version < mem.version):
                self.guard(self.store.save, mem, False)
        if not intact:  # Redis lost its data: write every ledger back, registrations renewed
            for rec in self.workers.values():
                self.guard(self.store.save, rec, True)
            self.guard(self.store.mark_intact)
        self._pending = {}  # everything memory holds is in the store now
        self.unpersisted = 0
        self.loaded, self.doubt = True, False
        log.info("ledgers in sync with Redis: %d workers", len(self.workers))
