"""The KV manager in-process: memory mode, and persistence in a real Redis (one round trip per step,
restore from snapshot + log, resent steps, Redis that lost its data or a reply)."""
from __future__ import annotations

import pytest
import redis.connection

from services.kvmanager.ledger import ThreadRef
from services.kvmanager.manager import InProcessClient, KVManager
from services.kvmanager.metrics import KVMetrics
from services.kvmanager.ops import Append, Start
from services.kvmanager.records import BadRequest, SeqConflict, StoreUnavailable, UnknownWorker, WorkerSpec
from services.kvmanager.store import RedisStore
from services.kvmanager.testing import ScratchRedis, SimWorker

SPEC = WorkerSpec("w1", "127.0.0.1:1", num_blocks=64, block_size=4, ttl_s=30)


@pytest.fixture(scope="module")
def redis_server():
    try:
        server = ScratchRedis()
    except FileNotFoundError:
        pytest.skip("redis-server is not installed")
    yield server
    server.close()


@pytest.fixture
def make(redis_server, request):
    """A manager on the module's Redis with this test's own key prefix."""
    prefix = f"t-{request.node.name}:"

    def make_manager(snapshot_every: int = 8) -> KVManager:
        metrics = KVMetrics()
        store = RedisStore(redis_server.url, prefix, snapshot_every, on_round_trip=metrics.round_trip)
        manager = KVManager(store, metrics)
        manager.sync()
        return manager

    return make_manager


def drive(manager: KVManager, sim: SimWorker, steps: int, worker: str = "w1"):
    """Send the simulated worker's next steps; each answer must equal the worker's own ledger's.
    Returns the last (seq, ops, answer)."""
    for _ in range(steps):
        seq, ops, local = sim.step()
        result = manager.step(worker, seq, ops)
        assert result.answer == local and result.free_blocks == sim.ledger.num_free and not result.resent
    return seq, ops, local


def test_memory_mode_equals_apply_and_expires_on_its_clock():
    now = [0.0]
    m = KVManager(store=None, clock=lambda: now[0])
    assert m.register(SPEC) == (False, 64)
    sim = SimWorker(seed=3)
    drive(m, sim, 150)
    assert m.state("w1") == sim.ledger.snapshot()
    assert m.register(SPEC) == (True, sim.ledger.num_free)  # same pool, still alive: restored
    now[0] = 20.0
    assert m.heartbeat("w1") and m.reap() == []
    now[0] = 51.0  # 30 s after the last heartbeat
    assert not m.heartbeat("w1")
    assert m.reap() == ["w1"] and m.usage() == []
    with pytest.raises(UnknownWorker):
        m.step("w1", sim.seq + 1, [])
    assert m.register(SPEC) == (False, 64)  # after expiry: a fresh ledger


def test_in_process_client_for_the_embedded_mode():
    client = InProcessClient(KVManager(), "embedded", "", num_blocks=64, block_size=4)
    assert client.register() is False and client.register() is True
    sim = SimWorker(seed=8)
    for _ in range(60):
        seq, ops, local = sim.step()
        assert client.step(seq, ops).answer == local
    assert client.state() == sim.ledger.snapshot()
    with pytest.raises(RuntimeError, match="unknown thread"):
        client.step(sim.seq + 1, [Append(ThreadRef("nobody", 0), 1)])


def test_one_pipelined_round_trip_per_step(make, monkeypatch):
    m = make(snapshot_every=8)
    m.register(SPEC)
    sim = SimWorker(seed=4)
    drive(m, sim, 1)  # the connection is open now (its handshake is not a step's traffic)
    sends = []
    real = redis.connection.AbstractConnection.send_packed_command
    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command",
                        lambda self, *a, **k: (sends.append(1), real(self, *a, **k))[1])
    before = m.metrics.round_trips._value.get()
    drive(m, sim, 100)  # snapshots included: every 8th step writes one in the same transaction
    assert len(sends) == 100, f"{len(sends)} socket writes for 100 steps"
    assert m.metrics.round_trips._value.get() - before == 100
    assert m.metrics.steps._value.get() == 101


