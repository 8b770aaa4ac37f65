"""The Prometheus metrics and the Grafana dashboard, against real processes on loopback.

Requests go through `apar serve` (gRPC and HTTP) and through the cluster (router, worker and KV manager
processes with Redis); every `/metrics` is scraped and checked against the usage the clients received:
generated and prompt tokens, forks (the threads started less one per answer), attended tokens and their
AR equivalent; the KV blocks released early against the same requests replayed on an in-process
engine (which must make the same trees); running, waiting and threads return to 0 once the
last request, a cancelled one included, has ended; every metric the dashboard queries is exported. The
random model forks when the engine's fork token is the ordinary token it emits most (as in
test_engine_sampling), so forks happen over gRPC too.
"""
from __future__ import annotations

import json
import re
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from apar.bench_suite.simulated import ScratchRedis
from apar.protogen import stubs
from services.kvmanager.metrics import STORE_OPERATIONS
from tests.faults import Stream, wait_until
from tests.procs import Proc, free_port

pb = stubs()
A = pb.apar_pb2
MODEL = "apar-metrics"
KV_BLOCKS = 256
DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "helm" / "apar" / "dashboards" / "apar.json"
PROMPTS = ["Give me five tips for working from home.", "List the planets, one by one, with a fact each.",
           "Name three rivers and where they flow.", "How do I bake bread? Give the steps."]
USAGE_KEYS = ("prompt_tokens", "completion_tokens", "threads", "forks", "steps", "attended_tokens", "cached_tokens")
KV_MANAGER_ONLY = {"apar_redis_errors_total"}  # the dashboard's names that only the KV manager exports


