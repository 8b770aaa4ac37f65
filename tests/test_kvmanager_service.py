"""The KV manager service on loopback gRPC with a real Redis: the replicas equal the workers' ledgers,
restarts (new server object, killed process) lose nothing, resends are skipped, expired workers are
reclaimed (and come back by a resync), a Redis restart is survived, and bad or random input never
crashes it."""
from __future__ import annotations

import json
import queue
import random
import subprocess
import sys
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from apar.bench_suite.simulated import ScratchRedis, SimWorker, free_port
from apar.engine.kv.ledger import KVLedger, ThreadRef
from apar.protogen import stubs
from services.grpc_common import MAX_MESSAGE
from services.kvmanager import convert
from services.kvmanager.codec import snapshot_parts, snapshot_to_bytes
from services.kvmanager.records import MAX_BLOCKS
from services.kvmanager.replication import Batch, StepLog
from services.kvmanager.service import serve
from services.worker.kv import RemoteKV
from services.worker.kvclient import KVManagerClient
from tests.faults import wait_until

pb = stubs()
K = pb.kvmanager_pb2
C = grpc.StatusCode
BLOCKS, BLOCK_SIZE, SESSION = 64, 4, 7


class Client:
    """The manager's API as a test drives it: unary calls, and batches on one open Steps stream."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.stub = pb.kvmanager_pb2_grpc.KVManagerStub(self.channel)
        self._requests: queue.SimpleQueue | None = None

    def register(self, worker="w1", blocks=BLOCKS, ttl=30, session=SESSION, **kw):
        return self.stub.Register(K.RegisterRequest(worker_id=worker, address=f"127.0.0.1:{len(worker)}",
                                                    num_blocks=blocks, block_size=BLOCK_SIZE, ttl_seconds=ttl,
                                                    session=session, **kw), timeout=5, wait_for_ready=True)

    def send(self, msg):
        """One StepBatch on the stream (opened on first use; a failed one is dropped)."""
        if self._requests is None:
            self._requests = queue.SimpleQueue()
            self._responses = self.stub.Steps(iter(self._requests.get, None), timeout=30)
        self._requests.put(msg)
        try:
            return next(self._responses)
        except grpc.RpcError:
            self._requests = None
            raise

    def state(self, worker="w1"):
        return self.stub.State(K.StateRequest(worker_id=worker), timeout=5)

    def usage(self):
        return self.stub.Usage(K.UsageRequest(), timeout=5).workers

    def drive(self, sim: SimWorker, steps: int, worker="w1", per_message: int = 2):
        """The simulated worker's next steps, `per_message` to a message; every ack agrees with it."""
        for i in range(steps):
            sim.step()
            if (i + 1) % per_message == 0 or i == steps - 1:
                ack = convert.ack_from_pb(self.send(convert.batch_to_pb(worker, sim.kv.batch())))
                assert ack.applied == sim.kv.seq and ack.digest == sim.ledger.digest() and not ack.resync
                sim.kv.acked(ack)


def worker(seed: int, blocks: int = BLOCKS, **kw) -> SimWorker:
    return SimWorker(StepLog(KVLedger(blocks, BLOCK_SIZE), SESSION), seed=seed, **kw)


