"""How a worker's ledger is replicated at the KV manager: numbered steps, acknowledgements, resyncs.

The worker's ledger is the truth for its own pool; the manager's copy is a replica (for usage, the
cross-worker view and restart recovery). Every allocation is made by the pool's single owner, the
worker, by the ledger's deterministic rule; the replica replays the same ops and never allocates on its
own, so a block can neither be lost nor handed to two threads by the replication. Data flows one way:

    engine --ops--> ReplicationLog.apply (local ledger first: the slots, at once)
                    -> LogEntry(seq, compact ops, digest) queued, unacknowledged
    sender --LogBatch(session, [Resync], steps)--> manager: apply_batch -> Ack(applied, digest, resync)
    sender <--Ack-- drops the acknowledged steps; a resync flag, a digest that differs or a gap it cannot
                    fill makes it send a snapshot of its ledger instead (`Resync`), which the manager
                    takes wholesale

Rules the manager follows for a batch (`records.apply_batch`):
  - a batch of a session the worker id is not bound to (the id was reaped and registered by another
    process) is refused whole (StaleSession), resync included: it never touches that process's replica;
  - a `Resync` replaces the replica, and sets `applied` to its seq;
  - steps of a replica that refused an op or diverged are not applied: the ack asks for a resync;
  - a step at or below `applied` is a duplicate and is skipped; one above `applied + 1` is early (a gap)
    and is not applied, the ack's `applied` tells the worker where to resend from;
  - a step whose digest differs from the replica's after applying it asks for a resync;
  - a resync older than the replica's last step is a late copy and is skipped.
And the worker, on every ack that covers its last step, compares the replica's digest with its own (an
idle worker sends an empty batch now and then for that: a `probe`). So a step arriving twice or out of
order is applied once, in order, and whatever goes wrong ends in a resync, never in a stalled engine:
the only thing the worker's engine ever waits for is its bounded lag.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice

from apar.engine.kv.ledger import Digest, KVLedger
from apar.engine.kv.ops import Op
from apar.engine.kv.step import OpResults, apply, record


class ReplicaUnavailable(ConnectionError):
    """The KV manager could not be reached (or could not load its ledgers from Redis yet): send again."""


class WorkerForgotten(RuntimeError):
    """The KV manager holds no ledger for this worker (expired, or never registered), or it holds one
    another process registered since: register again."""


class WorkerFenced(RuntimeError):
    """Another live process holds this worker's id at the KV manager: this one may not register it."""


@dataclass(slots=True)  # not frozen: a replica builds thousands a second, and a frozen init costs 4x
class LogEntry:
    """One engine step in the log: its number, its ops (compact) and the worker's digest after it."""

    seq: int
    ops: list[Op]
    digest: Digest  # the worker's ledger right after this step
    at: float = 0.0  # when the worker applied it (its monotonic clock; never sent)
    raw: bytes | None = None  # at the manager: the ops as they came (`json_forms` JSON), logged as they are


@dataclass(frozen=True, slots=True)
class Resync:
    seq: int  # the snapshot is the ledger after step `seq`
    ledger: dict  # KVLedger.snapshot()
    at: float = 0.0  # when the oldest step it replaces was applied (never sent)
    replica: object = None  # at the manager: the ReplicaLedger of `ledger`, built outside its memory lock


@dataclass(frozen=True, slots=True)
class ResyncPart:
    """One part of a resync's snapshot as it travels (the wire's form: compressed JSON, in parts)."""

    seq: int
    part: int
    parts: int
    data: bytes


@dataclass(frozen=True, slots=True)
class LogBatch:
    """What the sender hands the manager in one message: log entries in order, maybe a resync first."""

    session: int  # the worker's replication session: a new one per ledger that starts empty
    steps: list[LogEntry]
    resync: Resync | None = None
    part: ResyncPart | None = None  # at the manager: a resync still coming in parts (`resync` is None)


@dataclass(frozen=True, slots=True)
class Ack:
    applied: int  # the last step the replica holds (in Redis a round later, when the manager has a store)
    digest: Digest  # the replica after `applied`
    resync: bool = False  # the replica cannot go on from these steps: send a snapshot


