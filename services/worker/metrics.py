"""The worker's Prometheus metrics, updated after every engine step (SPEC section 8)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.worker.engine import Engine


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry or CollectorRegistry()
        self.registry = r
        self.steps = Counter("apar_worker_steps", "Engine steps", registry=r)
        self.step_seconds = Histogram("apar_worker_step_seconds", "Time of one engine step",
                                      buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1), registry=r)
        self.tokens = Counter("apar_worker_computed_tokens", "Tokens computed (prefill and decode)", registry=r)
        self.running = Gauge("apar_worker_requests_running", "Requests running", registry=r)
        self.queue = Gauge("apar_worker_requests_waiting", "Requests waiting for admission", registry=r)
        self.threads = Gauge("apar_worker_threads_running", "Threads running", registry=r)
        self.forks = Gauge("apar_worker_forks", "Forks so far", registry=r)
        self.kv_used = Gauge("apar_worker_kv_blocks_used", "KV blocks in use", registry=r)
        self.kv_free = Gauge("apar_worker_kv_blocks_free", "KV blocks free", registry=r)
        self.early = Gauge("apar_worker_kv_blocks_released_early",
                           "KV blocks freed by a finished thread while its request still ran", registry=r)
        self.preemptions = Counter("apar_worker_preemptions", "Requests preempted under KV pressure (blocks freed, "
                                   "KV recomputed on readmission)", registry=r)
        self.forks_refused = Counter("apar_worker_forks_refused", "[Fork]s refused because the KV pool was nearly "
                                     "full", registry=r)
        self.recomputed = Counter("apar_worker_recomputed_tokens", "Tokens computed again after preemptions",
                                  registry=r)
        self._seen = (0, 0, 0)

    def on_step(self, engine: Engine, seconds: float, tokens: int) -> None:
        self.steps.inc()
        self.step_seconds.observe(seconds)
        self.tokens.inc(tokens)
        self.running.set(len(engine.scheduler.running))
        self.queue.set(len(engine.scheduler.waiting))
        self.threads.set(sum(len(r.running_threads) for r in engine.scheduler.running))
        self.forks.set(engine.forks)
        self.kv_used.set(engine.ledger.num_used)
        self.kv_free.set(engine.ledger.num_free)
        self.early.set(engine.blocks_released_early)
        now = (engine.preemptions, engine.forks_refused, engine.recomputed_tokens)
        for counter, total, seen in zip((self.preemptions, self.forks_refused, self.recomputed), now, self._seen):
            if total > seen:
                counter.inc(total - seen)
        self._seen = now