def code_of(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()
    return C.OK


@pytest.fixture
def kv(redis_server, request):
    servers = []

    def start(url=None, memory=False, **kw):
        kw.setdefault("prefix", f"t-{request.node.name}:")
        url = None if memory else url or redis_server.url
        s = serve("127.0.0.1:0", url, snapshot_every=8, reap_every_s=0.1, **kw)
        servers.append(s)
        return s, Client(f"127.0.0.1:{s.port}")

    yield start
    for s in servers:
        s.stop(grace=None)


def test_stream_of_steps_equals_the_workers_own_ledger(kv):
    server, client = kv()
    assert not client.register().restored
    sim = worker(11)
    client.drive(sim, 300)
    assert client.state() == convert.state_to_pb(sim.ledger.snapshot())
    assert [(u.worker_id, u.free_blocks, u.requests) for u in client.usage()] == \
        [("w1", sim.ledger.num_free, sim.ledger.num_requests)]
    server.manager.check()
    assert server.metrics.steps._value.get() == 300 and server.metrics.messages._value.get() == 150


def test_prefix_index_answers_from_the_replicas_and_survives_a_restart(kv):
    """Two workers whose prompts share prefixes: `Prefix` answers, per worker, the leading blocks of a
    prompt's names it holds, which is what the worker's own ledger says (in use or cached, evictions
    included), and a manager restarted from Redis answers the same."""
    server, client = kv()
    sims = {w: worker(seed, blocks=24, prefixes=3, prompt=(4, 30), threads=4) for w, seed in (("w1", 5), ("w2", 6))}
    for w, sim in sims.items():
        client.register(worker=w, blocks=24)
        client.drive(sim, 120, worker=w)
    assert any(sim.ledger.num_cached for sim in sims.values()) and any(sim.ledger.evictions for sim in sims.values())
    families = [[(f << 32) | i for i in range(8)] for f in range(3)]

    def answers(c):
        return [{p.worker_id: p.blocks for p in c.stub.Prefix(K.PrefixRequest(names=names), timeout=5).workers}
                for names in families]

    expected = [{w: sim.ledger.cached_prefix(names) for w, sim in sims.items()} for names in families]
    assert answers(client) == expected and any(n for e in expected for n in e.values())
    usage = {u.worker_id: u for u in client.usage()}
    assert all(usage[w].cached_blocks == sim.ledger.num_cached and usage[w].block_size == BLOCK_SIZE
               for w, sim in sims.items())
    assert code_of(lambda: client.stub.Prefix(K.PrefixRequest(names=[1] * 70_000), timeout=5)) == C.INVALID_ARGUMENT
    server.stop(grace=None)
    _, again = kv()  # the same prefix in Redis
    assert answers(again) == expected


def test_remote_kv_workers_stream_concurrently(kv):
    """The worker's own client and sender: four workers step freely; their replicas keep up."""
    server, _ = kv()
    backends = []
    for i in range(4):
        client = KVManagerClient(f"127.0.0.1:{server.port}", f"w{i}", "here", BLOCKS, BLOCK_SIZE)
        assert not client.register()
        backends.append(RemoteKV(KVLedger(BLOCKS, BLOCK_SIZE), client, send_every_s=0.002))
    sims = [SimWorker(kv_, seed=20 + i) for i, kv_ in enumerate(backends)]
    try:
        for _ in range(150):
            for sim in sims:
                sim.step()
        for i, sim in enumerate(sims):
            sim.kv.drain()
            assert sim.kv.client.state() == convert.state_to_pb(sim.ledger.snapshot())
            assert sim.kv.blocked_s == 0.0
    finally:
        for sim in sims:
            sim.kv.close()
            sim.kv.client.close()
    server.manager.check()
    assert server.metrics.messages._value.get() < 4 * 150  # several steps to a message


def test_memory_only_server(kv):
    server, client = kv(memory=True)
    assert server.manager.store is None
    client.register()
    sim = worker(24)
    client.drive(sim, 50)
    assert client.state() == convert.state_to_pb(sim.ledger.snapshot())


def test_restart_on_the_same_redis_restores_every_ledger(kv):
    first, client = kv()
    client.register("w1")
    client.register("w2", blocks=32)
    sims = {"w1": worker(12), "w2": worker(13, blocks=32)}
    for w, sim in sims.items():
        client.drive(sim, 77, w)
    before = {w: client.state(w) for w in sims}
    first.stop(grace=None)
    second, client = kv()
    assert {w: client.state(w) for w in sims} == before
    assert client.register("w1").restored and client.register("w2", blocks=32).restored
    for w, sim in sims.items():  # going on, no block is handed out twice: the replicas equal the workers
        client.drive(sim, 60, w)
        assert client.state(w) == convert.state_to_pb(sim.ledger.snapshot())
    second.manager.check()
    assert not client.register("w2", blocks=16).restored  # another pool size: a fresh ledger
    assert client.state("w2").free == list(range(16))


class ManagerProcess:
    """`python -m services.kvmanager` as a child process; stderr goes to a file (appended to) that is polled
    for this process's own "listening on"."""

    def __init__(self, args: tuple[str, ...], log_path) -> None:
        self.log_path = log_path
        start = log_path.stat().st_size if log_path.exists() else 0
        with open(log_path, "a") as log:
            self.p = subprocess.Popen([sys.executable, "-m", "services.kvmanager", *args], stdout=subprocess.DEVNULL,
                                      stderr=log)

        def listening() -> bool:
            assert self.p.poll() is None, log_path.read_text()[-2000:]
            return "listening on" in log_path.read_text()[start:]

        wait_until(listening, 30, "the KV manager to listen", every=0.05)

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait(timeout=10)


def metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return next(float(line.rpartition(" ")[2]) for line in text.splitlines() if line.startswith(name + " "))


def test_killed_manager_process_restarts_from_redis(redis_server, request, tmp_path):
    port, metrics_port = free_port(), free_port()
    prefix = f"t-{request.node.name}:"
    args = ("--port", str(port), "--redis", redis_server.url, "--prefix", prefix, "--reap-every", "0.1",
            "--metrics-port", str(metrics_port))
    alive = redis_server.client()
    proc = ManagerProcess(args, tmp_path / "kv.log")
    try:
        client = Client(f"127.0.0.1:{port}")
        client.register(ttl=1)
        sim = worker(14)
        client.drive(sim, 90)
        before = client.state()
        assert before.used  # the simulated worker's running requests hold blocks
        wait_until(lambda: metric(metrics_port, "apar_kvmanager_unpersisted_messages") == 0, 5,
                   "the writer's round to put every acknowledged message in Redis")
        for _ in range(3):
            sim.step()
        unanswered = convert.batch_to_pb("w1", sim.kv.batch())
        proc.kill()  # SIGKILL: nothing is flushed on the way out
        assert code_of(lambda: client.send(unanswered)) == C.UNAVAILABLE
        # down longer than the ttl: the registration expires in Redis, no heartbeat could arrive meanwhile
        wait_until(lambda: not alive.exists(f"{prefix}kv:w:w1:alive"), 5, "the registration to expire")
        proc = ManagerProcess(args, tmp_path / "kv.log")
        # a reaper pass after the restart (each one reads Redis; nothing else does meanwhile) ...
        trips = metric(metrics_port, "apar_kvmanager_redis_round_trips_total")
        wait_until(lambda: metric(metrics_port, "apar_kvmanager_redis_round_trips_total") > trips, 5,
                   "a reaper pass")
        # ... did not reap it: a ledger loaded at start gets a fresh time-to-live
        assert [u.worker_id for u in client.usage()] == ["w1"]
        assert client.register(ttl=1).restored
        assert client.state() == before
        ack = convert.ack_from_pb(client.send(unanswered))  # the worker sends what was never acknowledged
        assert ack.applied == sim.kv.seq and not ack.resync
        sim.kv.acked(ack)
        client.drive(sim, 40)
        assert client.state() == convert.state_to_pb(sim.ledger.snapshot())
    finally:
        proc.kill()


def test_a_manager_killed_before_its_round_restarts_behind_and_is_caught_up_by_a_resync(redis_server, request,
                                                                                      tmp_path):
    """An ack means the replica holds the steps; Redis holds them a round later. A manager killed in
    between restarts behind what the worker had acknowledged: the worker's next message shows the gap,
    which it cannot fill (it dropped those steps), so it sends its ledger's snapshot, and both end equal."""
    port, metrics_port = free_port(), free_port()
    prefix = f"t-{request.node.name}:"
    args = ("--port", str(port), "--redis", redis_server.url, "--prefix", prefix, "--metrics-port", str(metrics_port))
    proc = ManagerProcess(args, tmp_path / "kv.log")
    try:
        client = Client(f"127.0.0.1:{port}")
        client.register()
        sim = worker(18)
        client.drive(sim, 60)  # 30 messages of 2 steps, each a log entry
        wait_until(lambda: metric(metrics_port, "apar_kvmanager_unpersisted_messages") == 0, 5,
                   "the writer's round to put every acknowledged message in Redis")
        proc.kill()
        redis_server.client().rpop(f"{prefix}kv:w:w1:log", 2)  # as if the last round had not reached Redis
        proc = ManagerProcess(args, tmp_path / "kv.log")
        client = Client(f"127.0.0.1:{port}")  # (the worker's stream ended with the killed manager)
        assert client.register().restored
        for _ in range(2):
            sim.step()
        ack = convert.ack_from_pb(client.send(convert.batch_to_pb("w1", sim.kv.batch())))
        assert ack.applied == 60 - 2 * 2 and not ack.resync  # the replica's last step: a gap before step 61
        sim.kv.acked(ack)
        snapshot = convert.batch_to_pb("w1", sim.kv.batch())
        assert snapshot.HasField("resync") and not snapshot.steps
        ack = convert.ack_from_pb(client.send(snapshot))
        assert ack.applied == sim.kv.seq == 62 and ack.digest == sim.ledger.digest() and not ack.resync
        sim.kv.acked(ack)
        assert metric(metrics_port, "apar_kvmanager_resyncs_total") == 1
        client.drive(sim, 20)
        assert client.state() == convert.state_to_pb(sim.ledger.snapshot())
    finally:
        proc.kill()


def test_the_same_batch_twice_is_applied_once(kv):
    server, client = kv()
    client.register()
    sim = worker(15)
    client.drive(sim, 20)
    for _ in range(3):
        sim.step()
    msg = convert.batch_to_pb("w1", sim.kv.batch())
    assert client.send(msg).applied == sim.kv.seq
    state = client.state()
    assert client.send(msg).applied == sim.kv.seq and client.state() == state
    assert server.metrics.duplicates._value.get() == 3
    other = convert.batch_to_pb("w1", Batch(SESSION + 1, sim.kv.batch().steps))  # another session
    assert code_of(lambda: client.send(other)) == C.FAILED_PRECONDITION and client.state() == state


def test_expired_worker_is_reclaimed_and_comes_back_by_a_resync(kv, redis_server, request):
    server, client = kv()
    client.register("w-live", ttl=1)
    dead = KVManagerClient(f"127.0.0.1:{server.port}", "w-dead", "here", BLOCKS, BLOCK_SIZE, ttl_s=1)
    assert not dead.register()
    backend = RemoteKV(KVLedger(BLOCKS, BLOCK_SIZE), dead, send_every_s=0.002)
    sim = SimWorker(backend, seed=16)
    try:
        for _ in range(30):
            sim.step()
        while not sim.running:  # stop where its running requests hold blocks
            sim.step()
        backend.drain()
        assert client.state("w-dead").used

        def reaped() -> bool:  # w-live sends heartbeats meanwhile, w-dead none
            assert client.stub.Heartbeat(K.HeartbeatRequest(worker_id="w-live"), timeout=5).known
            return [u.worker_id for u in client.usage()] == ["w-live"]

        wait_until(reaped, 10, "w-dead to be reaped", every=0.1)
        assert not client.stub.Heartbeat(K.HeartbeatRequest(worker_id="w-dead"), timeout=5).known
        assert code_of(lambda: client.state("w-dead")) == C.NOT_FOUND
        assert code_of(lambda: client.send(K.StepBatch(worker_id="w-dead", session=1))) == C.NOT_FOUND
        keys = redis_server.client().keys(f"t-{request.node.name}:kv:w:w-dead:*")
        assert keys == [] and not redis_server.client().hexists(f"t-{request.node.name}:kv:workers", "w-dead")
        assert server.metrics.reaped._value.get() == 1
        # the worker steps on: its sender registers again and replaces the new, empty replica by its ledger
        for _ in range(5):
            sim.step()
        backend.drain()
        assert dead.state() == convert.state_to_pb(sim.ledger.snapshot())
        assert server.metrics.resyncs._value.get() == 1 and backend.blocked_s == 0.0
    finally:
        backend.close()
        dead.close()


def test_redis_restart_is_survived(kv):
    redis = ScratchRedis()
    try:
        server, client = kv(redis.url)
        health = health_pb2_grpc.HealthStub(client.channel)
        client.register()
        sim = worker(17)
        client.drive(sim, 40)
        redis.kill()

        def status():
            return health.Check(health_pb2.HealthCheckRequest(service="apar.v1.KVManager"), timeout=5).status

        wait_until(lambda: status() == health_pb2.HealthCheckResponse.NOT_SERVING, 5, "NOT_SERVING")
        client.drive(sim, 20)  # acknowledged from memory all the same: the worker does not wait for Redis
        assert server.manager.unpersisted() > 0  # and they are not in Redis
        redis.start()  # empty: no persistence
        client.drive(sim, 10)
        wait_until(lambda: status() == health_pb2.HealthCheckResponse.SERVING, 5, "SERVING again")
        wait_until(lambda: server.manager.unpersisted() == 0, 5, "memory written back to the restarted Redis")
        assert [u.worker_id for u in client.usage()] == ["w1"]
        server.manager.check()
        server.stop(grace=None)  # and the restarted Redis holds it all: a new manager restores it
        _, client = kv(redis.url)
        assert client.state() == convert.state_to_pb(sim.ledger.snapshot())
    finally:
        redis.close()


def test_bad_input_gets_invalid_argument_with_a_reason(kv):
    server, client = kv()
    client.register()
    s = client.stub
    bad_registers = [dict(worker_id=""), dict(worker_id="has space"), dict(num_blocks=0), dict(num_blocks=1 << 30),
                     dict(block_size=0), dict(block_size=1 << 20), dict(ttl_seconds=10 ** 6), dict(address="\x00")]
    for fields in bad_registers:
        req = K.RegisterRequest(**{**dict(worker_id="w9", address="x", num_blocks=8, block_size=4), **fields})
        with pytest.raises(grpc.RpcError) as err:
            s.Register(req, timeout=5)
        assert err.value.code() == C.INVALID_ARGUMENT and err.value.details(), fields
    digest = K.Digest(free_blocks=BLOCKS, next_free=0)
    bad_steps = [b"not json", b'{"a": 1}', b'[["a", "r", 0]]', b'[["a", "r", 0, 0]]', b'[["a", "", 0, 1]]',
                 b'[["a", "r", -1, 1]]', b'[["s", "r", "0"]]', b'[["v", [["r"]]]]', b'[["q", 1]]', b'[["r", 5]]',
                 b'[["a", "r", 0, 1099511627776]]', b'[["e", [["r"]]]]', b'[["e", "r"]]', b'[["e", [["", 0]]]]',
                 b'[["e", [["r", 0.5]]]]']
    for ops in bad_steps:
        msg = K.StepBatch(worker_id="w1", session=SESSION, steps=[K.Step(seq=1, ops=ops, digest=digest)])
        with pytest.raises(grpc.RpcError) as err:
            client.send(msg)
        assert err.value.code() == C.INVALID_ARGUMENT and "step 0" in err.value.details(), ops
    bad_batches = [K.StepBatch(worker_id="w1", session=0), K.StepBatch(worker_id="w1", session=SESSION, steps=[
        K.Step(seq=1, ops=b"[]"), K.Step(seq=3, ops=b"[]")]), K.StepBatch(worker_id="w1", session=SESSION,
        resync=K.Resync(seq=1, ledger=b"[1, 2]")), K.StepBatch(worker_id="w1", session=SESSION,
        resync=K.Resync(seq=1, ledger=json.dumps({**KVLedger(BLOCKS, BLOCK_SIZE).snapshot(), "free": [0]}).encode()))]
    for msg in bad_batches:
        assert code_of(lambda: client.send(msg)) == C.INVALID_ARGUMENT, msg
    assert code_of(lambda: client.send(K.StepBatch(worker_id="nobody", session=1))) == C.NOT_FOUND
    assert code_of(lambda: client.send(K.StepBatch(worker_id="", session=1))) == C.INVALID_ARGUMENT
    assert code_of(lambda: s.State(K.StateRequest(), timeout=5)) == C.INVALID_ARGUMENT
    raw = client.channel.stream_stream("/apar.v1.KVManager/Steps")
    assert code_of(lambda: list(raw(iter([b"\xff\xff\xff"]), timeout=5))) == C.INVALID_ARGUMENT
    # an op the replica refuses is no status: the ack asks for a resync, the ops before it applied
    refused = K.StepBatch(worker_id="w1", session=SESSION, steps=[K.Step(seq=1, ops=b'[["a", "nobody", 0, 1]]')])
    ack = client.send(refused)
    assert ack.resync and ack.applied == 0
    assert client.state().free == list(range(BLOCKS))
    server.manager.check()


def _random_message(rng: random.Random, method: str):
    """A message with field values from a small pool (some valid, most not), or random bytes."""
    ids = ["w1", "w2", "", "x" * 200, "a b", "w-never"]  # w-never is never registered
    num = lambda: rng.choice([0, 1, 3, 64, 2 ** 20, 2 ** 32 - 1])  # noqa: E731
    if method == "Register":
        return K.RegisterRequest(worker_id=rng.choice(ids[:-1]), address=rng.choice(["", "h:1", "\x01"]),
                                 num_blocks=num(), block_size=num() % 5000,
                                 ttl_seconds=rng.choice([0, 1, 5, 2 ** 32 - 1]), session=rng.choice([0, 1, 7]))
    if method == "Steps":
        ref = lambda: [rng.choice(["a", "b", "", "\u00e9", "r" * 300]), rng.choice([0, 1, -1, 2 ** 32])]  # noqa: E731
        steps = []
        for seq in range(rng.choice([0, 1, 2, 2 ** 40]), 0, -1)[:4]:
            ops = [rng.choice([["s", *ref()], ["a", *ref(), num()], ["f", *ref(), *ref()], ["x", *ref()],
                               ["r", ref()[0]], ["v", [ref()]], ["v", []], ["e", [ref(), ref()]], [], "x"]) for _ in range(rng.randint(0, 5))]
            steps.append(K.Step(seq=seq, ops=json.dumps(ops).encode(), digest=K.Digest(free_blocks=num())))
        return K.StepBatch(worker_id=rng.choice(ids), session=rng.choice([0, 1, SESSION]), steps=steps[::-1])
    if method == "Heartbeat":
        return K.HeartbeatRequest(worker_id=rng.choice(ids))
    if method == "State":
        return K.StateRequest(worker_id=rng.choice(ids))
    return K.UsageRequest()


def test_fuzz_never_crashes_the_service(kv):
    server, client = kv()
    client.register("w1", blocks=8)
    rng = random.Random(18)
    methods = [m.name for m in K.DESCRIPTOR.services_by_name["KVManager"].methods]
    # another session's steps and registrations of a live id are refused too (the id is bound to w1's)
    allowed = {C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND, C.FAILED_PRECONDITION, C.ALREADY_EXISTS}
    seen = set()
    for i in range(400):
        method = rng.choice(methods)
        if rng.random() < 0.3:
            data = rng.randbytes(rng.randint(1, 64))
        else:
            data = _random_message(rng, method).SerializeToString()
        if method == "Steps":
            raw = client.channel.stream_stream("/apar.v1.KVManager/Steps")
            code = code_of(lambda: list(raw(iter([data]), timeout=5)))
        else:
            raw = client.channel.unary_unary(f"/apar.v1.KVManager/{method}")
            code = code_of(lambda: raw(data, timeout=5))
        assert code in allowed, (i, method, data, code)
        seen.add(code)
    assert seen == allowed  # the fuzz reached every kind of answer
    server.manager.check()
    assert client.usage()


def test_health_reflection_and_metrics(kv):
    port = free_port()
    server, client = kv(metrics_port=port)
    client.register()
    client.drive(worker(19), 25, per_message=5)
    health = health_pb2_grpc.HealthStub(client.channel)
    for name in ("", "apar.v1.KVManager"):
        assert health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING
    reflect = reflection_pb2_grpc.ServerReflectionStub(client.channel)
    answer = next(reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                               timeout=5))
    assert "apar.v1.KVManager" in [s.name for s in answer.list_services_response.service]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    used = server.manager.usage()[0]
    assert f'apar_kvmanager_blocks_free{{worker="w1"}} {float(used.free_blocks)}' in text
    assert "apar_kvmanager_steps_total 25.0" in text and "apar_kvmanager_messages_total 5.0" in text
    assert "apar_kvmanager_resyncs_total 0.0" in text and "apar_kvmanager_steps_duplicate_total 0.0" in text
    assert "apar_kvmanager_redis_round_trips_total" in text


