"""Cluster mode with the KV manager and a real Redis: router, worker and KV manager as processes.

Faults: the KV manager killed and restarted under load, a worker killed, Redis restarted."""
from __future__ import annotations

import subprocess
import threading
import time

import grpc
import pytest

from apar.protogen import stubs
from tests.procs import Proc, free_port

pb = stubs()
A, K = pb.apar_pb2, pb.kvmanager_pb2
BLOCKS = 64


class Redis:
    def __init__(self, port: int) -> None:
        self.port = port
        self.start()

    def start(self) -> None:
        self.p = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                   "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True,
                             text=True).stdout.strip() != "PONG":
            assert time.monotonic() < deadline, "redis did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        self.p.kill()
        self.p.wait()


@pytest.fixture(scope="module")
def cluster(llama_dir):
    redis = Redis(free_port())
    kv_port, w_port, r_port = free_port(), free_port(), free_port()
    kv_args = ("kvmanager", "--port", str(kv_port), "--redis", f"redis://127.0.0.1:{redis.port}/0", "--ttl", "2",
               "--reap-every", "0.2")
    kv = Proc(*kv_args)
    kv.wait_for("listening on")
    worker = Proc("worker", "--model", str(llama_dir), "--port", str(w_port), "--kv-blocks", str(BLOCKS),
                  "--kvmanager", f"127.0.0.1:{kv_port}", "--kv-ttl", "2", "--worker-id", "w-main")
    worker.wait_for("listening on")
    router = Proc("router", "--model", str(llama_dir), "--kvmanager", f"127.0.0.1:{kv_port}", "--port",
                  str(r_port))
    router.wait_for("listening on")
    c = type("Cluster", (), {})()
    c.redis, c.kv, c.kv_args, c.worker, c.router = redis, kv, kv_args, worker, router
    c.address, c.kv_address = f"127.0.0.1:{r_port}", f"127.0.0.1:{kv_port}"
    yield c
    for p in (c.router, c.worker, c.kv):
        p.stop()
    redis.stop()


def kv_state(c, worker="w-main"):
    with grpc.insecure_channel(c.kv_address) as ch:
        stub = pb.kvmanager_pb2_grpc.KVManagerStub(ch)
        return stub.State(K.StateRequest(worker_id=worker), timeout=5), stub.Usage(K.UsageRequest(), timeout=5)


def kv_usage(c):
    with grpc.insecure_channel(c.kv_address) as ch:
        return pb.kvmanager_pb2_grpc.KVManagerStub(ch).Usage(K.UsageRequest(), timeout=5)


def wait_idle(c, timeout=8.0):
    deadline = time.monotonic() + timeout
    while True:
        state, _ = kv_state(c)
        if len(state.free) == BLOCKS or time.monotonic() > deadline:
            return state
        time.sleep(0.1)


def gen(stub, max_tokens, **kw):
    req = A.GenerateRequest(prompt="Tell me about rivers.", sampling=pb.common_pb2.SamplingParameters(
        max_tokens=max_tokens, **kw))
    return [r.final for r in stub.Generate(req, timeout=60) if r.WhichOneof("event") == "final"][0]


def test_through_the_kv_manager(cluster, llama_dir):
    from services.router.prompt import encode_prompt
    from services.router.stream import RequestStream
    from services.worker.config import EngineConfig, SamplingParams
    from services.worker.engine import Engine

    with grpc.insecure_channel(cluster.address) as ch:
        stub = pb.apar_pb2_grpc.AparStub(ch)
        final = gen(stub, 30, temperature=0.8, seed=9)
        engine = Engine(llama_dir, EngineConfig(num_blocks=16))
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
    with grpc.insecure_channel(cluster.address) as ch:
        stub = pb.apar_pb2_grpc.AparStub(ch)
        outcomes = []

        def client(i):
            try:
                final = gen(stub, 120, temperature=0.5, seed=i, ignore_eos=True)
                outcomes.append(("ok" if not final.error else final.error, final.usage.completion_tokens))
            except grpc.RpcError as exc:
                outcomes.append((exc.code().name, 0))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        cluster.kv.kill()
        time.sleep(1.0)
        cluster.kv = Proc(*cluster.kv_args)
        cluster.kv.wait_for("listening on")
        for t in threads:
            t.join(60)
        # each request finishes, or fails cleanly with a final message saying why
        assert len(outcomes) == 4 and all(o in ("ok", "internal engine error") for o, _ in outcomes), \
            (outcomes, "".join(cluster.router.lines[-40:]))
        assert all(n == 120 for o, n in outcomes if o == "ok")
        state = wait_idle(cluster)
        assert len(state.free) == BLOCKS and len(set(state.free)) == BLOCKS and not state.used
        assert gen(stub, 10).usage.completion_tokens == 10  # still serving


def test_redis_restart_then_serving_goes_on(cluster):
    cluster.redis.stop()
    time.sleep(0.5)
    cluster.redis.start()
    with grpc.insecure_channel(cluster.address) as ch:
        stub = pb.apar_pb2_grpc.AparStub(ch)
        deadline = time.monotonic() + 20
        while True:
            try:
                assert gen(stub, 8).usage.completion_tokens == 8
                break
            except grpc.RpcError:
                assert time.monotonic() < deadline
                time.sleep(0.5)
    assert len(wait_idle(cluster).free) == BLOCKS


def test_worker_forgotten_by_the_manager_recovers(cluster):
    """The KV manager is away longer than the worker's time-to-live: it reclaims the worker; the worker's
    requests fail cleanly, it registers again, and both ledgers restart equal."""
    with grpc.insecure_channel(cluster.address) as ch:
        stub = pb.apar_pb2_grpc.AparStub(ch)
        result = []

        def client():
            try:
                result.append(gen(stub, 2000, ignore_eos=True))
            except grpc.RpcError as exc:
                result.append(exc.code().name)

        t = threading.Thread(target=client)
        t.start()
        time.sleep(0.5)
        cluster.kv.kill()
        time.sleep(3.0)  # > the 2 s time-to-live
        cluster.kv = Proc(*cluster.kv_args)
        cluster.kv.wait_for("listening on")
        t.join(60)
        assert result and not isinstance(result[0], str) and result[0].error
        deadline = time.monotonic() + 20
        while True:
            try:
                assert gen(stub, 12, ignore_eos=True).usage.completion_tokens == 12
                break
            except grpc.RpcError:
                assert time.monotonic() < deadline
                time.sleep(0.5)
        state = wait_idle(cluster)  # every step after the recovery was checked slot for slot by the worker
        assert len(state.free) == BLOCKS and not state.used
        info = stub.ModelInfo(A.ModelInfoRequest())
        assert info.free_kv_blocks == info.total_kv_blocks == BLOCKS


def test_killed_worker_is_reclaimed(cluster):
    cluster.worker.kill()
    deadline = time.monotonic() + 10
    while True:
        if not kv_usage(cluster).workers:
            break
        assert time.monotonic() < deadline, "the dead worker's ledger was never reclaimed"
        time.sleep(0.2)
    with grpc.insecure_channel(cluster.address) as ch:
        with pytest.raises(grpc.RpcError) as err:
            gen(pb.apar_pb2_grpc.AparStub(ch), 5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
