"""The KV manager service on loopback gRPC with a real Redis: answers equal the worker's own ledger,
restarts (new server object, killed process) lose nothing, resends are idempotent, expired workers are
reclaimed, a Redis restart is survived, and bad or random input never crashes it."""
from __future__ import annotations

import random
import subprocess
import sys
import threading
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from apar.protogen import stubs
from services.kvmanager import convert
from services.kvmanager.ledger import ThreadRef as R
from services.kvmanager.ops import Append, Start
from services.kvmanager.service import serve
from services.kvmanager.testing import ScratchRedis, SimWorker, free_port
from tests.faults import wait_until

pb = stubs()
K = pb.kvmanager_pb2
C = grpc.StatusCode
BLOCKS, BLOCK_SIZE = 64, 4


@pytest.fixture(scope="module")
def redis_server():
    try:
        server = ScratchRedis()
    except FileNotFoundError:
        pytest.skip("redis-server is not installed")
    yield server
    server.close()


class Client:
    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.stub = pb.kvmanager_pb2_grpc.KVManagerStub(self.channel)

    def register(self, worker="w1", blocks=BLOCKS, ttl=30, **kw):
        return self.stub.Register(K.RegisterRequest(worker_id=worker, address=f"127.0.0.1:{len(worker)}",
                                                    num_blocks=blocks, block_size=BLOCK_SIZE, ttl_seconds=ttl, **kw),
                                  timeout=5, wait_for_ready=True)

    def step(self, seq, ops, worker="w1"):
        return self.stub.Step(convert.step_to_pb(worker, seq, ops), timeout=5)

    def state(self, worker="w1"):
        return self.stub.State(K.StateRequest(worker_id=worker), timeout=5)

    def drive(self, sim: SimWorker, steps: int, worker="w1"):
        """The simulated worker's next steps; every answer must equal its own ledger's."""
        for _ in range(steps):
            seq, ops, local = sim.step()
            resp = self.step(seq, ops, worker)
            assert convert.answer_from_pb(resp) == local and resp.free_blocks == sim.ledger.num_free
        return seq, ops, resp


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


def test_step_round_trip_equals_the_workers_own_ledger(kv):
    server, client = kv()
    assert not client.register().restored
    sim = SimWorker(num_blocks=BLOCKS, block_size=BLOCK_SIZE, seed=11)
    client.drive(sim, 300)
    assert client.state() == convert.state_to_pb(sim.ledger.snapshot())
    usage = client.stub.Usage(K.UsageRequest(), timeout=5).workers
    assert [(u.worker_id, u.free_blocks, u.requests) for u in usage] == [("w1", sim.ledger.num_free, len(sim.running))]
    server.manager.check()


def test_workers_step_concurrently(kv):
    server, client = kv()
    sims = {f"w{i}": SimWorker(BLOCKS, BLOCK_SIZE, seed=20 + i) for i in range(4)}
    for w in sims:
        client.register(w)
    errors: list[BaseException] = []

    def run(w: str) -> None:
        try:
            client.drive(sims[w], 100, w)
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(w,)) for w in sims]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    for w, sim in sims.items():
        assert client.state(w) == convert.state_to_pb(sim.ledger.snapshot())
    server.manager.check()


def test_memory_only_server(kv):
    server, client = kv(memory=True)
    assert server.manager.store is None
    client.register()
    sim = SimWorker(BLOCKS, BLOCK_SIZE, seed=24)
    client.drive(sim, 50)
    assert client.state() == convert.state_to_pb(sim.ledger.snapshot())


def test_restart_on_the_same_redis_restores_every_ledger(kv):
    first, client = kv()
    client.register("w1")
    client.register("w2", blocks=32)
    sims = {"w1": SimWorker(BLOCKS, BLOCK_SIZE, seed=12), "w2": SimWorker(32, BLOCK_SIZE, seed=13)}
    for w, sim in sims.items():
        client.drive(sim, 77, w)
    before = {w: client.state(w) for w in sims}
    first.stop(grace=None)
    second, client = kv()
    assert {w: client.state(w) for w in sims} == before
    assert client.register("w1").restored and client.register("w2", blocks=32).restored
    for w, sim in sims.items():  # going on, no block is handed out twice: answers equal the workers' ledgers
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
        sim = SimWorker(BLOCKS, BLOCK_SIZE, seed=14)
        seq, ops, last = client.drive(sim, 90)
        before = client.state()
        assert before.used  # the simulated worker's running requests hold blocks
        proc.kill()  # SIGKILL: nothing is flushed on the way out
        # down longer than the ttl: the registration expires in Redis, no heartbeat could arrive meanwhile
        wait_until(lambda: not alive.exists(f"{prefix}kv:w:w1:alive"), 5, "the registration to expire")
        proc = ManagerProcess(args, tmp_path / "kv.log")
        # a reaper pass after the restart (each one reads Redis; nothing else does meanwhile) ...
        trips = metric(metrics_port, "apar_kvmanager_redis_round_trips_total")
        wait_until(lambda: metric(metrics_port, "apar_kvmanager_redis_round_trips_total") > trips, 5,
                   "a reaper pass")
        # ... did not reap it: a ledger loaded at start gets a fresh time-to-live
        assert [u.worker_id for u in client.stub.Usage(K.UsageRequest(), timeout=5).workers] == ["w1"]
        assert client.register(ttl=1).restored
        assert client.state() == before
        assert client.step(seq, ops) == last  # the worker resends the step it never heard back from
        client.drive(sim, 40)
        assert client.state() == convert.state_to_pb(sim.ledger.snapshot())
    finally:
        proc.kill()


