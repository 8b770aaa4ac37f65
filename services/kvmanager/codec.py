"""JSON forms of ops (a worker's steps carry them so, and the store logs them so), log entries, worker
specs and record snapshots.

An op is a short list: `["s", request, thread]` start, `["a", request, thread, tokens]` append, `["v",
[[request, thread], ...]]` advance (the held threads), `["f", request, parent, request, child]` fork,
`["x", request, thread]` finish, `["r", request]` release. A log entry is one applied message: `{"n":
entry number, "steps": [[seq, [op, ...]], ...]}` (only the steps the replica applied). A snapshot is a
record without its spec (the spec lives in the workers hash): `{"born", "n", "session", "seq",
"ledger"}`. Replaying a snapshot's entries through `ops.apply` rebuilds a replica exactly, because the
ledger is deterministic.
"""
from __future__ import annotations

import json

from services.kvmanager.ledger import KVLedger, LedgerError, ThreadRef
from services.kvmanager.ops import Advance, Append, Finish, Fork, Op, Release, Start
from services.kvmanager.records import WorkerRecord, WorkerSpec
from services.kvmanager.replication import Step


def _dumps(obj) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def op_to_json(op: Op) -> list:
    if isinstance(op, Append):
        return ["a", op.thread.request, op.thread.thread, op.tokens]
    if isinstance(op, Advance):
        return ["v", sorted([r.request, r.thread] for r in op.held)]
    if isinstance(op, Fork):
        return ["f", op.parent.request, op.parent.thread, op.child.request, op.child.thread]
    if isinstance(op, Start):
        return ["s", op.thread.request, op.thread.thread]
    if isinstance(op, Finish):
        return ["x", op.thread.request, op.thread.thread]
    if isinstance(op, Release):
        return ["r", op.request]
    raise TypeError(f"not an op: {op!r}")


def _ref(request, thread) -> ThreadRef:
    if type(request) is not str or type(thread) is not int:
        raise ValueError(f"a thread is a request string and a thread number, got {request!r}, {thread!r}")
    return ThreadRef(request, thread)


_ARITY = {"a": 4, "v": 2, "f": 5, "s": 3, "x": 3, "r": 2}


def op_from_json(item) -> Op:
    """One op; ValueError for anything that is not one (the manager checks the values after)."""
    if type(item) is not list or not item or _ARITY.get(item[0]) != len(item):
        raise ValueError(f"not an op: {item!r}")
    kind = item[0]
    if kind == "a":
        if type(item[3]) is not int:
            raise ValueError(f"append tokens must be a number: {item!r}")
        return Append(_ref(item[1], item[2]), item[3])
    if kind == "v":
        if type(item[1]) is not list or any(type(x) is not list or len(x) != 2 for x in item[1]):
            raise ValueError(f"advance holds a list of [request, thread]: {item!r}")
        return Advance(frozenset(_ref(r, t) for r, t in item[1]))
    if kind == "f":
        return Fork(_ref(item[1], item[2]), _ref(item[3], item[4]))
    if kind == "s":
        return Start(_ref(item[1], item[2]))
    if kind == "x":
        return Finish(_ref(item[1], item[2]))
    if type(item[1]) is not str:
        raise ValueError(f"release names a request: {item!r}")
    return Release(item[1])


def ops_to_bytes(ops: list[Op]) -> bytes:
    return _dumps([op_to_json(op) for op in ops]).encode()


def ops_from_bytes(data: bytes) -> list[Op]:
    """ValueError when the bytes are not a JSON list of ops."""
    items = json.loads(data)
    if type(items) is not list:
        raise ValueError("ops must be a JSON list")
    return [op_from_json(item) for item in items]


def entry_to_json(n: int, steps: list[Step]) -> str:
    return _dumps({"n": n, "steps": [[s.seq, [op_to_json(op) for op in s.ops]] for s in steps]})


def entry_from_json(text: str | bytes) -> tuple[int, list[tuple[int, list[Op]]]]:
    e = json.loads(text)
    return e["n"], [(seq, [op_from_json(item) for item in ops]) for seq, ops in e["steps"]]


def spec_to_json(spec: WorkerSpec) -> str:
    return _dumps({"worker_id": spec.worker_id, "address": spec.address, "num_blocks": spec.num_blocks,
                   "block_size": spec.block_size, "ttl_s": spec.ttl_s})


def spec_from_json(text: str | bytes) -> WorkerSpec:
    return WorkerSpec(**json.loads(text))


def snapshot_to_json(rec: WorkerRecord) -> str:
    return _dumps({"born": rec.born, "n": rec.n, "session": rec.session, "seq": rec.seq,
                   "ledger": rec.ledger.snapshot()})


def record_from_json(spec: WorkerSpec, text: str | bytes) -> WorkerRecord:
    """A record from its snapshot (entries still to replay); raises LedgerError when it does not fit."""
    d = json.loads(text)
    ledger = KVLedger.from_snapshot(d["ledger"])
    if ledger.num_blocks != spec.num_blocks or ledger.block_size != spec.block_size:
        raise LedgerError(f"snapshot of {spec.worker_id} does not match its registered pool size")
    return WorkerRecord(spec=spec, ledger=ledger, born=d["born"], session=d["session"], seq=d["seq"], n=d["n"],
                        base=d["n"])


def snapshot_to_bytes(snapshot: dict) -> bytes:
    """A ledger snapshot as it travels in a Resync."""
    return _dumps(snapshot).encode()


def snapshot_from_bytes(data: bytes) -> dict:
    return json.loads(data)