class ReplicationLog:
    """A worker's ledger and the numbered steps that replay it, kept until the replica acknowledges them.

    The engine's side is `LocalKV`'s (`apply`, `defer`, `flush`); the sender's side is `batch` and
    `acked`. Thread ends (`defer`) are applied at once and travel at the head of the next step. Not
    thread-safe: `RemoteKV` holds one lock around every call.
    """

    def __init__(self, ledger: KVLedger, session: int, max_batch_steps: int = 256,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ledger = ledger
        self.session = session
        self.max_batch_steps = max_batch_steps
        self.clock = clock
        self.seq = 0  # the last step made
        self.acked_seq = 0  # the last step the replica acknowledged
        self.unacked: deque[LogEntry] = deque()
        self.resync: Resync | None = None  # a snapshot sent, not yet acknowledged
        self.want_resync = False
        self._ends: list[Op] = []
        self._digest = ledger.digest()  # the ledger's after step `seq`

    # ---- the engine's side ----------------------------------------------------------------------------
    def apply(self, ops: list[Op]) -> OpResults:
        answer, compact = record(self.ledger, ops)
        if answer.error:
            raise RuntimeError(f"KV ledger refused an op: {answer.error}")
        self._push(self._ends + compact)
        self._ends = []
        return answer

    def defer(self, op: Op) -> list[int]:
        """A thread or request end (or an answer's fork): applied now, sent with the next step."""
        answer = apply(self.ledger, [op])
        if answer.error:
            raise RuntimeError(f"KV ledger refused an op: {answer.error}")
        self._ends.append(op)
        return answer.freed

    def flush(self) -> None:
        """The deferred ops as a step of their own (the engine is idle)."""
        if self._ends:
            self._push(self._ends)
            self._ends = []

    def _push(self, ops: list[Op]) -> None:
        self.seq += 1
        self._digest = self.ledger.digest()
        self.unacked.append(LogEntry(self.seq, ops, self._digest, self.clock()))

    # ---- the sender's side ----------------------------------------------------------------------------
    def lag(self) -> tuple[int, float]:
        """(steps the replica has not acknowledged, seconds since the oldest of them was applied)."""
        oldest = self.resync.at if self.resync is not None else self.unacked[0].at if self.unacked else None
        return self.seq - self.acked_seq, 0.0 if oldest is None else self.clock() - oldest

    def batch(self) -> LogBatch | None:
        """What to send now: a snapshot if one is wanted or unacknowledged, then the unacknowledged
        steps (at most `max_batch_steps`); None when the replica has everything."""
        if self.want_resync:
            self._snapshot()
        if not self.unacked and self.resync is None:
            return None
        return LogBatch(self.session, list(islice(self.unacked, self.max_batch_steps)), self.resync)

    def probe(self) -> LogBatch:
        """An empty batch: its ack tells whether the replica still matches (sent when idle)."""
        return self.batch() or LogBatch(self.session, [])

    def _snapshot(self) -> None:
        """Replace every unacknowledged step (and the deferred ends) by the ledger as it is now."""
        at = self.resync.at if self.resync is not None else self.unacked[0].at if self.unacked else self.clock()
        self.resync = Resync(self.seq, self.ledger.snapshot(), at)
        self.unacked.clear()
        self._ends = []  # applied to the ledger: they are in the snapshot
        self._digest = self.ledger.digest()
        self.want_resync = False

    def acked(self, ack: Ack) -> list[float]:
        """Take the replica's answer; returns the lag (seconds) of every step it acknowledged."""
        now = self.clock()
        lags: list[float] = []
        if self.resync is not None and ack.applied >= self.resync.seq and not ack.resync:
            lags.append(now - self.resync.at)
            self.resync = None
        while self.unacked and self.unacked[0].seq <= ack.applied:
            lags.append(now - self.unacked.popleft().at)
        if ack.applied <= self.seq:
            self.acked_seq = ack.applied
        if ack.resync or ack.applied > self.seq or (ack.applied == self.seq and ack.digest != self._digest):
            self.want_resync = True
        elif ack.applied < self.seq and self.resync is None and not (
                self.unacked and self.unacked[0].seq == ack.applied + 1):
            self.want_resync = True  # the replica lost steps this log no longer holds
        return lags

    def forget(self) -> None:
        """The replica was lost (the worker registered again): the next batch is a snapshot."""
        self.want_resync = True
