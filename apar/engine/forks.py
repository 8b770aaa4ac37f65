"""The fork rules: when a thread may emit [Fork], what happens when it may not, and the forks themselves
(docs/design.md, "Fork rules").

Rules applied to a thread's logits before sampling:
  - `[Child]` is never sampled (it is only forced as a child's first token);
  - `[Fork]` is banned after `[Fork]` or `[Child]`, in auto-regressive mode, and when a limit is reached
    (threads per answer, fork depth, fewer than 3 tokens of the answer's budget or of the model's
    context: [Fork], [Child], one more), and while the pool is nearly full (`watermark`).

`ForkRules` is a part the engine holds (`Engine.fork_rules`): it reads the ledger's free count and keeps
the fork counters; the engine applies the tokens and reports the events.
"""
from __future__ import annotations

from typing import Sequence

import torch

from apar.engine.kv.ledger import KVLedger
from apar.engine.replay import ReplayCursor
from apar.engine.sampler import rows_index, sample
from apar.engine.sequence import Request, Thread


def fork_allowed(req: Request, thread: Thread, fork_id: int, child_id: int, max_positions: int,
                 ahead: Sequence[int] = ()) -> bool:
    """Whether the thread may emit [Fork] next; `ahead`: draft tokens taken as already emitted (the row
    after them is being verified, speculate.py), each spending one token of the answer's budget, after
    the thread's own tokens ahead (verified, not yet applied: they are emitted first)."""
    p = req.params
    if not p.auto_parallel:
        return False
    if thread.ahead:
        ahead = [*thread.ahead, *ahead]
    last = ahead[-1] if ahead else thread.kv_tokens[-1]
    n_tokens = len(thread.kv_tokens) + len(ahead)
    next_pos = thread.start_pos + n_tokens  # where the [Fork] would sit
    return (
        last not in (fork_id, child_id)
        and thread.n_prompt < n_tokens  # not the very first token of the answer
        and req.answer_threads[thread.answer] < p.max_threads
        and thread.depth < p.max_depth
        and req.budget_left(thread.answer) - len(ahead) >= 3
        and next_pos + 2 < max_positions  # room for the [Child] and one token of the child
    )


class ForkRules:
    """Fork bans, refusals and forks, with their counters."""

    def __init__(self, fork_id: int | None, child_id: int | None, eos_ids: set[int], max_positions: int,
                 ledger: KVLedger, watermark: int):
        self.fork_id, self.child_id = fork_id, child_id  # None, None: the model cannot fork
        self.eos_ids = eos_ids
        self.max_positions = max_positions
        self.ledger = ledger
        self.watermark = watermark  # blocks: fewer free than this, every fork is refused
        self.forks = 0
        self.by_depth: dict[int, int] = {}  # new child's depth -> forks so far (the metrics read it)
        self.refused = 0  # [Fork]s refused because the pool was nearly full

    def may_fork(self, req: Request, t: Thread, ahead: Sequence[int] = ()) -> bool:
        return fork_allowed(req, t, self.fork_id, self.child_id, self.max_positions, ahead)

    def ban_in_draft_rows(self, req: Request, t: Thread, draft: Sequence[int], rows: torch.Tensor) -> None:
        """The bans of `rows` ([K, V]: the logits after each draft token), row j as if draft[:j + 1] had
        been emitted: [Child] always, [Fork] where a rule says so then, or while the pool is tight."""
        if self.child_id is not None:
            rows[:, self.child_id] = float("-inf")
        if self.fork_id is None:
            return
        tight = self.ledger.num_free < self.watermark
        for j in range(len(draft)):
            if tight or not self.may_fork(req, t, draft[: j + 1]):
                rows[j, self.fork_id] = float("-inf")

    def ban(self, samplers: list[tuple[Request, Thread]], logits: torch.Tensor) -> bool:
        """Ban [Child] in every row ([S, V]) and [Fork] in the rows whose thread may not fork now; returns
        whether the pool is tight (nearly full: every fork refused, each one the model wanted counted)."""
        if self.child_id is not None:
            logits[:, self.child_id] = float("-inf")
        fork_id, child_id, limit = self.fork_id, self.child_id, self.max_positions
        allowed = [fork_allowed(req, t, fork_id, child_id, limit) for req, t in samplers]
        tight = self.ledger.num_free < self.watermark
        if tight:  # memory first: a fork the model wanted is refused, the thread goes on sequentially
            wanted = [i for i, ok in enumerate(allowed) if ok and samplers[i][1].replay is None]
            if wanted:
                top = logits[wanted].argmax(dim=-1).tolist()
                for i, tok in zip(wanted, top):
                    if tok == self.fork_id:
                        self._refused(samplers[i][0])
        no_fork = [i for i, ok in enumerate(allowed) if not ok or tight]
        if no_fork and self.fork_id is not None:
            logits[rows_index(logits, no_fork), self.fork_id] = float("-inf")
        return tight

    def instead_of_fork(self, req: Request, t: Thread, row: torch.Tensor, tight: bool) -> int | None:
        """A [Fork] that may not happen now (memory, or a limit a sibling reached in this step): a
        replayed thread inlines that child and goes on; a sampled one picks again without [Fork]."""
        if t.replay is None:  # row: [V], already without [Fork] where the ban was known before
            row = row.clone()
            row[self.fork_id] = float("-inf")
            if req.params.greedy:
                return int(row.argmax())
            return int(sample(row[None], req.params, req.generator)[0])
        token: int | None = self.fork_id
        while token == self.fork_id:
            if tight:
                self._refused(req)
            t.replay.inline()
            token = t.replay.next_token(self.eos_ids)
        return token

    def _refused(self, req: Request) -> None:
        req.usage.forks_refused += 1
        self.refused += 1

    def fork(self, req: Request, parent: Thread) -> Thread:
        """The child the [Fork] just applied to `parent` starts: its forced [Child] spent and counted. (A
        [Fork] is the last of a verified run, so nothing is ahead of it: the child starts after it.)"""
        if parent.ahead:
            raise RuntimeError(f"thread {parent.id} forks with {len(parent.ahead)} tokens ahead of its [Fork]")
        anchor = len(parent.output_tokens) - 1
        child = Thread(id=len(req.threads), parent=parent, anchor=anchor,
                       start_pos=parent.start_pos + len(parent.kv_tokens), depth=parent.depth + 1,
                       kv_tokens=[self.child_id], answer=parent.answer)
        if parent.replay is not None:
            child.replay = ReplayCursor(parent.replay.child(), self.fork_id)
        req.add_thread(child)
        parent.children.append(child)
        req.usage.forks += 1
        self.forks += 1
        self.by_depth[child.depth] = self.by_depth.get(child.depth, 0) + 1
        req.spend(child.answer)  # the forced [Child]
        return child
