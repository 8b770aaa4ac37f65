"""The KV ledger's prefix cache (named blocks cached, reused, evicted) and its digest's contents hash
(a replica that differs in contents is caught), over exact cases and random operations (hypothesis)."""
from __future__ import annotations

import copy

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from apar.engine.kv.ledger import KVLedger, LedgerError, OutOfBlocks
from services.kvmanager.replica import ReplicaLedger
from tests.ledger_helpers import R, ops


# ---- the prefix cache ----------------------------------------------------------------------------------

def test_named_blocks_are_cached_reused_and_evicted_least_recent_first():
    led = KVLedger(num_blocks=6, block_size=4)
    a, b, c = R("a", 0), R("b", 0), R("c", 0)
    led.start(a)
    assert led.append(a, 10) == [(0, i) for i in range(4)] + [(1, i) for i in range(4)] + [(2, 0), (2, 1)]
    assert led.name(a, 0, (101, 102)) == 2
    assert led.blocks_of("a") == 1  # named blocks belong to no request
    assert led.release("a") == [2]  # the named ones are cached, not freed
    assert (led.num_free, led.num_cached, led.num_used) == (6, 2, 0)
    assert led.cached_prefix([101, 102, 103]) == 2 and led.cached_prefix([999, 101]) == 0
    led.start(b)
    led.reuse(b, (101,))
    assert led.context_blocks(b) == [0] and led.num_cached == 1
    assert led.append(b, 1) == [(3, 0)]  # a fresh block after the reused one, never into it
    assert led.blocks_of("b") == 1 and led.blocks_read("b") == 2  # its own, and the prefix it reads
    with pytest.raises(LedgerError):
        led.reuse(b, (101,))  # only a root without blocks
    led.start(c)
    with pytest.raises(LedgerError):
        led.reuse(c, (999,))
    assert led.append(c, 12) == [(4, i) for i in range(4)] + [(5, i) for i in range(4)] + [(2, i) for i in range(4)]
    assert led.evictions == 0
    led.append(c, 1)  # nothing free: the cached block 1 (named 102) is evicted
    assert led.evictions == 1 and led.cached_prefix([101, 102]) == 1 and led.context_blocks(c)[-1] == 1
    with pytest.raises(OutOfBlocks):
        led.append(c, 4)  # block 0 is in use by b: not evictable
    led.check()


def test_a_name_held_elsewhere_is_skipped_and_only_full_own_blocks_are_named():
    led = KVLedger(num_blocks=8, block_size=4)
    a, b = R("a", 0), R("b", 0)
    for t in (a, b):
        led.start(t)
        led.append(t, 6)
    assert led.name(a, 0, (7,)) == 1
    assert led.name(b, 0, (7,)) == 0  # the same prefix computed twice: the first copy keeps the name
    with pytest.raises(LedgerError):
        led.name(b, 1, (8,))  # block 1 of b holds 2 tokens
    with pytest.raises(LedgerError):
        led.name(a, 0, (9,))  # already named
    led.release("b")
    assert led.num_cached == 0  # its unnamed copy was freed
    led.check()


def test_a_full_named_block_others_reuse_is_never_written_by_its_owner():
    """Found by the property below: the owner of a full prompt block another request reuses appends
    several tokens at once (a prefill chunk): they go to fresh blocks, the shared one is not touched."""
    led = ReplicaLedger(num_blocks=6, block_size=4)
    a, b = R("a", 0), R("b", 0)
    led.start(a)
    led.append(a, 4)
    led.name(a, 0, (11,))
    led.start(b)
    led.reuse(b, (11,))
    assert led.append(a, 2) == [(1, 0), (1, 1)]
    led.check()


prefix_ops = st.lists(
    st.tuples(st.sampled_from(["start", "start", "decode", "fork", "finish", "release", "advance"]),
              st.integers(0, 4), st.integers(0, 2), st.integers(1, 14)),
    max_size=50,
)