def test_restore_from_snapshot_and_log_is_exact(make, redis_server):
    m = make(snapshot_every=8)
    m.register(SPEC)
    sim = SimWorker(seed=5)
    seq, ops, local = drive(m, sim, 101)  # 101 entries: snapshots every 8, the rest in the log
    key = "t-test_restore_from_snapshot_and_log_is_exact:kv:w:w1:log"
    client = redis_server.client()
    assert 0 < client.llen(key) <= 8
    client.rpush(key, client.lindex(key, -1))  # a transaction retried after its reply was lost
    again = make()
    assert again.state("w1") == m.state("w1") == sim.ledger.snapshot()
    assert again.usage() == m.usage()
    again.check()
    # the last step's answer came back too: a resend is answered, not applied
    resent = again.step("w1", seq, ops)
    assert resent.resent and resent.answer == local
    drive(again, sim, 50)  # and it goes on from there, block for block
    assert again.state("w1") == sim.ledger.snapshot()


def test_resend_rules(make):
    m = make()
    m.register(SPEC)
    root = ThreadRef("a", 0)
    first = m.step("w1", 1, [Start(root), Append(root, 6)])
    state = m.state("w1")
    assert m.step("w1", 1, [Start(root), Append(root, 6)]).answer == first.answer
    assert m.state("w1") == state  # not applied twice
    with pytest.raises(SeqConflict):
        m.step("w1", 1, [Append(root, 1)])  # same seq, other ops
    m.step("w1", 2, [Append(root, 1)])
    with pytest.raises(SeqConflict):
        m.step("w1", 1, [Start(root), Append(root, 6)])  # older than the last step
    with pytest.raises(BadRequest):
        m.step("w1", 0, [])
    assert m.step("w1", 5, [Append(root, 1)]).answer.appends == [[(1, 3)]]  # a gap in seq is accepted


def test_redis_that_lost_its_data_is_rewritten_from_memory(make, redis_server):
    m = make(snapshot_every=8)
    m.register(SPEC)
    sim = SimWorker(seed=6)
    drive(m, sim, 30)
    client = redis_server.client()
    prefix = "t-test_redis_that_lost_its_data_is_rewritten_from_memory:"
    saved = {k: client.dump(k) for k in client.scan_iter(prefix + "*") if not k.endswith(b":alive")}
    drive(m, sim, 13)
    for k in client.scan_iter(prefix + "*"):  # Redis restarted empty
        client.delete(k)
    drive(m, sim, 1)  # detected in that step's transaction; the step is applied once, after the rewrite
    assert make().state("w1") == sim.ledger.snapshot()
    assert m.reap() == []  # the registration was written back too
    drive(m, sim, 5)
    for k, v in saved.items():  # Redis restarted from an old dump
        client.restore(k, 0, v, replace=True)
    drive(m, sim, 1)
    assert make().state("w1") == sim.ledger.snapshot() == m.state("w1")


def test_a_step_whose_reply_was_lost_is_not_applied_twice(make):
    m = make(snapshot_every=4)
    m.register(SPEC)
    sim = SimWorker(seed=7)
    drive(m, sim, 10)
    real = m.store.append

    def lost_reply(rec, entry):
        real(rec, entry)  # committed in Redis...
        raise StoreUnavailable("connection reset")  # ...but the manager never heard back

    m.store.append = lost_reply
    seq, ops, local = sim.step()
    with pytest.raises(StoreUnavailable):
        m.step("w1", seq, ops)
    m.store.append = real
    result = m.step("w1", seq, ops)  # the worker resends: Redis is ahead, its version wins
    assert result.resent and result.answer == local
    assert m.state("w1") == sim.ledger.snapshot()
    drive(m, sim, 20)
    m.check()


def test_unreachable_redis_answers_unavailable_and_applies_nothing():
    m = KVManager(RedisStore("redis://127.0.0.1:1/0", "t-down:"))
    with pytest.raises(StoreUnavailable):
        m.register(SPEC)
    with pytest.raises(StoreUnavailable):
        m.step("w1", 1, [])
    assert m.usage() == []
