"""What the KV manager keeps per worker, the limits on what a client may send, and its errors.

Data flows: a worker's `Register` becomes a checked `WorkerSpec`; the manager keeps one `WorkerRecord`
per worker (its spec, its `ReplicaLedger`, the worker's session and the last step applied); a
worker's `LogBatch` goes through `apply_batch` (the rules are in `replication`'s docstring); the store
persists a record as a snapshot plus a log of entries, one per message. Every check a client's input
needs is here, so the gRPC servicer and the in-process caller get the same INVALID_ARGUMENT answers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from apar.engine.errors import UserError
from apar.engine.kv.ledger import LedgerError
from apar.engine.kv.ops import OPS, Op
from apar.engine.kv.step import apply
from services.kvmanager.replica import ReplicaLedger
from services.kvmanager.replication import Ack, LogBatch, ResyncPart, LogEntry

MAX_ID_CHARS = 128  # worker ids (part of Redis keys)
MAX_ADDRESS_CHARS = 256
MAX_MODEL_CHARS = 256  # a served model name
MAX_BLOCKS = 1 << 20  # per worker; a ledger of this size snapshots to a few MB of JSON
MAX_BLOCK_SIZE = 1 << 12  # tokens per block
MAX_TTL_S = 24 * 3600
MAX_OPS = 1 << 16  # per step
MAX_STEPS = 1 << 12  # per message
MAX_RESYNC_PARTS = 1 << 10  # parts of one resync (of json_forms.RESYNC_PART_BYTES each)
MAX_RESYNC_BYTES = 1 << 29  # of a resync's parts together (compressed)


class BadRequest(UserError):
    """A field a client sent is wrong (INVALID_ARGUMENT); nothing was changed."""


class UnknownWorker(LookupError):
    """No ledger for this worker: never registered, or its registration expired (NOT_FOUND)."""


class StoreUnavailable(RuntimeError):
    """Redis cannot be reached or lost data; nothing was applied, retry later (UNAVAILABLE)."""


class WorkerIdTaken(RuntimeError):
    """Another live process holds this worker id: its registration (another session) has not expired.
    Nothing was changed (ALREADY_EXISTS)."""


class StaleSession(RuntimeError):
    """A message from a session that no longer holds its worker id (the id was reaped and registered by
    another process): refused, nothing applied (FAILED_PRECONDITION). The process registers again, and
    stops if the id is taken."""


def check_worker_id(worker_id: str) -> str:
    if not worker_id:
        raise BadRequest("worker_id is empty")
    if len(worker_id) > MAX_ID_CHARS:
        raise BadRequest(f"worker_id is longer than {MAX_ID_CHARS} characters")
    if not worker_id.isprintable() or any(c.isspace() for c in worker_id):
        raise BadRequest("worker_id has spaces or control characters")
    return worker_id


MAX_SESSION = (1 << 64) - 1  # a uint64 on the wire


def check_session(session: int) -> int:
    """A worker's session: 1 or more. Every call of a worker names it (Register, Heartbeat, StepBatch):
    it is what binds a worker id to one process, so none is taken as "any"."""
    if not 1 <= session <= MAX_SESSION:
        raise BadRequest("session must be 1 or more: a worker names the session it registered with")
    return session


@dataclass(slots=True)
class WorkerSpec:
    """A worker's lease: its pool size and how long its registration lives without a heartbeat."""

    worker_id: str
    address: str
    num_blocks: int
    block_size: int
    ttl_s: int
    model: str = ""  # the model it serves ("": not said)

    def __post_init__(self) -> None:
        check_worker_id(self.worker_id)
        if len(self.address) > MAX_ADDRESS_CHARS or not self.address.isprintable():
            raise BadRequest(f"address must be at most {MAX_ADDRESS_CHARS} printable characters")
        if len(self.model) > MAX_MODEL_CHARS or not self.model.isprintable():
            raise BadRequest(f"model must be at most {MAX_MODEL_CHARS} printable characters")
        if not 1 <= self.num_blocks <= MAX_BLOCKS:
            raise BadRequest(f"num_blocks must be 1..{MAX_BLOCKS}, got {self.num_blocks}")
        if not 1 <= self.block_size <= MAX_BLOCK_SIZE:
            raise BadRequest(f"block_size must be 1..{MAX_BLOCK_SIZE}, got {self.block_size}")
        if not 1 <= self.ttl_s <= MAX_TTL_S:
            raise BadRequest(f"ttl_seconds must be 1..{MAX_TTL_S}, got {self.ttl_s}")

    def same_pool(self, other: WorkerSpec) -> bool:
        return self.num_blocks == other.num_blocks and self.block_size == other.block_size