@pytest.mark.parametrize("flags, message", [(["--round-every", "0"], "--round-every must be 0.001..10 s"),
                                            (["--reap-every", "0"], "--reap-every must be"),
                                            (["--ttl", "0"], "--ttl must be"),
                                            (["--snapshot-every", "0"], "--snapshot-every must be 1 or more")])
def test_bad_manager_flags_are_refused_with_a_reason(flags, message, capsys):
    from services.kvmanager.cli import main

    assert main(["--no-redis", "--port", "0", *flags]) == 2
    assert message in capsys.readouterr().err


def test_a_pool_of_a_million_blocks_resyncs_in_parts(kv):
    """A worker with the largest pool (2^20 blocks), half of it in use by requests of random ids and
    lengths (some released, so the free list is out of order), resyncs its whole ledger over a real gRPC
    stream: the snapshot, as one message more than twice gRPC's 16 MiB cap, goes compressed in parts,
    and the replica equals the worker's ledger, digest and all."""
    server, _ = kv(memory=True)
    rng = random.Random(7)
    ledger, requests = KVLedger(MAX_BLOCKS, 16), []
    while ledger.num_used < MAX_BLOCKS // 2:
        ref = ThreadRef(f"{rng.getrandbits(128):032x}", 0)  # as the router names requests
        ledger.start(ref)
        ledger.append(ref, rng.randint(1, 300 * 16), want_slots=False)
        requests.append(ref.request)
        if rng.random() < 0.3:
            ledger.release(requests.pop(rng.randrange(len(requests))))
    snapshot = ledger.snapshot()
    assert len(snapshot_to_bytes(snapshot)) > MAX_MESSAGE and len(snapshot_parts(snapshot)) > 1
    client = KVManagerClient(f"127.0.0.1:{server.port}", "w-big", "here", MAX_BLOCKS, 16, ttl_s=60)
    backend = None
    try:
        assert not client.register()
        backend = RemoteKV(ledger, client)
        backend.flush()
        with backend._cv:
            backend.outbox.forget()  # what a worker does when its replica is lost: its ledger, whole
        backend.drain(60)
        assert server.manager.state("w-big") == snapshot
        assert server.metrics.resyncs._value.get() == 1
    finally:
        if backend is not None:
            backend.close()
        client.close()


