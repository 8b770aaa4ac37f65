"""What the KV manager keeps per worker, the limits on what a client may send, and its errors.

Data flows: a worker's `Register` becomes a checked `WorkerSpec`; the manager keeps one `WorkerRecord`
per worker (its spec, its `KVLedger`, and the last step it applied, for idempotent resends); the store
persists a record as a snapshot plus a log of entries. Every check a client's input needs is here, so
the gRPC servicer and the in-process caller get the same INVALID_ARGUMENT answers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from apar.errors import UserError
from services.kvmanager.ledger import KVLedger, ThreadRef
from services.kvmanager.ops import Append, Finish, Fork, Op, Release, Start, StepAnswer, apply

MAX_ID_CHARS = 128  # worker ids (part of Redis keys)
MAX_REQUEST_CHARS = 256
MAX_ADDRESS_CHARS = 256
MAX_BLOCKS = 1 << 20  # per worker; a ledger of this size snapshots to a few MB of JSON
MAX_BLOCK_SIZE = 1 << 12  # tokens per block
MAX_TTL_S = 24 * 3600
MAX_APPEND_TOKENS = 1 << 20  # one append (a prefill chunk); more than the pool holds answers "failed"
MAX_OPS = 1 << 16  # per step


class BadRequest(UserError):
    """A field a client sent is wrong (INVALID_ARGUMENT); nothing was changed."""


class UnknownWorker(LookupError):
    """No ledger for this worker: never registered, or its registration expired (NOT_FOUND)."""


class SeqConflict(RuntimeError):
    """A step whose seq was already used by different ops, or older than the last step (FAILED_PRECONDITION)."""


class StoreUnavailable(RuntimeError):
    """Redis cannot be reached or lost data; nothing was applied, retry later (UNAVAILABLE)."""


def check_worker_id(worker_id: str) -> str:
    if not worker_id:
        raise BadRequest("worker_id is empty")
    if len(worker_id) > MAX_ID_CHARS:
        raise BadRequest(f"worker_id is longer than {MAX_ID_CHARS} characters")
    if not worker_id.isprintable() or any(c.isspace() for c in worker_id):
        raise BadRequest("worker_id has spaces or control characters")
    return worker_id


def check_request_id(request: str, what: str = "request") -> str:
    if not request:
        raise BadRequest(f"{what} id is empty")
    if len(request) > MAX_REQUEST_CHARS:
        raise BadRequest(f"{what} id is longer than {MAX_REQUEST_CHARS} characters")
    return request


def check_seq(seq: int) -> int:
    if seq <= 0:
        raise BadRequest("seq must be 1 or more (a worker numbers its steps from 1)")
    return seq


@dataclass(slots=True)
class WorkerSpec:
    """A worker's lease: its pool size and how long its registration lives without a heartbeat."""

    worker_id: str
    address: str
    num_blocks: int
    block_size: int
    ttl_s: int

    def __post_init__(self) -> None:
        check_worker_id(self.worker_id)
        if len(self.address) > MAX_ADDRESS_CHARS or not self.address.isprintable():
            raise BadRequest(f"address must be at most {MAX_ADDRESS_CHARS} printable characters")
        if not 1 <= self.num_blocks <= MAX_BLOCKS:
            raise BadRequest(f"num_blocks must be 1..{MAX_BLOCKS}, got {self.num_blocks}")
        if not 1 <= self.block_size <= MAX_BLOCK_SIZE:
            raise BadRequest(f"block_size must be 1..{MAX_BLOCK_SIZE}, got {self.block_size}")
        if not 1 <= self.ttl_s <= MAX_TTL_S:
            raise BadRequest(f"ttl_seconds must be 1..{MAX_TTL_S}, got {self.ttl_s}")

    def same_pool(self, other: WorkerSpec) -> bool:
        return self.num_blocks == other.num_blocks and self.block_size == other.block_size


def _check_ref(ref: ThreadRef, i: int, what: str) -> None:
    check_request_id(ref.request, f"op {i}: {what} request")
    if not 0 <= ref.thread < 1 << 32:
        raise BadRequest(f"op {i}: {what} thread must be 0..2^32-1")


def check_ops(ops: list[Op]) -> list[Op]:
    """Reject what no worker sends (INVALID_ARGUMENT); what a ledger refuses is answered in `error`."""
    if len(ops) > MAX_OPS:
        raise BadRequest(f"{len(ops)} ops in one step; at most {MAX_OPS}")
    for i, op in enumerate(ops):
        if isinstance(op, Append):
            _check_ref(op.thread, i, "append")
            if not 1 <= op.tokens <= MAX_APPEND_TOKENS:
                raise BadRequest(f"op {i}: append of {op.tokens} tokens; must be 1..{MAX_APPEND_TOKENS}")
        elif isinstance(op, Fork):
            _check_ref(op.parent, i, "fork parent")
            _check_ref(op.child, i, "fork child")
        elif isinstance(op, (Start, Finish)):
            _check_ref(op.thread, i, type(op).__name__.lower())
        elif isinstance(op, Release):
            check_request_id(op.request, f"op {i}: release")
        else:
            raise BadRequest(f"op {i}: unknown op {type(op).__name__}")
    return ops


@dataclass(slots=True)
class WorkerRecord:
    """One worker's ledger and where it stands in its log.

    `n` counts the log entries applied since registration (steps and Release calls); `base` is the `n`
    of the last snapshot in the store, so entries `base+1..n` are in the store's log. `born` (ns since
    the epoch, set at registration) orders two ledgers of the same worker id: a fresh registration
    outranks an old one. `seq`, `digest` and `answer` are the last step's, so a resend of that step is
    answered again without applying it twice.
    """

    spec: WorkerSpec
    ledger: KVLedger
    born: int
    n: int = 0
    base: int = 0
    seq: int = 0
    digest: str = ""
    answer: StepAnswer = field(default_factory=StepAnswer)
    requests: set[str] = field(default_factory=set)  # requests started and not released
    expires_at: float = 0.0  # monotonic deadline, only used without a store

    @property
    def version(self) -> tuple[int, int]:
        return (self.born, self.n)

    @property
    def worker_id(self) -> str:
        return self.spec.worker_id


def apply_entry(rec: WorkerRecord, seq: int | None, digest: str, ops: list[Op]) -> StepAnswer:
    """Apply one log entry to a record: the same call live and in a replay, so both end the same."""
    answer = apply(rec.ledger, ops)
    rec.n += 1
    if seq is not None:
        rec.seq, rec.digest, rec.answer = seq, digest, answer
    if answer.error:  # some ops were not applied: ask the ledger which requests it holds
        rec.requests = {r for r, _ in rec.ledger.snapshot()["requests"]}
    else:
        for op in ops:
            if isinstance(op, Start):
                rec.requests.add(op.thread.request)
            elif isinstance(op, Release):
                rec.requests.discard(op.request)
    return answer


@dataclass(frozen=True, slots=True)
class Usage:
    """One worker as the router sees it."""

    worker_id: str
    address: str
    num_blocks: int
    free_blocks: int
    requests: int


@dataclass(frozen=True, slots=True)
class StepResult:
    answer: StepAnswer
    free_blocks: int
    resent: bool = False  # the answer of a step already applied (same seq, same ops)
