"""A resync in parts at the KV manager: the replica of a large snapshot is built outside the memory lock,
so the other workers' messages go on meanwhile (for the largest pool that build takes seconds)."""
from __future__ import annotations

import threading

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
