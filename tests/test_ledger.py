"""The KV ledger: exact block ids and free order on a handful of 16-token blocks, the open threads and
the one-token advance a replica replays, and its invariants over random sequences of operations
(hypothesis)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings

from apar.engine.kv.contents import COUNT, USED, block_key, thread_key
from apar.engine.kv.ledger import KVLedger, LedgerError, OutOfBlocks
from services.kvmanager.replica import ReplicaLedger
from tests.ledger_helpers import R, ops


def test_prompt_then_tokens_fill_blocks_in_order():
    led = KVLedger(num_blocks=4, block_size=16)
    root = R("a", 0)
    led.start(root)
    slots = led.append(root, 20)  # prompt of 20 tokens: block 0 full, block 1 holds 4
    assert slots[0] == (0, 0) and slots[15] == (0, 15) and slots[16] == (1, 0) and slots[-1] == (1, 3)
    assert led.append(root) == [(1, 4)]
    assert led.num_used == 2 and led.num_free == 2 and led.blocks_of("a") == 2
    led.check()


def test_fork_shares_context_seals_parent_and_frees_child_at_once():
    led = KVLedger(num_blocks=6, block_size=16)
    root, child = R("a", 0), R("a", 1)
    led.start(root)
    led.append(root, 18)  # blocks 0, 1 (2 used)
    led.append(root)  # the [Fork] token at (1, 2)
    led.fork(root, child)
    assert led.context_blocks(child) == [0, 1]
    assert led.refcount(0) == 2 and led.refcount(1) == 2
    # the child's [Child] opens a fresh block; the parent's next token too (block 1 is sealed)
    assert led.append(child) == [(2, 0)]
    assert led.append(root) == [(3, 0)]
    led.check()
    assert led.finish(child) == [2]  # freed in the same call, and only its own block
    assert led.refcount(0) == 1 and led.refcount(1) == 1
    led.check()
    assert led.release("a") == [3, 1, 0]  # deepest first
    assert led.num_free == 6 and led.num_used == 0
    led.check()


def test_finished_parent_keeps_only_what_a_running_child_reads():
    led = KVLedger(num_blocks=8, block_size=16)
    root, child = R("a", 0), R("a", 1)
    led.start(root)
    led.append(root, 16)  # block 0
    led.append(root)  # [Fork] -> block 1 slot 0
    led.fork(root, child)
    led.append(child, 3)  # block 2
    led.append(root, 20)  # blocks 3, 4
    assert led.finish(root) == [4, 3]  # past the anchor: nobody reads them (deepest first)
    assert led.refcount(0) == 1 and led.refcount(1) == 1
    led.check()
    assert led.finish(child) == [2, 1, 0]  # deepest first
    assert led.num_used == 0
    led.release("a")
    led.check()


def test_nested_fork_references_every_ancestor():
    led = KVLedger(num_blocks=8, block_size=4)
    root, c1, c2 = R("a", 0), R("a", 1), R("a", 2)
    led.start(root)
    led.append(root, 5)  # blocks 0, 1
    led.fork(root, c1)
    led.append(c1, 2)  # block 2
    led.fork(c1, c2)
    assert led.context_blocks(c2) == [0, 1, 2]
    assert [led.refcount(b) for b in (0, 1, 2)] == [3, 3, 2]
    led.append(c2)  # block 3
    led.finish(root)
    led.finish(c1)
    assert led.num_used == 4  # all still read by c2
    assert led.finish(c2) == [3, 2, 1, 0]  # deepest first
    led.release("a")
    led.check()


def contents(blocks: dict[int, tuple]) -> int:
    """`Digest.contents` of a ledger holding these blocks: id -> (owner ref, fill, count)."""
    total = sum(block_key(i) * (thread_key(*owner) + USED * fill + COUNT * count)
                for i, (owner, fill, count) in blocks.items())
    return total % (1 << 64)


def test_open_threads_advance_in_place_and_the_digest_follows():
    led = ReplicaLedger(num_blocks=6, block_size=4)
    a, b, c = R("a", 0), R("b", 0), R("b", 1)
    led.start(a)
    led.append(a, 3)  # block 0, one slot left
    led.start(b)
    led.append(b, 4)  # block 1, full
    led.fork(b, c)
    assert led.open_threads() == {a} and led.digest()[:6] == (4, 2, 3, 7, 2, 0)
    # the contents hash, by its formula: each block's key times (owner's key + USED * fill + COUNT * count)
    assert led.digest().contents == contents({0: (a, 3, 1), 1: (b, 4, 2)})
    assert led.advance() == 1  # a's last slot; b is full and sealed, c has no block yet
    assert led.open_threads() == set() and led.num_tokens == 8
    assert led.digest().contents == contents({0: (a, 4, 1), 1: (b, 4, 2)})  # a's advance, lazy, is in it
    led.append(c, 1)
    led.append(b, 1)
    assert led.open_threads() == {b, c}
    assert led.advance(held=frozenset({c})) == 1 and led.context_blocks(b) == [1, 3]
    assert led.digest()[:6] == (2, 4, 3, 11, 4, 0)
    assert led.digest().contents == contents({0: (a, 4, 1), 1: (b, 4, 2), 2: (c, 1, 1), 3: (b, 2, 1)})
    led.check()
    assert led.finish(c) == [2] and led.open_threads() == {b} and led.num_tokens == 10
    led.check()
    assert ReplicaLedger.from_snapshot(led.snapshot()).digest() == led.digest()


def test_out_of_blocks_changes_nothing():
    led = KVLedger(num_blocks=2, block_size=4)
    led.start(R("a", 0))
    led.append(R("a", 0), 6)
    with pytest.raises(OutOfBlocks):
        led.append(R("a", 0), 3)
    assert led.num_used == 2 and led.num_free == 0
    led.check()
    assert led.append(R("a", 0), 2) == [(1, 2), (1, 3)]


def test_misuse_is_refused():
    led = KVLedger(num_blocks=4, block_size=4)
    led.start(R("a", 0))
    led.append(R("a", 0))
    with pytest.raises(LedgerError):
        led.start(R("a", 0))
    led.finish(R("a", 0))
    with pytest.raises(LedgerError):
        led.finish(R("a", 0))  # double finish would double free
    with pytest.raises(LedgerError):
        led.append(R("a", 0))
    with pytest.raises(LedgerError):
        led.fork(R("a", 0), R("a", 1))
    with pytest.raises(LedgerError):
        led.append(R("b", 0))
    led.release("a")
    led.check()


def test_release_cancels_running_threads_and_frees_everything():
    led = KVLedger(num_blocks=10, block_size=4)
    root = R("a", 0)
    led.start(root)
    led.append(root, 7)
    for i in (1, 2, 3):
        led.append(root)
        led.fork(root, R("a", i))
        led.append(R("a", i), 2)
    led.start(R("b", 0))
    led.append(R("b", 0), 3)
    led.check()
    freed = led.release("a")
    assert sorted(freed) == sorted(set(freed)) and led.blocks_of("a") == 0
    assert led.num_used == 1 and led.blocks_of("b") == 1
    led.check()


@settings(max_examples=300, deadline=None)
@given(ops)
def test_random_operations_keep_invariants(sequence):
    led = ReplicaLedger(num_blocks=12, block_size=4)
    next_thread = {}
    for op, req_i, thr_i, n in sequence:
        req = f"r{req_i}"
        running = [r for r in led._threads if r.request == req and led.is_running(r)]
        try:
            if op == "start" and req not in next_thread:
                led.start(R(req, 0))
                next_thread[req] = 1
            elif op == "append" and running:
                used_before = led.num_used
                led.append(running[thr_i % len(running)], n)
                assert led.num_used >= used_before
            elif op == "fork" and running:
                parent = running[thr_i % len(running)]
                child = R(req, next_thread[req])
                next_thread[req] += 1
                used_before = led.num_used
                led.fork(parent, child)
                assert led.num_used == used_before  # I5: a fork allocates nothing
            elif op == "finish" and running:
                ref = running[thr_i % len(running)]
                before = led.num_used
                freed = led.finish(ref)
                assert before - led.num_used == len(freed)
                assert all(led.refcount(b) == 0 for b in freed)
            elif op == "advance":
                tokens, open_ = led.num_tokens, led.open_threads()
                held = frozenset(r for r in open_ if r.thread == thr_i % 3)
                assert led.advance(held) == len(open_ - held) and led.num_tokens == tokens + len(open_ - held)
            elif op == "release" and req in next_thread:
                led.release(req)
                assert led.blocks_of(req) == 0
                del next_thread[req]
            elif op == "append_each":
                _append_each_is_append_one_by_one(led, thr_i, n)
            elif op == "truncate" and running:  # any thread, any count: refused (nothing changed) or done
                ref, before = running[thr_i % len(running)], led.snapshot()
                tokens, used = led.num_tokens, led.num_used
                try:
                    freed = led.truncate(ref, n)
                except LedgerError:
                    assert led.snapshot() == before
                else:
                    assert led.num_tokens == tokens - n and used - led.num_used == len(freed)
        except OutOfBlocks:
            pass
        led.check()
    for req in list(next_thread):
        led.release(req)
    led.check()
    assert led.num_used == 0 and led.num_free == 12


def _append_each_is_append_one_by_one(led: KVLedger, pick: int, n: int) -> None:
    """`append_each` (the replica's fast lane) against `append(t, 1)` for each thread in turn, on a copy:
    the same answers, the same starved requests, the same ledger after. The threads are any of the
    ledger's (running, finished, open or not, some twice), with an unknown one now and then."""
    threads = sorted(led._threads)
    refs = [threads[(pick + 3 * i) % len(threads)] for i in range(n)] if threads else []
    if pick == 7:
        refs.append(R("nobody", 0))
    other = ReplicaLedger.from_snapshot(led.snapshot())
    expected, starved_expected, error = [], {"r3"}, None
    for ref in refs:
        if ref.request in starved_expected:
            expected.append(None)
            continue
        try:
            expected.append(other.append(ref, 1))
        except OutOfBlocks:
            starved_expected.add(ref.request)
            expected.append(None)
        except LedgerError as exc:
            error = type(exc)
            break
    starved = {"r3"}
    if error is not None:
        with pytest.raises(error):
            led.append_each(refs, starved)
        return
    assert led.append_each(refs, starved) == expected and starved == starved_expected
    assert led.snapshot() == other.snapshot() and led.digest() == other.digest()
    assert led.open_threads() == other.open_threads()