OPS_TYPES = tuple(OPS.values())


def check_ops(ops: list[Op], where: str = "", each: bool = True) -> list[Op]:
    """Reject what no worker sends (INVALID_ARGUMENT; each op's `check`, unless `each` is False: ops
    decoded from the wire were checked then, by `ops.op_from_json`); what a ledger refuses makes the
    replica ask for a resync instead."""
    if len(ops) > MAX_OPS:
        raise BadRequest(f"{where}{len(ops)} ops in one step; at most {MAX_OPS}")
    for i, op in enumerate(ops if each else ()):
        if not isinstance(op, OPS_TYPES):
            raise BadRequest(f"{where}op {i}: unknown op {type(op).__name__}")
        try:
            op.check()
        except ValueError as exc:
            raise BadRequest(f"{where}op {i}: {exc}") from None
    return ops


def check_batch(batch: LogBatch) -> LogBatch:
    """A session, consecutive step numbers from 1 up, at most MAX_STEPS of them, ops that can be ops."""
    check_session(batch.session)
    if len(batch.steps) > MAX_STEPS:
        raise BadRequest(f"{len(batch.steps)} steps in one message; at most {MAX_STEPS}")
    if batch.resync is not None and batch.resync.seq < 0:
        raise BadRequest("resync seq must be 0 or more")
    p = batch.part
    if p is not None:
        if p.seq < 0 or not 0 <= p.part < p.parts <= MAX_RESYNC_PARTS:
            raise BadRequest(f"resync part {p.part} of {p.parts}: parts must be 1..{MAX_RESYNC_PARTS}, part below")
        if batch.steps and p.part < p.parts - 1:
            raise BadRequest("a resync's steps come with its last part")
    for i, step in enumerate(batch.steps):
        if step.seq <= 0:
            raise BadRequest(f"step {i}: seq must be 1 or more (a worker numbers its steps from 1)")
        if i and step.seq != batch.steps[i - 1].seq + 1:
            raise BadRequest(f"step {i}: seq {step.seq} does not follow {batch.steps[i - 1].seq}")
        check_ops(step.ops, f"step {i}: ", each=step.raw is None)
    return batch


@dataclass(slots=True)
class WorkerRecord:
    """One worker's replica and where it stands.

    `session` and `seq` are the worker's: the session that registered the worker id (the only one whose
    messages are applied: the id is bound to it) and the last of its steps applied. `broken` is set when
    the replica refused an op or its digest differed from the worker's (it no longer follows the
    worker): nothing more is applied until a resync. `n` counts the
    messages that changed the replica since registration (each a log entry, or a resync); `base` is the
    `n` of the last snapshot in the store, so entries `base+1..n` are in the store's log. `born` (ns
    since the epoch, set at registration) orders two replicas of the same worker id: a fresh
    registration outranks an old one.
    """

    spec: WorkerSpec
    ledger: ReplicaLedger
    born: int
    session: int = 0
    seq: int = 0
    n: int = 0
    base: int = 0
    broken: bool = False
    expires_at: float = 0.0  # monotonic deadline, only used without a store

    @property
    def version(self) -> tuple[int, int]:
        return (self.born, self.n)

    @property
    def worker_id(self) -> str:
        return self.spec.worker_id

    def ack(self, resync: bool = False) -> Ack:
        return Ack(self.seq, self.ledger.digest(), resync or self.broken)


