"""The replication of a worker's ledger: compact steps replay exactly, and the protocol (numbered steps,
acks, resyncs) brings the replica back to the worker's ledger whatever the channel does to the messages:
drops, duplicates, reordering, lost acks, a replica that went back in time or diverged. The ledger's
invariants hold on both sides after every message (hypothesis)."""
from __future__ import annotations

import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apar.bench_suite.simulated import SimWorker
from apar.engine.kv.ledger import KVLedger, ThreadRef
from apar.engine.kv.ops import Advance, Append, AppendEach, Finish, Fork, Release, Start
from apar.engine.kv.step import apply, record
from services.kvmanager.records import BadRequest, StaleSession, WorkerRecord, WorkerSpec, apply_batch
from services.kvmanager.replica import ReplicaLedger
from services.kvmanager.replication import Ack, LogBatch, Resync, ReplicationLog

R = ThreadRef
SESSION = 5


def test_decode_step_travels_as_one_advance():
    led = KVLedger(num_blocks=8, block_size=4)
    a, b, c = R("a", 0), R("b", 0), R("b", 1)
    apply(led, [Start(a), Append(a, 3), Start(b), Append(b, 4)])  # a: 1 slot left; b: full
    answer, wire = record(led, [Fork(b, c), Append(c, 1), Append(a, 1), Append(b, 1)])
    # a's token fits its open block: folded; b's block is full and c has none: each opens one, in order
    assert wire == [Advance(frozenset()), Fork(b, c), Append(c, 1), Append(b, 1)]
    assert answer.appends == [[(2, 0)], [(0, 3)], [(3, 0)]]
    answer, wire = record(led, [Append(b, 1), Append(a, 2)])  # a's prefill chunk stays an op; c held
    assert wire == [Advance(frozenset({c})), Append(a, 2)]
    assert led.open_threads() == {a, b, c} and led.digest().tokens == 13


def test_folding_respects_what_came_first():
    led = KVLedger(num_blocks=3, block_size=4)
    a, b = R("a", 0), R("a", 1)
    apply(led, [Start(a), Append(a, 2), Fork(a, b), Append(b, 1), Append(a, 1)])
    assert led.open_threads() == {a, b} and led.num_free == 0
    # a's 9 tokens do not fit: its request is starved, so b's token, open as it is, is not folded
    answer, wire = record(led, [Append(a, 9), Append(b, 1)])
    assert answer.appends == [None, None] and wire == [Append(a, 9), Append(b, 1)]
    answer, wire = record(led, [Release("a"), Start(a), Append(a, 1)])  # released, then a new a: not folded
    assert wire == [Release("a"), Start(a), Append(a, 1)] and answer.appends == [[(1, 0)]]


def test_tokens_that_open_a_block_travel_as_one_append_each():
    led, replica = KVLedger(num_blocks=8, block_size=2), ReplicaLedger(num_blocks=8, block_size=2)
    a, b, c, x = R("a", 0), R("b", 0), R("c", 0), R("x", 0)
    for ledger in (led, replica):
        apply(ledger, [Start(a), Append(a, 2), Start(b), Append(b, 2), Start(c), Append(c, 1)])  # a, b full
    answer, wire = record(led, [Append(b, 1), Append(a, 1), Append(c, 1)])
    assert wire == [Advance(frozenset()), AppendEach((b, a))]  # c fits its block; b and a open one each
    assert answer.appends == [[(3, 0)], [(4, 0)], [(2, 1)]]
    apply(replica, wire)
    # x's prompt takes blocks before c's token opens one: c's append stays in its place, after it
    answer, wire = record(led, [Start(x), Append(x, 3), Append(c, 1), Append(a, 1)])
    assert wire == [Advance(frozenset({b})), Start(x), Append(x, 3), Append(c, 1)]
    assert answer.appends == [[(5, 0), (5, 1), (6, 0)], [(7, 0)], [(4, 1)]]
    apply(replica, wire)
    assert replica.snapshot() == led.snapshot()


