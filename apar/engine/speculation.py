"""Speculation in the step: each decoding thread's draft planned, verified, kept ahead or rolled back
(docs/design.md, "Speculation"; the drafter and the acceptance rules are in speculate.py).

Data flow, one step:
  `_plan_drafts`   a thread whose tokens ahead end in a control or stop token, or already cover its
                   answer's budget, holds (no forward: its tokens ahead still go to the rounds); any other
                   decoding thread may draft (not penalized, its pending token not a control token), up
                   to K tokens, fewer near its answer's budget, the model's context or the cap on its
                   tokens ahead, within the step's token budget and while the pool keeps the fork
                   watermark free (under pressure speculation goes first, before forks: `Engine._schedule`)
  ledger           `Append(t, 1 + k)`: the pending token and the draft get slots like a prefill chunk
  forward          one chunk query per drafting thread: its K + 1 logits rows
  `_verify`        the bans of each row as if the tokens ahead and the draft before it had been emitted;
                   greedy keeps the prefix equal to the argmax, sampling applies the speculative-sampling
                   rule, a replayed thread keeps the prefix equal to its known tokens
  `_take_runs`     each thread's verified run joins its tokens ahead (cut after a control or stop token);
                   the rejected draft positions are rolled back: `Truncate` deferred to the ledger (it
                   travels at the head of the next step's message) and the context table's row shortened
  `_apply_rounds`  (results.py) the tokens ahead, in rounds, as the steps without drafts would have
  `_settle_drafts` a replayed thread keeps nothing ahead: what the rounds did not apply is rolled back
  `_propose`       medusa: the heads guess each thread's next draft from the hidden state of the row
                   its new pending token came from (apar/engine/medusa.py); timed for `DraftGate`, which
                   may pause the guesses (the drafter then only keeps the threads' states: `skip`)

`Speculation` holds the `Engine`'s own methods (a mixin over the engine's state, not used alone).
"""
from __future__ import annotations

import time
from dataclasses import replace

import torch

from apar.engine.draft_policy import choose
from apar.engine.input_builder import DraftRows
from apar.engine.kv.ledger import ThreadRef
from apar.engine.kv.ops import Truncate
from apar.engine.sampler import probabilities
from apar.engine.scheduler import Work
from apar.engine.sequence import Request, Thread, context_tokens, context_tokens_upto
from apar.engine.speculate import accept_greedy, accept_sampled

# A thread keeps at most this many times K tokens ahead (verified, not yet applied): enough for a thread
# whose drafts hold to build a lead over its answer's slowest thread, bounded so that it holds little KV
AHEAD_PER_DRAFT_TOKEN = 2