@dataclass(slots=True)
class Applied:
    """What one message did to a record: its answer, the steps applied (the log entry), a resync."""

    ack: Ack | None = None  # set before `apply_batch` returns
    steps: list[LogEntry] = field(default_factory=list)
    resynced: bool = False
    duplicates: int = 0
    freed: int = 0


def apply_batch(rec: WorkerRecord, batch: LogBatch) -> Applied:
    """Apply one message of a worker to its replica by the rules in `replication`'s docstring; raises
    StaleSession, changing nothing, for a message of a session the worker id is not bound to."""
    if batch.session != rec.session:
        raise StaleSession(f"worker {rec.worker_id} is registered by another process now: register again")
    out = Applied()
    stale = not rec.broken and batch.resync is not None and batch.resync.seq < rec.seq
    if batch.resync is not None and not stale:  # a stale one (a late copy) would only set the replica back
        data = batch.resync.ledger
        if not isinstance(data, dict) or (data.get("num_blocks"), data.get("block_size")) != (
                rec.spec.num_blocks, rec.spec.block_size):
            raise BadRequest("resync: the snapshot's pool is not the registered one")
        try:
            ledger = batch.resync.replica if batch.resync.replica is not None else ReplicaLedger.from_snapshot(data)
        except LedgerError as exc:
            raise BadRequest(f"resync: {exc}") from None
        rec.ledger, rec.seq, rec.broken = ledger, batch.resync.seq, False
        out.resynced = True
    if rec.broken:
        out.ack = rec.ack(resync=True)
        return out
    for step in batch.steps:
        if step.seq <= rec.seq:
            out.duplicates += 1
            continue
        if step.seq != rec.seq + 1:  # early: the worker resends from rec.seq + 1
            break
        answer = apply(rec.ledger, step.ops, slots=False)
        out.freed += len(answer.freed)
        if answer.error or rec.ledger.digest() != step.digest:
            rec.broken = True
            break
        rec.seq = step.seq
        out.steps.append(step)
    if out.steps or out.resynced:
        rec.n += 1
    out.ack = rec.ack()
    return out


@dataclass(slots=True)
class ResyncParts:
    """A worker's resync coming in parts, so far."""

    session: int
    seq: int
    parts: int
    data: list[bytes] = field(default_factory=list)
    size: int = 0


def add_part(pending: dict[str, ResyncParts], worker_id: str, session: int, p: ResyncPart) -> list[bytes] | None:
    """Keep one part of a worker's resync in `pending`; with its last part, all of them (and the worker's
    entry gone). BadRequest, the entry dropped, for a part out of order (the worker sends the snapshot
    again from part 0) or parts too large together."""
    have = pending.get(worker_id)
    if p.part == 0:
        have = pending[worker_id] = ResyncParts(session, p.seq, p.parts)
    elif have is None or (have.session, have.seq, have.parts, len(have.data)) != (session, p.seq, p.parts, p.part):
        pending.pop(worker_id, None)
        raise BadRequest(f"resync part {p.part} of {p.parts} out of order: send it again from part 0")
    have.data.append(p.data)
    have.size += len(p.data)
    if have.size > MAX_RESYNC_BYTES:
        del pending[worker_id]
        raise BadRequest(f"resync: more than {MAX_RESYNC_BYTES} bytes in parts")
    if len(have.data) < have.parts:
        return None
    del pending[worker_id]
    return have.data


def replay_entry(rec: WorkerRecord, steps: list[tuple[int, list[Op]]]) -> None:
    """Apply one log entry (steps applied live, in order) when a record is restored from the store;
    raises LedgerError when they do not apply."""
    for seq, ops in steps:
        answer = apply(rec.ledger, ops, slots=False)
        if answer.error:
            raise LedgerError(f"step {seq}: {answer.error}")
        rec.seq = seq
    rec.n += 1


@dataclass(frozen=True, slots=True)
class Usage:
    """One worker as the router sees it."""

    worker_id: str
    address: str
    num_blocks: int
    free_blocks: int  # free or cached (an allocation may evict a cached block)
    requests: int
    block_size: int = 0
    cached_blocks: int = 0
    model: str = ""
    digest: object = None  # the replica's ledger.Digest
