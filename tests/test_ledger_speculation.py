"""Rolling back a rejected draft in the KV ledger (`KVLedger.truncate`, the `Truncate` op): exact block ids
and free order, the refusals that keep I3, and (hypothesis) engine-like steps with drafts, rejections
and block boundaries through the worker's real outbox (`ReplicationLog`) to the KV manager's replica over the
JSON wire: the invariants hold after every step on both sides, the replica equals the worker's ledger,
and nothing leaks."""
from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apar.engine.kv.ledger import KVLedger, LedgerError, ThreadRef
from apar.engine.kv.ops import Append, Finish, Fork, Name, Release, Start, Truncate, op_from_json
from apar.engine.kv.step import apply
from services.kvmanager.json_forms import ops_from_bytes, ops_to_bytes
from services.kvmanager.replica import ReplicaLedger
from services.kvmanager.replication import Ack, ReplicationLog

R = ThreadRef


def test_a_rejected_draft_frees_the_block_it_opened():
    led = KVLedger(num_blocks=6, block_size=4)
    a = R("a", 0)
    apply(led, [Start(a), Append(a, 3)])  # block 0: 3 slots
    assert led.append(a, 4) == [(0, 3), (1, 0), (1, 1), (1, 2)]  # the pending token and a 3-token draft
    assert led.truncate(a, 3) == [1]  # all 3 rejected: block 1 empties, freed to the right
    assert list(led._free) == [2, 3, 4, 5, 1] and led.own_blocks(a) == [0] and led.num_tokens == 4
    assert a not in led.open_threads()  # block 0 is full: the next token opens block 2
    assert led.append(a, 1) == [(2, 0)]
    led.append(a, 3)
    assert led.truncate(a, 2) == [] and led.room(a) == 2 and a in led.open_threads()
    led.check()


def test_a_thread_sealed_by_a_fork_is_sealed_again_when_its_new_block_goes():
    led = KVLedger(num_blocks=6, block_size=4)
    a, c = R("a", 0), R("a", 1)
    apply(led, [Start(a), Append(a, 2), Fork(a, c), Append(c, 1)])  # c reads block 0 (2 slots)
    assert led.append(a, 3) == [(2, 0), (2, 1), (2, 2)]  # sealed: a's tokens open block 2
    assert led.truncate(a, 3) == [2]
    assert led.room(a) == 0 and led.refcount(0) == 2  # sealed again: block 0 is never written while shared
    assert led.append(a, 1) == [(3, 0)]
    led.check()


def test_truncate_refuses_what_it_may_not_take_back_and_changes_nothing():
    led = KVLedger(num_blocks=8, block_size=4)
    a, c, b = R("a", 0), R("a", 1), R("b", 0)
    apply(led, [Start(a), Append(a, 6), Fork(a, c), Append(c, 2), Start(b), Append(b, 5),
                Name(b, 0, (77,))])
    before = led.snapshot()
    for ref, n in ((a, 1), (c, 3), (b, 2), (R("z", 0), 1), (c, 0)):  # shared, too many, named, unknown, none
        with pytest.raises(LedgerError):
            led.truncate(ref, n)
        assert led.snapshot() == before
    apply(led, [Finish(c)])
    with pytest.raises(LedgerError, match="finished"):
        led.truncate(c, 1)
    assert led.truncate(b, 1) == [4]  # b's unnamed block 4 held 1 token
    assert led.truncate(a, 1) == [] and led.truncate(a, 1) == [1]  # c is gone: block 1's count is 1 again
    led.check()


def test_truncate_travels_as_json_and_a_bad_one_is_refused():
    op = Truncate(R("r", 2), 3)
    assert op.to_json() == ["t", "r", 2, 3] and op_from_json(["t", "r", 2, 3]) == op
    assert ops_from_bytes(ops_to_bytes([op])) == [op]
    for bad in (["t", "r", 2, 0], ["t", "r", 2, "3"], ["t", "", 2, 1], ["t", "r", -1, 1], ["t", "r", 2]):
        with pytest.raises(ValueError):
            op_from_json(bad)


# ---- engine-like steps with drafts (hypothesis) ------------------------------------------------------------
NUM_BLOCKS, BLOCK_SIZE, K = 16, 4, 5


