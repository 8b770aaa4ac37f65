"""A worker id is bound to the process (session) that registered it, at a real KV manager over gRPC with
Redis: a second live process with the id is refused and the first's record is untouched, whatever its
pool size; after a reap, a replacement takes the id, the old process's steps and resyncs are refused
(never overwriting the replacement's replica) and it stops; registration says which model a worker
serves, and a router takes only its own model's workers.
"""
from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import logging
import threading
from types import SimpleNamespace

import grpc
import pytest

from apar.bench_suite.simulated import ScratchRedis, SimWorker
from apar.commands.serve import _lease_pool
from apar.engine.errors import UserError
from apar.engine.kv.ledger import KVLedger, ThreadRef
from apar.engine.kv.ops import Append, Name, Start
from apar.engine.prefix import block_hashes
from apar.protogen import stubs
from services.kvmanager import wire
from services.kvmanager.inprocess import InProcessClient
from services.kvmanager.records import WorkerSpec
from services.kvmanager.replication import LogBatch, ReplicationLog
from services.kvmanager.service import serve
from services.router.workers import KVManagerDirectory, WorkerDirectory
from services.worker.kv import KVManagerUnavailable, RemoteKV
from services.worker.kvclient import KVManagerClient
from tests.faults import wait_until

pb = stubs()
K = pb.kvmanager_pb2
BLOCKS, BS = 64, 4


@pytest.fixture(scope="module")
def manager():
    redis = ScratchRedis()
    server = serve("127.0.0.1:0", redis.url, reap_every_s=0.1)
    yield server
    server.stop(grace=None)
    redis.close()


class Process:
    """One worker process's side of the manager, on raw gRPC: its session, its ledger (a simulated
    engine's steps), and the calls it makes (so the same test reads on any manager)."""

    def __init__(self, server, worker_id: str, session: int, address: str, blocks: int = BLOCKS,
                 ttl: int = 30, model: str = "m") -> None:
        self.id, self.session, self.address, self.blocks, self.ttl, self.model = (worker_id, session, address, blocks,
                                                                                   ttl, model)
        self.connect(server)
        self.sim = SimWorker(ReplicationLog(KVLedger(blocks, BS), session), seed=session)

    def connect(self, server) -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        self.stub = pb.kvmanager_pb2_grpc.KVManagerStub(self.channel)

    def register(self):
        return self.stub.Register(K.RegisterRequest(worker_id=self.id, address=self.address, num_blocks=self.blocks,
                                                    block_size=BS, ttl_seconds=self.ttl, session=self.session,
                                                    model=self.model), timeout=5)

    def send(self, batch: LogBatch):
        """One message on a stream of its own; the ack, or the status it was refused with."""
        try:
            (ack,) = self.stub.Steps(iter([wire.batch_to_pb(self.id, batch)]), timeout=5)
        except grpc.RpcError as exc:
            return exc.code()
        return wire.ack_from_pb(ack)

    def steps(self, n: int) -> None:
        """`n` steps of its engine, sent and acknowledged."""
        for _ in range(n):
            self.sim.step()
        ack = self.send(self.sim.kv.batch())
        assert not isinstance(ack, grpc.StatusCode) and ack.applied == self.sim.kv.seq and not ack.resync, ack
        self.sim.kv.acked(ack)

    def heartbeat(self) -> bool:
        return self.stub.Heartbeat(K.HeartbeatRequest(worker_id=self.id, session=self.session), timeout=5).known

    def close(self) -> None:
        self.channel.close()


def record(server, worker_id: str):
    """(address, model, the replica) the manager holds for the worker id."""
    [u] = [u for u in server.manager.usage() if u.worker_id == worker_id]
    return u.address, u.model, server.manager.state(worker_id)