# ---- scraping ---------------------------------------------------------------------------------------
class Scrape:
    def __init__(self, url: str) -> None:
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        self.samples = [(s.name, s.labels, s.value) for fam in text_string_to_metric_families(text)
                        for s in fam.samples]

    def names(self) -> set[str]:
        """Metric names as a dashboard queries them: histograms by their base name, and `_bucket`,
        `_sum`, `_count` too (`_created` left out)."""
        out = set()
        for name, _, _ in self.samples:
            if name.endswith("_created"):
                continue
            out.add(name)
            out.add(re.sub(r"_(bucket|sum|count)$", "", name))
        return out

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples of `name` whose labels include `labels`."""
        found = [v for n, lab, v in self.samples if n == name and labels.items() <= lab.items()]
        assert found, f"{name}{labels or ''} is not exported"
        return sum(found)


def scrape_value(url: str, name: str, **labels) -> float:
    return Scrape(url).value(name, **labels)


def dashboard_names() -> set[str]:
    d = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in d["panels"] for t in p["targets"]]
    return {re.sub(r"_(bucket|sum|count)$", "", n) for e in exprs for n in re.findall(r"apar_[a-z0-9_]+", e)}


# ---- a model that forks -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fork_token(llama_dir) -> str:
    """The ordinary token greedy decoding of the random model emits most after these prompts: served
    as the fork token, the model forks whenever it picks it."""
    from apar.engine.config import EngineConfig
    from apar.engine.engine import Engine
    from apar.engine.events import TokenEvent
    from apar.engine.params import SamplingParams
    from apar.text.prompt import encode_prompt

    eng = Engine(llama_dir, EngineConfig(num_blocks=64))
    counts: Counter = Counter()
    for prompt in PROMPTS:
        eng.add_request(encode_prompt(eng.tokenizer, prompt), SamplingParams(max_tokens=40, auto_parallel=False))
        counts.update(e.token for e in eng.run_to_completion() if isinstance(e, TokenEvent))
    token = next(t for t, _ in counts.most_common() if t not in eng.eos_ids)
    return eng.tokenizer.convert_ids_to_tokens(token)


# ---- the load ---------------------------------------------------------------------------------------
def tri(x: float) -> float:
    return x * (x + 1) / 2


def ar_equivalent(u: dict, n: int) -> float:
    """Plain AR's attended tokens for the same prompt and answer lengths (each answer completion / n):
    the prompt once (less what the prefix cache served), then each answer's computed tokens (all but its
    last) in one line."""
    p, c = u["prompt_tokens"], u["completion_tokens"] / n
    return tri(p) - tri(u.get("cached_tokens", 0)) + n * (tri(p + c - 1) - tri(p))


def grpc_request(address: str, prompt: str, n: int = 1, ar: bool = False, **sampling) -> tuple[dict, int]:
    """(usage of the final message, answers)."""
    req = A.GenerateRequest(prompt=prompt, stream=A.STREAM_MODE_LINEAR, auto_regressive=ar,
                            sampling=pb.common_pb2.SamplingParameters(n=n, **sampling),
                            limits=pb.common_pb2.Limits(max_threads=6, max_depth=2))
    with grpc.insecure_channel(address) as ch:
        finals = [r.final for r in pb.apar_pb2_grpc.AparStub(ch).Generate(req, timeout=120)
                  if r.WhichOneof("event") == "final"]
    assert len(finals) == n
    u = finals[0].usage
    return {k: getattr(u, k) for k in USAGE_KEYS}, n


def http_request(base: str, prompt: str, n: int = 1) -> tuple[dict, int]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 30, "n": n,
            "temperature": 0.8, "seed": 7, "apar": {"max_threads": 6, "max_depth": 2}}
    r = httpx.post(base + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == n
    usage = r.json()["usage"]
    return {**usage, "cached_tokens": usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)}, n


class Job(NamedTuple):
    """One request of the load: through gRPC or HTTP (chat), its prompt, answers, AR or not, sampling."""

    door: str
    prompt: str
    n: int = 1
    ar: bool = False
    sampling: tuple[tuple[str, float], ...] = ()


JOBS = ([Job("grpc", p, sampling=(("max_tokens", 48),)) for p in PROMPTS]
        + [Job("grpc", p, sampling=(("max_tokens", 40), ("temperature", 0.8), ("seed", 3))) for p in PROMPTS]
        + [Job("grpc", PROMPTS[0], n=2, sampling=(("max_tokens", 32), ("temperature", 0.9), ("seed", 1))),
           Job("grpc", PROMPTS[1], ar=True, sampling=(("max_tokens", 24),)),
           Job("http", PROMPTS[2]), Job("http", PROMPTS[3], n=2)])


def run_job(job: Job, address: str, http_base: str) -> tuple[dict, int]:
    if job.door == "grpc":
        return grpc_request(address, job.prompt, job.n, job.ar, **dict(job.sampling))
    return http_request(http_base, job.prompt, job.n)


@pytest.fixture(scope="module")
def replayed(llama_dir, fork_token) -> tuple[list[tuple[int, int, int]], int]:
    """The load's requests run together on an in-process engine configured as the servers are: each
    request's (completion tokens, threads, forks), and the KV blocks its threads freed while it still ran,
    summed. A request's tree, and so what its threads free early, is its own whatever runs beside it."""
    from apar.engine.config import ControlTokens, EngineConfig
    from apar.engine.engine import Engine
    from apar.engine.params import SamplingParams
    from services.protocol.wire import params_from_pb
    from apar.text.prompt import encode_prompt
    from apar.text.stream import RequestStream

    eng = Engine(llama_dir, EngineConfig(num_blocks=KV_BLOCKS, block_size=16, control=ControlTokens(fork=fork_token)))
    streams = {}
    for job in JOBS:
        if job.door == "grpc":  # as grpc_request sends it
            params = params_from_pb(pb.common_pb2.SamplingParameters(n=job.n, **dict(job.sampling)),
                                    pb.common_pb2.Limits(max_threads=6, max_depth=2), job.ar)
            ids = encode_prompt(eng.tokenizer, job.prompt)
        else:  # as http_request's body reads
            params = SamplingParams(max_tokens=30, n=job.n, temperature=0.8, seed=7, max_threads=6, max_depth=2)
            ids = encode_prompt(eng.tokenizer, messages=[{"role": "user", "content": job.prompt}])
        streams[eng.add_request(ids, params)] = RequestStream(eng.tokenizer, eng.fork_id, eng.child_id, eng.eos_ids)
    for ev in eng.run_to_completion():
        streams[ev.request].feed(ev)
    usages = [stream.finals[0].usage for stream in streams.values()]
    return [(u["completion_tokens"], u["threads"], u["forks"]) for u in usages], eng.blocks_released_early