class Speculation:
    """Drafts planned, verified and settled (the `Engine` methods)."""

    def _plan_drafts(self, work: list[Work]) -> list[Work]:
        """The decoding work with each thread's draft, where it may draft, less the threads that hold
        (the module's docstring). Each thread drafts on its own: the rounds apply what its answer's
        slowest thread allows, and keep the rest ahead (`_apply_rounds`)."""
        if self.drafter is None or not work:
            return work
        work = [w for w in work if not self._holds(w)]
        room = self.config.max_batch_tokens - len(work)  # the step's tokens the drafts may take
        spare = self.ledger.num_free - sum(self.scheduler.blocks_needed(work).values()) - self.fork_rules.watermark
        drafts = []
        for w in work:
            t = w.thread
            k = min(self._draft_limit(w), room)
            if k <= 0 or spare < 0:
                draft = []
            elif self.drafter.by_thread:  # medusa: the guesses of the step that gave its pending token
                draft = self.drafter.proposal((w.request.id, t.id), t.start_pos + t.n_tokens, k)
            else:
                draft = self.drafter.draft(context_tokens_upto(t, t.start_pos + t.n_tokens), k)
            drafts.append(draft)
        drafts = self._drafts_that_pay(work, drafts)
        out = []
        for w, draft in zip(work, drafts):
            t = w.thread
            if draft:
                ref = ThreadRef(w.request.id, t.id)
                opened = self.ledger.blocks_needed(ref, 1 + len(draft)) - self.ledger.blocks_needed(ref, 1)
                if opened <= spare:
                    spare -= opened
                    room -= len(draft)
                    w = replace(w, draft=tuple(draft))
            out.append(w)
        return out

    def _drafts_that_pay(self, work: list[Work], drafts: list[list[int]]) -> list[list[int]]:
        """Each thread's draft cut to the tokens that pay for their rows (apar/engine/draft_policy.py),
        and each kept draft's scores noted for `_take_runs`; a thread sampled with a seed keeps its whole
        draft (its seed repeats its answer)."""
        self._draft_scores = {}
        scores_of = getattr(self.drafter, "scores", None)
        scores = []
        for w, draft in zip(work, drafts):
            t = w.thread
            s = scores_of((w.request.id, t.id), t.start_pos + t.n_tokens, len(draft)) \
                if scores_of is not None and draft else [1.0] * len(draft)
            scores.append(s)
        if self.config.speculate.policy == "pays":
            free = [i for i, w in enumerate(work) if drafts[i] and
                    (w.request.params.greedy or w.request.params.seed is None)]
            odds = [self.draft_odds.odds(s) for s in scores]
            take = choose(len(work), [odds[i] for i in free], self.step_cost)
            for i, n in zip(free, take):
                self.spec_skipped_tokens += len(drafts[i]) - n
                drafts[i], scores[i], odds[i] = drafts[i][:n], scores[i][:n], odds[i][:n]
            expected = sum(sum(o) for o in odds)  # what the drafts taken should earn, for the gate
            self.draft_gate.observe_step(len(work), len(work) + expected, self.step_cost,
                                         len(work) + sum(len(d) for d in drafts))
        for w, s in zip(work, scores):
            if s:
                self._draft_scores[(w.request.id, w.thread.id)] = s
        return drafts

    def _holds(self, w: Work) -> bool:
        """A thread with tokens ahead skips the forward when it would be of no use: its last token ahead
        is a control or stop token (nothing is drafted or computed past a [Fork] before it is applied:
        its child reads up to it), or its tokens ahead cover its answer's budget or the model's context."""
        req, t = w.request, w.thread
        if not t.ahead:
            return False
        tip = t.ahead[-1]
        return (tip in (self.fork_id, self.child_id) or tip in self.eos_ids or tip in req.params.stop_token_ids
                or len(t.ahead) >= req.budget_left(t.answer)
                or t.start_pos + t.n_tokens >= self.runner.max_positions)

    def _draft_limit(self, w: Work) -> int:
        """How many tokens the thread may draft now: none for a penalized thread (its logits depend on
        more than its context) or after a control token (the [Fork] a child reads, or the [Child] it
        starts with); otherwise K, less near the answer's budget and the model's context (its tokens
        ahead count: they are emitted first) and the cap on its tokens ahead."""
        req, t = w.request, w.thread
        if w.n != 1 or req.params.penalized or not t.in_ledger:
            return 0
        if t.tip in (self.fork_id, self.child_id):
            return 0
        k, held = self.config.speculate.num_tokens, len(t.ahead)
        return min(k, AHEAD_PER_DRAFT_TOKEN * k - held - 1, req.budget_left(t.answer) - held - 1,
                   self.runner.max_positions - (t.start_pos + t.n_tokens) - 1)

    def _trim_ahead(self) -> bool:
        """Memory pressure: every thread keeps only the first of its tokens ahead (then its pending one),
        the KV of the others rolled back (they are the model's tokens: decoded again later, the answer is
        the same). Returns whether any was dropped."""
        trimmed = False
        for req in self.scheduler.running:
            for t in req.threads:
                m = len(t.ahead) - 1
                if m <= 0 or not t.running or not t.in_ledger:
                    continue
                self.kv.defer(Truncate(ThreadRef(req.id, t.id), m))
                self.runner.contexts.truncate(t, m)
                t.computed -= m
                del t.ahead[1:], t.ahead_drafted[1:]
                t.ahead_row = None  # (a [Fork] is only ever the last token ahead)
                trimmed = True
        return trimmed

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

    def _take_runs(self, samplers: list[tuple[Request, Thread]], logits: torch.Tensor, drafts: list[DraftRows],
                   emitted: list[list[int | None]]) -> list[int]:
        """Each sampler's verified run (`emitted[i]`, its draft's accepted tokens then one from the model)
        joins its thread's tokens ahead, cut after its first control or stop token (what follows one is
        never applied). Of a draft, the positions past the run's last accepted token are rolled back at
        once (a replayed thread's, once the rounds are known: `_settle_drafts`). Returns each run's length.
        logits: [S + D, V], bans applied (a run ending in [Fork] keeps its row, for `instead_of_fork`)."""
        draft_of = {d.sampler: d for d in drafts}
        fork_id, eos = self.fork_id, self.eos_ids
        lengths = []
        for i, (req, t) in enumerate(samplers):
            run = emitted[i]
            accepted = len(run) - 1  # the draft tokens it holds (then one token from the model)
            for j, tok in enumerate(run):
                if tok is None or tok == fork_id or tok in eos or tok in req.params.stop_token_ids:
                    run = run[: j + 1]
                    break
            n = len(run)
            t.ahead.extend(run)
            t.ahead_drafted.extend(j < accepted for j in range(n))
            d = draft_of.get(i)
            t.ahead_row = None
            if run[-1] == fork_id and t.replay is None:  # [V]: the row it came from
                t.ahead_row = (logits[i] if n == 1 else logits[d.first_row + n - 2]).clone()
            lengths.append(n)
            if d is None:
                continue
            k = len(d.draft)
            scores = self._draft_scores.get((req.id, t.id))
            if scores is not None and len(scores) == k:
                self.draft_odds.observe(scores, accepted)
            req.usage.drafted_tokens += k
            self.spec_draft_tokens += k
            if t.replay is None:
                t.computed += n - 1  # the run's tokens before its last (the new pending one) have their KV
                if k > n - 1:
                    self.kv.defer(Truncate(ThreadRef(req.id, t.id), k - n + 1))
                    self.runner.contexts.truncate(t, k - n + 1)
        return lengths

    def _settle_drafts(self, samplers: list[tuple[Request, Thread]], drafts: list[DraftRows],
                       lengths: list[int], applied: dict[int, int]) -> None:
        """A replayed thread keeps nothing ahead: the KV of the draft tokens its thread was given stays
        (all but the last token given, its next pending one), the rest is rolled back in the ledger and
        the context table, and its cursor reads again from there. (A thread that ended has its blocks
        freed by its end instead.) Then medusa's guesses for the next step."""
        tips = list(lengths)  # per sampler: the tokens of its run up to its pending token
        for d in drafts:
            req, t = samplers[d.sampler]
            if t.replay is None:
                continue
            k, given = len(d.draft), applied.get(id(t), 0)
            tips[d.sampler] = given
            used = max(0, given - 1)
            if d.replay_state is not None and used < d.replay_read:
                t.replay.restore(d.replay_state)  # it read ahead: read again only what was applied
                for _ in range(used):
                    t.replay.next_token(self.eos_ids)
            if not t.running or not t.in_ledger:
                continue
            t.drop_ahead()
            t.computed += used
            if k > used:
                self.kv.defer(Truncate(ThreadRef(req.id, t.id), k - used))
                self.runner.contexts.truncate(t, k - used)
        if self.drafter.by_thread:
            self._propose(samplers, drafts, tips)

    def _propose(self, samplers: list[tuple[Request, Thread]], drafts: list[DraftRows], tips: list[int]) -> None:
        """The drafter's guesses for every sampling thread still running (`ByThread.propose`,
        apar/engine/medusa.py): each thread's verified run up to its new pending token, every token with
        the row it came from (its sampled row, then the rows of its accepted draft tokens)."""
        first_row = {d.sampler: d.first_row for d in drafts}
        keys, lengths, rows, tokens, counts = [], [], [], [], []
        for i, (req, t) in enumerate(samplers):
            a = tips[i]
            if not a or not t.running:
                continue
            keys.append((req.id, t.id))
            lengths.append(t.start_pos + t.n_tokens)
            rows += [i] + [first_row[i] + j for j in range(a - 1)]  # token j + 1 of the run came from row j
            tokens += t.tokens(t.n_tokens - a, t.n_tokens)
            counts.append(a)
        hidden = self.runner.last_hidden
        if not rows or hidden is None:
            self.drafter.propose([], [], None, [], [])
            return
        hidden = hidden.index_select(0, torch.tensor(rows, device=hidden.device))
        seeded = any(not req.params.greedy and req.params.seed is not None for req, _ in samplers)
        if self.config.speculate.policy == "pays" and not self.draft_gate.guesses(must=seeded):
            self.drafter.skip(keys, lengths, hidden, tokens, counts)  # keeps the threads' states, guesses nothing
            return
        started = time.perf_counter()
        self.drafter.propose(keys, lengths, hidden, tokens, counts)
        self.draft_gate.observe_work(time.perf_counter() - started)