def refused(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code()


@pytest.mark.parametrize("blocks", [BLOCKS, 2 * BLOCKS], ids=["same-pool", "other-pool"])
def test_a_second_live_process_with_the_id_is_refused_and_the_first_keeps_its_record(manager, blocks):
    """The first process steps; a second one registers the same id (same pool size, or another) while
    the first's registration lives: refused with ALREADY_EXISTS, and the record is the first's,
    untouched: its address (where the router sends requests), its replica, which still takes the first's
    steps and resyncs. The second's steps are refused too."""
    wid = f"dup-{blocks}"
    first = Process(manager, wid, 11, "10.0.0.1:50061")
    second = Process(manager, wid, 22, "10.0.0.2:50061", blocks=blocks)
    try:
        assert not first.register().restored
        first.steps(30)
        before = record(manager, wid)
        assert refused(second.register) == grpc.StatusCode.ALREADY_EXISTS
        assert record(manager, wid) == before and before[0] == "10.0.0.1:50061"
        second.sim.step()
        assert second.send(second.sim.kv.batch()) == grpc.StatusCode.FAILED_PRECONDITION
        assert not second.heartbeat() and first.heartbeat()
        first.steps(10)  # the first goes on, and so does its resync
        first.sim.kv.forget()
        first.steps(1)
        assert manager.manager.state(wid) == first.sim.ledger.snapshot()
        assert record(manager, wid)[0] == "10.0.0.1:50061"
    finally:
        first.close()
        second.close()


def test_after_a_reap_the_replacement_holds_the_id_and_the_old_process_is_refused(manager):
    """The first process goes silent past its time-to-live (a pause, a partition): reaped. A replacement
    registers the id (as a StatefulSet's new pod does) and steps. The old process comes back: its
    heartbeat is not known, its steps and its resync are refused, and registering again is refused
    while the replacement lives; the replacement's replica is its own ledger throughout."""
    wid = "reaped"
    old = Process(manager, wid, 33, "10.0.0.3:50061", ttl=1)
    new = Process(manager, wid, 44, "10.0.0.4:50061")
    try:
        old.register()
        old.steps(20)
        wait_until(lambda: wid not in manager.manager.workers(), 10, "the silent process reaped", every=0.05)
        assert not new.register().restored
        new.steps(20)
        assert not old.heartbeat() and new.heartbeat()
        old.sim.step()
        assert old.send(old.sim.kv.batch()) == grpc.StatusCode.FAILED_PRECONDITION
        old.sim.kv.forget()  # what a worker does next: its whole ledger as a resync
        assert old.send(old.sim.kv.batch()) == grpc.StatusCode.FAILED_PRECONDITION
        assert refused(old.register) == grpc.StatusCode.ALREADY_EXISTS
        assert manager.manager.state(wid) == new.sim.ledger.snapshot()
        assert record(manager, wid)[0] == "10.0.0.4:50061"
        new.steps(5)
        assert manager.manager.state(wid) == new.sim.ledger.snapshot()
    finally:
        old.close()
        new.close()


def test_a_stale_worker_stops_and_the_replacement_keeps_its_replica(manager):
    """The same, with the worker's own KV backend (RemoteKV over KVManagerClient): the stale process's
    sender is refused, registers again, is refused again, and is fenced: it sends nothing more, its
    engine's steps fail at once, and it is told to stop; the replacement's replica is never touched."""
    wid = "stale"
    address = f"127.0.0.1:{manager.port}"
    old_client = KVManagerClient(address, wid, "10.0.0.5:50061", BLOCKS, BS, ttl_s=1, model="m")
    new_client = KVManagerClient(address, wid, "10.0.0.6:50061", BLOCKS, BS, ttl_s=30, model="m")
    backends = []
    stopped = threading.Event()
    try:
        assert not old_client.register()
        old_kv = RemoteKV(KVLedger(BLOCKS, BS), old_client, probe_every_s=3600)
        backends.append(old_kv)
        old_kv.on_fenced = lambda reason: stopped.set()
        old_sim = SimWorker(old_kv, seed=5)
        for _ in range(20):
            old_sim.step()
        old_kv.drain()
        # silent (no heartbeat thread, nothing to send): reaped; the replacement takes the id
        wait_until(lambda: wid not in manager.manager.workers(), 10, "the silent process reaped", every=0.05)
        assert not new_client.register()
        new_client.start_heartbeat()
        new_kv = RemoteKV(KVLedger(BLOCKS, BS), new_client)
        backends.append(new_kv)
        new_sim = SimWorker(new_kv, seed=6)
        for _ in range(20):
            new_sim.step()
        new_kv.drain()
        resyncs = manager.metrics.resyncs._value.get()
        old_sim.step()  # the stale process wakes and steps: refused, registers again, refused: fenced
        assert stopped.wait(10) and "another process holds this worker's id" in old_kv.fenced
        with pytest.raises(KVManagerUnavailable):
            old_sim.step()
        for _ in range(10):
            new_sim.step()
        new_kv.drain()
        assert manager.manager.state(wid) == new_sim.ledger.snapshot()
        assert record(manager, wid)[0] == "10.0.0.6:50061"
        # no resync at all: the stale one's was refused, and the replacement never had to repair its own
        assert manager.metrics.resyncs._value.get() == resyncs
    finally:
        for kv in backends:
            kv.close()
        for c in (old_client, new_client):
            c.close()


def test_a_worker_must_name_its_session(manager):
    """Two processes registering one id with no session (0, proto3's default) cannot be told apart: the
    second's registration would pass for the first's and move its address. Register and Heartbeat
    without a session are refused with INVALID_ARGUMENT, nothing registered; nor does a heartbeat
    without one keep another process's registration alive."""
    wid = "no-session"
    first = Process(manager, wid, 0, "10.0.0.7:50061")
    second = Process(manager, wid, 0, "10.0.0.8:50061")
    live = Process(manager, "no-session-live", 77, "10.0.0.9:50061")
    try:
        codes = []
        for p in (first, second):
            try:
                p.register()
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())
        held = [u.address for u in manager.manager.usage() if u.worker_id == wid]
        assert codes == [grpc.StatusCode.INVALID_ARGUMENT] * 2 and held == [], (codes, held)
        live.register()
        assert refused(lambda: live.stub.Heartbeat(K.HeartbeatRequest(worker_id=live.id), timeout=5)) == \
            grpc.StatusCode.INVALID_ARGUMENT
        assert live.heartbeat()
    finally:
        for p in (first, second, live):
            p.close()


