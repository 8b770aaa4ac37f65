"""A worker's engine through outages of its KV manager, on a real gRPC manager in this process.

The manager is stopped while forking requests run and stays away past the worker's lag bound, and the
step that passes the bound admits new requests: the engine thread lives on, the requests that were
running and those the refused step admitted end with the status that says the manager is unavailable
(not the loop's catch-all), a request sent during the outage waits for the manager and ends the same
way, and when a manager is back on the same port the worker registers again, resyncs, serves new
requests, and the replica equals its ledger. Each wait is on an event (a request's end, a log line, the replica's
acknowledgement), never a fixed sleep.
"""
from __future__ import annotations

import logging
import threading

import pytest

from apar.bench_suite.simulated import ScratchRedis
from apar.engine.config import EngineConfig
from apar.engine.engine import Engine
from apar.engine.events import FinishReason, RequestFinished, ThreadStarted, TokenEvent
from apar.engine.kv.ops import Start
from apar.engine.params import SamplingParams
from services.kvmanager import wire
from services.kvmanager.service import serve
from services.worker.kv import MANAGER_UNAVAILABLE, KVManagerUnavailable, RemoteKV
from services.worker.kvclient import KVManagerClient
from services.worker.loop import EngineLoop
from tests.faults import wait_until
from tests.test_engine_pressure import biased_forward

LAG_S, WAIT_S = 0.3, 0.4  # the worker's lag bound and its wait past it (RemoteKV's are 5 s and 10 s)


class Requests:
    """Sinks for requests submitted to an engine loop: each request's events, and its end."""

    def __init__(self, loop: EngineLoop) -> None:
        self.loop = loop
        self.events: dict[str, list] = {}
        self.done: dict[str, RequestFinished] = {}
        self._cond = threading.Condition()

    def submit(self, rid: str, prompt: list[int], params: SamplingParams, wait: bool = True) -> str:
        """Submit a request; with `wait`, once the engine took it (else it may still be queued)."""
        self.events[rid] = []

        def sink(evs) -> None:
            with self._cond:
                self.events[rid].extend(evs)
                if isinstance(evs[-1], RequestFinished):
                    self.done[rid] = evs[-1]
                self._cond.notify_all()

        fut = self.loop.submit(prompt, params, rid, sink)
        if wait:
            fut.result(timeout=10)
        return rid

    def tokens(self, rid: str) -> int:
        return sum(isinstance(e, TokenEvent) for e in self.events[rid])

    def forks(self, rid: str) -> int:
        return sum(isinstance(e, ThreadStarted) and e.parent is not None for e in self.events[rid])

    def wait_done(self, rids, timeout: float = 30.0) -> list[RequestFinished]:
        with self._cond:
            ok = self._cond.wait_for(lambda: all(r in self.done for r in rids), timeout)
        assert ok, f"requests {sorted(set(rids) - set(self.done))} never ended (the engine loop is stuck or dead)"
        return [self.done[r] for r in rids]


@pytest.fixture
def cluster(long_llama_dir):
    """A memory-only KV manager on loopback gRPC and a worker's engine loop in cluster mode (fork-biased
    random model, 32k positions: its requests run until something ends them)."""
    c = type("Cluster", (), {})()
    c.server = serve("127.0.0.1:0", reap_every_s=0.2)
    c.clients = []

    def factory(ledger):
        client = KVManagerClient(f"127.0.0.1:{c.server.port}", "w-out", "here", ledger.num_blocks,
                                 ledger.block_size, ttl_s=30)
        assert not client.register()
        client.start_heartbeat()
        c.clients.append(client)
        return RemoteKV(ledger, client, max_lag_s=LAG_S, wait_s=WAIT_S)

    c.engine = Engine(long_llama_dir, EngineConfig(block_size=4, num_blocks=512, max_batch_tokens=32,
                                                   fork_watermark=0.0), kv_factory=factory)
    biased_forward(c.engine, 3.0)
    c.loop = EngineLoop(c.engine)
    c.requests = Requests(c.loop)
    yield c
    c.loop.stop()
    c.engine.kv.close()
    for client in c.clients:
        client.close()
    c.server.stop(grace=None)


def forking(max_tokens: int, seed: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed, ignore_eos=True, max_threads=4)


