"""The worker's Prometheus metrics, read from the engine on its loop thread after every step
(docs/design.md, "Metrics").

Names follow vLLM's (`vllm:num_requests_running` -> `apar_num_requests_running`, ...), with APAR's own
beside them; every series carries `model_name`. Gauges are set from the engine's state; counters grow by
what the engine's running totals grew since the last call (the engine keeps totals, the metrics deltas),
so a counter is never set and never goes down. While the loop is idle `on_step` is called with no step
(seconds and result None): only the gauges are refreshed then.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from apar.engine.engine import Engine, EngineOutput

STEP_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
RTT_SECONDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
TOKENS_PER_STEP = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
FORK_DEPTH = (1, 2, 3, 4, 5, 6, 8, 12, 16)


class WorkerMetrics:
    def __init__(self, model_name: str, registry: CollectorRegistry | None = None) -> None:
        r = registry if registry is not None else CollectorRegistry()
        self.registry = r
        self.model_name = model_name
        m = ["model_name"]

        def gauge(name: str, doc: str):
            return Gauge(name, doc, m, registry=r).labels(model_name)

        def counter(name: str, doc: str):
            return Counter(name, doc, m, registry=r).labels(model_name)

        def histogram(name: str, doc: str, buckets):
            return Histogram(name, doc, m, buckets=buckets, registry=r).labels(model_name)

        # vLLM's names
        self.running = gauge("apar_num_requests_running", "Requests admitted and running on the engine")
        self.waiting = gauge("apar_num_requests_waiting", "Requests waiting for admission (new or preempted)")
        self.kv_usage = gauge("apar_kv_cache_usage_perc", "KV cache usage: blocks in use / blocks in the pool (0..1)")
        self.preemptions = counter("apar_num_preemptions_total", "Requests preempted under KV pressure (blocks "
                                   "freed, KV recomputed on readmission)")
        # APAR's own
        self.threads = gauge("apar_threads_running", "Threads running, over every running request")
        self.forks = counter("apar_forks_total", "Forks: threads started by [Fork] (the threads of every answer "
                             "less its root)")
        self.fork_depth = histogram("apar_fork_depth", "Depth of each new child thread (the root is 0)", FORK_DEPTH)
        self.tokens_per_step = histogram("apar_tokens_per_step", "Tokens sampled in one engine step, over every "
                                         "request: the parallelism of the step (steps that sampled)",
                                         TOKENS_PER_STEP)
        self.early = counter("apar_kv_blocks_released_early_total", "KV blocks freed by a finished thread while "
                             "its request still ran")
        self.forks_refused = counter("apar_forks_refused_total", "[Fork]s refused because the KV pool was nearly "
                                     "full (the thread went on sequentially)")
        self.recomputed = counter("apar_recomputed_tokens_total", "Tokens computed again after preemptions")
        self.computed = counter("apar_computed_tokens_total", "Tokens computed by the model (prefill and decode)")
        self.kv_used = gauge("apar_kv_blocks_used", "KV blocks in use")
        self.kv_free = gauge("apar_kv_blocks_free", "KV blocks free (cached ones included: evicted when needed)")
        # the prefix cache, vLLM's names: hit rate = hits / queries, in prompt tokens at each request's start
        self.prefix_queries = counter("apar_prefix_cache_queries_total", "Prompt tokens looked up in the prefix "
                                      "cache (each request's whole prompt, at its first start)")
        self.prefix_hits = counter("apar_prefix_cache_hits_total", "Prompt tokens served from the prefix cache "
                                   "(usage cached_tokens)")
        self.kv_cached = gauge("apar_kv_blocks_cached", "KV blocks cached: named prompt blocks no running thread "
                               "reads, kept for reuse until evicted")
        self.evictions = counter("apar_prefix_cache_evictions_total", "Cached KV blocks evicted to give a new "
                                 "block")
        # speculation inside threads, vLLM's names: acceptance rate = accepted / draft tokens; mean accepted
        # length per verification = 1 + accepted / drafts verified
        self.draft_tokens = counter("apar_spec_decode_num_draft_tokens_total", "Tokens drafted by the threads "
                                    "(speculation) and verified by the model")
        self.accepted_tokens = counter("apar_spec_decode_num_accepted_tokens_total", "Drafted tokens kept: each "
                                       "saved its thread a step")
        self.skipped_tokens = counter("apar_spec_decode_num_skipped_tokens_total", "Tokens drafted but left out of "
                                      "their step: their odds did not pay for their rows (--draft-policy pays)")
        self.paused_steps = counter("apar_spec_decode_paused_steps_total", "Steps after which the drafter made "
                                    "no guesses: its own work did not pay (--draft-policy pays)")
        self.step_seconds = histogram("apar_worker_step_seconds", "Wall time of one engine step (forward pass "
                                      "included)", STEP_SECONDS)
        self.kv_rtt = histogram("apar_kvmanager_rtt_seconds", "Round trip of one Step message to the KV manager "
                                "(cluster mode; in-process under apar serve)", RTT_SECONDS)
        self._totals = {"forks": 0, "early": 0, "preemptions": 0, "forks_refused": 0, "recomputed": 0,
                        "prefix_queries": 0, "prefix_hits": 0, "evictions": 0, "draft_tokens": 0,
                        "accepted_tokens": 0, "skipped_tokens": 0, "paused_steps": 0}
        self._depths: dict[int, int] = {}
        self._hooked = None

    def on_step(self, engine: Engine, seconds: float | None, result: EngineOutput | None) -> None:
        """After a step (on the engine loop's thread), or with seconds/result None while idle."""
        self._hook(engine)
        sched = engine.scheduler
        self.running.set(len(sched.running))
        self.waiting.set(len(sched.waiting))
        self.threads.set(sum(len(r.running_threads) for r in sched.running))
        ledger = engine.ledger
        self.kv_used.set(ledger.num_used)
        self.kv_free.set(ledger.num_free)
        self.kv_cached.set(ledger.num_cached)
        self.kv_usage.set(ledger.num_used / ledger.num_blocks if ledger.num_blocks else 0.0)
        now = {"forks": engine.forks, "early": engine.blocks_released_early, "preemptions": engine.preemptions,
               "forks_refused": engine.forks_refused, "recomputed": engine.recomputed_tokens,
               "prefix_queries": engine.prefix_queried_tokens, "prefix_hits": engine.prefix_hit_tokens,
               "evictions": ledger.evictions, "draft_tokens": engine.spec_draft_tokens,
               "accepted_tokens": engine.spec_accepted_tokens, "skipped_tokens": engine.spec_skipped_tokens,
               "paused_steps": engine.draft_gate.paused_steps}
        for key, total in now.items():
            if total > self._totals[key]:
                getattr(self, key).inc(total - self._totals[key])
            self._totals[key] = total
        for depth, total in engine.forks_by_depth.items():
            for _ in range(total - self._depths.get(depth, 0)):
                self.fork_depth.observe(depth)
            self._depths[depth] = total
        if result is not None and result.tokens:  # a step that ran the model
            self.step_seconds.observe(seconds)
            self.computed.inc(result.tokens)
            if result.sampled:  # a step of prefill chunks only samples nothing: no parallelism to report
                self.tokens_per_step.observe(result.sampled)

    def _hook(self, engine: Engine) -> None:
        """Time the KV manager's round trips: the engine's KV backend (set after start-up, replaced on
        recovery) hears them through its `on_round_trip`, when it has one (RemoteKV)."""
        kv = engine.kv
        if kv is not self._hooked:
            if hasattr(kv, "on_round_trip"):
                kv.on_round_trip = self.kv_rtt.observe
            self._hooked = kv