def drive(address: str, http_base: str, worker_url: str) -> tuple[list[tuple[dict, int]], int]:
    """A long AR request streams (the worker's gauges show it) while forking requests of both front doors
    run to completion; then the long one is cancelled. Returns (usage, answers) of the completed requests
    and how many were cancelled (the long one, unless it finished first)."""
    with grpc.insecure_channel(address) as ch:
        long = Stream(pb.apar_pb2_grpc.AparStub(ch), A.GenerateRequest(
            prompt="Tell a long story.", auto_regressive=True,
            sampling=pb.common_pb2.SamplingParameters(max_tokens=900, ignore_eos=True)), timeout=300)
        long.wait_running()
        wait_until(lambda: scrape_value(worker_url, "apar_num_requests_running", model_name=MODEL) >= 1 and
                   scrape_value(worker_url, "apar_threads_running", model_name=MODEL) >= 1, 10,
                   "the gauges to show the running request")
        with ThreadPoolExecutor(6) as pool:
            done = list(pool.map(lambda job: run_job(job, address, http_base), JOBS))
        long.cancel()
        long.join(20)
    if long.final is not None:  # it finished before the cancel reached it: an answered request like the others
        u = long.final.usage
        done.append(({k: getattr(u, k) for k in USAGE_KEYS}, 1))
        return done, 0
    assert long.code == "CANCELLED", long.code
    return done, 1


def idle(worker_url: str) -> Scrape:
    def check():
        s = Scrape(worker_url)
        gauges = [s.value(n, model_name=MODEL) for n in ("apar_num_requests_running", "apar_num_requests_waiting",
                                                          "apar_threads_running", "apar_kv_cache_usage_perc")]
        return s if gauges == [0, 0, 0, 0] else None

    return wait_until(check, 10, "running, waiting, threads and KV usage back to 0", every=0.1)


# ---- the checks -------------------------------------------------------------------------------------
def check_router(s: Scrape, done: list[tuple[dict, int]], cancelled: int) -> None:
    usages = [u for u, _ in done]
    m = {"model_name": MODEL}
    assert s.value("apar_generation_tokens_total", **m) == sum(u["completion_tokens"] for u in usages)
    assert s.value("apar_prompt_tokens_total", **m) == sum(u["prompt_tokens"] for u in usages)
    assert s.value("apar_threads_started_total", **m) == sum(u["threads"] for u in usages)
    assert s.value("apar_attended_tokens_total", **m) == sum(u["attended_tokens"] for u in usages)
    assert s.value("apar_attended_tokens_ar_equivalent_total", **m) == pytest.approx(
        sum(ar_equivalent(u, n) for u, n in done))
    single = [u for u, n in done if n == 1 and u["threads"] == 1]  # the AR ones, and any that did not fork
    assert single and all(ar_equivalent(u, 1) == u["attended_tokens"] for u in single)  # exact for them
    assert s.value("apar_request_success_total", **m) == len(done)
    for name in ("apar_e2e_request_latency_seconds_count", "apar_steps_per_request_count"):
        assert s.value(name, **m) == len(done), name
    assert s.value("apar_steps_per_request_sum", **m) == sum(u["steps"] for u in usages)
    assert s.value("apar_requests_received_total", **m) == len(done) + cancelled
    assert s.value("apar_time_to_first_token_seconds_count", **m) == len(done) + cancelled
    assert s.value("apar_inter_token_latency_seconds_count", **m) > 0
    assert s.value("apar_requests_failed_total", **m) == 0


