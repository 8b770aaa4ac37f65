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