def spy_refused_steps(engine: Engine) -> list[list]:
    """The ops of each step the worker's KV backend refused (KVManagerUnavailable), in order."""
    refused: list[list] = []
    apply = engine.kv.apply

    def spied(ops):
        try:
            return apply(ops)
        except KVManagerUnavailable:
            refused.append(list(ops))
            raise

    engine.kv.apply = spied
    return refused


def test_engine_survives_a_manager_outage_past_the_lag_bound(cluster, caplog):
    """The step that passes the lag bound admits new requests (and the running ones fork): its ops are
    refused, and nothing of it may count as applied."""
    c, reqs = cluster, cluster.requests
    refused = spy_refused_steps(c.engine)
    running = [reqs.submit(f"run-{i}", list(range(40 + 9 * i, 52 + 9 * i)), forking(30000, i)) for i in range(3)]
    wait_until(lambda: all(reqs.tokens(r) >= 20 for r in running) and sum(reqs.forks(r) for r in running), 60,
               "every request streaming, and a fork")
    port = c.server.port
    gate, parked = threading.Event(), threading.Event()

    def park(engine) -> None:  # on the loop thread, between two steps
        parked.set()
        assert gate.wait(30)

    with caplog.at_level(logging.WARNING, logger="services.worker"):
        c.server.stop(grace=None)  # the manager is gone: the worker's replica falls behind
        wait_until(lambda: c.loop.call(lambda e: e.kv.outbox.lag()[0]).result(10), 10,
                   "a step the manager did not acknowledge")
        c.loop.call(park)
        assert parked.wait(10)
        # queued while the engine is parked: its next step admits them
        admitted = [reqs.submit(f"new-{i}", list(range(100 + 8 * i, 108 + 8 * i)), forking(100, 20 + i), wait=False)
                    for i in range(2)]
        wait_until(lambda: c.engine.kv.outbox.lag()[1] > LAG_S, 10, "the replica past the lag bound")
        gate.set()
        ended = reqs.wait_done(running + admitted, timeout=30)
        # the step past the bound started the new requests' roots in its ops: refused, so never applied
        assert refused, "no step was refused"
        starts = {op.thread.request for op in refused[0] if isinstance(op, Start)}
        assert starts and starts <= set(admitted), refused[0]
        # each ends with the status that says why: the running ones after streaming, the new ones unserved
        assert all(reqs.tokens(r) > 20 for r in running) and not any(reqs.tokens(r) for r in admitted)
        assert [(e.reason, e.error) for e in ended] == [(FinishReason.ERROR, MANAGER_UNAVAILABLE)] * 5
        # sent while the manager is still away: nothing is admitted until it is back; it waits for it
        # (the backend's wait) and ends the same way, and the engine lives on
        late = reqs.submit("late", list(range(200, 230)), forking(100, 7))
        (e,) = reqs.wait_done([late], timeout=10)
        assert (e.reason, e.error) == (FinishReason.ERROR, MANAGER_UNAVAILABLE) and reqs.tokens(late) == 0
        assert c.loop._thread.is_alive()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "an outage is not an engine failure"
    assert c.engine.ledger.num_used == 0  # every failed request's blocks are free in the worker's ledger
    c.engine.ledger.check()

    c.server = serve(f"127.0.0.1:{port}", reap_every_s=0.2)  # a new manager, empty: the worker is unknown
    # the worker registers again and resyncs its ledger; until the replica is back within the lag bound
    # nothing is admitted (with this test's short wait, a request sent now could end unserved)
    wait_until(lambda: not c.engine.kv.unavailable, 30, "the worker caught up with the new manager")
    after = [reqs.submit(f"after-{i}", list(range(300 + 5 * i, 320 + 5 * i)), forking(60, 10 + i))
             for i in range(3)]
    done = reqs.wait_done(after, timeout=60)
    assert all((e.reason, e.error) == (FinishReason.LENGTH, None) for e in done)
    assert all(e.usage.completion_tokens == 60 for e in done)

    def replica_equal() -> bool:
        c.loop.call(lambda e: e.kv.drain(10)).result(timeout=20)
        mine = c.loop.call(lambda e: wire.state_to_pb(e.ledger.snapshot())).result(timeout=10)
        return c.clients[0].state() == mine

    wait_until(replica_equal, 30, "the new manager's replica equal to the worker's ledger")
    assert [w.worker_id for w in c.server.manager.usage()] == ["w-out"]


