"""Applying a step's results: each sampling thread's token chosen (bans, then `sampler.choose_tokens`)
and applied to its thread: extend it, fork a child (forks.py), or end it, its answer, or its request. A
request for `n` answers forks the roots of answers 1..n-1 from its root's prompt (`_open_answers`).

`TokenResults` holds the `Engine`'s own methods (a mixin over the engine's state, not used alone): applying
a token changes the requests, the scheduler's queues, the KV, the device contexts, the penalties and the
events at once, so these stay with the engine (docs/design.md, "Parts of the engine").
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from apar.engine.events import Event, FinishReason, RequestFinished, ThreadFinished, ThreadStarted, TokenEvent
from apar.engine.kv.ledger import ThreadRef
from apar.engine.kv.ops import Finish, Fork, Release
from apar.engine.input_builder import DraftRows
from apar.engine.sampler import choose_tokens, rows_index, sample
from apar.engine.sequence import Request, Thread, context_tokens


@dataclass(slots=True)
class EngineOutput:
    """What one `Engine.step()` gives: its events, and how many tokens it computed and sampled."""

    events: list[Event]
    tokens: int = 0  # tokens computed in this step (prefill and decode)
    sampled: int = 0
    # (request, thread) -> (context token ids, logits [V]) when the engine keeps logits (tests)
    logits: dict[tuple[str, int], tuple[list[int], torch.Tensor]] = field(default_factory=dict)
    # (request, thread) -> the row its token was chosen from: penalties and bans applied (tests)
    chosen_from: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    # the rows after each draft token, as `logits` has the sampled rows: (request, thread, the context
    # through that draft token, logits [V]) when the engine keeps logits (tests)
    draft_logits: list[tuple[str, int, list[int], torch.Tensor]] = field(default_factory=list)


class TokenResults:
    """Sampling and applying tokens, and ending threads and requests (the `Engine` methods)."""

    def _sample(self, samplers: list[tuple[Request, Thread]], logits: torch.Tensor, result: EngineOutput,
                drafts: list[DraftRows] = ()) -> set[str]:
        """Pick each sampling thread's tokens (logits: [S + D, V], row i for samplers[i], then the rows
        after the draft tokens); apply them. Returns the ids of requests that produced.

        The penalties a request asks for go first, on the device, to its rows only (`Penalties`: each
        thread's own context counts); then the control-token bans.
        Bans known before the step are applied to all rows at once; greedy rows take one argmax
        together; a sampling request draws from its own generator, its threads in id order (and the
        first tokens of answers 1..n-1 right after the root's first, from the same row). A thread with a
        draft gets the tokens its verification keeps (`_verify`), after those it holds ahead. The fork
        rules are checked again as each token is applied (`_apply_rounds`), since a sibling's fork in the
        same step may have used up a limit.
        """
        main = logits[: len(samplers)]  # [S, V], a view: the bans below write through
        if self.keep_logits:
            for (req, t), row in zip(samplers, main):
                result.logits[(req.id, t.id)] = (context_tokens(t), row.detach().to("cpu", copy=True))
        self.penalties.apply(main, samplers)
        rules = self.fork_rules
        tight = rules.ban(samplers, main)  # [Child] always, [Fork] where a rule says so
        no_eos = [i for i, (req, _) in enumerate(samplers) if req.params.ignore_eos]
        if no_eos:
            rows = rows_index(main, no_eos)
            for eos in self._eos_list:
                main[rows, eos] = float("-inf")
        if self.keep_logits:
            for (req, t), row in zip(samplers, main):
                result.chosen_from[(req.id, t.id)] = row.detach().to("cpu", copy=True)
        sampled_drafts = {d.sampler for d in drafts if not samplers[d.sampler][0].params.greedy}
        chosen = choose_tokens(main, samplers, self.eos_ids, sampled_drafts)
        emitted: list[list[int | None]] = [[tok] for tok in chosen]
        if drafts:
            self._verify(samplers, logits, drafts, emitted, result)
        lengths = self._take_runs(samplers, logits, drafts, emitted)
        applied, produced = self._apply_rounds(samplers, logits, tight, result)
        if self.drafter is not None:  # (medusa guesses after every step, drafts or not)
            self._settle_drafts(samplers, drafts, lengths, applied)
        result.sampled += len(samplers)
        return produced

    def _apply_rounds(self, samplers: list[tuple[Request, Thread]], logits: torch.Tensor | None, tight: bool,
                      result: EngineOutput) -> tuple[dict[int, int], set[str]]:
        """Apply the tokens ahead in rounds (docs/design.md, "Speculation"): every thread's first token
        in thread order (as without speculation), then every thread's second, and so on. An answer takes
        round r while each of its running threads has a token left for it, so its threads stay in
        lockstep: round r is what the step r later would have applied, and the answer's budget and fork
        limits see its tokens in the same order as without drafts. A fork (a new thread) in round r
        ends the request's rounds there: its child's first token would have come in round r + 1. What a
        thread's answer does not take stays ahead for the next step. The threads are the samplers' and
        those that hold (tokens ahead, no forward: `_holds`); logits: [S, ...], the samplers' rows, or
        None without them. Returns how many tokens each thread (by id) was given, and the ids of the
        requests that produced."""
        rules, fork_id = self.fork_rules, self.fork_id
        sampler_row = {id(t): i for i, (_, t) in enumerate(samplers)}
        parts = self._participants(samplers)
        applied: dict[int, int] = {}
        last_round: dict[str, int] = {}  # request -> its last round, once a fork ended them
        r = 0
        while True:
            ready: dict[tuple[str, int], bool] = {}  # (request, answer) -> it takes round r
            for req, t in parts:
                if t.running:
                    key = (req.id, t.answer)
                    ready[key] = ready.get(key, True) and bool(t.ahead) and r <= last_round.get(req.id, r)
            if not any(ready.values()):
                break
            for req, t in parts:
                if not t.running or not ready[(req.id, t.answer)]:
                    continue
                token, drafted = t.ahead.pop(0), t.ahead_drafted.pop(0)
                row, t.ahead_row = (t.ahead_row, None) if not t.ahead else (None, t.ahead_row)
                if token == fork_id and (tight or not rules.may_fork(req, t)):
                    token = rules.instead_of_fork(req, t, row, tight)
                threads = len(req.threads)
                if r == 0 and req.params.n > 1 and t.id == 0 and len(t.kv_tokens) == t.n_prompt:  # root's first
                    self._open_answers(req, token, logits[sampler_row[id(t)]], result)
                else:
                    if drafted and req.budget_left(t.answer) > 0:  # an accepted draft token, applied
                        req.usage.accepted_tokens += 1
                        self.spec_accepted_tokens += 1
                    self._apply(req, t, token, result)
                applied[id(t)] = r + 1
                if len(req.threads) > threads:
                    last_round[req.id] = r
            r += 1
        return applied, {req.id for req, _ in parts}

    def _participants(self, samplers: list[tuple[Request, Thread]]) -> list[tuple[Request, Thread]]:
        """The threads with tokens ahead, each request's in thread order: the samplers' requests in
        sampler order, then those whose threads all hold."""
        reqs = [req for req, _ in samplers]
        if self.drafter is not None:
            reqs += [req for req in self.scheduler.running if not req.recomputing
                     and any(t.ahead and t.running for t in req.threads)]
        seen: set[str] = set()
        parts = []
        for req in reqs:
            if req.id not in seen:
                seen.add(req.id)
                parts.extend((req, t) for t in req.threads if t.running and t.ahead)
        return parts

    def _apply(self, req: Request, t: Thread, token: int | None, result: EngineOutput) -> None:
        """Add one sampled token to a thread: extend it, fork a child, or end it (its whole answer when
        the answer's budget is spent)."""
        if not t.running:
            return
        if req.budget_left(t.answer) <= 0:
            self._end_threads(req, FinishReason.LENGTH, result, t.answer)
            return
        if token is None:  # a replayed thread ran out of tokens
            self._finish_thread(req, t, FinishReason.STOP, result)
            return
        req.spend(t.answer)
        if token in self.eos_ids or token in req.params.stop_token_ids:
            self._finish_thread(req, t, FinishReason.STOP, result)
            return
        t.kv_tokens.append(token)
        if t.penalty is not None:
            self.penalties.count(t, token)
        result.events.append(TokenEvent(req.id, t.id, token))
        if token == self.fork_id:
            child = self.fork_rules.fork(req, t)
            if t.penalty is not None:
                self.penalties.open_thread(child, t)
            result.events.append(ThreadStarted(req.id, child.id, t.id, child.anchor))
        if t.start_pos + len(t.kv_tokens) >= self.runner.max_positions:
            self._finish_thread(req, t, FinishReason.LENGTH, result)
        if req.budget_left(t.answer) <= 0:
            self._end_threads(req, FinishReason.LENGTH, result, t.answer)

    def _open_answers(self, req: Request, token: int, row: torch.Tensor, result: EngineOutput) -> None:
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

    def _finish_thread(self, req: Request, t: Thread, reason: FinishReason, result: EngineOutput) -> None:
        t.finish = reason
        t.drop_ahead()  # (their KV goes with the thread's blocks)
        self.penalties.close_thread(t)
        if not req.admitted:  # never admitted, never announced: nothing to report
            return
        if t.in_ledger:
            freed = self.kv.defer(Finish(ThreadRef(req.id, t.id)))
            if req.running_threads:
                self.blocks_released_early += len(freed)
        result.events.append(ThreadFinished(req.id, t.id, reason))

    def _end_threads(self, req: Request, reason: FinishReason, result: EngineOutput, answer: int | None = None) -> None:
        """Finish the running threads of one answer, or of every answer (None)."""
        for t in req.threads:
            if t.running and answer in (None, t.answer):
                self._finish_thread(req, t, reason, result)

    def _end_request(self, req: Request, reason: FinishReason | None) -> list[Event]:
        """Finish what still runs, free every block of the request, report it; reason None: all ended."""
        tmp = EngineOutput(events=[])
        if reason is not None:
            self._end_threads(req, reason, tmp)
        if req.root.in_ledger:  # not after a preemption: that released it already
            self.kv.defer(Release(req.id))
        self.runner.contexts.forget(req.threads)
        self.penalties.close_request(req)
        self.scheduler.remove(req)
        self.requests.pop(req.id, None)
        if reason is None:
            reasons = {t.finish for t in req.threads}
            reason = FinishReason.LENGTH if FinishReason.LENGTH in reasons else FinishReason.STOP
        req.finish = reason
        tmp.events.append(RequestFinished(req.id, reason, req.usage, req.error))
        return tmp.events
