"""How the engine talks to the KV ledger: one `apply` of ordered ops per step, thread ends deferred.

The engine always keeps a local `KVLedger`, its own pool's ledger (admission reads it). `LocalKV` is that
ledger alone (embedded mode without a manager): deferred ops apply at once, so a finished thread's
blocks are free in the step it ends. In cluster mode the worker passes a `RemoteKV`
(services/worker/kv.py) with the same three methods, which also replicates the ops at the KV manager.
"""
from __future__ import annotations

from apar.engine.kv.ledger import KVLedger
from apar.engine.kv.ops import Op
from apar.engine.kv.step import OpResults, apply


class LocalKV:
    unavailable = False  # (a ledger in this process is never behind: see RemoteKV)
    wait_s = 0.0

    def __init__(self, ledger: KVLedger) -> None:
        self.ledger = ledger

    def apply(self, ops: list[Op]) -> OpResults:
        answer = apply(self.ledger, ops)
        if answer.error:
            raise RuntimeError(f"KV ledger refused an op: {answer.error}")
        return answer

    def defer(self, op: Op) -> list[int]:
        """A thread or request end; returns the block ids it freed locally."""
        return self.apply([op]).freed

    def flush(self) -> None:
        """Send what was deferred (nothing to send for a local ledger)."""
