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

    Every op is applied locally first (so the engine sees its answer at once), then sent: thread ends
    wait for the next step and travel in its message, so a step is ONE `Step` call. Batches keep their
    sequence number until the manager acknowledges them, so a resend after a lost answer is not applied
    twice; while the manager is away the step blocks and retries for `retry_s`, then raises (the engine
    loop fails the running requests cleanly; their releases go out with the next batch).
    """

    def __init__(self, ledger: KVLedger, client, retry_s: float = 10.0) -> None:
        self.ledger = ledger
        self.client = client  # services.worker.kvclient.KVManagerClient
        self.retry_s = retry_s
        self._deferred: list[Op] = []
        self._batches: list[tuple[int, list[Op]]] = []
        self._seq = 0

    def apply(self, ops: list[Op]) -> StepAnswer:
        answer = apply(self.ledger, ops)
        if answer.error:
            raise RuntimeError(f"KV ledger refused an op: {answer.error}")
        self._queue(self._deferred + ops)
        self._deferred = []
        remote = self._send()
        remote = getattr(remote, "answer", remote)  # the in-process manager answers a StepResult
        if remote is not None and remote.appends != answer.appends:
            raise RuntimeError("the KV manager's ledger and this worker's disagree on the step's slots")
        return answer

    def defer(self, op: Op) -> list[int]:
        answer = apply(self.ledger, [op])
        if answer.error:
            raise RuntimeError(f"KV ledger refused an op: {answer.error}")
        self._deferred.append(op)
        return answer.freed

    def flush(self) -> None:
        if self._deferred:
            self._queue(self._deferred)
            self._deferred = []
        if self._batches:
            self._send()

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

    def _queue(self, ops: list[Op]) -> None:
        self._seq += 1
        self._batches.append((self._seq, ops))

    def _send(self):
        """Send the queued batches in order; returns the manager's answer to the last one."""
        import time

        deadline = time.monotonic() + self.retry_s
        resp = None
        while self._batches:
            seq, ops = self._batches[0]
            try:
                resp = self.client.step(seq, ops)
            except ConnectionError:
                if time.monotonic() > deadline:
                    raise KVManagerUnavailable(f"the KV manager did not answer step {seq} for {self.retry_s:.0f} s")
                time.sleep(0.1)
                continue
            self._batches.pop(0)
        return resp
