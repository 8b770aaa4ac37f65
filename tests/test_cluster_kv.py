"""Cluster mode with the KV manager and a real Redis: router, worker and KV manager as processes.

Faults, each injected while a request is seen running and checked to have hit it: the KV manager killed
and restarted under load, Redis restarted, the worker silent past its time-to-live, the worker killed.
The worker's steps never wait for the manager: requests go on through each fault, and afterwards the
manager's replica equals the worker's ledger. And with the manager frozen (SIGSTOP), an engine steps on
without waiting while its replica lags within the bound, and waits past it."""
from __future__ import annotations

import sys
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from apar.protogen import stubs
from apar.bench_suite.simulated import ScratchRedis
from tests.faults import Stream, wait_until, worker_info
from tests.procs import Proc, free_port

pb = stubs()
A, K = pb.apar_pb2, pb.kvmanager_pb2
BLOCKS = 512  # a request of 4,000 tokens fits: it is still running when a fault hits it


@pytest.fixture(scope="module")
def cluster(long_llama_dir):
    redis = ScratchRedis()
    kv_port, w_port, r_port = free_port(), free_port(), free_port()
    kv_args = ("kvmanager", "--port", str(kv_port), "--redis", redis.url, "--ttl", "2", "--reap-every", "0.2")
    kv = Proc(*kv_args)
    kv.wait_for("listening on")
    worker = Proc("worker", "--model", str(long_llama_dir), "--port", str(w_port), "--kv-blocks", str(BLOCKS),
                  "--kvmanager", f"127.0.0.1:{kv_port}", "--kv-ttl", "2", "--worker-id", "w-main")
    worker.wait_for("listening on")
    router = Proc("router", "--model", str(long_llama_dir), "--kvmanager", f"127.0.0.1:{kv_port}", "--port",
                  str(r_port))
    router.wait_for("listening on")
    c = type("Cluster", (), {})()
    c.redis, c.kv, c.kv_args, c.worker, c.router = redis, kv, kv_args, worker, router
    c.address, c.kv_address, c.worker_address = f"127.0.0.1:{r_port}", f"127.0.0.1:{kv_port}", f"127.0.0.1:{w_port}"
    yield c
    for p in (c.router, c.worker, c.kv):
        p.stop()
    redis.close()


def kv_state(c, worker="w-main"):
    with grpc.insecure_channel(c.kv_address) as ch:
        stub = pb.kvmanager_pb2_grpc.KVManagerStub(ch)
        return stub.State(K.StateRequest(worker_id=worker), timeout=5), stub.Usage(K.UsageRequest(), timeout=5)


def kv_usage(c):
    with grpc.insecure_channel(c.kv_address) as ch:
        return pb.kvmanager_pb2_grpc.KVManagerStub(ch).Usage(K.UsageRequest(), timeout=5)


def kv_serving(c) -> bool:
    with grpc.insecure_channel(c.kv_address) as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="apar.v1.KVManager"),
                                                     timeout=5).status
    return status == health_pb2.HealthCheckResponse.SERVING


def wait_idle(c, timeout=8.0):
    """The manager's ledger of the worker once every block in it is free."""
    def idle():
        state, _ = kv_state(c)
        return state if len(state.free) == BLOCKS else None

    return wait_until(idle, timeout, "every block free in the manager's ledger", every=0.05)


def gen(stub, max_tokens, **kw):
    req = A.GenerateRequest(prompt="Tell me about rivers.", sampling=pb.common_pb2.SamplingParameters(
        max_tokens=max_tokens, **kw))
    return [r.final for r in stub.Generate(req, timeout=60) if r.WhichOneof("event") == "final"][0]


def streamed(max_tokens, **kw):
    """A request streamed thread by thread: its first event (the root's start) comes with its first step."""
    return A.GenerateRequest(prompt="Tell me about rivers.", stream=A.STREAM_MODE_THREADS,
                             sampling=pb.common_pb2.SamplingParameters(max_tokens=max_tokens, **kw))


