"""A resync in parts at the KV manager: the replica of a large snapshot is built outside the memory lock,
so the other workers' messages go on meanwhile (for the largest pool that build takes seconds); and
ledgers built in several threads at once share one correct table of block keys."""
from __future__ import annotations

import sys
import threading
from array import array

from apar.engine.kv import contents
from apar.engine.kv.ledger import KVLedger, ThreadRef
from services.kvmanager.inprocess import InProcessClient
from services.kvmanager.json_forms import snapshot_parts
from services.kvmanager.manager import KVManager
from services.kvmanager.replica import ReplicaLedger
from services.kvmanager.replication import LogBatch, LogEntry, ResyncPart

BLOCKS, BLOCK_SIZE = 64, 4


def test_another_workers_step_is_applied_while_a_resync_builds_its_replica(monkeypatch):
    """Worker `big` sends a resync in parts; while the manager builds the replica of its last part
    (held there by the test until `other` is answered), worker `other`'s step is applied and answered.
    Then `big`'s replica is its ledger."""
    manager = KVManager()
    big, other = (InProcessClient(manager, w, "here", BLOCKS, BLOCK_SIZE) for w in ("big", "other"))
    for client in (big, other):
        assert not client.register()
    ledger = KVLedger(BLOCKS, BLOCK_SIZE)
    for r in range(5):
        ledger.start(ThreadRef(f"r{r}", 0))
        ledger.append(ThreadRef(f"r{r}", 0), 3 + 5 * r)
    snapshot = ledger.snapshot()
    parts = snapshot_parts(snapshot, size=64)
    assert len(parts) > 1

    building, release = threading.Event(), threading.Event()
    build = ReplicaLedger.from_snapshot

    def held_build(cls, data):
        if data == snapshot and not building.is_set():
            building.set()
            release.wait(30)
        return build(data)

    monkeypatch.setattr(ReplicaLedger, "from_snapshot", classmethod(held_build))
    for i in range(len(parts) - 1):
        big.send(LogBatch(big.session, [], part=ResyncPart(3, i, len(parts), parts[i])))
    acks = {}

    def send(name, client, batch):
        acks[name] = client.send(batch)

    last = LogBatch(big.session, [], part=ResyncPart(3, len(parts) - 1, len(parts), parts[-1]))
    resync = threading.Thread(target=send, args=("big", big, last))
    resync.start()
    try:
        assert building.wait(30)
        step = LogBatch(other.session, [LogEntry(1, [], KVLedger(BLOCKS, BLOCK_SIZE).digest())])
        stepping = threading.Thread(target=send, args=("other", other, step))
        stepping.start()
        stepping.join(10)
        assert not stepping.is_alive(), "the other worker's step waited for the resync's replica"
        assert acks["other"].applied == 1 and not acks["other"].resync
        assert "big" not in acks  # the resync was still being built
    finally:
        release.set()
        resync.join(30)
    assert acks["big"].applied == 3 and acks["big"].digest == ledger.digest() and not acks["big"].resync
    assert manager.state("big") == snapshot


def test_ledgers_built_in_threads_at_once_share_a_correct_key_table(monkeypatch):
    """Four threads start ledgers of 20,000 blocks at once on an empty key table (the process's, as the
    manager's gRPC threads do when replicas are built outside its lock), with the interpreter switching
    threads as often as it can: every key in the table is `block_key` of its index. (Extending it
    without a lock appended ids twice: every one of 20 tries left a longer, shifted table.)"""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for _ in range(5):
            monkeypatch.setattr(contents, "_KEYS", array("Q"))
            start = threading.Barrier(4)

            def build():
                start.wait()
                KVLedger(20_000, BLOCK_SIZE)

            threads = [threading.Thread(target=build) for _ in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            keys = contents._KEYS
            assert len(keys) == 20_000 and all(keys[i] == contents.block_key(i) for i in range(len(keys)))
    finally:
        sys.setswitchinterval(interval)