def test_resent_seq_is_answered_again_not_applied(kv):
    server, client = kv()
    client.register()
    sim = SimWorker(BLOCKS, BLOCK_SIZE, seed=15)
    seq, ops, last = client.drive(sim, 20)
    state = client.state()
    assert client.step(seq, ops) == last and client.state() == state
    assert code_of(lambda: client.step(seq, ops[:-1])) == C.FAILED_PRECONDITION  # same seq, other ops
    assert code_of(lambda: client.step(seq - 1, ops)) == C.FAILED_PRECONDITION  # older than the last
    assert client.state() == state
    assert server.metrics.resent._value.get() == 1


def test_expired_worker_is_reclaimed(kv, redis_server, request):
    server, client = kv()
    client.register("w-dead", ttl=1)
    client.register("w-live", ttl=1)
    sim = SimWorker(BLOCKS, BLOCK_SIZE, seed=16)
    client.drive(sim, 30, "w-dead")
    while not sim.running:  # stop where its running requests hold blocks
        client.drive(sim, 1, "w-dead")
    assert client.state("w-dead").used

    def reaped() -> bool:  # w-live sends heartbeats meanwhile, w-dead none
        assert client.stub.Heartbeat(K.HeartbeatRequest(worker_id="w-live"), timeout=5).known
        return [u.worker_id for u in client.stub.Usage(K.UsageRequest(), timeout=5).workers] == ["w-live"]

    wait_until(reaped, 10, "w-dead to be reaped", every=0.1)
    assert not client.stub.Heartbeat(K.HeartbeatRequest(worker_id="w-dead"), timeout=5).known
    assert code_of(lambda: client.step(sim.seq + 1, [], "w-dead")) == C.NOT_FOUND
    assert code_of(lambda: client.state("w-dead")) == C.NOT_FOUND
    keys = redis_server.client().keys(f"t-{request.node.name}:kv:w:w-dead:*")
    assert keys == [] and not redis_server.client().hexists(f"t-{request.node.name}:kv:workers", "w-dead")
    assert server.metrics.reaped._value.get() == 1
    assert not client.register("w-dead").restored  # it comes back with a fresh ledger
    assert client.state("w-dead").free == list(range(BLOCKS))


def test_redis_restart_is_survived(kv):
    redis = ScratchRedis()
    try:
        server, client = kv(redis.url)
        health = health_pb2_grpc.HealthStub(client.channel)
        client.register()
        sim = SimWorker(BLOCKS, BLOCK_SIZE, seed=17)
        client.drive(sim, 40)
        redis.kill()
        seq, ops, local = sim.step()
        assert code_of(lambda: client.step(seq, ops)) == C.UNAVAILABLE  # nothing applied, nothing lost

        def status():
            return health.Check(health_pb2.HealthCheckRequest(service="apar.v1.KVManager"), timeout=5).status

        wait_until(lambda: status() == health_pb2.HealthCheckResponse.NOT_SERVING, 5, "NOT_SERVING")
        redis.start()  # empty: no persistence
        resp = client.step(seq, ops)  # the worker's resend goes through once Redis is back
        assert convert.answer_from_pb(resp) == local
        client.drive(sim, 30)
        wait_until(lambda: status() == health_pb2.HealthCheckResponse.SERVING, 5, "SERVING again")
        assert [u.worker_id for u in client.stub.Usage(K.UsageRequest(), timeout=5).workers] == ["w1"]
        server.manager.check()
        server.stop(grace=None)  # and the restarted Redis holds it all: a new manager restores it
        _, client = kv(redis.url)
        assert client.state() == convert.state_to_pb(sim.ledger.snapshot())
    finally:
        redis.close()


def _op(**kw):
    return K.KVOp(**kw)


