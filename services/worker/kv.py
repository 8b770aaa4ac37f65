"""How the engine talks to the KV ledger: one `apply` of ordered ops per step, thread ends deferred.

The engine always keeps a local `KVLedger` (its view of its own pool; admission reads it). `LocalKV`
is that ledger alone (embedded mode): deferred ops apply at once, so a finished thread's blocks are free
in the step it ends. A remote backend (cluster mode) applies the same ops locally and sends them to the
KV manager, the thread ends with the next step's message: one message per step, and both ledgers see
the same ops in the same order, so they agree block for block.
"""
from __future__ import annotations

from services.kvmanager.ledger import KVLedger
from services.kvmanager.ops import Op, StepAnswer, apply


class LocalKV:
    def __init__(self, ledger: KVLedger) -> None:
        self.ledger = ledger

    def apply(self, ops: list[Op]) -> StepAnswer:
        answer = apply(self.ledger, ops)
        if answer.error:
            raise RuntimeError(f"KV ledger refused an op: {answer.error}")
        return answer

    def defer(self, op: Op) -> list[int]:
        """A thread or request end; returns the block ids it freed locally."""
        return self.apply([op]).freed

    def flush(self) -> None:
        """Send what was deferred (nothing to send for a local ledger)."""


class KVManagerUnavailable(RuntimeError):
    """The KV manager did not answer a step within the retry window."""


class RemoteKV:
    """Cluster mode: the local ledger mirrors the KV manager's ledger of this worker's pool.

    Every op is applied locally first (so the engine has its slots at once), then sent: thread ends wait
    for the next step and travel in its message, so a step is ONE `Step` call. The call runs on a sender
    thread while the engine computes the step; the next step first waits for it and checks that the
    manager gave the same slots (one step in flight at most). Batches keep their sequence number until
    acknowledged, so a resend after a lost answer is not applied twice. While the manager is away the
    sender retries for `retry_s`, then the next step raises (the engine loop fails the running requests
    cleanly; their releases go out with a later batch). `on_round_trip(seconds)`, when set (the worker's
    metrics set it), hears the time of every answered `Step` call.
    """

    def __init__(self, ledger: KVLedger, client, retry_s: float = 10.0) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.ledger = ledger
        self.client = client  # KVManagerClient (gRPC) or the in-process manager's client
        self.retry_s = retry_s
        self._deferred: list[Op] = []
        self._batches: list[tuple[int, list[Op]]] = []  # touched by the sender only while it runs
        self._seq = 0
        self._sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="apar-kv-sender")
        self._inflight = None
        self.on_round_trip = None  # Callable[[float], None]: each answered Step call's round trip, in seconds

    def apply(self, ops: list[Op]) -> StepAnswer:
        self._wait()  # the previous step's message is acknowledged and agreed before anything new
        answer = apply(self.ledger, ops)
        if answer.error:
            raise RuntimeError(f"KV ledger refused an op: {answer.error}")
        self._queue(self._deferred + ops)
        self._deferred = []
        self._inflight = self._sender.submit(self._send, answer.appends)
        return answer

    def defer(self, op: Op) -> list[int]:
        answer = apply(self.ledger, [op])
        if answer.error:
            raise RuntimeError(f"KV ledger refused an op: {answer.error}")
        self._deferred.append(op)
        return answer.freed

    def flush(self) -> None:
        self._wait()
        if self._deferred:
            self._queue(self._deferred)
            self._deferred = []
        if self._batches:
            self._send(None)

    def recover(self) -> bool:
        """After a failed step, once every request was ended: when the manager forgot this worker,
        register again and start both ledgers afresh (so they agree block for block). True if done."""
        from services.worker.kvclient import WorkerForgotten

        try:
            self.flush()
            return False
        except WorkerForgotten:
            pass
        except (ConnectionError, KVManagerUnavailable):
            return False
        if self.client.register():
            raise RuntimeError("the KV manager restored a ledger it had reported forgotten")
        self.ledger.reset()
        self._deferred, self._batches = [], []
        return True

    def _wait(self) -> None:
        if self._inflight is not None:
            fut, self._inflight = self._inflight, None
            fut.result()

    def _queue(self, ops: list[Op]) -> None:
        self._seq += 1
        self._batches.append((self._seq, ops))

    def _send(self, expected) -> None:
        """Send the queued batches in order; check the last answer's slots against `expected`."""
        import time

        deadline = time.monotonic() + self.retry_s
        resp = None
        while self._batches:
            seq, ops = self._batches[0]
            t0 = time.perf_counter()
            try:
                resp = self.client.step(seq, ops)
            except ConnectionError:
                if time.monotonic() > deadline:
                    raise KVManagerUnavailable(f"the KV manager did not answer step {seq} for {self.retry_s:.0f} s")
                time.sleep(0.1)
                continue
            if self.on_round_trip is not None:
                self.on_round_trip(time.perf_counter() - t0)
            self._batches.pop(0)
        resp = getattr(resp, "answer", resp)  # the in-process manager answers a StepResult
        if expected is not None and resp is not None and resp.appends != expected:
            raise RuntimeError("the KV manager's ledger and this worker's disagree on the step's slots")
