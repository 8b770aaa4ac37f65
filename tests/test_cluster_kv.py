"""Cluster mode with the KV manager and a real Redis: router, worker and KV manager as processes.

Faults, each injected while a request is seen running and checked to have hit it: the KV manager killed
under load and away past the worker's lag bound, Redis restarted, the worker silent past its
time-to-live, the worker killed. The worker's steps never wait for the manager within the bound:
requests go on through Redis's restart and the worker's pause; past the bound they end with a clear
error (those running, and one the refused step admits) and the worker serves again once the manager
is back; afterwards the manager's replica equals the
worker's ledger. And with the manager frozen (SIGSTOP), an engine steps on without waiting while its
replica lags within the bound, and waits past it."""
from __future__ import annotations

import sys
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from apar.bench_suite.simulated import ScratchRedis
from apar.protogen import stubs
from services.worker.kv import MANAGER_UNAVAILABLE
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
                  "--kvmanager", f"127.0.0.1:{kv_port}", "--kv-ttl", "2", "--worker-id", "w-main",
                  "--kv-max-lag", "1", "--kv-lag-wait", "3")
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
    from apar.engine.config import EngineConfig
    from apar.engine.engine import Engine
    from apar.engine.params import SamplingParams
    from apar.text.prompt import encode_prompt
    from apar.text.stream import RequestStream

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


def test_kv_manager_killed_past_the_lag_bound_then_back(cluster):
    """The KV manager is killed while requests stream and stays away past the worker's lag bound (1 s,
    then 3 s of waiting): the requests that were running end with the error that says the manager is
    unavailable (not the loop's catch-all for a failed step), the engine lives on (a request sent during
    the outage ends the same way at once), and once the manager is back (restored from Redis) the worker
    catches up and serves new requests in full; in the end the replica and the worker's ledger both
    hold nothing, every block free."""
    with grpc.insecure_channel(cluster.address) as ch:
        stub = pb.apar_pb2_grpc.AparStub(ch)
        streams = [Stream(stub, streamed(16000, temperature=0.5, seed=i, ignore_eos=True)) for i in range(4)]
        wait_until(lambda: all(s.running for s in streams), 30, "every request streaming")
        mark = len(cluster.worker.lines)
        cluster.kv.kill()
        assert all(s.running for s in streams) and worker_info(cluster.worker_address).running == 4
        at_kill = [s.events for s in streams]
        for s in streams:
            s.join(30)
        ends = [(s.code, s.final.finish_reason, s.final.error) if s.final else (s.code,) for s in streams]
        assert ends == [("OK", "error", MANAGER_UNAVAILABLE)] * 4, (ends, "".join(cluster.worker.lines[mark:]))
        # they streamed on up to the bound: tokens after the kill, not only the final message
        assert all(s.events - 1 - n >= 10 for s, n in zip(streams, at_kill)), (at_kill, [s.events for s in streams])
        cluster.worker.wait_for("ending the requests of its steps", timeout=5, since=mark)
        during = gen(stub, 10, ignore_eos=True)
        assert (during.finish_reason, during.error) == ("error", MANAGER_UNAVAILABLE)
        assert worker_info(cluster.worker_address).running == 0
        cluster.kv = Proc(*cluster.kv_args)
        cluster.kv.wait_for("listening on")
        cluster.worker.wait_for("caught up with this worker", timeout=30, since=mark)
        final = gen(stub, 40, ignore_eos=True)
        assert (final.finish_reason, final.error, final.usage.completion_tokens) == ("length", "", 40)
        assert not [line for line in cluster.worker.lines[mark:] if "Traceback" in line or " ERROR " in line]
        state = wait_idle(cluster)
        assert len(set(state.free)) == BLOCKS and not state.used
        info = worker_info(cluster.worker_address)
        assert (info.free_blocks, info.running, info.waiting) == (BLOCKS, 0, 0)


