"""The step's KV slots: every planned token gets its slot from the ledger in ONE call, and the prefix
cache takes its part there (a root starting on cached blocks; a prompt just written named).

Data flow, one step: the scheduler plans `Work` (`Engine._schedule`); `_allocate` turns it into ledger
ops in plan order (a new root's [Start, Reuse], a new child's [Fork], maybe its finished parent's
[Finish], each thread's [Append]), applies them with one `kv.apply`, and hands the slots to the device's
context table (`push`; `fork` for a new child, `reuse` for a root's cached prefix), where the input
builder takes them. After the forward, `_name_prompts` names the full blocks of the prompts the step
completed (docs/design.md, "Prefix index").

`SlotAllocation` holds the `Engine`'s own methods (a mixin over the engine's state, not used alone), as
`TokenResults` does (docs/design.md, "Parts of the engine").
"""
from __future__ import annotations

from apar.engine.events import FinishReason
from apar.engine.kv.ledger import ThreadRef
from apar.engine.kv.ops import Append, Finish, Fork, Name, Op, Reuse, Start
from apar.engine.results import EngineOutput
from apar.engine.scheduler import Work
from apar.engine.sequence import Request, Thread


class SlotAllocation:
    """The step's ledger ops and the context table's new slots (the `Engine` methods)."""

    def _allocate(self, work: list[Work], result: EngineOutput) -> list[Work]:
        """Give every planned token a slot in ONE ledger call, in plan order: a new root's start, a new
        child's fork (after its parent's [Fork] got its slot), the append, and for a finished thread
        recomputed for its children, its end once its last such child is forked. (A new answer root is
        forked when it is created, see `_open_answers`; after a preemption it is forked here.) New roots
        start first, so that no allocation of the step evicts a cached block one of them reuses."""
        starts: list[Op] = []
        ops: list[Op] = []
        new_threads: dict[int, Thread] = {}
        for w in work:
            req, t = w.request, w.thread
            ref = ThreadRef(req.id, t.id)
            if not t.in_ledger and id(t) not in new_threads:
                if t.parent is None:
                    starts += self._start_root(req, ref)
                else:
                    parent = t.parent
                    ops.append(Fork(ThreadRef(req.id, parent.id), ref))
                    if not parent.running and t is parent.last_reader:
                        ops.append(Finish(ThreadRef(req.id, parent.id)))  # its last reader is forked
                new_threads[id(t)] = t
            if w.n:
                ops.append(Append(ref, w.tokens))
        if not starts and not ops:
            return []
        # raises when the ops cannot be handed over (the KV manager is away past the lag bound); then
        # nothing was applied, and no thread may count as known to the ledger before it is
        answer = self.kv.apply(starts + ops)
        for t in new_threads.values():
            t.in_ledger = True
            if t.parent is not None and not t.parent.running and t is t.parent.last_reader:
                t.parent.recompute.to = 0
        bs = self.config.block_size
        failed: set[str] = set()
        appends = iter(answer.appends)
        for w in work:
            slots = next(appends) if w.n else []  # (a draft only follows kv tokens: n > 0)
            if w.request.id in failed:
                continue
            if slots is None:
                failed.add(w.request.id)
                w.request.error = "the KV cache is full"
                result.events.extend(self._end_request(w.request, FinishReason.LENGTH))
                continue
            t = w.thread
            if new_threads.pop(id(t), None) is not None:
                if t.parent is not None:  # the parent's context up to its [Fork]
                    self.runner.contexts.fork(t.parent, t)
                elif t.recompute.reused:  # a root's cached prefix
                    blocks = self.ledger.context_blocks(ThreadRef(w.request.id, t.id))[: t.recompute.reused]
                    self.runner.contexts.reuse(t, [b * bs + o for b in blocks for o in range(bs)])
            self.runner.contexts.push(t, [b * bs + o for b, o in slots])
        return [w for w in work if w.request.id not in failed and w.n]

    # ---- prefix cache ------------------------------------------------------------------------------
    def _start_root(self, req: Request, ref: ThreadRef) -> list[Op]:
        """A root's start in the ledger, on its cached prefix. The first start is the request's cache
        hit (`cached_tokens`); one after a preemption reads its own cached blocks back."""
        root = req.root
        if self.config.prefix_cache and not req.usage.preemptions:
            req.usage.cached_tokens = root.recompute.reused * self.config.block_size
            self.prefix_queried_tokens += len(req.prompt)
            self.prefix_hit_tokens += req.usage.cached_tokens
        if not root.recompute.reused:
            return [Start(ref)]
        return [Start(ref), Reuse(ref, tuple(req.prompt_names[: root.recompute.reused]))]

    def _name_prompts(self, prefilled: list[Work]) -> None:
        """Roots whose prompt the step just wrote: the full blocks they wrote get their names (those past
        the cached prefix), so that later prompts can reuse them."""
        for w in prefilled:
            t = w.thread
            names = w.request.prompt_names[t.recompute.reused :]
            if names:
                self.kv.defer(Name(ThreadRef(w.request.id, t.id), t.recompute.reused, tuple(names)))