def serving(stub, max_tokens=8):
    """Wait until a new request is answered in full (the router may first have to see the worker again)."""
    wait_until(lambda: gen(stub, max_tokens, ignore_eos=True).usage.completion_tokens == max_tokens, 20,
               "a new request answered in full", every=0.1, ignore=(grpc.RpcError,))


def test_through_the_kv_manager(cluster, long_llama_dir):
    from services.protocol.params import SamplingParams
    from services.router.prompt import encode_prompt
    from services.router.stream import RequestStream
    from services.worker.config import EngineConfig
    from services.worker.engine import Engine

    with grpc.insecure_channel(cluster.address) as ch:
        stub = pb.apar_pb2_grpc.AparStub(ch)
        final = gen(stub, 30, temperature=0.8, seed=9)
        engine = Engine(long_llama_dir, EngineConfig(num_blocks=16))
        engine.add_request(encode_prompt(engine.tokenizer, "Tell me about rivers."),
                           SamplingParams(max_tokens=30, temperature=0.8, seed=9))
        local = RequestStream(engine.tokenizer, engine.fork_id, engine.child_id, engine.eos_ids)
        for ev in engine.run_to_completion():
            local.feed(ev)
        assert final.text == local.final.text and final.usage.completion_tokens == local.final.usage["completion_tokens"]
        call = stub.Generate(A.GenerateRequest(prompt="x", sampling=pb.common_pb2.SamplingParameters(
            max_tokens=3000, ignore_eos=True)), timeout=60)
        for i, _ in enumerate(call):
            if i == 5:
                break
        state, usage = kv_state(cluster)
        assert len(state.used) > 0
        call.cancel()
        state = wait_idle(cluster)
        assert len(state.free) == BLOCKS and not state.used
        assert [w.worker_id for w in usage.workers] == ["w-main"]


def test_kv_manager_killed_and_restarted_under_load(cluster):
    """The KV manager is killed while requests run: they go on (the worker's steps never wait for it),
    and once it is back (restored from Redis) the worker resends what it had not acknowledged; every
    request finishes, or fails cleanly with a final message saying why (had the manager stayed away
    past the worker's lag bound)."""
    with grpc.insecure_channel(cluster.address) as ch:
        stub = pb.apar_pb2_grpc.AparStub(ch)
        streams = [Stream(stub, streamed(600, temperature=0.5, seed=i, ignore_eos=True)) for i in range(4)]
        wait_until(lambda: any(s.running for s in streams), 30, "a request streaming")
        mark = len(cluster.worker.lines)
        cluster.kv.kill()
        # the fault hits running requests, and they go on streaming with the manager gone
        hit = [s for s in streams if s.running]
        assert hit and worker_info(cluster.worker_address).running >= 1
        at_kill = sum(s.events for s in hit)
        cluster.worker.wait_for("KV manager unavailable", timeout=10, since=mark)
        wait_until(lambda: sum(s.events for s in hit) >= at_kill + 20 or all(s.ended for s in hit), 10,
                   "the requests to go on without the manager")
        cluster.kv = Proc(*cluster.kv_args)
        cluster.kv.wait_for("listening on")
        for s in streams:
            s.join(60)
        outcomes = [(s.final.error or "ok", s.final.usage.completion_tokens) if s.final else (s.code, 0)
                    for s in streams]
        # each request finishes, or fails cleanly with a final message saying why
        assert all(o in ("ok", "internal engine error") for o, _ in outcomes), \
            (outcomes, "".join(cluster.router.lines[-40:]))
        assert all(n == 600 for o, n in outcomes if o == "ok")
        state = wait_idle(cluster)
        assert len(state.free) == BLOCKS and len(set(state.free)) == BLOCKS and not state.used
        assert gen(stub, 10, ignore_eos=True).usage.completion_tokens == 10  # still serving


def went_on(s: Stream, since: int) -> bool:
    """The request streamed on from `since` events: still running, or ended cleanly."""
    wait_until(lambda: s.events >= since + 10 or s.ended, 30, "the request to go on")
    return s.events > since and (s.running or (s.final is not None and s.final.error in ("", "the KV cache is full")))


