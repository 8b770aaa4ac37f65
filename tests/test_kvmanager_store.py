"""The KV manager in-process: memory mode, and persistence in a real Redis (at most one transaction per
message, fewer when messages arrive together; restore from snapshot + log; duplicates and steps out of
order; Redis that lost its data or a reply)."""
from __future__ import annotations

import threading

import pytest
import redis.connection

from apar.bench_suite.simulated import SimWorker, deliver
from apar.engine.kv.ledger import KVLedger, ThreadRef
from apar.engine.kv.ops import Append
from services.kvmanager.inprocess import InProcessClient
from services.kvmanager.manager import KVManager
from services.kvmanager.metrics import KVMetrics
from services.kvmanager.records import BadRequest, StoreUnavailable, UnknownWorker, WorkerSpec
from services.kvmanager.replication import LogBatch, ReplicaUnavailable, ReplicationLog, WorkerForgotten
from services.kvmanager.store import RedisStore

W1 = WorkerSpec("w1", "127.0.0.1:1", num_blocks=64, block_size=4, ttl_s=30)
SESSION = 7


@pytest.fixture
def make(redis_server, request):
    """A manager on the module's Redis with this test's own key prefix."""
    prefix = f"t-{request.node.name}:"
    managers = []

    def make_manager(snapshot_every: int = 8) -> KVManager:
        metrics = KVMetrics()
        store = RedisStore(redis_server.url, prefix, snapshot_every, on_round_trip=metrics.round_trip)
        manager = KVManager(store, metrics)
        manager.sync()
        managers.append(manager)
        return manager

    yield make_manager
    for m in managers:
        m.close()


def worker(seed: int, num_blocks: int = 64) -> SimWorker:
    return SimWorker(ReplicationLog(KVLedger(num_blocks, 4), SESSION), seed=seed)


def drive(manager: KVManager, sim: SimWorker, steps: int, worker_id: str = "w1") -> None:
    """The simulated worker's next steps, each sent as a message; each ack covers it and agrees, and each
    message is in Redis (`flush`) before the next is sent: one log entry per transaction."""
    for _ in range(steps):
        sim.step()
        ack = deliver(manager, worker_id, sim.kv)
        assert ack.applied == sim.kv.seq and not ack.resync and ack.digest == sim.ledger.digest()
        manager.flush()


def test_memory_mode_equals_the_worker_and_expires_on_its_clock():
    now = [0.0]
    m = KVManager(store=None, clock=lambda: now[0])
    assert m.register(W1, SESSION) == (False, 64)
    sim = worker(3)
    drive(m, sim, 150)
    assert m.state("w1") == sim.ledger.snapshot()
    assert m.register(W1, SESSION) == (True, sim.ledger.num_free)  # same pool, still alive: restored
    now[0] = 20.0
    assert m.heartbeat("w1", SESSION) and m.reap() == []
    now[0] = 51.0  # 30 s after the last heartbeat
    assert not m.heartbeat("w1", SESSION)
    assert m.reap() == ["w1"] and m.usage() == []
    with pytest.raises(UnknownWorker):
        m.submit("w1", LogBatch(SESSION, []))
    assert m.register(W1, SESSION) == (False, 64)  # after expiry: a fresh ledger


def test_in_process_client_for_the_embedded_mode():
    manager = KVManager()
    client = InProcessClient(manager, "embedded", "", num_blocks=64, block_size=4)
    assert client.register() is False and client.register() is True
    log = ReplicationLog(KVLedger(64, 4), client.session)
    sim = SimWorker(log, seed=8)
    for _ in range(60):
        sim.step()
        log.acked(client.send(log.batch()))
    assert client.state() == sim.ledger.snapshot() and log.batch() is None
    manager.reap()  # nothing expired: the registration lives a day
    with pytest.raises(WorkerForgotten):
        InProcessClient(manager, "nobody", "", 64, 4).send(LogBatch(1, []))
    with pytest.raises(ReplicaUnavailable):
        InProcessClient(KVManager(RedisStore("redis://127.0.0.1:1/0", "t-down:")), "w", "", 64, 4).send(LogBatch(1, []))


