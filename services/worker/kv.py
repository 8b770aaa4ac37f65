"""Cluster mode's link from the engine to the KV ledger: `RemoteKV`, the same interface as the core's
`apar.engine.kv.local.LocalKV` (one `apply` of ordered ops per step, thread ends deferred). It applies
the ops locally first and streams them to the KV manager, which keeps a replica; the engine never waits
for the manager's answer.

The manager's authority under this rule. The worker's ledger is the truth for its own pool: every
allocation of a block of that pool is made by the worker, the pool's single owner, by the ledger's
deterministic rule, and the slots the engine writes come from it at once. The manager's copy is a
replica, for the router's usage view, the cluster-wide picture, and recovery when the manager restarts;
it replays the worker's steps by the same rule and never allocates for a worker. When the two disagree
(a digest that differs, an op the replica refuses, steps the replica lost), the worker wins: it sends
a snapshot of its ledger and the replica is replaced wholesale. (An ack means the replica holds the
steps; Redis holds them a round later, so a manager killed in between restarts with steps lost, and
the worker's next message ends in a resync.) So no block can be lost or given to two
threads by the replication: pools are disjoint, each has one writer, and a replica that strays is
overwritten rather than obeyed. What the manager still decides is liveness: a worker that stops
heartbeating is reclaimed (its replica dropped); if it comes back, it registers again and resyncs.
"""
from __future__ import annotations

import logging
import threading
import time

from apar.engine.kv.ledger import KVLedger
from apar.engine.kv.ops import Op
from apar.engine.kv.step import OpResults
from services.kvmanager.replication import ReplicaUnavailable, ReplicationLog, WorkerFenced, WorkerForgotten
from services.repeating import RepeatingWarning

log = logging.getLogger(__name__)


MANAGER_UNAVAILABLE = "the KV manager is unavailable"  # the error of the requests its outage ends


class KVManagerUnavailable(RuntimeError):
    """The KV manager stayed behind the lag bound for `wait_s`: the step was not applied."""


