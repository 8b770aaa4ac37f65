"""Memory pressure: when a step's new blocks do not fit, preempt the most recently admitted request
(docs/design.md, "Admission and preemption"). Forks are refused before this, in forks.py.

`Pressure` is a part of `Engine` (a mixin over the engine's state), not used alone.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from apar.engine.events import FinishReason
from apar.engine.kv.ops import Release
from apar.engine.scheduler import Work
from apar.engine.sequence import Request

if TYPE_CHECKING:
    from apar.engine.results import StepResult


class Pressure:
    """Making room for a step (the `Engine` methods)."""

    def _make_room(self, work: list[Work], need: dict[str, int], result: StepResult) -> list[Work]:
        """While the step's new blocks (`need`, per request) exceed the free ones, preempt the most
        recently admitted request. A request left alone that still does not fit has filled the pool: it
        ends with `length`. The free count is read again after each preemption: what a victim frees is
        its own blocks and the named prompt blocks only it read, which stay cached (and count as free)."""
        free = self.ledger.num_free
        running = self.scheduler.running
        gone: set[str] = set()
        while sum(need.values()) > free and len(running) > 1:
            victim = running[-1]
            need.pop(victim.id, None)
            self._preempt(victim)  # its release is applied to the ledger at once
            free = self.ledger.num_free
            gone.add(victim.id)
        if sum(need.values()) > free:
            req = running[0]
            req.error = "the KV cache is full"
            result.events.extend(self._end_request(req, FinishReason.LENGTH))
            gone.add(req.id)
        return [w for w in work if w.request.id not in gone] if gone else work

    def _preempt(self, req: Request) -> None:
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
                t.recompute_to = max((c.fork_offset for c in t.children if c.live), default=0)
        req.recomputing = True
        req.usage.preemptions += 1
        self.preemptions += 1
