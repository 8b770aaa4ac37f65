"""The KV ledger: exact block ids and free order on a handful of 16-token blocks, the open threads and
the one-token advance a replica replays, and its invariants over random sequences of operations
(hypothesis)."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.kvmanager.ledger import KVLedger, LedgerError, OutOfBlocks, ThreadRef

R = ThreadRef


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
    assert led.release("a") == [0, 1, 3]
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
    assert led.finish(root) == [3, 4]  # past the anchor: nobody reads them
    assert led.refcount(0) == 1 and led.refcount(1) == 1
    led.check()
    assert led.finish(child) == [2, 0, 1]
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
    assert led.finish(c2) == [3, 0, 1, 2]
    led.release("a")
    led.check()


def test_open_threads_advance_in_place_and_the_digest_follows():
    led = KVLedger(num_blocks=6, block_size=4)
    a, b, c = R("a", 0), R("b", 0), R("b", 1)
    led.start(a)
    led.append(a, 3)  # block 0, one slot left
    led.start(b)
    led.append(b, 4)  # block 1, full
    led.fork(b, c)
    assert led.open_threads() == {a} and led.digest() == (4, 2, 3, 7, 2)
    assert led.advance() == 1  # a's last slot; b is full and sealed, c has no block yet
    assert led.open_threads() == set() and led.num_tokens == 8
    led.append(c, 1)
    led.append(b, 1)
    assert led.open_threads() == {b, c}
    assert led.advance(held=frozenset({c})) == 1 and led.context_blocks(b) == [1, 3]
    assert led.digest() == (2, 4, 3, 11, 4)
    led.check()
    assert led.finish(c) == [2] and led.open_threads() == {b} and led.num_tokens == 10
    led.check()
    assert KVLedger.from_snapshot(led.snapshot()).digest() == led.digest()


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


# ---- property-based: random operation sequences keep every invariant ---------------------------------

ops = st.lists(
    st.tuples(st.sampled_from(["start", "append", "fork", "finish", "release", "advance"]),
              st.integers(0, 3), st.integers(0, 7), st.integers(1, 9)),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_random_operations_keep_invariants(sequence):
    led = KVLedger(num_blocks=12, block_size=4)
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
        except OutOfBlocks:
            pass
        led.check()
    for req in list(next_thread):
        led.release(req)
    led.check()
    assert led.num_used == 0 and led.num_free == 12