@settings(max_examples=150, deadline=None)
@given(prefix_ops)
def test_prefix_cache_keeps_invariants_and_reused_blocks_hold_their_tokens(sequence):
    """Requests whose prompts share prefixes reuse each other's named blocks. A model of the pool's
    contents (the token written in every slot) shows that a reused block holds exactly the prompt's
    tokens at those positions (no named block is ever written), and `check()` after every op shows that
    no block is evicted while referenced and none is leaked, through cancellations (release)."""
    from apar.engine.prefix import block_hashes

    bs = 4
    led = ReplicaLedger(num_blocks=14, block_size=bs)
    content: dict[tuple[int, int], int] = {}  # (block, offset) -> token written there
    prompts = {i: [(i % 3) * 100 + j for j in range(12)][: 4 + 2 * i] for i in range(5)}  # three families
    live: dict[str, int] = {}
    starts = 0
    for op, req_i, thr_i, n in sequence:
        running = [r for req in live for r in led._threads if r.request == req and led.is_running(r)]
        try:
            if op == "start":
                req = f"q{starts}"
                starts += 1
                prompt = prompts[req_i]
                names = block_hashes(prompt, bs)
                k = min(led.cached_prefix(names), (len(prompt) - 1) // bs)
                root = R(req, 0)
                led.start(root)
                live[req] = 1
                if k:
                    led.reuse(root, tuple(names[:k]))
                    for i, block in enumerate(led.context_blocks(root)):
                        assert [content[(block, o)] for o in range(bs)] == prompt[i * bs:(i + 1) * bs]
                for (block, o), tok in zip(led.append(root, len(prompt) - k * bs), prompt[k * bs:]):
                    content[(block, o)] = tok
                full = len(prompt) // bs
                led.name(root, k, tuple(names[k:full]))
            elif op == "decode" and running:
                t = running[thr_i % len(running)]
                for block, o in led.append(t, n):
                    content[(block, o)] = -1
            elif op == "fork" and running:
                parent = running[thr_i % len(running)]
                child = R(parent.request, live[parent.request])
                live[parent.request] += 1
                led.fork(parent, child)
            elif op == "finish" and running:
                led.finish(running[thr_i % len(running)])
            elif op == "release" and live:
                req = sorted(live)[req_i % len(live)]
                led.release(req)
                del live[req]
            elif op == "advance":
                led.advance()
        except OutOfBlocks:
            if op == "start":  # the prompt did not fit: the engine ends the request
                led.release(req)
                del live[req]
        led.check()
    for req in list(live):
        led.release(req)
    led.check()
    assert led.num_used == 0 and led.num_free == 14


# ---- the digest's contents hash: a replica that differs in contents is caught ------------------------

def _held(led: KVLedger) -> list[tuple]:
    """What a replica must agree on: every held block's id, owner, count, fill and name."""
    return sorted(tuple(b) for b in led.snapshot()["blocks"])


def _both(worker: KVLedger, replica: KVLedger, fn) -> tuple[KVLedger, KVLedger] | None:
    """`fn` applied to copies of both ledgers, or None when either refuses it."""
    w, r = copy.deepcopy(worker), copy.deepcopy(replica)
    try:
        fn(w)
        fn(r)
    except LedgerError:
        return None
    return w, r


def _diverge(worker: KVLedger, replica: KVLedger, kind: str, salt: int) -> bool:
    """Apply to each ledger one op the other does not get, of a kind that leaves all six counts of the
    old digest equal: a token given to another open thread, a block given another name, a prompt
    started under another request's id. False when the ledgers offer no place for it now."""
    if kind == "thread":
        open_ = sorted(worker.open_threads())
        if len(open_) < 2:
            return False
        x, y = open_[salt % len(open_)], open_[(salt + 1) % len(open_)]
        worker.append(x, 1)
        replica.append(y, 1)
    elif kind == "name":
        full = [(t.ref, len(t.refs) + i) for t in worker._threads.values() if t.running
                for i, b in enumerate(t.own) if worker._blocks[b].used == worker.block_size
                and worker._blocks[b].name is None]
        if not full:
            return False
        ref, index = full[salt % len(full)]
        worker.name(ref, index, (1000 + salt,))
        replica.name(ref, index, (2000 + salt,))
    else:  # "request"
        if worker.num_free == 0:
            return False
        for led, request in ((worker, "w"), (replica, "v")):
            led.start(R(request, 0))
            led.append(R(request, 0), 1 + salt % worker.block_size)
    return True


@settings(max_examples=300, deadline=None)
@given(ops, st.sampled_from(["thread", "name", "request"]), st.integers(0, 40), st.integers(0, 99))
def test_replicas_that_differ_in_contents_with_equal_counts_are_caught(sequence, kind, at, salt):
    """Two ledgers go through the same ops but one: from then on the six counts of the old digest may
    well agree (they do right after it), while the contents hash differs exactly when the held blocks
    (owner, name, fill, count) differ, through every op after."""
    worker, replica = ReplicaLedger(num_blocks=12, block_size=4), ReplicaLedger(num_blocks=12, block_size=4)
    for led in (worker, replica):  # two open threads and two full blocks for the ops that differ
        for request, tokens in (("p", 6), ("q", 5)):
            led.start(R(request, 0))
            led.append(R(request, 0), tokens)
    next_thread: dict[str, int] = {}
    diverged = False
    for i, (op, req_i, thr_i, n) in enumerate([*sequence, ("end", 0, 0, 0)]):
        if not diverged and i >= min(at, len(sequence)) and _diverge(worker, replica, kind, salt):
            diverged = True
            assert worker.digest()[:6] == replica.digest()[:6]  # blind to it
            assert worker.digest().contents != replica.digest().contents
        req = f"r{req_i}"
        running = [r for r in worker._threads if r.request == req and worker.is_running(r)]
        fn = None
        if op == "start" and req not in next_thread:
            fn = lambda led: led.start(R(req, 0))  # noqa: E731
        elif op in ("append", "append_each") and running:
            fn = lambda led: led.append(running[thr_i % len(running)], n)  # noqa: E731
        elif op == "fork" and running:
            fn = lambda led: led.fork(running[thr_i % len(running)], R(req, next_thread[req]))  # noqa: E731
        elif op == "finish" and running:
            fn = lambda led: led.finish(running[thr_i % len(running)])  # noqa: E731
        elif op == "advance":
            held = frozenset(r for r in worker.open_threads() if r.thread == thr_i % 3)
            fn = lambda led: led.advance(held)  # noqa: E731
        elif op == "release" and req in next_thread:
            fn = lambda led: led.release(req)  # noqa: E731
        both = _both(worker, replica, fn) if fn else None
        if both is None:
            continue
        worker, replica = both
        if op == "start":
            next_thread[req] = 1
        elif op == "fork":
            next_thread[req] += 1
        elif op == "release":
            del next_thread[req]
        assert (_held(worker) != _held(replica)) == (worker.digest().contents != replica.digest().contents)
    assume(diverged)
