"""Which tokens run in the next step, admission on free blocks, and the order of preemption.

One rule covers prefill, chunked prefill, decode and recompute: each thread's `computed` catches up with
its `target` (docs/design.md, "Admission and preemption"). Every running thread of a decoding request
with one pending token (its last sampled one, or a new child's `[Child]`) runs each step; the rest of
`max_batch_tokens` goes to requests that are catching up, oldest first: a new request's prompt, or a
preempted request's threads.
A root that starts in the ledger skips its prompt's cached prefix (the prefix cache): those tokens are
computed already.

A request catching up is walked as a tree, parents before children: a parent's chunk never runs past a
child's `[Fork]` before that child is forked (so the ledger shares exactly the blocks up to the `[Fork]`
and seals the parent's block there, as when the fork first happened). A preempted request recomputes
all but the last token of each running thread; that last token then runs as an ordinary decode step,
every thread of the request together, so its stream goes on exactly as if nothing had happened.

Admission is on what is free, never on a reservation: the oldest waiting request is admitted when the
free blocks (cached ones included: they are evicted when needed), less what this step's decoding threads
are about to open, cover what it needs to start (its prompt, or after a preemption the KV it must
recompute, less the blocks of its root's cached prefix that a running request reads, or that a request
admitted before it takes: shared, they take nothing from the free list) plus a watermark: a share of the
pool, or one block per running request if more (what they open over the next block's worth of steps).
With nothing running the head of the queue is admitted whatever it needs, so the queue can never stall.
A request whose prompt can never fit is rejected.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from apar.engine.errors import CapacityError
from apar.engine.kv.ledger import KVLedger, ThreadRef
from apar.engine.sequence import Request, Thread


# A running request opens about one block every `block_size` steps (an AR one exactly; an APAR one opens
# more with its threads but frees its finished children's at once). Admission keeps one block per running
# request free besides the watermark: a request admitted into memory the others are about to need would
# only be preempted again, its prefill wasted (docs/benchmarks.md, "Admission reserve", has the
# measurement that chose it).
GROWTH_BLOCKS_PER_REQUEST = 1


@dataclass(slots=True)
class Work:
    """One thread's share of a step: its next `n` kv tokens (0: only fork it in the ledger), then for a
    decoding thread maybe a `draft` of the tokens after them, verified in the step (speculate.py)."""

    request: Request
    thread: Thread
    n: int
    draft: tuple[int, ...] = ()
    # positions the step computes for it: its kv tokens and its draft (set here, read on every hot loop
    # of the step; `dataclasses.replace` gives a Work with another draft)
    tokens: int = field(init=False)

    def __post_init__(self) -> None:
        self.tokens = self.n + len(self.draft)


class Scheduler:
    def __init__(self, ledger: KVLedger, max_batch_tokens: int, admit_watermark: int = 0) -> None:
        self.ledger = ledger
        self.max_batch_tokens = max_batch_tokens
        self.admit_watermark = admit_watermark  # blocks kept free after an admission
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order: the last is the first to preempt

    # ---- admission ---------------------------------------------------------------------------------
    def blocks_to_start(self, req: Request, counted: set[int] | None = None) -> int:
        """Blocks a request takes before it can sample: its prompt (once, whatever its answers), or its
        recompute after a preemption (every thread to its target, one more block per fork for the sealed
        one it shares), less the blocks of its root's cached prefix that take nothing from the free
        list: those a running request reads (shared), and those named in `counted` (cached ones that a
        request admitted before it in the same call takes already; the names it takes are added)."""
        bs = self.ledger.block_size
        shared = self._shared_prefix(req, counted)
        if not req.admitted:
            return -(-len(req.prompt) // bs) - shared
        return sum(-(-t.target // bs) + 1 for t in req.threads if t.target) - 1 - shared

    def _shared_prefix(self, req: Request, counted: set[int] | None) -> int:
        """Of the prompt blocks a root not in the ledger would start on (`reusable`), how many take nothing
        from the free list: all but the cached ones not in `counted` (to which those are added)."""
        if req.root.in_ledger or not req.prompt_names:
            return 0
        names = req.prompt_names[: self.ledger.reusable(req.prompt_names, len(req.prompt))]
        if counted is None:
            return len(names) - self.ledger.cached_among(names)
        taken = self.ledger.cached_names(n for n in names if n not in counted)
        counted.update(taken)
        return len(names) - len(taken)

    def check_fits(self, req: Request) -> None:
        """Reject a request that can never sample its first tokens: its prompt once, then one token per
        answer (with n > 1 each in a block of its own: the prompt's last block is shared, so sealed)."""
        bs, n = self.ledger.block_size, req.params.n
        need = -(-(len(req.prompt) + 1) // bs) if n == 1 else -(-len(req.prompt) // bs) + n
        if need > self.ledger.num_blocks:
            what = f"prompt of {len(req.prompt)} tokens" + (f" and {n} answers" if n > 1 else "")
            raise CapacityError(f"{what} needs {need} KV blocks, the pool has {self.ledger.num_blocks}")

    def add(self, req: Request) -> None:
        self.check_fits(req)
        self.waiting.append(req)

    def admit(self, reserve: int = 0) -> list[Request]:
        """Admit waiting requests, oldest first, while the free blocks (less `reserve`, what the running
        requests open in this step) cover each one's start plus the watermark."""
        admitted = []
        free = self.ledger.num_free - reserve
        growth = len(self.running) * GROWTH_BLOCKS_PER_REQUEST
        counted: set[int] = set()  # names of the cached blocks the requests admitted so far take
        while self.waiting:
            req = self.waiting[0]
            taken = set(counted)
            need = self.blocks_to_start(req, taken)
            alone = not (self.running or admitted)  # admitted whatever it needs: it held it before, or
            if not alone and free - need < max(self.admit_watermark, growth):  # it ends with `length`
                break
            free -= need
            counted = taken
            self.waiting.popleft()
            self.running.append(req)
            admitted.append(req)
        return admitted

    def preempt(self, req: Request) -> None:
        """Back to the head of the queue (the engine has freed its blocks)."""
        self.running.remove(req)
        self.waiting.appendleft(req)

    # ---- the step's work ---------------------------------------------------------------------------
    def plan_decode(self) -> list[Work]:
        """Every decoding thread's next token (request, then thread order: a parent feeds its [Fork]
        before its new child feeds the [Child] that reads it)."""
        work: list[Work] = []
        for req in self.running:
            if req.recomputing or req.root.in_prefill:
                continue
            for t in req.threads:
                if t.running and t.pending == 1:
                    work.append(Work(req, t, 1))
        return work

    def plan_catch_up(self, work: list[Work]) -> None:
        """Add catch-up chunks (prompts, recomputes) to `work` within the step's token budget, oldest
        request first."""
        budget = self.max_batch_tokens - sum(w.tokens for w in work)
        for req in self.running:
            if budget <= 0:
                break
            if req.recomputing or req.root.in_prefill:
                if not req.root.in_ledger:
                    self._skip_cached_prefix(req)
                budget = self._catch_up(req, budget, work)

    def _skip_cached_prefix(self, req: Request) -> None:
        """A root about to start in the ledger (admitted, or again after a preemption) starts on the
        longest run of its prompt's named blocks the ledger holds (none without the prefix cache: no
        names): their tokens count as computed. At least one prompt token is left to compute, for the
        logits of the first token. Looked up again each step until the start: allocations may evict."""
        root = req.root
        root.recompute.reused = self.ledger.reusable(req.prompt_names, len(req.prompt))
        root.computed = root.recompute.reused * self.ledger.block_size

    def _catch_up(self, req: Request, budget: int, work: list[Work]) -> int:
        """Chunks of one request's threads, parents before children, within `budget`; returns what is
        left. When the whole tree is covered, a recomputing request decodes from the next step."""
        recompute = req.recomputing

        def goal(t: Thread) -> int:  # a running thread recomputes all but its last token
            return t.target - 1 if recompute and t.running else t.target

        def visit(t: Thread, covered: int) -> bool:
            nonlocal budget
            for child in [c for c in t.children if c.live] + [None]:
                end = goal(t) if child is None else min(child.fork_offset, goal(t))
                if covered < end:
                    n = min(end - covered, budget)
                    if n <= 0:
                        return False
                    work.append(Work(req, t, n))
                    covered += n
                    budget -= n
                    if covered < end:
                        return False
                if child is None or covered < child.fork_offset:
                    break  # its [Fork] is the parent's last token: both run in the decode step
                if not child.in_ledger and goal(child) == 0:
                    work.append(Work(req, child, 0))  # fork it now: the parent writes on past it
                if not visit(child, child.computed):
                    return False
            return True

        if visit(req.root, req.root.computed) and recompute:
            req.recomputing = False
        return budget

    def blocks_needed(self, work: list[Work]) -> dict[str, int]:
        """Blocks each request's work takes off the free list, simulating the ledger's rule exactly: a
        thread fills its last block unless it is sealed (a child read it), then opens fresh ones. A root
        starting on a cached prefix counts the blocks of it that are cached and that no root before it in
        `work` reuses (one a running thread reads is in use already, and shared; the step's roots start
        first, so a cached block two of them reuse comes off the free count once, for the first)."""
        bs = self.ledger.block_size
        room: dict[int, int] = {}
        need: dict[str, int] = {}
        counted: set[int] = set()  # names of the cached blocks that roots in `work` so far reuse
        for w in work:
            t = w.thread
            reused = 0
            if id(t) not in room:
                room[id(t)] = self.ledger.room(ThreadRef(w.request.id, t.id)) if t.in_ledger else 0
                if not t.in_ledger and t.recompute.reused:  # only the cached ones come off the free count
                    names = w.request.prompt_names[: t.recompute.reused]
                    taken = self.ledger.cached_names(n for n in names if n not in counted)
                    counted.update(taken)
                    reused = len(taken)
            if not t.in_ledger and t.parent is not None:
                room[id(t.parent)] = 0  # the fork seals the parent's last block
            m = w.tokens
            extra = max(0, m - room[id(t)])
            opened = -(-extra // bs)
            room[id(t)] = room[id(t)] - m if extra == 0 else opened * bs - extra
            need[w.request.id] = need.get(w.request.id, 0) + opened + reused
        return need

    def remove(self, req: Request) -> None:
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)
