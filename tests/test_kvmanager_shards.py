"""KV manager shards: each worker finds its own by its id (rendezvous hashing); with two shards as
processes under simulated workers stepping all along, one shard is killed and restarted: its workers
resend and catch up, the other shard's workers never notice; the router asks every shard for usage."""
from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter

import pytest

from apar.bench_suite.simulated import ScratchRedis, SimWorker, free_port
from apar.engine.kv.ledger import KVLedger
from services.kvmanager import wire
from services.kvmanager.records import WorkerSpec
from services.kvmanager.replication import ReplicaUnavailable
from services.kvmanager.service import serve
from services.kvmanager.shards import parse_shards, shard_for
from services.worker.kv import RemoteKV
from services.worker.kvclient import KVManagerClient
from tests.faults import wait_until
from tests.procs import Proc

BLOCKS, BLOCK_SIZE = 128, 4


def test_each_worker_has_one_shard_and_a_new_shard_moves_only_its_own():
    shards = parse_shards(" a:1, b:2 ,c:3,a:1")
    assert shards == ["a:1", "b:2", "c:3"]
    ids = [f"worker-{i}" for i in range(3000)]
    owner = {w: shard_for(w, shards) for w in ids}
    assert owner == {w: shard_for(w, list(reversed(shards))) for w in ids}  # the list's order does not matter
    counts = Counter(owner.values())
    assert min(counts.values()) > 800, counts  # about a third each
    grown = {w: shard_for(w, shards + ["d:4"]) for w in ids}
    moved = [w for w in ids if grown[w] != owner[w]]
    assert all(grown[w] == "d:4" for w in moved) and 550 < len(moved) < 950  # only to the new shard
    with pytest.raises(ValueError):
        parse_shards(" , ")


def ids_owned_by_each(shards: str, per_shard: int) -> dict[str, list[str]]:
    """Worker ids w-0, w-1, ... taken until every shard owns `per_shard` of them (ports are random, so a
    fixed list of ids may all hash to one shard)."""
    owned: dict[str, list[str]] = {a: [] for a in parse_shards(shards)}
    for i in range(1000):
        mine = owned[shard_for(f"w-{i}", list(owned))]
        if len(mine) < per_shard:
            mine.append(f"w-{i}")
        if all(len(v) == per_shard for v in owned.values()):
            return owned
    raise AssertionError(f"1000 ids and still a shard short: {owned}")


class Fleet:
    """Simulated workers over RemoteKV and the real client, stepping on a thread at `rate` steps/s each;
    every failed send is counted per worker."""

    def __init__(self, shards: str, ids: list[str], rate: float = 50.0) -> None:
        self.backends: dict[str, RemoteKV] = {}
        self.failures: Counter = Counter()
        for i, wid in enumerate(ids):
            client = KVManagerClient(shards, wid, f"127.0.0.1:{i + 1}", BLOCKS, BLOCK_SIZE, ttl_s=30)
            assert not client.register()
            send = client.send

            def counted(batch, send=send, wid=wid):
                try:
                    return send(batch)
                except ReplicaUnavailable:
                    self.failures[wid] += 1
                    raise

            client.send = counted
            self.backends[wid] = RemoteKV(KVLedger(BLOCKS, BLOCK_SIZE), client, send_every_s=0.01)
        self.sims = [SimWorker(b, seed=i, threads=8) for i, b in enumerate(self.backends.values())]
        self.rate = rate
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.steps = 0

    def shard_of(self, wid: str) -> str:
        return self.backends[wid].client.address

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            for sim in self.sims:
                sim.step()
            self.steps += 1
            next_at += 1 / self.rate
            self._stop.wait(max(0.0, next_at - time.monotonic()))  # the pace of the engines, until stopped

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        for backend in self.backends.values():
            backend.drain(30)

    def close(self) -> None:
        for backend in self.backends.values():
            backend.close()
            backend.client.close()


