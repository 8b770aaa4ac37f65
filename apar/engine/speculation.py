"""Speculation in the step: each decoding thread's draft planned, verified and rolled back (docs/design.md,
"Speculation"; the drafter and the acceptance rules are in speculate.py).

Data flow, one step:
  `_plan_drafts`   a decoding thread may draft (not penalized, its pending token not a control token); up to K tokens, fewer near its answer's budget or the model's context,
                   within the step's token budget and while the pool keeps the fork watermark free
                   (under pressure speculation goes first, before forks: `Engine._schedule`)
  ledger           `Append(t, 1 + k)`: the pending token and the draft get slots like a prefill chunk
  forward          one chunk query per drafting thread: its K + 1 logits rows
  `_verify`        the bans of each row as if the draft before it had been emitted; greedy keeps the
                   prefix equal to the argmax, sampling applies the speculative-sampling rule, a
                   replayed thread keeps the prefix equal to its known tokens
  `_apply_rounds`  (results.py) the kept tokens, in rounds, as the steps without drafts would have
  `_settle_drafts` the accepted drafts count as computed; the rest is rolled back: `Truncate` deferred
                   to the ledger (it travels at the head of the next step's message) and the context
                   table's row shortened
  `_propose`       medusa: the heads guess each thread's next draft from the hidden state of the row
                   its new pending token came from (apar/engine/medusa.py)

`Speculation` holds the `Engine`'s own methods (a mixin over the engine's state, not used alone).
"""
from __future__ import annotations

from dataclasses import replace

import torch

from apar.engine.input_builder import DraftRows
from apar.engine.kv.ledger import ThreadRef
from apar.engine.kv.ops import Truncate
from apar.engine.sampler import probabilities
from apar.engine.scheduler import Work
from apar.engine.sequence import Request, Thread, context_tokens, context_tokens_upto
from apar.engine.speculate import accept_greedy, accept_sampled