def test_the_binding_survives_a_manager_restart():
    """The session a worker id is bound to is kept in Redis with its ledger: after the manager restarts
    on the same Redis, a second process is still refused and the record stays the first's; the first
    registers again (restored: its own ledger) and goes on stepping; the second's steps are refused."""
    redis = ScratchRedis()
    server = serve("127.0.0.1:0", redis.url, reap_every_s=0.1)
    wid = "restart"
    first = Process(server, wid, 61, "10.0.0.10:50061")
    second = Process(server, wid, 62, "10.0.0.11:50061")
    try:
        assert not first.register().restored
        first.steps(25)
        server.stop()  # a graceful stop writes its last round: Redis holds every step acknowledged
        server = serve("127.0.0.1:0", redis.url, reap_every_s=0.1)
        for p in (first, second):
            p.close()
            p.connect(server)
        assert refused(second.register) == grpc.StatusCode.ALREADY_EXISTS
        assert record(server, wid)[0] == "10.0.0.10:50061"
        assert first.register().restored and first.heartbeat() and not second.heartbeat()
        first.steps(10)
        second.sim.step()
        assert second.send(second.sim.kv.batch()) == grpc.StatusCode.FAILED_PRECONDITION
        assert server.manager.state(wid) == first.sim.ledger.snapshot()
        assert record(server, wid)[0] == "10.0.0.10:50061"
    finally:
        for p in (first, second):
            p.close()
        server.stop(grace=None)
        redis.close()