def _key(request="a", thread=0):
    return K.ThreadKey(request=request, thread=thread)


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
    bad_ops = [_op(), _op(append=K.AppendOp(thread=_key(), tokens=0)),
               _op(append=K.AppendOp(thread=_key(), tokens=1 << 30)), _op(start=_key(request="")),
               _op(fork=K.ForkOp(parent=_key())), _op(release="")]
    for op in bad_ops:
        with pytest.raises(grpc.RpcError) as err:
            s.Step(K.StepRequest(worker_id="w1", seq=1, ops=[op]), timeout=5)
        assert err.value.code() == C.INVALID_ARGUMENT and "op 0" in err.value.details(), op
    assert code_of(lambda: s.Step(K.StepRequest(worker_id="w1", seq=0), timeout=5)) == C.INVALID_ARGUMENT
    assert code_of(lambda: s.Step(K.StepRequest(worker_id="nobody", seq=1), timeout=5)) == C.NOT_FOUND
    assert code_of(lambda: s.Release(K.ReleaseRequest(worker_id="w1"), timeout=5)) == C.INVALID_ARGUMENT
    assert code_of(lambda: s.State(K.StateRequest(), timeout=5)) == C.INVALID_ARGUMENT
    raw = client.channel.unary_unary("/apar.v1.KVManager/Step")
    assert code_of(lambda: raw(b"\xff\xff\xff", timeout=5)) == C.INVALID_ARGUMENT
    # an op the ledger refuses is answered in `error`: the ops before it applied, the rest not
    resp = client.step(1, [Start(R("a", 0)), Append(R("a", 0), 5), Append(R("b", 0), 1), Start(R("c", 0))])
    assert resp.error.startswith("Append: unknown thread") and len(resp.appends) == 1
    assert [u.requests for u in s.Usage(K.UsageRequest(), timeout=5).workers] == [1]  # "c" never started
    assert client.state().free == list(range(2, BLOCKS))
    server.manager.check()


def _random_message(rng: random.Random, method: str):
    """A message with field values from a small pool (some valid, most not), or random bytes."""
    ids = ["w1", "w2", "", "x" * 200, "a b"]
    reqs = ["a", "b", "", "\u00e9", "r" * 300]
    key = lambda: K.ThreadKey(request=rng.choice(reqs), thread=rng.choice([0, 1, 2, 2 ** 32 - 1]))  # noqa: E731
    num = lambda: rng.choice([0, 1, 3, 64, 2 ** 20, 2 ** 32 - 1])  # noqa: E731
    if method == "Register":
        return K.RegisterRequest(worker_id=rng.choice(ids), address=rng.choice(["", "h:1", "\x01"]), num_blocks=num(),
                                 block_size=num() % 5000, ttl_seconds=rng.choice([0, 1, 5, 2 ** 32 - 1]))
    if method == "Step":
        ops = []
        for _ in range(rng.randint(0, 6)):
            kind = rng.choice(["start", "append", "fork", "finish", "release", None])
            if kind == "append":
                ops.append(K.KVOp(append=K.AppendOp(thread=key(), tokens=num())))
            elif kind == "fork":
                ops.append(K.KVOp(fork=K.ForkOp(parent=key(), child=key())))
            elif kind == "release":
                ops.append(K.KVOp(release=rng.choice(reqs)))
            elif kind is not None:
                ops.append(K.KVOp(**{kind: key()}))
            else:
                ops.append(K.KVOp())
        return K.StepRequest(worker_id=rng.choice(ids), seq=rng.choice([0, 1, 2, rng.randint(3, 2 ** 40)]), ops=ops)
    if method == "Release":
        return K.ReleaseRequest(worker_id=rng.choice(ids), request=rng.choice(reqs))
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
    allowed = {C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND, C.FAILED_PRECONDITION}
    seen = set()
    for i in range(400):
        method = rng.choice(methods)
        raw = client.channel.unary_unary(f"/apar.v1.KVManager/{method}")
        if rng.random() < 0.3:
            data = rng.randbytes(rng.randint(1, 64))
        else:
            data = _random_message(rng, method).SerializeToString()
        code = code_of(lambda: raw(data, timeout=5))
        assert code in allowed, (i, method, data, code)
        seen.add(code)
    assert seen == allowed  # the fuzz reached every kind of answer
    server.manager.check()
    assert client.stub.Usage(K.UsageRequest(), timeout=5).workers


def test_health_reflection_and_metrics(kv):
    port = free_port()
    server, client = kv(metrics_port=port)
    client.register()
    client.drive(SimWorker(BLOCKS, BLOCK_SIZE, seed=19), 25)
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
    assert "apar_kvmanager_steps_total 25.0" in text
    assert "apar_kvmanager_redis_round_trips_total" in text
