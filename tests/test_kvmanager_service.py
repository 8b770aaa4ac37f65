"""The KV manager service on loopback gRPC with a real Redis: the replicas equal the workers' ledgers,
restarts (new server object, killed process) lose nothing, resends are skipped, expired workers are
reclaimed (and come back by a resync), a Redis restart is survived, and bad or random input never
crashes it."""
from __future__ import annotations

import subprocess
import sys
import urllib.request

from grpc_health.v1 import health_pb2, health_pb2_grpc

from apar.bench_suite.simulated import ScratchRedis, SimWorker, free_port
from apar.engine.kv.ledger import KVLedger
from services.kvmanager import wire
from services.kvmanager.replication import LogBatch
from services.worker.kv import RemoteKV
from services.worker.kvclient import KVManagerClient
from tests.faults import wait_until
from tests.kvmanager_helpers import (BLOCKS, BLOCK_SIZE, C, Client, K, SESSION, code_of, kv,
                                     worker)  # noqa: F401 (fixtures)


def test_stream_of_steps_equals_the_workers_own_ledger(kv):
    server, client = kv()
    assert not client.register().restored
    sim = worker(11)
    client.drive(sim, 300)
    assert client.state() == wire.state_to_pb(sim.ledger.snapshot())
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
            assert sim.kv.client.state() == wire.state_to_pb(sim.ledger.snapshot())
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
    assert client.state() == wire.state_to_pb(sim.ledger.snapshot())


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
        assert client.state(w) == wire.state_to_pb(sim.ledger.snapshot())
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
        unanswered = wire.batch_to_pb("w1", sim.kv.batch())
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
        ack = wire.ack_from_pb(client.send(unanswered))  # the worker sends what was never acknowledged
        assert ack.applied == sim.kv.seq and not ack.resync
        sim.kv.acked(ack)
        client.drive(sim, 40)
        assert client.state() == wire.state_to_pb(sim.ledger.snapshot())
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
        ack = wire.ack_from_pb(client.send(wire.batch_to_pb("w1", sim.kv.batch())))
        assert ack.applied == 60 - 2 * 2 and not ack.resync  # the replica's last step: a gap before step 61
        sim.kv.acked(ack)
        snapshot = wire.batch_to_pb("w1", sim.kv.batch())
        assert snapshot.HasField("resync") and not snapshot.steps
        ack = wire.ack_from_pb(client.send(snapshot))
        assert ack.applied == sim.kv.seq == 62 and ack.digest == sim.ledger.digest() and not ack.resync
        sim.kv.acked(ack)
        assert metric(metrics_port, "apar_kvmanager_resyncs_total") == 1
        client.drive(sim, 20)
        assert client.state() == wire.state_to_pb(sim.ledger.snapshot())
    finally:
        proc.kill()


def test_the_same_batch_twice_is_applied_once(kv):
    server, client = kv()
    client.register()
    sim = worker(15)
    client.drive(sim, 20)
    for _ in range(3):
        sim.step()
    msg = wire.batch_to_pb("w1", sim.kv.batch())
    assert client.send(msg).applied == sim.kv.seq
    state = client.state()
    assert client.send(msg).applied == sim.kv.seq and client.state() == state
    assert server.metrics.duplicates._value.get() == 3
    other = wire.batch_to_pb("w1", LogBatch(SESSION + 1, sim.kv.batch().steps))  # another session
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
            assert client.stub.Heartbeat(K.HeartbeatRequest(worker_id="w-live", session=SESSION), timeout=5).known
            return [u.worker_id for u in client.usage()] == ["w-live"]

        wait_until(reaped, 10, "w-dead to be reaped", every=0.1)
        assert not client.stub.Heartbeat(K.HeartbeatRequest(worker_id="w-dead", session=dead.session),
                                     timeout=5).known
        assert code_of(lambda: client.state("w-dead")) == C.NOT_FOUND
        assert code_of(lambda: client.send(K.StepBatch(worker_id="w-dead", session=1))) == C.NOT_FOUND
        keys = redis_server.client().keys(f"t-{request.node.name}:kv:w:w-dead:*")
        assert keys == [] and not redis_server.client().hexists(f"t-{request.node.name}:kv:workers", "w-dead")
        assert server.metrics.reaped._value.get() == 1
        # the worker steps on: its sender registers again and replaces the new, empty replica by its ledger
        for _ in range(5):
            sim.step()
        backend.drain()
        assert dead.state() == wire.state_to_pb(sim.ledger.snapshot())
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
        assert client.state() == wire.state_to_pb(sim.ledger.snapshot())
    finally:
        redis.close()
