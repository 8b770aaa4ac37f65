"""Which tokens run in the next step, and admission against the KV budget.

One rule covers prefill, chunked prefill and decode: each thread's `computed` catches up with its
`kv_tokens`. Every running thread with one pending token (decode, including a new child's `[Child]`)
runs each step; the rest of `max_batch_tokens` goes to prompt chunks, oldest request first.

Admission is by reservation: a request is admitted only when the free blocks, less what running
requests may still take, cover its worst case (prompt + max_tokens, plus two partly filled blocks per
possible thread). So a running request never meets a full pool, whatever the others do; blocks released
early by finished threads lower what a request holds but not what it reserved. A request whose prompt
alone cannot fit the pool is rejected.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from apar.errors import CapacityError
from services.kvmanager.ledger import KVLedger
from services.worker.sequence import Request, Thread


@dataclass(slots=True)
class Work:
    """One thread's share of a step: its next `n` kv tokens."""

    request: Request
    thread: Thread
    n: int


class Scheduler:
    def __init__(self, ledger: KVLedger, max_batch_tokens: int) -> None:
        self.ledger = ledger
        self.max_batch_tokens = max_batch_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def worst_case_blocks(self, req: Request) -> int:
        bs = self.ledger.block_size
        p = req.params
        threads = 1 if not p.auto_parallel else min(p.max_threads, p.max_tokens // 2 + 1)
        return -(-(len(req.prompt) + p.max_tokens) // bs) + 2 * threads

    def check_fits(self, req: Request) -> None:
        need = -(-(len(req.prompt) + 1) // self.ledger.block_size)
        if need > self.ledger.num_blocks:
            raise CapacityError(
                f"prompt of {len(req.prompt)} tokens needs {need} KV blocks, the pool has {self.ledger.num_blocks}"
            )

    def add(self, req: Request) -> None:
        self.check_fits(req)
        req.reserved_blocks = min(self.worst_case_blocks(req), self.ledger.num_blocks)
        self.waiting.append(req)

    @property
    def outstanding(self) -> int:
        """Blocks running requests reserved but do not hold now."""
        return sum(max(0, r.reserved_blocks - self.ledger.blocks_of(r.id)) for r in self.running)

    def admit(self) -> list[Request]:
        admitted = []
        while self.waiting:
            req = self.waiting[0]
            if self.ledger.num_free - self.outstanding < req.reserved_blocks:
                break
            self.waiting.popleft()
            self.running.append(req)
            admitted.append(req)
        return admitted

    def plan(self) -> list[Work]:
        """This step's work, decode threads first (request, then thread order: a parent feeds its [Fork]
        before its new child feeds the [Child] that reads it)."""
        work: list[Work] = []
        for req in self.running:
            for t in req.threads:
                if t.running and not t.in_prefill and t.pending == 1:
                    work.append(Work(req, t, 1))
        budget = self.max_batch_tokens - len(work)
        for req in self.running:
            root = req.root
            if budget <= 0:
                break
            if root.running and root.in_prefill:
                n = min(root.pending, budget)
                work.append(Work(req, root, n))
                budget -= n
        return work

    def remove(self, req: Request) -> None:
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)