def test_resync_parts_out_of_order_or_not_a_snapshot_are_refused(kv):
    """A resync in parts: a part out of order, parts that are not a compressed snapshot, steps before
    the last part are INVALID_ARGUMENT with a reason, and change nothing; in order, they replace the
    replica."""
    server, client = kv(memory=True)
    client.register()
    sim = worker(19)
    client.drive(sim, 10)
    state = client.state()
    parts = snapshot_parts(sim.ledger.snapshot(), size=64)  # small parts: several even for this pool
    assert len(parts) > 2

    def part(i: int, data: bytes | None = None, **kw):
        return K.StepBatch(worker_id="w1", session=SESSION, resync=K.Resync(
            seq=sim.kv.seq, ledger=parts[i] if data is None else data, part=i, parts=len(parts)), **kw)

    def refused(msg) -> str:
        with pytest.raises(grpc.RpcError) as err:
            client.send(msg)
        assert err.value.code() == C.INVALID_ARGUMENT
        return err.value.details()

    assert "out of order" in refused(part(1))
    client.send(part(0))
    assert "out of order" in refused(part(2))
    step = K.Step(seq=sim.kv.seq + 1, ops=b"[]", digest=convert.digest_to_pb(sim.ledger.digest()))
    assert "last part" in refused(part(0, steps=[step]))
    for i in range(len(parts) - 1):
        client.send(part(i, b"not zlib" if i == 0 else None))
    assert "not a compressed snapshot" in refused(part(len(parts) - 1))
    assert client.state() == state
    for i in range(len(parts)):
        ack = client.send(part(i))
    assert ack.applied == sim.kv.seq and not ack.resync and client.state() == state
    assert server.metrics.resyncs._value.get() == 1