def test_the_router_takes_only_the_workers_of_its_model(manager, caplog):
    """Two models' workers register with one manager: a router serving one model lists only its own (and
    says that the others are there: a worker with another served model name gets no request)."""
    for i, model in enumerate(["llama-a", "llama-b", "llama-a"]):
        manager.manager.register(WorkerSpec(f"model-{i}", f"10.0.1.{i}:50061", 16, BS, 30, model), 100 + i)

    async def listed(model: str | None) -> set[str]:
        d = KVManagerDirectory(f"127.0.0.1:{manager.port}", refresh_s=60, model=model)
        try:
            await d.refresh(force=True)
            return {w.address for w in d.workers if w.address.startswith("10.0.1.")}
        finally:
            await d.close()

    assert asyncio.run(listed("llama-a")) == {"10.0.1.0:50061", "10.0.1.2:50061"}
    assert asyncio.run(listed("llama-b")) == {"10.0.1.1:50061"}
    said = [r.getMessage() for r in caplog.records if "workers of other models" in r.getMessage()]
    assert any("'llama-a'" in m and "serves 'llama-b' only" in m for m in said)
    assert asyncio.run(listed(None)) == {"10.0.1.0:50061", "10.0.1.1:50061", "10.0.1.2:50061"}
    [u] = [u for u in manager.manager.usage() if u.worker_id == "model-1"]
    assert u.model == "llama-b"


class _InfoOnly(pb.worker_pb2_grpc.WorkerServicer):
    """A worker as a router polls it: its Info, and nothing else."""

    def __init__(self, info) -> None:
        self.info = info

    async def Info(self, req, context):
        return self.info


async def _info_workers() -> tuple[list, dict[str, str]]:
    """Two live gRPC workers that answer Info only: 'llama-a' with 40 free blocks, 'llama-b' with 60 (so
    room alone would pick b). Returns their servers and each model's address."""
    workers, addresses = [], {}
    for model, free in (("llama-a", 40), ("llama-b", 60)):
        w = grpc.aio.server()
        port = w.add_insecure_port("127.0.0.1:0")
        info = pb.worker_pb2.WorkerInfo(worker_id=model, model=model, num_blocks=64, block_size=BS,
                                        free_blocks=free)
        pb.worker_pb2_grpc.add_WorkerServicer_to_server(_InfoOnly(info), w)
        await w.start()
        workers.append(w)
        addresses[model] = f"127.0.0.1:{port}"
    return workers, addresses


def test_a_router_sends_requests_only_to_the_workers_of_its_model():
    """Two live workers register with one manager, serving two models; the other model's worker holds the
    prompt's whole prefix and more free blocks, so by prefix and room it would win every time. A router
    serving 'llama-a' sends every request to llama-a's worker, and a router serving 'llama-b' to
    llama-b's: a block name carries no model, the worker's registration does."""
    server = serve("127.0.0.1:0", None)
    ids = list(range(100, 150))  # 50 tokens: 3 full blocks that leave a token to compute
    names = block_hashes(ids, BS)

    async def main() -> tuple[dict[str, list[str]], dict[str, str]]:
        workers, addresses = await _info_workers()
        for model in addresses:
            client = InProcessClient(server.manager, model, addresses[model], 64, BS, model=model)
            assert not client.register()
            log = ReplicationLog(KVLedger(64, BS), client.session)
            if model == "llama-b":  # b holds the prompt's prefix: the block names alone would pick it
                ref = ThreadRef("r", 0)
                log.apply([Start(ref), Append(ref, len(ids)), Name(ref, 0, tuple(names[:3]))])
                log.acked(client.send(log.batch()))
        assert [n for _, _, n in server.manager.prefix(names)] == [0, 3]
        chosen = {}
        try:
            for model in ("llama-a", "llama-b"):
                d = KVManagerDirectory(f"127.0.0.1:{server.port}", refresh_s=60, model=model)
                try:
                    chosen[model] = []
                    for _ in range(8):
                        w = await d.choose(ids)
                        chosen[model].append(None if w is None else w.address)
                        if w is not None:
                            d.release(w)
                finally:
                    await d.close()
        finally:
            for w in workers:
                await w.stop(None)
        return chosen, addresses

    try:
        chosen, addresses = asyncio.run(main())
    finally:
        server.stop(grace=None)
    assert chosen == {m: [addresses[m]] * 8 for m in ("llama-a", "llama-b")}, (chosen, addresses)