def check_worker(s: Scrape, done: list[tuple[dict, int]], blocks: int, replayed) -> None:
    usages, early = replayed
    # the in-process replay made the same trees as the server did, so its early releases are the oracle
    assert [(u["completion_tokens"], u["threads"], u["forks"]) for u, _ in done[:len(JOBS)]] == usages
    m = {"model_name": MODEL}
    forks = s.value("apar_forks_total", **m)
    assert forks == sum(u["forks"] for u, _ in done) == sum(u["threads"] - n for u, n in done)
    assert forks > 0, "no request forked"
    assert s.value("apar_fork_depth_count", **m) == forks and s.value("apar_fork_depth_sum", **m) >= forks
    assert s.value("apar_kv_blocks_used", **m) == 0 and s.value("apar_kv_blocks_free", **m) == blocks
    steps = s.value("apar_tokens_per_step_count", **m)
    assert steps > 0 and s.value("apar_tokens_per_step_bucket", le="1.0", **m) < steps  # some steps in parallel
    assert s.value("apar_worker_step_seconds_count", **m) >= steps
    assert s.value("apar_kvmanager_rtt_seconds_count", **m) > 0
    assert s.value("apar_kv_blocks_released_early_total", **m) == early > 0
    assert s.value("apar_num_preemptions_total", **m) == 0


def check_names(*scrapes: Scrape) -> None:
    """Router and worker: every series has the model label, and no apar_router_/apar_worker_ twins."""
    for s in scrapes:
        for name, labels, _ in s.samples:
            assert labels.get("model_name") == MODEL, (name, labels)
            assert not name.startswith("apar_router_"), name
            assert not name.startswith("apar_worker_") or name.startswith("apar_worker_step_seconds"), name


# ---- the tests --------------------------------------------------------------------------------------
def test_serve_metrics_match_the_clients_usage(llama_dir, fork_token, replayed):
    port, mport = free_port(), free_port()
    proc = Proc("serve", "--model", str(llama_dir), "--port", str(port), "--http-port", "0", "--metrics-port",
                str(mport), "--kv-blocks", str(KV_BLOCKS), "--block-size", "16", "--fork-token", fork_token,
                "--served-model-name", MODEL)
    try:
        http_port = int(proc.wait_for(r"listening on .*HTTP on 127\.0\.0\.1:(\d+)").group(1))
        url, http = f"http://127.0.0.1:{mport}/metrics", f"http://127.0.0.1:{http_port}"
        done, cancelled = drive(f"127.0.0.1:{port}", http, url)
        s = idle(url)
        check_router(s, done, cancelled)
        check_worker(s, done, KV_BLOCKS, replayed)
        check_names(s)
        via_http = Scrape(http + "/metrics")  # the HTTP API's /metrics: the same registry
        assert via_http.names() == s.names()
        missing = dashboard_names() - KV_MANAGER_ONLY - s.names()
        assert not missing, f"the dashboard queries metrics apar serve does not export: {missing}"
    finally:
        proc.stop()