def test_at_most_one_transaction_per_message_and_fewer_together(make):
    m = make(snapshot_every=8)
    m.register(W1, SESSION)
    sim = worker(4)
    drive(m, sim, 1)  # the connection is open now (its handshake is not a message's traffic)
    m.flush()
    sends = []
    real = redis.connection.AbstractConnection.send_packed_command

    def counted(self, *a, **k):
        sends.append(1)
        return real(self, *a, **k)

    redis.connection.AbstractConnection.send_packed_command = counted
    try:
        before = m.metrics.round_trips._value.get()
        for _ in range(100):  # several steps per message; snapshots every 8 messages in the same transaction
            for _ in range(3):
                sim.step()
            deliver(m, "w1", sim.kv)  # acknowledged at once; the writer's rounds take them to Redis
        m.flush()
        trips = m.metrics.round_trips._value.get() - before
        assert 1 <= trips <= 100 and len(sends) == trips, f"{len(sends)} socket writes, {trips} transactions"
        assert m.metrics.steps._value.get() == 301 and m.metrics.messages._value.get() == 101
        # 16 workers sending at once: their messages share transactions
        specs = [WorkerSpec(f"c{i}", "x", 64, 4, 30) for i in range(16)]
        for spec in specs:
            m.register(spec, SESSION)
        sims = {spec.worker_id: worker(10 + i) for i, spec in enumerate(specs)}
        before = m.metrics.round_trips._value.get()
        barrier = threading.Barrier(len(sims))

        def run(w: str) -> None:
            barrier.wait()
            drive(m, sims[w], 20, w)

        threads = [threading.Thread(target=run, args=(w,)) for w in sims]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        m.flush()
        trips = m.metrics.round_trips._value.get() - before
        assert trips < 16 * 20, f"{trips} transactions for {16 * 20} messages"
    finally:
        redis.connection.AbstractConnection.send_packed_command = real
    again = make()  # Redis holds every message
    for w, s in [("w1", sim), *sims.items()]:
        assert m.state(w) == again.state(w) == s.ledger.snapshot()


def test_restore_from_snapshot_and_log_is_exact(make, redis_server):
    m = make(snapshot_every=8)
    m.register(W1, SESSION)
    sim = worker(5)
    drive(m, sim, 101)  # 101 entries: snapshots every 8, the rest in the log
    key = "t-test_restore_from_snapshot_and_log_is_exact:kv:w:w1:log"
    client = redis_server.client()
    assert 0 < client.llen(key) <= 8
    client.rpush(key, client.lindex(key, -1))  # a transaction retried after its reply was lost
    again = make()
    assert again.state("w1") == m.state("w1") == sim.ledger.snapshot()
    assert again.usage() == m.usage() and again.applied("w1") == (SESSION, sim.kv.seq)
    again.check()
    sim.step()
    batch = sim.kv.batch()
    assert again.submit("w1", batch).applied == sim.kv.seq
    assert again.submit("w1", batch).applied == sim.kv.seq  # a resend is skipped, not applied twice
    assert again.metrics.duplicates._value.get() == 1
    sim.kv.acked(again.submit("w1", batch))
    drive(again, sim, 50)  # and it goes on from there, block for block
    assert again.state("w1") == sim.ledger.snapshot()


def test_duplicates_and_steps_out_of_order_are_applied_once_in_order(make):
    m = make()
    m.register(W1, SESSION)
    sim = worker(9)
    batches = []
    for _ in range(5):
        for _ in range(4):
            sim.step()
        batches.append(sim.kv.batch())
        sim.kv.unacked.clear()  # each batch holds only its own four steps
    order = [2, 0, 3, 0, 1, 4, 2, 1, 3, 4, 0]  # early, duplicated, late
    applied = [m.submit("w1", batches[i]).applied for i in order]
    assert applied == [0, 4, 4, 4, 8, 8, 12, 12, 16, 20, 20]
    assert m.state("w1") == sim.ledger.snapshot() and m.metrics.steps._value.get() == 20
    m.flush()
    assert make().state("w1") == sim.ledger.snapshot()  # Redis holds each step once, in order


