"""Ledger operations as data: what a worker's steps are made of, applied the same way on both sides.

The worker's engine hands its KV backend, per step, the ops in plan order (`Start`, `Fork`, `Append`),
and between steps the thread ends (`Finish`, `Release`, answers' `Fork`s). `apply` runs ops on a ledger
and answers with the slots of each append and every block id freed; the worker's own ledger and the KV
manager's replica both go through it, so they give the same answer for the same ops.

`record` is the worker's side of the wire: it applies a step's ops and returns them *compact*, as the
replica replays them: every one-token append into an open block (the decode step's bulk) folds into
one `Advance` naming only the open threads that did NOT advance; what changes block ownership (starts,
forks, appends that open a block, prefill chunks) stays an op of its own, in order.
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


@dataclass(frozen=True, slots=True)
class Advance:
    """One token for every open thread (`KVLedger.open_threads`) except `held`: `KVLedger.advance`."""

    held: frozenset[ThreadRef] = frozenset()


Op = Start | Append | Fork | Finish | Release | Advance


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
        if not _apply_one(ledger, op, answer, starved):
            break
    return answer


def _apply_one(ledger: KVLedger, op: Op, answer: StepAnswer, starved: set[str]) -> bool:
    """One op of `apply`; False when the ledger refused it (`answer.error` says why)."""
    try:
        if isinstance(op, Append):
            if op.thread.request in starved:
                answer.appends.append(None)
                return True
            try:
                answer.appends.append(ledger.append(op.thread, op.tokens))
            except OutOfBlocks:
                starved.add(op.thread.request)
                answer.appends.append(None)
        elif isinstance(op, Advance):
            ledger.advance(op.held)
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
        return False
    return True


def record(ledger: KVLedger, ops: list[Op]) -> tuple[StepAnswer, list[Op]]:
    """`apply(ledger, ops)`, and the same step compact: `[Advance(held), *the other ops in order]`.

    An `Append(t, 1)` folds into the Advance when `t` is open at the start of the step and no earlier
    op of the step touched `t` or released or starved its request. Such an append only writes a slot of
    `t`'s own unshared block, so it commutes with every op before it: replaying the Advance first, then
    the rest, leaves the replica exactly where `apply` leaves this ledger.
    """
    open_ = ledger.open_threads()
    foldable = set(open_)  # open, and untouched so far in this step
    released: set[str] = set()
    starved: set[str] = set()  # requests an append found no room for (see `apply`)
    advanced: set[ThreadRef] = set()
    rest: list[Op] = []
    answer = StepAnswer()
    for op in ops:
        kind = type(op)
        if kind is Append:
            t = op.thread
            if t in foldable:
                foldable.discard(t)
                if op.tokens == 1 and t.request not in released and t.request not in starved:
                    answer.appends.append(ledger.append(t, 1))
                    advanced.add(t)
                    continue
        elif kind is Fork:
            foldable.discard(op.parent)
            foldable.discard(op.child)
        elif kind is Release:
            released.add(op.request)
        elif kind is Start or kind is Finish:
            foldable.discard(op.thread)
        rest.append(op)
        if not _apply_one(ledger, op, answer, starved):
            break
    if not advanced:  # an Advance that holds every open thread changes nothing
        return answer, rest
    return answer, [Advance(frozenset(open_ - advanced)), *rest]
