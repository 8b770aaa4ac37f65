"""The KV manager's Prometheus metrics: per-worker block usage, messages, steps, resyncs, frees and Redis
traffic.

The manager counts messages, steps, duplicates, resyncs and frees as it applies them; the per-worker
block gauges are read from the replicas when Prometheus scrapes (`watch`), so a message costs no gauge
update. The store counts its round trips through
`round_trip` (at most one per message is the design: messages that arrive together share one, and the
tests check it), and the manager its failed store calls by operation
(`apar_redis_errors_total{operation}`). The workers' ledgers carry no model, so these series have no
`model_name`. Each manager gets its own registry unless one is given, so several managers can live in
one process (tests, embedded mode).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

# RedisStore's methods (each one round trip or two); `StoreWriter.guard` labels an error with the name
STORE_OPERATIONS = ("commit", "save", "renew", "touch", "alive", "drop", "mark_intact", "load", "ping")


class KVMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry if registry is not None else CollectorRegistry()
        self.registry = r
        self._ledgers = _Ledgers()
        r.register(self._ledgers)
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

    def round_trip(self) -> None:
        self.round_trips.inc()

    def watch(self, usage: Callable[[], Iterable], unpersisted: Callable[[], int] = int) -> None:
        """Where the gauges come from at each scrape: `KVManager.usage` for the per-worker ones (a dropped
        worker's series go away with it), `KVManager.unpersisted` for the messages Redis does not hold yet."""
        self._ledgers.usage = usage
        self._ledgers.unpersisted = unpersisted


class _Ledgers(Collector):
    """apar_kvmanager_blocks_used / _free per worker, apar_kvmanager_workers and
    apar_kvmanager_unpersisted_messages, read at scrape time."""

    def __init__(self) -> None:
        self.usage: Callable[[], Iterable] = list
        self.unpersisted: Callable[[], int] = int

    def collect(self):
        used = GaugeMetricFamily("apar_kvmanager_blocks_used", "KV blocks in use, per worker", labels=["worker"])
        free = GaugeMetricFamily("apar_kvmanager_blocks_free", "KV blocks free, per worker", labels=["worker"])
        workers = list(self.usage())
        for u in workers:
            used.add_metric([u.worker_id], u.num_blocks - u.free_blocks)
            free.add_metric([u.worker_id], u.free_blocks)
        yield used
        yield free
        yield GaugeMetricFamily("apar_kvmanager_workers", "Workers with a ledger", value=len(workers))
        yield GaugeMetricFamily("apar_kvmanager_unpersisted_messages", "Messages acknowledged whose changes Redis "
                                "does not hold yet (the next round writes them)", value=self.unpersisted())