def test_a_worker_reconnects_at_once_after_a_long_outage_and_is_not_reaped(tmp_path, caplog):
    """A worker (time-to-live 2 s) streams its steps to a manager with Redis; the manager is stopped
    while the worker's heartbeats fail ten times over (gRPC's own reconnect backoff would by then wait
    seconds between tries), then restarted on the same port from the same Redis, which gives the
    worker's ledger a fresh time-to-live. The worker reaches it again before that runs out: it is not
    reaped, its heartbeats are known, and after its next steps the replica equals its ledger."""
    from apar.bench_suite.simulated import SimWorker
    from apar.engine.kv.ledger import KVLedger

    redis = ScratchRedis()
    server = serve("127.0.0.1:0", redis.url, reap_every_s=0.1)
    port = server.port
    client = KVManagerClient(f"127.0.0.1:{port}", "w-long", "here", 64, 4, ttl_s=2)
    kv = None
    try:
        assert not client.register()
        client.start_heartbeat()
        kv = RemoteKV(KVLedger(64, 4), client)
        sim = SimWorker(kv, seed=3)
        for _ in range(30):
            sim.step()
        kv.drain()
        with caplog.at_level(logging.WARNING, logger="services.worker.kvclient"):
            server.stop(grace=None)
            wait_until(lambda: client.failed_beats >= 10, 30, "ten failed heartbeats")
        # and one line says so, not ten
        assert sum("heartbeat to the KV manager failed" in r.getMessage() for r in caplog.records) == 1
        beats = client.beats
        server = serve(f"127.0.0.1:{port}", redis.url, reap_every_s=0.1)
        reaped = server.metrics.reaped._value.get
        # the worker's first heartbeat the new manager answers, or its reap, whichever comes first
        wait_until(lambda: client.beats > beats or reaped(), 30, "the worker heard again, or reaped")
        assert reaped() == 0, "the worker was reaped: it reached the manager only after its time-to-live"
        for _ in range(10):
            sim.step()
        kv.drain(20)
        assert server.manager.state("w-long") == sim.ledger.snapshot()
        assert reaped() == 0
    finally:
        if kv is not None:
            kv.close()
        client.close()
        server.stop(grace=None)
        redis.close()


def test_a_step_whose_ops_cannot_be_handed_over_marks_no_thread_known(llama_dir):
    """With the manager gone and no lag allowed, the step that starts a new request (and forks) raises
    before applying anything: no thread of it counts as known to the ledger, so ending the requests
    sends no op for a thread the ledger never saw, and every block is free."""
    server = serve("127.0.0.1:0")
    clients = []

    def factory(ledger):
        client = KVManagerClient(f"127.0.0.1:{server.port}", "w-step", "here", ledger.num_blocks, ledger.block_size)
        client.register()
        clients.append(client)
        return RemoteKV(ledger, client, max_lag_s=0.2, wait_s=0.01)

    eng = Engine(llama_dir, EngineConfig(block_size=4, num_blocks=128, max_batch_tokens=64, fork_watermark=0.0),
                 kv_factory=factory)
    biased_forward(eng, 6.0)
    try:
        first = eng.add_request(list(range(30, 45)), forking(200, 1))
        while not eng.requests[first].usage.forks:
            eng.step()
        server.stop(grace=None)
        eng.step()  # a step the manager will not acknowledge
        wait_until(lambda: eng.kv.outbox.lag()[1] > eng.kv.max_lag_s, 10, "the replica past the lag bound")
        second = eng.add_request(list(range(60, 75)), forking(200, 2))
        with pytest.raises(KVManagerUnavailable):
            eng.step()  # admits `second` and starts it in the ledger: cannot be handed over
        fresh = [t for r in (first, second) for t in eng.requests[r].threads if not t.in_ledger]
        assert fresh and any(t.parent is None for t in fresh)  # the new request's root, unknown
        for rid in (first, second):
            eng.requests[rid].error = MANAGER_UNAVAILABLE
            eng.abort(rid, FinishReason.ERROR)
        assert not eng.requests and eng.ledger.num_used == 0
        eng.ledger.check()
    finally:
        eng.kv.close()
        for client in clients:
            client.close()
        server.stop(grace=None)