# ---- compact steps replay exactly (hypothesis over engine-like steps) -----------------------------------
step_ops = st.lists(st.tuples(st.sampled_from(["start", "append", "fork", "finish", "release"]),
                              st.integers(0, 2), st.integers(0, 5), st.integers(1, 6)), max_size=12)


@settings(max_examples=300, deadline=None)
@given(st.lists(step_ops, max_size=25), st.integers(0, 3))
def test_record_then_apply_equals_apply(steps, ends_first):
    engine_view, worker = (KVLedger(num_blocks=10, block_size=4) for _ in range(2))
    replica = ReplicaLedger(num_blocks=10, block_size=4)  # the manager's: replays the compact steps lazily
    next_thread: dict[str, int] = {}
    for spec in steps:
        ops = _valid_ops(engine_view, spec, next_thread)
        expected = apply(engine_view, ops)
        answer, wire = record(worker, ops)
        assert answer == expected and not answer.error
        assert not apply(replica, wire).error
        assert replica.snapshot() == worker.snapshot() == engine_view.snapshot()
        assert replica.digest() == worker.digest()
        worker.check()
        replica.check()


def _valid_ops(led: KVLedger, spec, next_thread: dict[str, int]) -> list:
    """Turn (kind, request, thread, n) tuples into ops the engine could send, on a scratch copy."""
    scratch = copy.deepcopy(led)
    ops: list = []
    starved: set[str] = set()  # `apply` skips the later appends and forks of a request it starved
    for kind, req_i, thr_i, n in spec:
        req = f"r{req_i}"
        if req in starved and kind in ("append", "fork"):
            continue
        running = [r for r in scratch._threads if r.request == req and scratch.is_running(r)]
        if kind == "start" and req not in next_thread:
            op = [Start(R(req, 0)), Append(R(req, 0), n)]
            next_thread[req] = 1
        elif kind == "append" and running:
            op = [Append(running[thr_i % len(running)], 1 if n < 4 else n)]
        elif kind == "fork" and running:
            child = R(req, next_thread[req])
            next_thread[req] += 1
            op = [Fork(running[thr_i % len(running)], child), Append(child, 1)]
        elif kind == "finish" and running:
            op = [Finish(running[thr_i % len(running)])]
        elif kind == "release" and req in next_thread:
            op = [Release(req)]
            del next_thread[req]
        else:
            continue
        answer = apply(scratch, op)
        if answer.error:
            raise AssertionError(answer.error)
        if None in answer.appends:
            starved.add(req)
        ops += op
    return ops


# ---- the protocol under a faulty channel -----------------------------------------------------------------
ACTIONS = ["step", "step", "step", "deliver", "deliver", "drop", "lose_ack", "duplicate_old", "replay_later",
           "rewind_replica", "corrupt_replica"]