def test_a_shard_restart_touches_only_its_own_workers(tmp_path):
    redis = ScratchRedis()
    ports = [free_port(), free_port()]
    shards = ",".join(f"127.0.0.1:{p}" for p in ports)

    def start_shard(i: int) -> Proc:
        proc = Proc("kvmanager", "--port", str(ports[i]), "--redis", redis.url, "--prefix", f"shard{i}:",
                    "--ttl", "30")
        proc.wait_for("listening on")
        return proc

    procs = [start_shard(0), start_shard(1)]
    owned = ids_owned_by_each(shards, 4)
    fleet = Fleet(shards, [w for ids in owned.values() for w in ids])
    try:
        by_shard = {a: [w for w in fleet.backends if fleet.shard_of(w) == a] for a in parse_shards(shards)}
        assert by_shard == owned  # the clients found the shards the ids hash to: four workers each
        fleet.start()
        victim, other = parse_shards(shards)
        acked = lambda ws: all(fleet.backends[w].outbox.acked_seq >= 20 for w in ws)  # noqa: E731
        wait_until(lambda: acked(fleet.backends), 30, "every worker's steps acknowledged by its shard")
        at_kill = fleet.steps
        procs[0].kill()  # SIGKILL the shard on ports[0]: its workers keep stepping, their steps queue
        made_at_kill = {w: fleet.backends[w].outbox.seq for w in by_shard[other]}
        wait_until(lambda: all(fleet.failures[w] > 0 for w in by_shard[victim]), 30,
                   "the dead shard's workers failing to send")  # the fault hit them while they stepped
        wait_until(lambda: fleet.steps - at_kill > 30, 30, "steps made while the shard is dead")
        # the other shard's workers never noticed: steps they made after the kill are acknowledged while
        # the dead shard is still dead
        wait_until(lambda: all(fleet.backends[w].outbox.acked_seq > made_at_kill[w] for w in by_shard[other]), 30,
                   "the other shard acknowledging steps made after the kill")
        assert procs[0].p.poll() is not None and all(fleet.failures[w] == 0 for w in by_shard[other])
        procs[0] = start_shard(0)  # restored from its own keys in Redis
        resumed = {w: fleet.backends[w].outbox.seq for w in by_shard[victim]}
        wait_until(lambda: all(fleet.backends[w].outbox.acked_seq >= resumed[w] for w in by_shard[victim]), 30,
                   "the restarted shard acknowledging every step made while it was dead")
        fleet.stop()
        for w in by_shard[victim]:
            assert fleet.failures[w] > 0  # they noticed, resent, and caught up
        for w in by_shard[other]:
            assert fleet.failures[w] == 0  # never noticed
        for wid, backend in fleet.backends.items():
            assert backend.blocked_s == 0.0
            assert backend.client.state() == wire.state_to_pb(backend.ledger.snapshot()), wid
    finally:
        fleet.close()
        for p in procs:
            p.stop()
        redis.close()


def test_router_directory_asks_every_shard(llama_dir):
    """Two in-memory shards, each owning workers (ids are taken until both own three), each worker a real
    worker gRPC server (all over one in-process engine: the directory asks each its Info). The directory
    routes to every shard's workers; with one shard stopped, its workers stay as last seen while the
    other shard's answers still come in (a worker registered there after the stop becomes routable)."""
    from apar.engine.config import EngineConfig
    from apar.engine.engine import Engine
    from services.router.workers import KVManagerDirectory
    from services.worker.loop import EngineLoop
    from services.worker.service import start_worker_server

    servers = [serve("127.0.0.1:0", None), serve("127.0.0.1:0", None)]
    addresses = [f"127.0.0.1:{s.port}" for s in servers]
    shards = ",".join(addresses)
    owned = ids_owned_by_each(shards, 3)
    engine_loop = EngineLoop(Engine(llama_dir, EngineConfig(num_blocks=16)))

    async def listed() -> tuple[set[str], set[str], set[str], set[str]]:
        workers = []

        async def worker(shard: int, wid: str) -> str:
            server, port = await start_worker_server(engine_loop, "127.0.0.1:0", wid, "m")
            workers.append(server)
            servers[shard].manager.register(WorkerSpec(wid, f"127.0.0.1:{port}", 16, 16, 30), 1)
            return f"127.0.0.1:{port}"

        registered = {await worker(s, wid) for s, a in enumerate(addresses) for wid in owned[a][:2]}
        directory = KVManagerDirectory(shards, refresh_s=60)
        try:
            await directory.refresh(force=True)
            first = {w.address for w in directory.workers if w.alive}
            servers[0].stop(grace=None)  # one shard gone: its workers stay as last seen
            late = {await worker(1, owned[addresses[1]][2])}
            await directory.refresh(force=True)
            return registered, first, late, {w.address for w in directory.workers if w.alive}
        finally:
            await directory.close()
            for server in workers:
                await server.stop(None)

    try:
        registered, first, late, second = asyncio.run(listed())
    finally:
        engine_loop.stop()
        for s in servers:
            s.stop(grace=None)
    assert first == registered
    assert second == registered | late
