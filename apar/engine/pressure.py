"""Memory pressure: when a step's new blocks do not fit, preempt the most recently admitted request
(docs/design.md, "Admission and preemption"). Forks are refused before this, in forks.py.

`Pressure` is a part the engine holds (`Engine.pressure`): it reads the ledger's free count, moves
requests back to the scheduler's queue and defers their release to the engine's KV (`kv`, set again when
the engine's KV is replaced).
"""
from __future__ import annotations

from apar.engine.kv.ledger import KVLedger
from apar.engine.kv.local import LocalKV
from apar.engine.kv.ops import Release
from apar.engine.scheduler import Scheduler, Work
from apar.engine.sequence import Request


class Pressure:
    """Making room for a step, with the preemption counter."""

    def __init__(self, scheduler: Scheduler, ledger: KVLedger, kv: LocalKV):
        self.scheduler = scheduler
        self.ledger = ledger
        self.kv = kv  # LocalKV, or the engine's replacement (same `defer`)
        self.preemptions = 0

    def make_room(self, work: list[Work], need: dict[str, int]) -> tuple[list[Work], Request | None]:
        """While the step's new blocks (`need`, per request) exceed the free ones, preempt the most
        recently admitted request. A request left alone that still does not fit has filled the pool: it
        is returned (the engine ends it with `length`), its work dropped. The free count and the need
        are read again after each preemption: what a victim frees is its own blocks and the named prompt
        blocks only it read, which stay cached (and count as free); a root of the step that reuses one
        of those takes it from the free count now, where it shared it before."""
        free = self.ledger.num_free
        running = self.scheduler.running
        while sum(need.values()) > free and len(running) > 1:
            victim = running[-1]
            self.preempt(victim)  # its release is applied to the ledger at once
            work = [w for w in work if w.request is not victim]
            need = self.scheduler.blocks_needed(work)
            free = self.ledger.num_free
        full = None
        if sum(need.values()) > free:
            full = running[0]
            work = [w for w in work if w.request is not full]
        return work, full

    def preempt(self, req: Request) -> None:
        """Free every block of a running request at once and put it back at the head of the queue; its
        tokens stay, its KV is recomputed when it is admitted again (parents before children)."""
        self.scheduler.preempt(req)
        if not req.root.in_ledger:  # admitted in this step, nothing computed yet: simply not admitted
            # planning may have marked its recompute as covered: after an earlier preemption it still
            # has everything to recompute when it is admitted again
            req.recomputing = req.usage.preemptions > 0
            return
        self.kv.defer(Release(req.id))
        for t in req.threads:
            t.forget_kv()
        for t in reversed(req.threads):  # children before parents: `live` is known below each thread
            if not t.running:
                t.recompute.to = max((c.fork_offset for c in t.children if c.live), default=0)
        req.recomputing = True
        req.usage.preemptions += 1
        self.preemptions += 1