class Channel:
    """A worker's ReplicationLog and the manager's replica of it, with a channel that loses, repeats and
    reorders messages; every message that reaches the replica is applied by `records.apply_batch`."""

    def __init__(self, seed: int) -> None:
        self.log = ReplicationLog(KVLedger(num_blocks=24, block_size=4), SESSION)
        # odd seeds: prompts share prefixes, so steps carry Reuse and Name and blocks are cached and evicted
        self.sim = SimWorker(self.log, threads=5, seed=seed, prompt=(1, 9), finish_p=0.1, cancel_p=0.03,
                             prefixes=2 * (seed % 2))
        spec = WorkerSpec("w", "here", 24, 4, 30)
        self.rec = WorkerRecord(spec=spec, ledger=ReplicaLedger(24, 4), born=1, session=SESSION)
        self.sent: list[LogBatch] = []
        self.saved: list[tuple[KVLedger, int]] = []  # the replica as it was (a manager restored from Redis)
        self.strays = 0

    def send(self) -> LogBatch | None:
        batch = self.log.batch()
        if batch is not None:
            self.sent.append(batch)
        return batch

    def arrive(self, batch: LogBatch) -> Ack:
        ack = apply_batch(self.rec, batch).ack
        self.rec.ledger.check()  # the replica's invariants after every message it applies
        self.log.ledger.check()
        return ack

    def act(self, action: str) -> None:
        if action == "step":
            self.sim.step()
            if self.rec.seq % 3 == 0:
                self.saved.append((copy.deepcopy(self.rec.ledger), self.rec.seq))
        elif action in ("deliver", "drop", "lose_ack"):
            batch = self.send()
            if batch is None or action == "drop":
                return
            ack = self.arrive(batch)
            if action == "deliver":
                self.log.acked(ack)
        elif action in ("duplicate_old", "replay_later") and self.sent:
            old = self.sent[0] if action == "duplicate_old" else self.sent[len(self.sent) // 2]
            self.arrive(old)  # its ack goes to a stream the worker no longer reads
        elif action == "rewind_replica" and self.saved:
            ledger, seq = self.saved[len(self.saved) // 2]
            self.rec.ledger, self.rec.seq = copy.deepcopy(ledger), seq
        elif action == "corrupt_replica":
            self.strays += 1
            self.rec.ledger.start(R(f"stray-{self.strays}", 0))  # a replica that went its own way

    def settle(self) -> None:
        """The worker's sender goes on until everything is acknowledged: the replica equals the ledger."""
        probed = False
        self.log.flush()  # what was deferred after the last step (a worker's drain does the same)
        for _ in range(20):
            batch = self.send()
            if batch is None and not probed:  # all acknowledged: does the replica still match?
                batch, probed = self.log.probe(), True
            if batch is None:
                break
            self.log.acked(self.arrive(batch))
        assert self.log.batch() is None
        assert self.rec.ledger.snapshot() == self.log.ledger.snapshot()
        assert (self.rec.session, self.rec.seq) == (SESSION, self.log.seq)


@settings(max_examples=250, deadline=None)
@given(st.integers(0, 10_000), st.lists(st.sampled_from(ACTIONS), max_size=80))
def test_faulty_channel_ends_with_the_replica_equal(seed, actions):
    ch = Channel(seed)
    for action in actions:
        ch.act(action)
    ch.settle()


def test_steps_twice_and_out_of_order_are_applied_once_in_order():
    ch = Channel(3)
    batches = []
    for _ in range(6):
        for _ in range(3):
            ch.sim.step()
        batches.append(ch.send())
        ch.log.unacked.clear()  # each batch holds only its own three steps
    late, early = batches[1], batches[2]
    ack = ch.arrive(early)  # steps 7-9 before 4-6: not applied, the ack says where to go on from
    assert ack.applied == 0 and not ack.resync
    ch.arrive(batches[0])
    assert ch.arrive(late).applied == 6
    assert ch.arrive(early).applied == 9
    for b in batches:  # everything again, in any order: nothing is applied twice
        ch.arrive(b)
    assert ch.rec.seq == 18 and ch.rec.ledger.snapshot() == ch.log.ledger.snapshot()


def test_resync_replaces_the_replica_and_is_checked():
    ch = Channel(4)
    for _ in range(10):
        ch.sim.step()
    ch.rec.broken = True  # a replica that diverged: it asks for a snapshot
    assert ch.arrive(ch.send()).resync
    ch.log.forget()
    batch = ch.send()
    assert batch.resync is not None and batch.resync.seq == 10 and batch.steps == []
    assert ch.arrive(batch) == Ack(10, ch.log.ledger.digest(), False)
    with pytest.raises(BadRequest):
        apply_batch(ch.rec, LogBatch(SESSION, [], Resync(10, {**batch.resync.ledger, "num_blocks": 99})))
    broken = {**batch.resync.ledger, "free": batch.resync.ledger["free"][1:]}  # a block lost
    with pytest.raises(BadRequest):
        apply_batch(ch.rec, LogBatch(SESSION, [], Resync(10, broken)))
    # another process's snapshot (its session is not the one the worker id is bound to) changes nothing
    with pytest.raises(StaleSession):
        apply_batch(ch.rec, LogBatch(SESSION + 1, [], Resync(99, KVLedger(24, 4).snapshot())))
    assert ch.rec.ledger.snapshot() == ch.log.ledger.snapshot() and ch.rec.seq == 10
