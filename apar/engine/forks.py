"""The fork rules: when a thread may emit [Fork], what happens when it may not, and the forks themselves
(docs/design.md, "Fork rules").

Rules applied to a thread's logits before sampling:
  - `[Child]` is never sampled (it is only forced as a child's first token);
  - `[Fork]` is banned after `[Fork]` or `[Child]`, in auto-regressive mode, and when a limit is reached
    (threads per answer, fork depth, fewer than 3 tokens of the answer's budget or of the model's
    context: [Fork], [Child], one more), and while the pool is nearly full (`fork_watermark`).
A request for `n` answers forks the roots of answers 1..n-1 from its root's prompt (`_open_answers`).

`ForkRules` is a part of `Engine` (a mixin over the engine's state), not used alone.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from apar.engine.events import ThreadStarted
from apar.engine.kv.ledger import ThreadRef
from apar.engine.kv.ops import Fork
from apar.engine.replay import ReplayCursor
from apar.engine.sampler import rows_index, sample
from apar.engine.sequence import Request, Thread

if TYPE_CHECKING:
    from apar.engine.results import StepResult


def fork_allowed(req: Request, thread: Thread, fork_id: int, child_id: int, max_positions: int) -> bool:
    p = req.params
    last = thread.kv_tokens[-1]
    next_pos = thread.start_pos + len(thread.kv_tokens)  # where the [Fork] would sit
    return (
        p.auto_parallel
        and last not in (fork_id, child_id)
        and thread.n_prompt < len(thread.kv_tokens)  # not the very first token of the answer
        and req.answer_threads[thread.answer] < p.max_threads
        and thread.depth < p.max_depth
        and req.budget_left(thread.answer) >= 3
        and next_pos + 2 < max_positions  # room for the [Child] and one token of the child
    )


class ForkRules:
    """Fork bans, refusals and forks (the `Engine` methods)."""

    def _may_fork(self, req: Request, t: Thread) -> bool:
        return fork_allowed(req, t, self.fork_id, self.child_id, self.runner.max_positions)

    def _ban_forks(self, samplers: list[tuple[Request, Thread]], logits: torch.Tensor) -> bool:
        """Ban [Child] in every row ([S, V]) and [Fork] in the rows whose thread may not fork now; returns
        whether the pool is tight (nearly full: every fork refused, each one the model wanted counted)."""
        if self.child_id is not None:
            logits[:, self.child_id] = float("-inf")
        allowed = [self._may_fork(req, t) for req, t in samplers]
        tight = self.ledger.num_free < self.fork_watermark
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

    def _instead_of_fork(self, req: Request, t: Thread, row: torch.Tensor, tight: bool) -> int | None:
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

    def _open_answers(self, req: Request, token: int, row: torch.Tensor, result: StepResult) -> None:
        """The root's prefill is done and it sampled `token` from `row` ([V], bans applied): draw the
        first tokens of answers 1..n-1 from the same row (after the root's draw, in answer order), fork
        their roots from the root's prompt, then apply every answer's first token.

        The forks reach the ledger before the root's first token gets its slot (before the root can
        end, too), so the answers share exactly the prompt's blocks, its last one sealed."""
        root = req.root
        extra = req.params.n - 1
        if req.params.greedy:
            tokens = [token] * extra
        else:
            tokens = sample(row.expand(extra, -1), req.params, req.generator).tolist()  # [n-1, V] -> [n-1]
        answers = []
        for k, tok in enumerate(tokens, start=1):
            a = Thread(id=len(req.threads), parent=root, anchor=-1, start_pos=root.n_prompt, depth=0,
                       kv_tokens=[], answer=k, in_ledger=True)
            self.kv.defer(Fork(ThreadRef(req.id, root.id), ThreadRef(req.id, a.id)))
            self.runner.contexts.fork(root, a)
            req.add_thread(a)
            if root.penalty is not None:
                self.penalties.open_thread(a, root)
            root.children.append(a)
            answers.append((a, tok))
        self._apply(req, root, token, result)
        for a, tok in answers:
            result.events.append(ThreadStarted(req.id, a.id, None, -1))  # to the client: a new answer
            self._apply(req, a, tok, result)

    def _refused(self, req: Request) -> None:
        req.usage.forks_refused += 1
        self.forks_refused += 1

    def _fork(self, req: Request, parent: Thread, result: StepResult) -> None:
        anchor = len(parent.output_tokens) - 1
        child = Thread(id=len(req.threads), parent=parent, anchor=anchor,
                       start_pos=parent.start_pos + len(parent.kv_tokens), depth=parent.depth + 1,
                       kv_tokens=[self.child_id], answer=parent.answer)
        if parent.replay is not None:
            child.replay = ReplayCursor(parent.replay.child(), self.fork_id)
        req.add_thread(child)
        if parent.penalty is not None:
            self.penalties.open_thread(child, parent)
        parent.children.append(child)
        req.usage.forks += 1
        self.forks += 1
        self.forks_by_depth[child.depth] = self.forks_by_depth.get(child.depth, 0) + 1
        req.spend(child.answer)  # the forced [Child]
        result.events.append(ThreadStarted(req.id, child.id, parent.id, anchor))