def test_bad_batches_are_refused_with_a_reason(make):
    m = make()
    m.register(W1, SESSION)
    sim = worker(11)
    sim.step()
    step = sim.kv.batch().steps[0]
    for bad in (LogBatch(0, [step]), LogBatch(SESSION, [step, step]),
                LogBatch(SESSION, [type(step)(0, [], step.digest)]),
                LogBatch(SESSION, [type(step)(1, [Append(ThreadRef("", 0), 1)], step.digest)])):
        with pytest.raises(BadRequest):
            m.submit("w1", bad)
    assert m.state("w1") == KVLedger(64, 4).snapshot()
    # an op the replica refuses is no status: the replica asks for a resync, then takes the snapshot
    wrong = type(step)(1, [Append(ThreadRef("nobody", 0), 1)], step.digest)
    assert m.submit("w1", LogBatch(SESSION, [wrong])).resync
    sim.kv.forget()
    assert not m.submit("w1", sim.kv.batch()).resync
    assert m.state("w1") == sim.ledger.snapshot()


def test_redis_that_lost_its_data_is_rewritten_from_memory(make, redis_server):
    m = make(snapshot_every=8)
    m.register(W1, SESSION)
    sim = worker(6)
    drive(m, sim, 30)
    client = redis_server.client()
    prefix = "t-test_redis_that_lost_its_data_is_rewritten_from_memory:"
    saved = {k: client.dump(k) for k in client.scan_iter(prefix + "*") if not k.endswith(b":alive")}
    drive(m, sim, 13)
    for k in client.scan_iter(prefix + "*"):  # Redis restarted empty
        client.delete(k)
    drive(m, sim, 1)  # detected in that message's round; memory is written back
    assert make().state("w1") == sim.ledger.snapshot()
    assert m.reap() == []  # the registration was written back too
    drive(m, sim, 5)
    for k, v in saved.items():  # Redis restarted from an old dump
        client.restore(k, 0, v, replace=True)
    drive(m, sim, 1)
    assert make().state("w1") == sim.ledger.snapshot() == m.state("w1")


def test_a_failed_transaction_is_written_again_from_memory(make):
    m = make(snapshot_every=4)
    m.register(W1, SESSION)
    sim = worker(7)
    drive(m, sim, 10)
    real = m.store.commit

    def commit(writes):  # the store's, but its reply is lost
        real(writes)  # committed in Redis...
        raise StoreUnavailable("connection reset")  # ...but the manager never heard back

    m.store.commit = commit
    sim.step()
    ack = deliver(m, "w1", sim.kv)  # acknowledged at once: the replica holds it, Redis gets it after
    assert ack.applied == sim.kv.seq and ack.digest == sim.ledger.digest()
    try:
        m.flush()  # this round, or the writer's just before it, loses the reply: the manager is in doubt
    except StoreUnavailable:
        pass
    m.store.commit = real
    assert m.metrics.store_errors.labels("commit")._value.get() == 1  # the fault hit that message's round
    drive(m, sim, 3)  # acknowledged as ever; the next round syncs: memory and Redis agree again
    again = make()
    assert again.state("w1") == m.state("w1") == sim.ledger.snapshot()
    assert again.applied("w1") == (SESSION, sim.kv.seq)
    drive(m, sim, 20)
    m.check()


def test_unreachable_redis_answers_unavailable_and_applies_nothing():
    m = KVManager(RedisStore("redis://127.0.0.1:1/0", "t-down:"))
    with pytest.raises(StoreUnavailable):
        m.register(W1, SESSION)
    with pytest.raises(StoreUnavailable):
        m.submit("w1", LogBatch(SESSION, []))
    assert m.usage() == []
    m.close()
