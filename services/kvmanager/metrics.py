"""The KV manager's Prometheus metrics: per-worker block usage, messages, steps, resyncs, frees and Redis
traffic.

The manager updates them after every message it applies; the store counts its round trips through
`round_trip` (at most one per message is the design: messages that arrive together share one, and the
tests check it), and the manager its failed store calls by operation
(`apar_redis_errors_total{operation}`). The workers' ledgers carry no model, so these series have no
`model_name`. Each manager gets its own registry unless one is given, so several managers can live in
one process (tests, embedded mode).
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

# RedisStore's methods (each one round trip or two); `KVManager._guard` labels an error with the name
STORE_OPERATIONS = ("commit", "save", "renew", "touch", "alive", "drop", "mark_intact", "load")


class KVMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry if registry is not None else CollectorRegistry()
        self.registry = r
        self.used = Gauge("apar_kvmanager_blocks_used", "KV blocks in use, per worker", ["worker"], registry=r)
        self.free = Gauge("apar_kvmanager_blocks_free", "KV blocks free, per worker", ["worker"], registry=r)
        self.workers = Gauge("apar_kvmanager_workers", "Workers with a ledger", registry=r)
        self.messages = Counter("apar_kvmanager_messages", "Messages (batches of steps) applied", registry=r)
        self.steps = Counter("apar_kvmanager_steps", "Engine steps applied to the replicas", registry=r)
        self.duplicates = Counter("apar_kvmanager_steps_duplicate", "Steps received again (a resend): skipped, "
                                  "not applied twice", registry=r)
        self.resyncs = Counter("apar_kvmanager_resyncs", "Replicas replaced by a worker's ledger snapshot",
                               registry=r)
        self.freed = Counter("apar_kvmanager_blocks_freed", "KV blocks freed", registry=r)
        self.round_trips = Counter("apar_kvmanager_redis_round_trips", "Redis round trips", registry=r)
        errors = Counter("apar_redis_errors_total", "Redis calls that failed, by store operation", ["operation"],
                         registry=r)
        for op in STORE_OPERATIONS:  # every series from the start, at 0, so rate() sees the first error
            errors.labels(op)
        self.store_errors = errors
        self.reaped = Counter("apar_kvmanager_workers_reaped", "Workers dropped when their registration "
                              "expired", registry=r)

        self._known: set[str] = set()

    def round_trip(self) -> None:
        self.round_trips.inc()

    def ledger(self, worker_id: str, used: int, free: int) -> None:
        self.used.labels(worker_id).set(used)
        self.free.labels(worker_id).set(free)
        self._known.add(worker_id)
        self.workers.set(len(self._known))

    def forget(self, worker_id: str) -> None:
        """A worker's ledger was dropped: its series go away."""
        if worker_id in self._known:
            self.used.remove(worker_id)
            self.free.remove(worker_id)
            self._known.discard(worker_id)
        self.workers.set(len(self._known))
        self.reaped.inc()
