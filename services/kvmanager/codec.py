"""JSON forms of what the store keeps in Redis: ops (a log entry), step answers, worker records.

A log entry is one applied message: `{"n": entry number, "seq": step seq or null for a Release call,
"d": digest of the ops, "ops": [...]}`. A snapshot is a record without its spec (the spec lives in the
workers hash): `{"born", "n", "seq", "d", "answer", "ledger"}`. Replaying a snapshot's entries through
`ops.apply` rebuilds a ledger exactly, because the ledger is deterministic.
"""
from __future__ import annotations

import hashlib
import json

from services.kvmanager.ledger import KVLedger, LedgerError, ThreadRef
from services.kvmanager.ops import Append, Finish, Fork, Op, Release, Start, StepAnswer
from services.kvmanager.records import WorkerRecord, WorkerSpec


def _dumps(obj) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def op_to_json(op: Op) -> list:
    if isinstance(op, Append):
        return ["a", op.thread.request, op.thread.thread, op.tokens]
    if isinstance(op, Fork):
        return ["f", op.parent.request, op.parent.thread, op.child.request, op.child.thread]
    if isinstance(op, Start):
        return ["s", op.thread.request, op.thread.thread]
    if isinstance(op, Finish):
        return ["x", op.thread.request, op.thread.thread]
    if isinstance(op, Release):
        return ["r", op.request]
    raise TypeError(f"not an op: {op!r}")


def op_from_json(item: list) -> Op:
    kind = item[0]
    if kind == "a":
        return Append(ThreadRef(item[1], item[2]), item[3])
    if kind == "f":
        return Fork(ThreadRef(item[1], item[2]), ThreadRef(item[3], item[4]))
    if kind == "s":
        return Start(ThreadRef(item[1], item[2]))
    if kind == "x":
        return Finish(ThreadRef(item[1], item[2]))
    if kind == "r":
        return Release(item[1])
    raise ValueError(f"unknown op kind {kind!r}")


def ops_json(ops: list[Op]) -> tuple[list, str]:
    """The ops as JSON data and their digest (equal ops, equal digest): a resend is recognized by it."""
    data = [op_to_json(op) for op in ops]
    return data, hashlib.sha1(_dumps(data).encode()).hexdigest()


def entry_to_json(n: int, seq: int | None, digest: str, ops_data: list) -> str:
    return _dumps({"n": n, "seq": seq, "d": digest, "ops": ops_data})


def entry_from_json(text: str | bytes) -> tuple[int, int | None, str, list[Op]]:
    e = json.loads(text)
    return e["n"], e["seq"], e["d"], [op_from_json(item) for item in e["ops"]]


def answer_to_json(a: StepAnswer) -> dict:
    appends = [None if s is None else [x for slot in s for x in slot] for s in a.appends]
    return {"a": appends, "f": a.freed, "e": a.error}


def answer_from_json(d: dict) -> StepAnswer:
    appends = [None if s is None else list(zip(s[0::2], s[1::2])) for s in d["a"]]
    return StepAnswer(appends=appends, freed=list(d["f"]), error=d["e"])


def spec_to_json(spec: WorkerSpec) -> str:
    return _dumps({"worker_id": spec.worker_id, "address": spec.address, "num_blocks": spec.num_blocks,
                   "block_size": spec.block_size, "ttl_s": spec.ttl_s})


def spec_from_json(text: str | bytes) -> WorkerSpec:
    return WorkerSpec(**json.loads(text))


def snapshot_to_json(rec: WorkerRecord) -> str:
    return _dumps({"born": rec.born, "n": rec.n, "seq": rec.seq, "d": rec.digest,
                   "answer": answer_to_json(rec.answer), "ledger": rec.ledger.snapshot()})


def record_from_json(spec: WorkerSpec, text: str | bytes) -> WorkerRecord:
    """A record from its snapshot (entries still to replay); raises LedgerError when it does not fit."""
    d = json.loads(text)
    ledger = KVLedger.from_snapshot(d["ledger"])
    if ledger.num_blocks != spec.num_blocks or ledger.block_size != spec.block_size:
        raise LedgerError(f"snapshot of {spec.worker_id} does not match its registered pool size")
    requests = {r for r, _ in d["ledger"]["requests"]}
    return WorkerRecord(spec=spec, ledger=ledger, born=d["born"], n=d["n"], base=d["n"], seq=d["seq"],
                        digest=d["d"], answer=answer_from_json(d["answer"]), requests=requests)