class Speculation:
    """Drafts planned, verified and settled (the `Engine` methods)."""

    def _plan_drafts(self, work: list[Work]) -> list[Work]:
        """The decoding work with each thread's draft, where it may draft (the module's docstring). The
        threads of one answer draft in lockstep: each as many tokens as the shortest draft among them
        (none if one of them has none), since the tokens are applied in lockstep (`_apply_rounds`)."""
        if self.drafter is None or not work:
            return work
        found: dict[int, list[int]] = {}  # work index -> its draft
        shortest: dict[tuple[str, int], int] = {}  # (request, answer) -> its shortest draft
        for i, w in enumerate(work):
            t = w.thread
            k = self._draft_limit(w)
            length = t.start_pos + len(t.kv_tokens)
            if k <= 0:
                draft = []
            elif self.drafter.by_thread:  # medusa: the guesses of the step that gave its pending token
                draft = self.drafter.proposal((w.request.id, t.id), length, k)
            else:
                draft = self.drafter.draft(context_tokens_upto(t, length), k)
            key = (w.request.id, t.answer)
            shortest[key] = min(shortest.get(key, len(draft)), len(draft))
            found[i] = draft
        room = self.config.max_batch_tokens - len(work)  # the step's tokens the drafts may take
        spare = self.ledger.num_free - sum(self.scheduler.blocks_needed(work).values()) - self.fork_rules.watermark
        out = []
        for i, w in enumerate(work):
            draft = found[i][: min(shortest[(w.request.id, w.thread.answer)], room)]
            if draft and spare >= 0:
                ref = ThreadRef(w.request.id, w.thread.id)
                opened = self.ledger.blocks_needed(ref, 1 + len(draft)) - self.ledger.blocks_needed(ref, 1)
                if opened <= spare:
                    spare -= opened
                    room -= len(draft)
                    w = replace(w, draft=tuple(draft))
            out.append(w)
        return out

    def _draft_limit(self, w: Work) -> int:
        """How many tokens the thread may draft now: none for a penalized thread (its logits depend on
        more than its context) or after a control token (the [Fork] a child reads, or the
        [Child] it starts with); otherwise K, less near the answer's budget and the model's context."""
        req, t = w.request, w.thread
        if w.n != 1 or req.params.penalized or not t.in_ledger:
            return 0
        if t.kv_tokens[-1] in (self.fork_id, self.child_id):
            return 0
        return min(self.config.speculate.num_tokens, req.budget_left(t.answer) - 1,
                   self.runner.max_positions - (t.start_pos + len(t.kv_tokens)) - 1)

    def _verify(self, samplers: list[tuple[Request, Thread]], logits: torch.Tensor, drafts: list[DraftRows],
                emitted: list[list[int | None]], result) -> None:
        """Each draft's kept tokens into `emitted[sampler]` (its first token there is the argmax of its
        sampled row, or None for a sampling thread). logits: [S + D, V], the draft rows after the sampled
        ones; their bans are applied here, in place."""
        for d in drafts:
            req, t = samplers[d.sampler]
            rows = logits[d.first_row: d.first_row + len(d.draft)]  # [K, V]
            if self.keep_logits:
                ctx = context_tokens(t)
                for j, row in enumerate(rows):
                    result.draft_logits.append((req.id, t.id, ctx + list(d.draft[: j + 1]),
                                                row.detach().to("cpu", copy=True)))
            self.fork_rules.ban_in_draft_rows(req, t, d.draft, rows)
            if req.params.ignore_eos:
                rows[:, self._eos_list] = float("-inf")
        for d in drafts:  # a replayed thread: its known tokens are the model's, read as far as they agree
            t = samplers[d.sampler][1]
            if t.replay is not None and emitted[d.sampler][0] != self.fork_id:  # (a [Fork] ends the run)
                d.replay_state = t.replay.state()
                out = emitted[d.sampler]
                for tok in d.draft:  # draft[j] is a guess at out[j]: kept, the row after it gives out[j + 1]
                    if out[-1] != tok:
                        break
                    out.append(t.replay.next_token(self.eos_ids))
                    if out[-1] == self.fork_id:
                        break
                d.replay_read = len(out) - 1
        greedy = [d for d in drafts if samplers[d.sampler][0].params.greedy and samplers[d.sampler][1].replay is None]
        if greedy:
            top = logits[len(samplers):].argmax(dim=-1).tolist()  # one read for every draft row
            base = len(samplers)
            for d in greedy:
                i = d.first_row - base
                argmax = [emitted[d.sampler][0], *top[i: i + len(d.draft)]]
                emitted[d.sampler] = accept_greedy(d.draft, argmax).tokens
        for d in drafts:
            req, t = samplers[d.sampler]
            if req.params.greedy or t.replay is not None:
                continue
            rows = torch.cat([logits[d.sampler: d.sampler + 1], logits[d.first_row: d.first_row + len(d.draft)]])
            probs = probabilities(rows, req.params)  # [K + 1, V]
            emitted[d.sampler] = accept_sampled(d.draft, probs, req.generator).tokens

    def _settle_drafts(self, samplers: list[tuple[Request, Thread]], drafts: list[DraftRows],
                       applied: list[int]) -> None:
        """Count each draft, and keep the KV of the draft tokens its thread was given (all but the last
        token given, which is its next pending one); roll back the rest in the ledger and the context
        table. A thread that ended has its blocks freed by its end instead."""
        for d in drafts:
            req, t = samplers[d.sampler]
            k = len(d.draft)
            used = max(0, applied[d.sampler] - 1)
            req.usage.drafted_tokens += k
            req.usage.accepted_tokens += used
            self.spec_draft_tokens += k
            self.spec_accepted_tokens += used
            if d.replay_state is not None and applied[d.sampler] - 1 < d.replay_read:
                t.replay.restore(d.replay_state)  # it read ahead: read again only what was applied
                for _ in range(applied[d.sampler] - 1):
                    t.replay.next_token(self.eos_ids)
            if not t.running or not t.in_ledger:
                continue
            t.computed += used
            if k > used:
                self.kv.defer(Truncate(ThreadRef(req.id, t.id), k - used))
                self.runner.contexts.truncate(t, k - used)
        if self.drafter.by_thread:
            self._propose(samplers, drafts, applied)

    def _propose(self, samplers: list[tuple[Request, Thread]], drafts: list[DraftRows], applied: list[int]) -> None:
        """Medusa: the heads' guesses for every thread still running, from the hidden state of the row
        its pending token came from (its sampled row, or the row of its last accepted draft token) and
        that pending token, for the next step's drafts (apar/engine/medusa.py)."""
        first_row = {d.sampler: d.first_row for d in drafts}
        keys, lengths, rows, pending = [], [], [], []
        for i, (req, t) in enumerate(samplers):
            a = applied[i]
            if not a or not t.running:
                continue
            keys.append((req.id, t.id))
            lengths.append(t.start_pos + len(t.kv_tokens))
            pending.append(t.kv_tokens[-1])  # the token that row gave (hydra heads read it)
            rows.append(i if a == 1 else first_row[i] + a - 2)  # the row token a - 1 came from
        hidden = self.runner.last_hidden
        if not rows or hidden is None:
            self.drafter.propose([], [], None)
            return
        index = torch.tensor(rows, device=hidden.device)
        self.drafter.propose(keys, lengths, hidden.index_select(0, index), pending)