def test_redis_restart_then_serving_goes_on(cluster):
    """Redis restarts (empty) while a request runs: the manager goes on applying and acknowledging the
    worker's steps from memory (the worker never finds it unavailable), the request streams on, and once
    Redis is back the manager writes every ledger back."""
    with grpc.insecure_channel(cluster.address) as ch:
        stub = pb.apar_pb2_grpc.AparStub(ch)
        s = Stream(stub, streamed(4000, ignore_eos=True))
        s.wait_running()
        mark = len(cluster.worker.lines)
        cluster.redis.kill()
        wait_until(lambda: not kv_serving(cluster), 10, "the KV manager to report Redis gone")
        assert worker_info(cluster.worker_address).running == 1 and s.running  # in flight at the outage
        at_outage, free = s.events, kv_usage(cluster).workers[0].free_blocks
        assert went_on(s, at_outage), (s.code, s.final)
        wait_until(lambda: kv_usage(cluster).workers[0].free_blocks != free, 10,
                   "the manager's replica to follow the request while Redis is away")
        cluster.redis.start()
        wait_until(lambda: kv_serving(cluster), 10, "the KV manager serving again")
        wait_until(lambda: cluster.redis.client().exists("apar:kv:w:w-main:snap"), 10,
                   "the worker's ledger written back to the restarted Redis")
        assert not any("KV manager unavailable" in line for line in cluster.worker.lines[mark:])
        s.cancel()
        s.join(10)
        serving(stub)
    assert len(wait_idle(cluster).free) == BLOCKS


def test_worker_forgotten_by_the_manager_recovers(cluster):
    """The worker is silent longer than its time-to-live while a request runs (frozen, as in a long pause
    or a partition): the manager reclaims it; once it wakes, it registers again and replaces the fresh,
    empty replica by its own ledger (a resync): its request goes on, and both ledgers end equal."""
    with grpc.insecure_channel(cluster.address) as ch:
        stub = pb.apar_pb2_grpc.AparStub(ch)
        s = Stream(stub, streamed(4000, ignore_eos=True))
        s.wait_running()
        assert worker_info(cluster.worker_address).running == 1
        cluster.worker.pause()
        try:  # the time-to-live passes without a heartbeat: the manager drops the worker
            wait_until(lambda: not kv_usage(cluster).workers, 10, "the manager to reclaim the silent worker")
            assert s.running  # the request was in flight when its worker was forgotten
        finally:
            mark = len(cluster.worker.lines)
            cluster.worker.resume()
        cluster.worker.wait_for("resyncing its ledger", timeout=10, since=mark)
        wait_until(lambda: [w.worker_id for w in kv_usage(cluster).workers] == ["w-main"], 10,
                   "the worker registered again")
        at_resync = s.events
        assert went_on(s, at_resync), (s.code, s.final)
        s.cancel()
        s.join(10)
        serving(stub, 12)
        state = wait_idle(cluster)
        assert len(state.free) == BLOCKS and not state.used
        info = stub.ModelInfo(A.ModelInfoRequest())
        assert info.free_kv_blocks == info.total_kv_blocks == BLOCKS


