"""The router's Prometheus metrics (docs/design.md, "Metrics"): what each request's client saw.

Names follow vLLM's (`vllm:time_to_first_token_seconds` -> `apar_time_to_first_token_seconds`, with
vLLM's bucket edges), with APAR's own beside them; every series carries `model_name` (the served model
name). The token counters and the per-request histograms are fed from the usage the client receives
with its final message, once per request (`done`); a request that failed or was cancelled counts only in
`apar_requests_failed_total` (and not at all when the client went away). What happens on the engine
(running, waiting, KV usage, forks, preemptions) is the worker's to export.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

# vLLM's bucket edges (vllm/v1/metrics/loggers.py)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)
STEPS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
FINISH_REASONS = ("stop", "length", "cancelled", "error")
FAILURES = ("invalid", "unavailable", "resource_exhausted", "deadline")


class _ByModel:
    """A labelled metric with `model_name` bound: `.labels(reason)` gives the (model_name, reason) child."""

    def __init__(self, metric, model_name: str) -> None:
        self.metric, self.model_name = metric, model_name

    def labels(self, *values: str):
        return self.metric.labels(self.model_name, *values)


def ar_equivalent(prompt_tokens: int, completion_tokens: int, answers: int = 1, cached_tokens: int = 0) -> float:
    """The attended KV tokens (`usage.attended_tokens`, as the engine counts them) of plain AR decoding
    of the same answer lengths: the prompt prefilled once (sum of 1..p), then each answer's tokens in one
    line, the k-th computed token reading p + k + 1 (its context, itself included). The last sampled token
    of an answer is never computed, so an answer of c tokens computes c - 1 of them, and an AR request
    costs exactly T(p + c - 1) with T(x) = x (x + 1) / 2: what the engine reports for an AR request.
    With n answers the per-answer lengths are not in the usage: each is taken as completion_tokens / n.
    Prompt tokens served from the prefix cache are not computed, by AR either: T(cached) less."""
    p = prompt_tokens
    if completion_tokens <= 0 or answers < 1:
        return 0.0

    def tri(x: float) -> float:
        return x * (x + 1) / 2

    c = completion_tokens / answers
    return tri(p) - tri(cached_tokens) + answers * (tri(p + c - 1) - tri(p))


class RouterMetrics:
    def __init__(self, model_name: str, registry: CollectorRegistry | None = None) -> None:
        r = registry if registry is not None else CollectorRegistry()
        self.registry = r
        self.model_name = model_name
        m = ["model_name"]

        def counter(name: str, doc: str):
            return Counter(name, doc, m, registry=r).labels(model_name)

        def histogram(name: str, doc: str, buckets):
            return Histogram(name, doc, m, buckets=buckets, registry=r).labels(model_name)

        # vLLM's names
        self.ttft = histogram("apar_time_to_first_token_seconds", "Time from the request's arrival at the router "
                              "to its first streamed message", TTFT_BUCKETS)
        self.inter_token = histogram("apar_inter_token_latency_seconds", "Time between a request's streamed "
                                     "messages (one per engine step that produced tokens for it)", ITL_BUCKETS)
        self.e2e = histogram("apar_e2e_request_latency_seconds", "End-to-end latency of answered requests",
                             E2E_BUCKETS)
        self.prompt_tokens = counter("apar_prompt_tokens_total", "Prompt tokens of answered requests (once per "
                                     "request, whatever n)")
        self.tokens = counter("apar_generation_tokens_total", "Generated tokens of answered requests, every "
                              "thread and answer (usage.completion_tokens)")
        success = Counter("apar_request_success_total", "Requests answered, by the finish reason of their first "
                          "answer", m + ["finished_reason"], registry=r)
        for reason in FINISH_REASONS:
            success.labels(model_name, reason)
        self.finished = _ByModel(success, model_name)
        # the router's own
        self.requests = counter("apar_requests_received_total", "Generate requests received (both front doors)")
        failed = Counter("apar_requests_failed_total", "Requests ended with an error status, by reason",
                         m + ["reason"], registry=r)
        for reason in FAILURES:
            failed.labels(model_name, reason)
        self.failed = _ByModel(failed, model_name)
        # APAR's own
        self.steps = histogram("apar_steps_per_request", "Engine steps that produced tokens for a request "
                               "(usage.steps)", STEPS_BUCKETS)
        self.threads = counter("apar_threads_started_total", "Threads of answered requests, every answer's root "
                               "included (usage.threads)")
        self.attended = counter("apar_attended_tokens_total", "KV tokens attended by answered requests "
                                "(usage.attended_tokens: each computed token's context, itself included)")
        self.attended_ar = counter("apar_attended_tokens_ar_equivalent_total", "KV tokens plain AR decoding "
                                   "would attend for the same prompt and answer lengths (n > 1: each answer "
                                   "taken as completion_tokens / n)")

    def done(self, usage: dict[str, int], seconds: float, finish_reason: str, answers: int = 1) -> None:
        """An answered request: its whole usage (every answer's), its latency, its first answer's reason."""
        self.finished.labels(finish_reason).inc()
        self.e2e.observe(seconds)
        prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
        self.tokens.inc(completion)
        self.prompt_tokens.inc(prompt)
        self.threads.inc(usage.get("threads", 0))
        self.steps.observe(usage.get("steps", 0))
        attended = usage.get("attended_tokens", 0)
        self.attended.inc(attended)
        # a request that generated nothing (ended before its first token) adds the same to both
        self.attended_ar.inc(ar_equivalent(prompt, completion, answers, usage.get("cached_tokens", 0))
                             if completion > 0 else attended)
