"""The router's Prometheus metrics (SPEC section 8)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry or CollectorRegistry()
        self.registry = r
        self.requests = Counter("apar_router_requests", "Generate requests received", registry=r)
        self.failed = Counter("apar_router_failed_requests", "Requests ended with an error status", ["reason"],
                              registry=r)
        self.finished = Counter("apar_router_finished_requests", "Requests answered", ["finish_reason"], registry=r)
        self.ttft = Histogram("apar_router_time_to_first_token_seconds", "Time to first token", buckets=_LATENCY,
                              registry=r)
        self.inter_token = Histogram("apar_router_inter_token_seconds", "Time between streamed steps",
                                     buckets=_TOKEN, registry=r)
        self.e2e = Histogram("apar_router_request_seconds", "End-to-end request latency", buckets=_LATENCY,
                             registry=r)
        self.tokens = Counter("apar_router_generated_tokens", "Generated tokens, all threads", registry=r)
        self.prompt_tokens = Counter("apar_router_prompt_tokens", "Prompt tokens", registry=r)
        self.threads = Counter("apar_router_threads", "Threads started", registry=r)
        self.steps = Histogram("apar_router_steps_per_request", "Generation steps per request",
                               buckets=(1, 4, 16, 64, 256, 1024, 4096), registry=r)
        self.attended = Counter("apar_router_attended_tokens", "Attended KV tokens", registry=r)
        self.preemptions = Counter("apar_router_preemptions", "Preemptions of answered requests under KV pressure",
                                   registry=r)
        self.forks_refused = Counter("apar_router_forks_refused", "[Fork]s refused for memory in answered requests",
                                     registry=r)
        self.recomputed = Counter("apar_router_recomputed_tokens", "Tokens recomputed after preemptions in answered "
                                  "requests", registry=r)
        self.waiting = Gauge("apar_router_requests_waiting", "Requests waiting for admission on the workers, as they "
                             "last reported", registry=r)

    def done(self, usage: dict[str, int], seconds: float, finish_reason: str) -> None:
        self.finished.labels(finish_reason).inc()
        self.e2e.observe(seconds)
        self.tokens.inc(usage.get("completion_tokens", 0))
        self.prompt_tokens.inc(usage.get("prompt_tokens", 0))
        self.threads.inc(usage.get("threads", 0))
        self.steps.observe(usage.get("steps", 0))
        self.attended.inc(usage.get("attended_tokens", 0))
        self.preemptions.inc(usage.get("preemptions", 0))
        self.forks_refused.inc(usage.get("forks_refused", 0))
        self.recomputed.inc(usage.get("recomputed_tokens", 0))
