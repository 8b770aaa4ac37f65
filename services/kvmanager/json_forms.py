"""JSON forms of ops (a worker's steps carry them so, and the store logs them so), log entries, worker
specs and record snapshots.

An op is a short list: `["s", request, thread]` start, `["a", request, thread, tokens]` append, `["v",
[[request, thread], ...]]` advance (the held threads), `["e", [[request, thread], ...]]` one token each
(in order), `["f", request, parent, request, child]` fork, `["x", request, thread]` finish, `["r",
request]` release, `["u", request, thread, [name, ...]]` reuse, `["n", request, thread, first, [name,
...]]` name, `["t", request, thread, tokens]` truncate (a rejected draft's slots taken back). A log entry is one applied message: `{"n":
entry number, "steps": [[seq, [op, ...]], ...]}` (only the steps the replica applied). A snapshot is a
record without its spec (the spec lives in the workers hash): `{"born", "n", "session", "seq",
"ledger"}`. Replaying a snapshot's entries through `ops.apply` rebuilds a replica exactly, because the
ledger is deterministic.
"""
from __future__ import annotations

import json
import zlib

from apar.engine.kv.ledger import LedgerError
from apar.engine.kv.ops import Op, op_from_json
from services.kvmanager.records import WorkerRecord, WorkerSpec
from services.kvmanager.replica import ReplicaLedger
from services.kvmanager.replication import LogEntry


def _dumps(obj) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def ops_to_bytes(ops: list[Op]) -> bytes:
    return _dumps([op.to_json() for op in ops]).encode()


def ops_from_bytes(data: bytes) -> list[Op]:
    """ValueError when the bytes are not a JSON list of ops."""
    items = json.loads(data.decode())  # UTF-8 only: the store logs these bytes as they are
    if type(items) is not list:
        raise ValueError("ops must be a JSON list")
    return [op_from_json(item) for item in items]


def entry_to_json(n: int, steps: list[LogEntry]) -> str:
    """A log entry; a step's ops go in as they came from the worker when the manager has them (`raw`:
    JSON the manager parsed and checked), saving the encoding of every op of every step."""
    parts = [f"[{s.seq},{s.raw.decode() if s.raw is not None else _dumps([op.to_json() for op in s.ops])}]"
             for s in steps]
    return f'{{"n":{n},"steps":[{",".join(parts)}]}}'


def entry_from_json(text: str | bytes) -> tuple[int, list[tuple[int, list[Op]]]]:
    e = json.loads(text)
    return e["n"], [(seq, [op_from_json(item) for item in ops]) for seq, ops in e["steps"]]


def spec_to_json(spec: WorkerSpec) -> str:
    return _dumps({"worker_id": spec.worker_id, "address": spec.address, "num_blocks": spec.num_blocks,
                   "block_size": spec.block_size, "ttl_s": spec.ttl_s, "model": spec.model})


def spec_from_json(text: str | bytes) -> WorkerSpec:
    return WorkerSpec(**json.loads(text))


def snapshot_of(rec: WorkerRecord) -> dict:
    """A record's state as plain data (a copy: the record may change while it is encoded)."""
    return {"born": rec.born, "n": rec.n, "session": rec.session, "seq": rec.seq, "ledger": rec.ledger.snapshot()}


def snapshot_to_json(rec: WorkerRecord | dict) -> str:
    """A record (or its `snapshot_of`) as the store keeps it."""
    return _dumps(rec if isinstance(rec, dict) else snapshot_of(rec))


def record_from_json(spec: WorkerSpec, text: str | bytes) -> WorkerRecord:
    """A record from its snapshot (entries still to replay); raises LedgerError when it does not fit."""
    d = json.loads(text)
    ledger = ReplicaLedger.from_snapshot(d["ledger"])
    if ledger.num_blocks != spec.num_blocks or ledger.block_size != spec.block_size:
        raise LedgerError(f"snapshot of {spec.worker_id} does not match its registered pool size")
    return WorkerRecord(spec=spec, ledger=ledger, born=d["born"], session=d["session"], seq=d["seq"], n=d["n"],
                        base=d["n"])


RESYNC_PART_BYTES = 4 << 20  # a resync's parts: far under gRPC's 16 MiB message cap
MAX_SNAPSHOT_BYTES = 1 << 30  # a snapshot's JSON: a pool of MAX_BLOCKS blocks, each of another long request id


def snapshot_to_bytes(snapshot: dict) -> bytes:
    """A ledger snapshot as it travels in a Resync of one part."""
    return _dumps(snapshot).encode()


def snapshot_from_bytes(data: bytes) -> dict:
    return json.loads(data)


def snapshot_parts(snapshot: dict, size: int = RESYNC_PART_BYTES) -> list[bytes]:
    """A snapshot as a Resync in parts carries it: its JSON, compressed, cut in pieces of `size` bytes."""
    data = zlib.compress(snapshot_to_bytes(snapshot), 1)
    return [data[i:i + size] for i in range(0, len(data), size)]


def snapshot_from_parts(parts: list[bytes]) -> dict:
    """The snapshot the parts carry; ValueError when they are not one (or it would exceed MAX_SNAPSHOT_BYTES)."""
    d = zlib.decompressobj()
    try:
        data = d.decompress(b"".join(parts), MAX_SNAPSHOT_BYTES)
    except zlib.error as exc:
        raise ValueError(f"the parts are not a compressed snapshot: {exc}") from None
    if not d.eof or d.unconsumed_tail:
        raise ValueError(f"the parts are not a whole compressed snapshot of at most {MAX_SNAPSHOT_BYTES} bytes")
    return json.loads(data)