def test_cluster_metrics_match_the_clients_usage(llama_dir, fork_token, replayed):
    redis = ScratchRedis()
    kv_port, kv_m, w_port, w_m, r_port, r_m = (free_port() for _ in range(6))
    kv = Proc("kvmanager", "--port", str(kv_port), "--redis", redis.url, "--metrics-port", str(kv_m))
    procs = [kv]
    try:
        kv.wait_for("listening on")
        worker = Proc("worker", "--model", str(llama_dir), "--port", str(w_port), "--kv-blocks", str(KV_BLOCKS),
                      "--block-size", "16", "--kvmanager", f"127.0.0.1:{kv_port}", "--worker-id", "w-metrics",
                      "--metrics-port", str(w_m), "--fork-token", fork_token, "--served-model-name", MODEL)
        procs.append(worker)
        worker.wait_for("listening on")
        router = Proc("router", "--model", str(llama_dir), "--kvmanager", f"127.0.0.1:{kv_port}", "--port",
                      str(r_port), "--http-port", "0", "--metrics-port", str(r_m), "--served-model-name", MODEL)
        procs.append(router)
        http_port = int(router.wait_for(r"listening on .*HTTP on 127\.0\.0\.1:(\d+)").group(1))
        router_url, worker_url = f"http://127.0.0.1:{r_m}/metrics", f"http://127.0.0.1:{w_m}/metrics"
        kv_url = f"http://127.0.0.1:{kv_m}/metrics"
        done, cancelled = drive(f"127.0.0.1:{r_port}", f"http://127.0.0.1:{http_port}", worker_url)
        w = idle(worker_url)
        r = Scrape(router_url)
        check_router(r, done, cancelled)
        check_worker(w, done, KV_BLOCKS, replayed)
        check_names(r, w)
        assert not {n for n, _, _ in r.samples} & {n for n, _, _ in w.samples}  # each quantity in one place
        k = wait_until(lambda: (s := Scrape(kv_url)).value("apar_kvmanager_blocks_used", worker="w-metrics") == 0
                       and s, 10, "the KV manager's ledger of the worker empty")
        # every message the manager answered was timed by the worker; messages carry one or more steps
        wait_until(lambda: Scrape(kv_url).value("apar_kvmanager_messages_total") ==
                   Scrape(worker_url).value("apar_kvmanager_rtt_seconds_count") > 0, 10,
                   "as many round trips timed by the worker as messages answered by the KV manager")
        assert k.value("apar_kvmanager_steps_total") > 0 and k.value("apar_kvmanager_resyncs_total") == 0
        for op in STORE_OPERATIONS:
            assert k.value("apar_redis_errors_total", operation=op) == 0
        missing = dashboard_names() - (r.names() | w.names() | k.names())
        assert not missing, f"the dashboard queries metrics the cluster does not export: {missing}"
    finally:
        for p in reversed(procs):
            p.stop()
        redis.close()


def test_dashboard_is_valid_grafana_json():
    d = json.loads(DASHBOARD.read_text())
    assert 36 <= d["schemaVersion"] <= 41 and d["uid"] and d["title"]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    model = variables["model_name"]
    assert model["type"] == "query" and model["query"]["query"] == "label_values(apar_num_requests_running, model_name)"
    assert model["datasource"]["uid"] == "${datasource}"
    panels = d["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)) and len(panels) >= 20
    for p in panels:
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"] and p["title"] and set(p["gridPos"]) == {"x", "y", "w", "h"}
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs))
        for t in p["targets"]:
            e = t["expr"]
            for a, b in ("()", "{}", "[]"):
                depth = 0
                for ch in e:
                    depth += (ch == a) - (ch == b)
                    assert depth >= 0, e
                assert depth == 0, e
            for name in re.findall(r"apar_[a-z0-9_]+", e):  # one model at a time, except the KV manager's
                assert name in KV_MANAGER_ONLY or f'{name}{{model_name=~"$model_name"}}' in e, e
            if "histogram_quantile" in e:
                assert re.fullmatch(r'histogram_quantile\(0\.\d+, sum by \(le\) \(rate\(apar_[a-z0-9_]+_bucket'
                                    r'\{model_name=~"\$model_name"\}\[\$__rate_interval\]\)\)\)', e), e
    titles = " ".join(p["title"] for p in panels).lower()
    for words in ("time to first token", "inter-token", "end-to-end", "tokens/s", "running and waiting",
                  "kv cache usage", "finish reason", "parallelism", "forks", "fork depth", "released early",
                  "attended tokens saved", "preemptions", "step time", "kv manager round trip", "redis errors"):
        assert words in titles, words