class RemoteKV:
    """Cluster mode: the local ledger is replicated at the KV manager by a sender thread.

    `apply` applies a step's ops to the local ledger (the engine has its slots at once) and queues the
    step, compact (`ops.record`), numbered, with its digest (`replication.StepLog`); it never waits for
    the manager, except for backpressure: while the replica lags more than `max_lag_steps` steps or
    `max_lag_s` seconds, `apply` waits for it to catch up, and raises KVManagerUnavailable after
    `wait_s`, having applied nothing (the engine loop then ends the step's requests with
    MANAGER_UNAVAILABLE; their ends go out later). Until the replica is back within the bound,
    `unavailable` is set (the engine loop admits nothing meanwhile) and every `apply` raises at once.
    While the manager cannot be reached, the sender says once when the replica falls past the bound.

    The sender sends whatever is unacknowledged as one batch, at most every `send_every_s` (so a busy
    worker sends several steps per message), one batch in flight; an ack drops the steps it covers. It
    resends after a lost connection (the manager skips duplicates), registers again when the manager
    forgot this worker, and sends a snapshot instead of steps when the replica asks for one or cannot
    go on. Idle for `probe_every_s`, it sends an empty batch, whose ack checks the replica's digest.
    When it registers again and another live process holds the worker id (this one was reaped, and a
    replacement took the id), this process is fenced: it sends nothing more, every `apply` raises at
    once, and `on_fenced(reason)` tells the worker to stop.
    `on_round_trip(seconds)` (the worker's metrics) hears every answered batch; `on_lag(seconds)`, when
    set, every acknowledged step's lag.
    """

    def __init__(self, ledger: KVLedger, client, *, max_lag_steps: int = 4096, max_lag_s: float = 5.0,
                 wait_s: float = 10.0, send_every_s: float = 0.025, probe_every_s: float = 5.0,
                 max_batch_steps: int = 256) -> None:
        self.ledger = ledger
        self.client = client  # KVManagerClient (gRPC) or the in-process manager's client
        self.max_lag_steps, self.max_lag_s, self.wait_s = max_lag_steps, max_lag_s, wait_s
        self.send_every_s, self.probe_every_s = send_every_s, probe_every_s
        self.outbox = ReplicationLog(ledger, client.session, max_batch_steps)
        self.on_round_trip = None  # Callable[[float], None]: each answered batch's round trip, in seconds
        self.on_lag = None  # Callable[[float], None]: each acknowledged step's lag, in seconds
        self.blocked_s = 0.0  # time the engine spent waiting on the lag bound
        self.unavailable = False  # past the bound for `wait_s`: steps fail at once until it catches up
        self.fenced: str | None = None  # why this process may no longer replicate its id's ledger
        self.on_fenced = None  # Callable[[str], None]: the worker stops
        self._cv = threading.Condition()  # guards `outbox` (and so the ledger against a snapshot)
        self._closed = False
        self._idle = False  # the sender waits for a step: wake it
        self._outage = RepeatingWarning(log)  # one line when the manager goes away, one when it is back
        self._past_bound = False  # said that the replica fell past the lag bound (once per outage)
        self._sender = threading.Thread(target=self._send_loop, name="apar-kv-sender", daemon=True)
        self._sender.start()

    # ---- the engine's thread ------------------------------------------------------------------------
    def apply(self, ops: list[Op]) -> OpResults:
        with self._cv:
            self._within_lag()
            answer = self.outbox.apply(ops)
            if self._idle:
                self._cv.notify_all()
        return answer

    def defer(self, op: Op) -> list[int]:
        with self._cv:
            return self.outbox.defer(op)

    def flush(self) -> None:
        """The deferred ends go out as a step of their own (the engine is idle); does not wait."""
        with self._cv:
            self.outbox.flush()
            self._cv.notify_all()

    def _within_lag(self) -> None:
        """Return once the replica is within the lag bound; raise KVManagerUnavailable after `wait_s`
        past it, and from then on at once, without waiting, until the replica is back within it."""
        if self.fenced is not None:
            raise KVManagerUnavailable(self.fenced)
        if self._within_bound():
            return
        steps, seconds = self.outbox.lag()
        if self.unavailable:
            raise KVManagerUnavailable(f"the KV manager is still {steps} steps and {seconds:.1f} s behind")
        t0 = time.monotonic()
        deadline = t0 + self.wait_s
        while steps > self.max_lag_steps or seconds > self.max_lag_s:
            left = deadline - time.monotonic()
            if left <= 0:
                self.blocked_s += time.monotonic() - t0
                self.unavailable = True
                raise KVManagerUnavailable(f"the KV manager is {steps} steps and {seconds:.1f} s behind "
                                           f"this worker after {self.wait_s:g} s")
            self._cv.wait(min(left, 0.05))
            steps, seconds = self.outbox.lag()
        self.blocked_s += time.monotonic() - t0

    def _within_bound(self) -> bool:
        """Whether the replica is within the lag bound (and if it just came back, say so once)."""
        steps, seconds = self.outbox.lag()
        if steps > self.max_lag_steps or seconds > self.max_lag_s:
            return False
        if self.unavailable:
            self.unavailable = False
            log.warning("the KV manager caught up with this worker: its steps go on")
        return True

    # ---- for tests and shutdown ---------------------------------------------------------------------
    def drain(self, timeout: float = 10.0) -> None:
        """Flush, then wait until the manager acknowledged every step; TimeoutError if it did not."""
        deadline = time.monotonic() + timeout
        with self._cv:
            self.outbox.flush()
            self._cv.notify_all()
            while self.outbox.unacked or self.outbox.resync is not None or self.outbox.want_resync:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"the KV manager did not acknowledge {len(self.outbox.unacked)} steps")
                self._cv.wait(min(left, 0.05))

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._sender.join(timeout=5)

    # ---- the sender's thread ------------------------------------------------------------------------
    def _send_loop(self) -> None:
        backoff, last_send = 0.05, 0.0
        while True:
            batch = self._next_batch(last_send)
            if batch is None:
                return
            last_send = time.monotonic()
            try:
                ack = self.client.send(batch)
            except WorkerForgotten:
                self._register_again()
                continue
            except ReplicaUnavailable as exc:
                self._outage.failed("send", "unavailable", "KV manager unavailable (%s); sending again, backing off "
                                    "up to 1 s", exc)
                self._say_past_bound()
                time.sleep(backoff)
                backoff = min(1.0, backoff * 2)
                continue
            except Exception:  # refused (a bug on one side): the replica is replaced by a snapshot
                if self.client.closed:
                    return
                log.exception("the KV manager refused a batch; resyncing")
                with self._cv:
                    self.outbox.want_resync = True
                time.sleep(backoff)
                backoff = min(1.0, backoff * 2)
                continue
            backoff = 0.05
            self._outage.ok("send", "the KV manager acknowledges steps again")
            if self.on_round_trip is not None:
                self.on_round_trip(time.monotonic() - last_send)
            with self._cv:
                self._past_bound = False
                lags = self.outbox.acked(ack)
                if self.unavailable:
                    self._within_bound()
                if self.outbox.want_resync:
                    log.warning("the KV manager's replica of this worker needs a resync (acked step %d of %d)",
                                ack.applied, self.outbox.seq)
                self._cv.notify_all()
            if self.on_lag is not None:
                for lag in lags:
                    self.on_lag(lag)

    def _say_past_bound(self) -> None:
        """Once per outage, when the unreachable manager's replica falls past the lag bound: from now on a
        step waits for it (at most `wait_s`), then its requests end."""
        with self._cv:
            steps, seconds = self.outbox.lag()
            if self._past_bound or (steps <= self.max_lag_steps and seconds <= self.max_lag_s):
                return
            self._past_bound = True
        log.warning("the KV manager's replica of this worker is %d steps and %.1f s behind, past the lag bound: "
                    "a step waits for it at most %g s, then its requests end", steps, seconds, self.wait_s)

    def _next_batch(self, last_send: float):
        """Wait for something to send and for the send interval; None once closed."""
        with self._cv:
            while True:
                if self._closed or self.client.closed or self.fenced:  # the worker is shutting down
                    return None
                if self.client.forgotten:  # the heartbeat found this worker forgotten, maybe while idle
                    self._cv.release()
                    try:
                        self._register_again()
                    finally:
                        self._cv.acquire()
                wait = last_send + self.send_every_s - time.monotonic()
                if wait > 0:
                    self._cv.wait(wait)
                    continue
                batch = self.outbox.batch()
                if batch is None and time.monotonic() - last_send >= self.probe_every_s:
                    batch = self.outbox.probe()
                if batch is not None:
                    return batch
                self._idle = True  # until a step comes; now and then, to notice a forgotten registration
                self._cv.wait(0.5)
                self._idle = False

    def _register_again(self) -> None:
        """The manager holds no replica of this worker (it expired, or Redis lost it): register again and
        send a snapshot of the ledger first."""
        try:
            self.client.register()
        except WorkerFenced as exc:
            self._fence(f"another process holds this worker's id at the KV manager ({exc})")
            return
        except Exception as exc:  # the manager is away too: the next batch tries again
            log.warning("registering again with the KV manager failed: %s", exc)
            time.sleep(0.2)
            return
        log.warning("the KV manager had forgotten this worker: registered again, resyncing its ledger")
        with self._cv:
            self.outbox.forget()

    def _fence(self, reason: str) -> None:
        log.error("%s: this worker stops replicating its ledger and serving", reason)
        with self._cv:
            self.fenced = reason
            self.unavailable = True  # for good: nothing more is admitted
            self._cv.notify_all()
        if self.on_fenced is not None:
            self.on_fenced(reason)
