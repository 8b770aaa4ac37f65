"""One step's ledger operations as data: what a worker sends the KV manager in ONE message per step.

The worker's engine collects, in order, the thread ends of the last step (`Finish`, `Release`), then this
step's `Start`, `Fork` and `Append` ops; `apply` runs them on a ledger and answers with the slots of
each append and every block id freed. The same function serves the in-process ledger and the KV manager
service, so both give the same answer for the same ops.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from services.kvmanager.ledger import KVLedger, LedgerError, OutOfBlocks, ThreadRef


@dataclass(frozen=True, slots=True)
class Start:
    thread: ThreadRef


@dataclass(frozen=True, slots=True)
class Append:
    thread: ThreadRef
    tokens: int


@dataclass(frozen=True, slots=True)
class Fork:
    parent: ThreadRef
    child: ThreadRef


@dataclass(frozen=True, slots=True)
class Finish:
    thread: ThreadRef


@dataclass(frozen=True, slots=True)
class Release:
    request: str


Op = Start | Append | Fork | Finish | Release


@dataclass(slots=True)
class StepAnswer:
    appends: list[list[tuple[int, int]] | None] = field(default_factory=list)  # None: out of blocks
    freed: list[int] = field(default_factory=list)
    error: str | None = None  # an op the ledger refused; the ops after it were not applied


def apply(ledger: KVLedger, ops: list[Op]) -> StepAnswer:
    """Apply ops in order. An append that does not fit changes nothing and answers None; every op of
    that request after it is skipped (its worker ends the request), the other requests go on."""
    answer = StepAnswer()
    starved: set[str] = set()
    for op in ops:
        try:
            if isinstance(op, Append):
                if op.thread.request in starved:
                    answer.appends.append(None)
                    continue
                try:
                    answer.appends.append(ledger.append(op.thread, op.tokens))
                except OutOfBlocks:
                    starved.add(op.thread.request)
                    answer.appends.append(None)
            elif isinstance(op, Fork):
                if op.parent.request not in starved:
                    ledger.fork(op.parent, op.child)
            elif isinstance(op, Start):
                ledger.start(op.thread)
            elif isinstance(op, Finish):
                answer.freed.extend(ledger.finish(op.thread))
            elif isinstance(op, Release):
                answer.freed.extend(ledger.release(op.request))
            else:
                raise LedgerError(f"unknown op {op!r}")
        except LedgerError as exc:
            answer.error = f"{type(op).__name__}: {exc}"
            break
    return answer