def test_killed_worker_is_reclaimed(cluster):
    """The worker is killed under a running request: the request gets UNAVAILABLE, the manager reclaims
    the worker's ledger (the request's blocks with it), and new requests get UNAVAILABLE."""
    with grpc.insecure_channel(cluster.address) as ch:
        stub = pb.apar_pb2_grpc.AparStub(ch)
        s = Stream(stub, streamed(2000, ignore_eos=True))
        s.wait_running()
        state, _ = kv_state(cluster)
        assert state.used  # the running request's blocks, in the manager's ledger
        cluster.worker.kill()
        assert s.join(10).code == "UNAVAILABLE"
        wait_until(lambda: not kv_usage(cluster).workers, 10, "the dead worker's ledger reclaimed")
        with pytest.raises(grpc.RpcError) as err:
            kv_state(cluster)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as err:
            gen(stub, 5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


LAG_STEPS = 40  # the engine's lag bound in the test below, in steps (its bound in seconds is out of reach)


def waiting_on_lag(thread: threading.Thread) -> bool:
    """The thread is inside RemoteKV's lag-bound wait (read from its live stack)."""
    frame = sys._current_frames().get(thread.ident)
    while frame is not None:
        if frame.f_code.co_name == "_within_lag":
            return True
        frame = frame.f_back
    return False


def test_a_paused_manager_holds_the_engine_back_only_past_the_lag_bound(llama_dir):
    """A real engine (random model, in this process) in cluster mode, 4 requests decoding, its manager a
    process frozen (SIGSTOP). While the replica lags at most the bound (LAG_STEPS steps), the engine
    steps on and never waits; the step after the bound waits (the step stays inside the lag-bound wait
    while the manager is frozen) until the manager resumes. After that, the replica equals the engine's
    ledger. (The engine's pace with a frozen manager is measured by `apar bench kvmanager
    --pause-manager S`, a benchmark.)"""
    from services.kvmanager import convert
    from services.protocol.params import SamplingParams
    from services.worker.config import EngineConfig
    from services.worker.engine import Engine
    from services.worker.kv import RemoteKV
    from services.worker.kvclient import KVManagerClient

    import torch

    redis = ScratchRedis()
    port = free_port()
    kv = Proc("kvmanager", "--port", str(port), "--redis", redis.url, "--ttl", "60")
    clients = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on 2 shared cores, 2 torch threads spin against each other

    def factory(ledger):
        client = KVManagerClient(f"127.0.0.1:{port}", "w-paced", "here", ledger.num_blocks, ledger.block_size,
                                 ttl_s=60)
        assert not client.register()
        client.start_heartbeat()
        clients.append(client)
        # the wait past the bound gives up after wait_s: longer than the test holds the manager frozen
        return RemoteKV(ledger, client, max_lag_steps=LAG_STEPS, max_lag_s=3600.0, wait_s=20.0)

    try:
        kv.wait_for("listening on")
        eng = Engine(llama_dir, EngineConfig(block_size=16, num_blocks=128), kv_factory=factory)
        for i in range(4):
            eng.add_request(list(range(10 + i, 40 + i)), SamplingParams(max_tokens=300, ignore_eos=True,
                                                                         auto_parallel=False))
        while eng.ledger.num_requests < 4 or eng.steps < 4:
            eng.step()  # every request admitted, prefilled, decoding
        eng.kv.drain(30)
        assert eng.kv.outbox.lag()[0] == 0
        kv.pause()
        try:
            # under the bound: the engine steps on with nothing acknowledged, and never waits
            steps = eng.steps
            while eng.kv.outbox.lag()[0] <= LAG_STEPS:
                eng.step()
            assert eng.steps - steps >= LAG_STEPS and eng.kv.blocked_s == 0.0
            assert eng.ledger.num_requests == 4  # all still running
            # past the bound: the next step waits for the frozen manager
            failed: list[BaseException] = []

            def one_step() -> None:
                try:
                    eng.step()
                except BaseException as exc:  # reported on the test's thread below
                    failed.append(exc)

            step = threading.Thread(target=one_step, daemon=True)
            step.start()
            wait_until(lambda: waiting_on_lag(step) or not step.is_alive(), 30, "the step to reach the lag bound")
            assert step.is_alive(), "the step past the lag bound did not wait for the manager"
        finally:
            kv.resume()
        step.join(30)
        assert not step.is_alive() and not failed and eng.kv.blocked_s > 0.0, failed
        eng.kv.drain(30)
        state = clients[0].state()
        assert state == convert.state_to_pb(eng.ledger.snapshot()) and state.used
    finally:
        torch.set_num_threads(threads)
        if clients:
            eng.kv.close()
        for c in clients:
            c.close()
        kv.stop()
        redis.close()
