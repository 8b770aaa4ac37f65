"""A step's ledger ops applied in order (`apply`), and recorded compact for the replica (`record`).

`record` is the worker's side of the wire: it applies a step's ops and returns them *compact*, as the
replica replays them: every one-token append into an open block (the decode step's bulk) folds into
one `Advance` naming only the open threads that did NOT advance, and the one-token appends that open a
block into one `AppendEach` listing their threads; what else changes block ownership (starts, forks,
prefill chunks, ends) stays an op of its own, in order (docs/design.md, "Replication").
"""
from __future__ import annotations

from dataclasses import dataclass, field

from apar.engine.kv.ledger import KVLedger, LedgerError, ThreadRef
from apar.engine.kv.ops import Advance, Append, AppendEach, Fork, Name, Op, Release, Start, _Op


@dataclass(slots=True)
class OpResults:
    """What applying a list of ops gave: per append, its slots (block, offset) in order; the blocks freed."""

    appends: list[list[tuple[int, int]] | None] = field(default_factory=list)  # None: out of blocks
    freed: list[int] = field(default_factory=list)
    error: str | None = None  # an op the ledger refused; the ops after it were not applied


def apply(ledger: KVLedger, ops: list[Op], slots: bool = True) -> OpResults:
    """Apply ops in order. An append that does not fit changes nothing and answers None; every op of
    that request after it is skipped (its worker ends the request), the other requests go on. A replica
    (it writes no KV) passes `slots=False`: its appends answer empty lists."""
    answer = OpResults()
    starved: set[str] = set()
    for op in ops:
        if not _apply_one(ledger, op, answer, starved, slots):
            break
    return answer


def _apply_one(ledger: KVLedger, op: Op, answer: OpResults, starved: set[str], slots: bool = True) -> bool:
    """One op of `apply`; False when the ledger refused it (`answer.error` says why)."""
    if not isinstance(op, _Op):
        answer.error = f"unknown op {op!r}"
        return False
    try:
        op.apply_to(ledger, answer, starved, slots)
    except LedgerError as exc:
        answer.error = f"{type(op).__name__}: {exc}"
        return False
    return True


def record(ledger: KVLedger, ops: list[Op]) -> tuple[OpResults, list[Op]]:
    """`apply(ledger, ops)`, and the same step compact: `[Advance(held), AppendEach(threads), *the other ops
    in order]`.

    An `Append(t, 1)` folds into the Advance when `t` is open at the start of the step and no earlier
    op of the step touched `t` or released or starved its request. Such an append only writes a slot of
    `t`'s own unshared block, so it commutes with every op before it.

    An `Append(t, 1)` of a thread that runs but is not open at the start of the step (its token opens a
    block: the decode step's other case) folds into the AppendEach under the same conditions, when a
    block is there for it and every op before it is a Start, a Fork, a Name or a folded append: it takes
    the next block by the ledger's rule, and none of those takes, frees or caches a block, so it commutes
    with them. Replaying the Advance, then the AppendEach in its order, then the rest therefore leaves
    the replica exactly where `apply` leaves this ledger.
    """
    open_ = ledger.open_threads()
    touched: set[ThreadRef] = set()  # threads an op of this step named so far
    released: set[str] = set()
    starved: set[str] = set()  # requests an append found no room for (see `apply`)
    advanced: set[ThreadRef] = set()
    opening: list[ThreadRef] = []
    movable = True  # no op so far took, freed or cached a block, but the folded appends
    rest: list[Op] = []
    answer = OpResults()
    for op in ops:
        kind = type(op)
        if kind is Append:
            t = op.thread
            if op.tokens == 1 and t not in touched and t.request not in released and t.request not in starved:
                if t in open_:
                    touched.add(t)
                    answer.appends.append(ledger.append(t, 1))
                    advanced.add(t)
                    continue
                if movable and ledger.is_running(t) and ledger.num_free:
                    touched.add(t)
                    answer.appends.append(ledger.append(t, 1))
                    opening.append(t)
                    continue
            touched.add(t)
            movable = False
        elif kind is Release:
            released.add(op.request)
            movable = False
        else:
            touched.update(op.touches())
            movable = movable and kind in (Start, Fork, Name)
        rest.append(op)
        if not _apply_one(ledger, op, answer, starved):
            break
    head: list[Op] = []
    if advanced:  # (an Advance that holds every open thread would change nothing)
        head.append(Advance(frozenset(open_ - advanced)))
    if opening:
        head.append(AppendEach(tuple(opening)))
    return answer, head + rest