def test_a_static_worker_list_serves_only_the_workers_of_its_model(caplog):
    """Without a KV manager (a --workers list, or a Kubernetes Service) the worker's own Info names its
    model: of two live workers, the one serving another model (and with more free blocks, so room alone
    would pick it) never gets a request, and the router says so once."""

    async def main() -> tuple[list, dict[str, str]]:
        workers, addresses = await _info_workers()
        d = WorkerDirectory(list(addresses.values()), refresh_s=60, model="llama-a")
        chosen = []
        try:
            for _ in range(8):
                w = await d.choose([1, 2, 3])
                chosen.append(None if w is None else w.address)
                if w is not None:
                    d.release(w)
        finally:
            await d.close()
            for w in workers:
                await w.stop(None)
        return chosen, addresses

    with caplog.at_level(logging.WARNING, logger="services.router.workers"):
        chosen, addresses = asyncio.run(main())
    assert chosen == [addresses["llama-a"]] * 8, (chosen, addresses)
    said = [r.getMessage() for r in caplog.records if "not this router's" in r.getMessage()]
    assert len(said) == 1 and addresses["llama-b"] in said[0] and "'llama-b'" in said[0], said


class _Loop:
    """What `_lease_pool` needs of a worker's engine loop: a call run on its engine."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def call(self, fn):
        done = concurrent.futures.Future()
        done.set_result(fn(self.engine))
        return done


def _worker_args(manager, port: int, ttl: int) -> argparse.Namespace:
    return argparse.Namespace(advertise=None, host="127.0.0.1", port=port, kvmanager=f"127.0.0.1:{manager.port}",
                              kv_ttl=ttl, served_model_name="m", model="models/m", kv_max_lag=5.0, kv_lag_wait=5.0)


def test_a_worker_restarted_after_a_crash_takes_its_id_back(manager, caplog):
    """A worker crashes (no goodbye: its registration lives on until its time-to-live ends) and restarts
    with the same id, a new process, a new session: `apar worker`'s lease is refused while the old
    registration lives, says so, and takes the id once it expired; the new process then replicates its
    ledger from nothing. A live holder that outlasts two time-to-lives makes it give up with a clear
    error instead."""
    wid = "crashed"
    old = KVManagerClient(f"127.0.0.1:{manager.port}", wid, "127.0.0.1:50071", BLOCKS, BS, ttl_s=1, model="m")
    engine = SimpleNamespace(ledger=KVLedger(BLOCKS, BS), kv=None)
    client = None
    try:
        assert not old.register()
        old.close()  # the crash: no more heartbeats
        with caplog.at_level(logging.WARNING, logger="apar.commands.serve"):
            client = _lease_pool(engine, _Loop(engine), _worker_args(manager, 50072, 30), wid)
        assert any("worker id crashed is taken" in r.getMessage() for r in caplog.records)
        assert record(manager, wid)[:2] == ("127.0.0.1:50072", "m")
        assert manager.manager.applied(wid) == (client.session, 0)
        sim = SimWorker(engine.kv, seed=7)
        for _ in range(30):
            sim.step()
        engine.kv.drain()
        assert manager.manager.state(wid) == sim.ledger.snapshot()

        rival = SimpleNamespace(ledger=KVLedger(BLOCKS, BS), kv=None)  # the id is held, and heartbeats go on
        with pytest.raises(UserError, match="worker id crashed is taken"):
            _lease_pool(rival, _Loop(rival), _worker_args(manager, 50073, 1), wid)
        assert rival.kv is None and record(manager, wid)[0] == "127.0.0.1:50072"
    finally:
        if engine.kv is not None:
            engine.kv.close()
        if client is not None:
            client.close()