def test_the_step_past_the_lag_bound_admits_a_request(cluster):
    """The KV manager is killed while a request runs; the request is cancelled, so the worker is idle
    with steps the manager never acknowledged. Once the worker says its replica is past the lag bound, a
    new request comes: the step that admits it is the step the bound refuses (nothing of it applied).
    The request ends unserved with the error that says the manager is unavailable; the worker logs no
    error (ending a request the ledger never saw would), and serves again once the manager is back."""
    with grpc.insecure_channel(cluster.address) as ch:
        stub = pb.apar_pb2_grpc.AparStub(ch)
        serving(stub)
        mark = len(cluster.worker.lines)
        s = Stream(stub, streamed(4000, ignore_eos=True))
        s.wait_running()
        cluster.kv.kill()
        s.cancel()
        assert s.join(10).code == "CANCELLED"
        wait_until(lambda: worker_info(cluster.worker_address).running == 0, 10, "the worker idle")
        cluster.worker.wait_for("past the lag bound", timeout=10, since=mark)
        new = Stream(stub, streamed(20, ignore_eos=True)).join(30)
        assert (new.code, new.final.finish_reason, new.final.error) == ("OK", "error", MANAGER_UNAVAILABLE)
        assert new.final.usage.completion_tokens == 0
        cluster.worker.wait_for("ending the requests of its steps", timeout=5, since=mark)
        cluster.kv = Proc(*cluster.kv_args)
        cluster.kv.wait_for("listening on")
        cluster.worker.wait_for("caught up with this worker", timeout=30, since=mark)
        serving(stub)
        assert not [line for line in cluster.worker.lines[mark:] if "Traceback" in line or " ERROR " in line]
        info = worker_info(cluster.worker_address)
        assert (info.running, info.waiting) == (0, 0) and info.free_blocks == BLOCKS


def went_on(s: Stream, since: int) -> bool:
    """The request streamed ten more events from `since` and is still running, or ended in full (its
    4,000 tokens): an end with an error, or before those ten events, is not going on."""
    wait_until(lambda: s.events >= since + 10 or s.ended, 30, "the request to go on")
    if s.events < since + 10:
        return False
    return s.running or (s.code == "OK" and s.final is not None
                         and (s.final.finish_reason, s.final.error) == ("length", ""))


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
    # being forgotten after a reaping is expected (the worker registers again): a warning, not an error
    assert not [line for line in cluster.worker.lines[mark:] if " ERROR " in line and "no longer knows" in line]


def test_a_worker_id_belongs_to_one_live_process(cluster, long_llama_dir):
    """A second worker process with the cluster worker's id, as a StatefulSet's replacement pod has:
    while the first lives, the second is refused (it says so and waits) and the manager still lists the
    id at the first's address, where the router sends requests; the first freezes past its time-to-live
    (a pause, a partition): reaped, and the second registers the id and serves; the first wakes, is
    refused, and stops (exit 1, saying why). The second is the cluster's worker from then on."""
    old, port = cluster.worker, free_port()

    def listed() -> list[str]:
        return [w.address for w in kv_usage(cluster).workers if w.worker_id == "w-main"]

    new = Proc("worker", "--model", str(long_llama_dir), "--port", str(port), "--kv-blocks", str(BLOCKS),
               "--kvmanager", cluster.kv_address, "--kv-ttl", "4", "--worker-id", "w-main",
               "--kv-max-lag", "1", "--kv-lag-wait", "3")
    try:
        new.wait_for("worker id w-main is taken")
        assert listed() == [cluster.worker_address]
        with grpc.insecure_channel(cluster.address) as ch:
            stub = pb.apar_pb2_grpc.AparStub(ch)
            assert gen(stub, 6, ignore_eos=True).usage.completion_tokens == 6
            old.pause()
            try:
                new.wait_for("listening on", timeout=30)
                assert listed() == [f"127.0.0.1:{port}"]
            finally:
                mark = len(old.lines)
                old.resume()
            assert old.p.wait(timeout=30) == 1
            old.wait_for("stopped: another process holds this worker's id", timeout=1, since=mark)
            assert listed() == [f"127.0.0.1:{port}"]
            cluster.worker, cluster.worker_address = new, f"127.0.0.1:{port}"
            serving(stub)
    except BaseException:
        new.stop()
        raise


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
    from apar.engine.config import EngineConfig
    from apar.engine.engine import Engine
    from apar.engine.params import SamplingParams
    from services.kvmanager import wire
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
        assert state == wire.state_to_pb(eng.ledger.snapshot()) and state.used
    finally:
        torch.set_num_threads(threads)
        if clients:
            eng.kv.close()
        for c in clients:
            c.close()
        kv.stop()
        redis.close()