class DraftingWorker:
    """Stands in for the engine with speculation on, over the worker's real outbox: per step, thread ends
    and rejected drafts are deferred (as the engine does between steps), then one `apply` of the step's
    starts, forks and appends, each running thread appending its pending token and a draft of 0..K
    tokens (none for a parent whose pending token is a [Fork]: its child forks in the step)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.log = ReplicationLog(KVLedger(NUM_BLOCKS, BLOCK_SIZE), session=1)
        self.replica = ReplicaLedger(NUM_BLOCKS, BLOCK_SIZE)
        self.running: dict[str, list[ThreadRef]] = {}
        self.next_thread: dict[str, int] = {}
        self.requests = 0
        self.drafts: dict[ThreadRef, tuple[int, list[tuple[int, int]]]] = {}  # last step's: k, slots
        self.rolled_back = self.drafted = 0
        self.starved: set[str] = set()
        self.blocks_freed = 0  # by rollbacks

    @property
    def ledger(self) -> KVLedger:
        return self.log.ledger

    def verify(self) -> None:
        """The last step's drafts: each keeps a random prefix, the rest is rolled back (deferred)."""
        for ref, (k, slots) in self.drafts.items():
            rejected = self.rng.randint(0, k)
            if not rejected:
                continue
            opened = {b for b, _ in slots if self.ledger.refcount(b) == 1}
            freed = self.log.defer(Truncate(ref, rejected))
            self.blocks_freed += len(freed)
            assert set(freed) <= opened  # only blocks the thread itself wrote in that step
            assert all(self.ledger.refcount(b) == 0 for b in freed)
            kept_in = {b for b, _ in slots[: len(slots) - rejected]}
            assert not set(freed) & kept_in  # a block that still holds an accepted token stays
            self.rolled_back += rejected
        self.drafts = {}

    def ends(self) -> None:
        rng = self.rng
        for req in self.starved & set(self.running):
            self._release(req)
        for req in list(self.running):
            threads = self.running[req]
            if rng.random() < 0.08:
                self._release(req)
            elif rng.random() < 0.3:
                t = rng.choice(threads)
                threads.remove(t)
                self.log.defer(Finish(t))
                if not threads:
                    self._release(req)

    def _release(self, req: str) -> None:
        self.log.defer(Release(req))
        del self.running[req]

    def step(self) -> None:
        rng = self.rng
        ops: list = []
        forking: dict[ThreadRef, ThreadRef] = {}
        if not self.running or (len(self.running) < 3 and rng.random() < 0.4):
            req = f"r{self.requests}"
            self.requests += 1
            root = R(req, 0)
            self.running[req] = []
            self.next_thread[req] = 1
            ops += [Start(root), Append(root, rng.randint(1, 9))]
        for req, threads in list(self.running.items()):
            for t in list(threads):
                if rng.random() < 0.15 and sum(map(len, self.running.values())) < 8:
                    child = R(req, self.next_thread[req])
                    self.next_thread[req] += 1
                    forking[t] = child
        draft_k: dict[ThreadRef, int] = {}
        for req, threads in self.running.items():
            for t in threads:
                k = 0 if t in forking else rng.randint(0, K)
                draft_k[t] = k
                ops.append(Append(t, 1 + k))
                if t in forking:
                    ops += [Fork(t, forking[t]), Append(forking[t], 1)]
        answer = self.log.apply(ops)
        for req, threads in self.running.items():  # the new threads run from now on
            threads.extend(c for p, c in forking.items() if p.request == req)
        if ops and type(ops[0]) is Start:
            self.running[ops[0].thread.request].append(ops[0].thread)
        appends = iter(answer.appends)
        starved = set()
        for op in ops:
            if type(op) is not Append:
                continue
            slots = next(appends)
            if slots is None:
                starved.add(op.thread.request)
            elif draft_k.get(op.thread):
                self.drafts[op.thread] = (draft_k[op.thread], slots)
                self.drafted += draft_k[op.thread]
        self.drafts = {t: d for t, d in self.drafts.items() if t.request not in starved}
        self.starved = starved  # released before the next step, as the engine ends such a request

    def deliver(self, last: bool = False) -> None:
        """The outbox's step (one per engine step, the rollbacks and ends deferred before it at its head;
        after the `last` step, what was deferred since goes as one step of its own), through their JSON
        form, replayed by the replica."""
        if last:
            self.log.flush()
        batch = self.log.batch()
        assert len(batch.steps) == 1
        for s in batch.steps:
            answer = apply(self.replica, ops_from_bytes(ops_to_bytes(s.ops)), slots=False)
            assert answer.error is None, answer.error
            assert self.replica.digest() == s.digest
        self.log.acked(Ack(batch.steps[-1].seq, self.replica.digest()))
        assert not self.log.want_resync and not self.log.unacked
        self.ledger.check()
        self.replica.check()
        assert self.replica.snapshot() == self.ledger.snapshot()


def _run(rng: random.Random, steps: int) -> DraftingWorker:
    w = DraftingWorker(rng)
    for _ in range(steps):
        w.verify()
        w.ends()
        w.step()
        w.deliver()
    w.verify()
    for req in list(w.running):
        w._release(req)
    w.deliver(last=True)
    for led in (w.ledger, w.replica):
        assert led.num_used == 0 and led.num_free == NUM_BLOCKS and led.num_tokens == 0
    assert w.rolled_back <= w.drafted
    return w


@settings(max_examples=100, deadline=None)
@given(st.randoms(use_true_random=False), st.integers(1, 40))
def test_drafts_and_rollbacks_keep_the_replica_equal_and_leak_nothing(rng, steps):
    _run(rng, steps)


def test_the_drafting_worker_rolls_back_across_block_boundaries():
    w = _run(random.Random(0), 40)  # (the property test's generator, checked to reach the cases it is for)
    assert w.rolled_back > 20 and w.blocks_freed > 3 and w.requests > 3
