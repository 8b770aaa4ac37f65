"""The APAR engine: continuous batching of every thread of every request, one forward pass a step.

`step()` reads like its description: plan the decoding threads, admit on what is free, plan the
catch-up chunks, make room (preempting the most recently admitted request while the step's blocks do
not fit), allocate slots in the ledger (allocation.py), run the model, sample, then apply the tokens
(fork, finish, free) and report events. Under pressure new forks are refused first (`fork_watermark`),
then requests are preempted: every block freed at once, every token kept, the KV recomputed on
readmission. Callers add requests and abort them between steps; the engine is single-threaded by design
(a server drives it from one loop).

A request for `n` answers prefills its prompt once: when the root samples its first token, the other
answers' first tokens are drawn from the same logits row and their roots forked from the root's prompt
(`_open_answers`), so every answer reads the prompt's blocks. Each answer has its own `max_tokens` and
`max_threads`; the request ends when every answer has.

Prefix cache (`EngineConfig.prefix_cache`): a root starts in the ledger on the longest run of its
prompt's full blocks the ledger holds by name (the scheduler looks it up, `_start_root` sends
[Start, Reuse]): those tokens count as computed and its prefill starts after them. Once its prompt is
prefilled, the blocks it wrote are named (`_name_prompts`) and outlive the request as cached blocks,
evicted when a block is needed.
"""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import replace
from pathlib import Path

import torch

from apar.engine.allocation import SlotAllocation
from apar.engine.backends.base import ModelInputs
from apar.engine.config import EngineConfig
from apar.engine.draft_policy import DraftGate, DraftOdds, StepCost
from apar.engine.errors import UserError
from apar.engine.events import Event, FinishReason, RequestFinished, ThreadStarted
from apar.engine.forks import ForkRules
from apar.engine.input_builder import DraftRows, InputBuilder
from apar.engine.kv.ledger import KVLedger
from apar.engine.kv.local import LocalKV
from apar.engine.kv.ops import Release
from apar.engine.model_runner import ModelRunner
from apar.engine.params import SamplingParams
from apar.engine.penalties import Penalties
from apar.engine.pressure import Pressure
from apar.engine.prefix import block_hashes
from apar.engine.replay import ReplayCursor, ReplayNode
from apar.engine.results import EngineOutput, TokenResults
from apar.engine.scheduler import Scheduler, Work
from apar.engine.sequence import Request, Thread
from apar.engine.speculate import make_drafter
from apar.engine.speculation import Speculation

log = logging.getLogger(__name__)


class Engine(SlotAllocation, TokenResults, Speculation):
    """The step loop over a model, a KV ledger and a scheduler (the module's docstring says how); it holds
    its parts (`runner`, `ledger`, `kv`, `scheduler`, `pressure`, `fork_rules`, `penalties`,
    `input_builder`), allocates the step's slots (`SlotAllocation`, allocation.py) and applies the sampled
    tokens itself (`TokenResults`, results.py)."""

    def __init__(self, model_dir: str | Path, config: EngineConfig | None = None, keep_logits: bool = False,
                 kv_factory=None):
        self.config = config or EngineConfig()
        self.runner = ModelRunner(model_dir, self.config)
        self.tokenizer = self.runner.tokenizer
        # None, None: the tokenizer lacks the control tokens, every request runs auto-regressively
        self.fork_id, self.child_id = self._control_ids()
        self.eos_ids = self.runner.eos_ids()
        self._eos_list = sorted(self.eos_ids)
        self.penalties = Penalties(self.runner.device, {t for t in (self.fork_id, self.child_id) if t is not None})
        self.ledger = KVLedger(self.runner.num_blocks, self.config.block_size)
        self.kv = LocalKV(self.ledger)
        self.input_builder = InputBuilder(self.runner.contexts)
        n = self.ledger.num_blocks
        self.scheduler = Scheduler(self.ledger, self.config.max_batch_tokens,
                                   admit_watermark=int(self.config.admit_watermark * n))
        self.pressure = Pressure(self.scheduler, self.ledger, self.kv)
        self.fork_rules = ForkRules(self.fork_id, self.child_id, self.eos_ids, self.runner.max_positions, self.ledger,
                                    watermark=int(self.config.fork_watermark * n))
        # speculation (speculation.py): None when off; drafted and accepted tokens so far
        self.drafter = make_drafter(self.config.speculate, [t for t in (self.fork_id, self.child_id) if t is not None],
                                    self.runner)
        self.spec_draft_tokens = self.spec_accepted_tokens = 0
        self.spec_skipped_tokens = 0  # drafted, but left out of their step: they did not pay (draft_policy.py)
        # what this engine's steps cost by rows, how often drafts hold: the drafts that pay (draft_policy.py)
        self.step_cost = StepCost()
        self.draft_odds = DraftOdds(self.config.speculate.num_tokens)
        self.draft_gate = DraftGate()  # pauses a drafter whose own work does not pay (draft_policy.py)
        self._draft_scores: dict[tuple[str, int], list[float]] = {}
        self.keep_logits = keep_logits
        self.requests: dict[str, Request] = {}
        self.steps = 0
        self.peak_blocks = 0
        self.blocks_released_early = 0  # freed by a thread's end while its request still ran
        self.recomputed_tokens = 0  # tokens computed again after preemptions
        # prefix cache, at each request's first start: prompt tokens looked up, and found cached
        self.prefix_queried_tokens = 0
        self.prefix_hit_tokens = 0
        self._ids = itertools.count()
        if self.runner.compiled or self.runner.graphs is not None:
            self._warm_up()
        if kv_factory:  # after the warm-up, whose blocks the ledger has all back
            self.kv = self.pressure.kv = kv_factory(self.ledger)

    # the counters the metrics read, kept by the parts that count them
    @property
    def forks(self) -> int:
        return self.fork_rules.forks

    @property
    def forks_by_depth(self) -> dict[int, int]:
        """New child's depth -> forks so far."""
        return self.fork_rules.by_depth

    @property
    def forks_refused(self) -> int:
        """[Fork]s refused because the pool was nearly full."""
        return self.fork_rules.refused

    @property
    def preemptions(self) -> int:
        return self.pressure.preemptions

    @property
    def auto_parallel(self) -> bool:
        """The model can fork: its tokenizer has both control tokens. Without them, a request that asks
        for auto-parallel decoding runs auto-regressively, as one with `auto_parallel=False`."""
        return self.fork_id is not None

    def _control_ids(self) -> tuple[int | None, int | None]:
        """The control tokens' ids; (None, None), with one notice, when the tokenizer has neither (an
        ordinary model). A tokenizer with only one of them is misconfigured (say, a mistyped string):
        a clear error."""
        fork, child = self.config.control.fork, self.config.control.child
        vocab = self.tokenizer.get_vocab()
        if fork not in vocab and child not in vocab:
            log.warning("the tokenizer has neither control token (%r, %r): serving auto-regressively "
                        "(auto-parallel is off for every request)", fork, child)
            return None, None
        return self.runner.token_id(fork), self.runner.token_id(child)

    def _warm_up(self) -> None:
        """Compile and capture before the first request: two short requests of different lengths give a
        prefill step, decode steps of two threads and of one (the shapes the compiled layers specialise
        on, see `ModelRunner._compile`); then the CUDA graph of every batch-size bucket a step can fill is
        captured. The prefix cache is off for the requests, so the ledger is empty again afterwards; the
        counters start from zero."""
        banned = self.eos_ids | {self.fork_id, self.child_id}
        prompt = [t for t in range(self.runner.vocab_size) if t not in banned][:8]
        cache, self.config.prefix_cache = self.config.prefix_cache, False
        try:
            for n, tokens in ((len(prompt), 4), (max(1, len(prompt) // 2), 2)):
                self.add_request(prompt[:n], SamplingParams(max_tokens=tokens, auto_parallel=False, ignore_eos=True),
                                 request_id=f"warm-up-{n}")
            self.run_to_completion()
        finally:
            self.config.prefix_cache = cache
        if self.ledger.num_used:
            raise RuntimeError(f"the warm-up left {self.ledger.num_used} KV blocks in use")
        self.steps = self.peak_blocks = 0
        if self.runner.graphs is not None:
            self.runner.graphs.capture_all(self.config.max_batch_tokens)

    # ---- requests in and out -----------------------------------------------------------------------
    def add_request(self, prompt: list[int], params: SamplingParams, request_id: str | None = None,
                    replay: ReplayNode | None = None, cache_salt: int = 0) -> str:
        """Queue a request; raises UserError (nothing queued) when it is invalid or can never fit. On a model
        that cannot fork (`auto_parallel` False) every request runs, and is checked, as an AR one.
        `cache_salt` is part of its prompt blocks' names: it reuses and leaves cached blocks only for
        prompts of the same salt."""
        if params.auto_parallel and not self.auto_parallel:
            params = replace(params, auto_parallel=False)
        if not prompt:
            raise UserError("prompt is empty")
        if any((not isinstance(t, int)) or t < 0 or t >= self.runner.vocab_size for t in prompt):
            raise UserError(f"prompt holds token ids outside the vocabulary (0..{self.runner.vocab_size - 1})")
        limit = self.runner.max_positions
        if len(prompt) >= limit:
            raise UserError(f"prompt of {len(prompt)} tokens is longer than the model allows ({limit})")
        if len(prompt) + params.max_tokens > limit and not params.auto_parallel:
            raise UserError(
                f"prompt ({len(prompt)}) + max_tokens ({params.max_tokens}) exceeds the model's context ({limit})"
            )
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise UserError(f"request id {request_id!r} is already in use")
        if replay is not None:
            if params.n > 1:
                raise UserError("a replayed request serves one answer (n must be 1)")
            if not self.auto_parallel and replay.threads() > 1:
                raise UserError("a replayed tree cannot fork on a model without control tokens")
            replay.validate(self.fork_id)
        req = Request(id=request_id, prompt=list(prompt), params=params, arrival=self.steps)
        if self.config.prefix_cache:
            req.prompt_names = block_hashes(prompt, self.config.block_size, salt=cache_salt)
        if not params.greedy:
            gen = torch.Generator(device=self.runner.device)
            gen.manual_seed(params.seed if params.seed is not None else torch.seed())
            req.generator = gen
        root = Thread(id=0, parent=None, anchor=-1, start_pos=0, depth=0, kv_tokens=list(prompt),
                      n_prompt=len(prompt))
        if replay is not None:
            root.replay = ReplayCursor(replay, self.fork_id)
        req.add_thread(root)
        if params.penalized:
            self.penalties.open_request(req)
        req.usage.prompt_tokens = len(prompt)
        self.scheduler.add(req)
        self.requests[request_id] = req
        return request_id

    def abort(self, request_id: str, reason: FinishReason = FinishReason.CANCELLED) -> list[Event]:
        """Cancel a request between steps: every block of it is free on return."""
        req = self.requests.get(request_id)
        if req is None:
            return []
        events = self._end_request(req, reason)
        self.penalties.flush()
        return events

    def discard(self, request_id: str, reason: FinishReason) -> list[Event]:
        """Last resort for a request whose `abort` failed (a bug in the bookkeeping): forget it, free
        what the ledger still holds of it (a release of a request it does not know frees nothing), and
        report its end."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return []
        self.scheduler.remove(req)
        self.runner.contexts.forget(req.threads)
        self.kv.defer(Release(req.id))
        req.finish = reason
        return [RequestFinished(req.id, reason, req.usage, req.error)]

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # ---- one step ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> EngineOutput:
        """One step: schedule the work (and its KV slots), run the model, apply the sampled tokens."""
        started = time.perf_counter()
        result = EngineOutput(events=[])
        work = self._schedule(result)
        if not work:  # nothing to run (at most forks of recomputed threads, which the ledger now has)
            if self.drafter is not None and self._participants([]):  # only threads that hold tokens ahead
                self.steps += 1
                produced = self._apply_rounds([], None, self.ledger.num_free < self.fork_rules.watermark, result)[1]
                self._end_step(produced, result)
            self.kv.flush()
            self.penalties.flush()
            return result
        step, samplers, drafts, prefilled = self._build_step(work)
        logits = self.runner.forward(step)  # [S + D, V]: one row per sampling thread, then one per draft token
        self._apply_results(step, samplers, drafts, prefilled, logits, result)
        if self.drafter is not None:  # a step without the drafter's guesses costs the gate's plain steps
            cost = self.step_cost if self.draft_gate.guessed else self.draft_gate.plain
            cost.observe(step.num_tokens, time.perf_counter() - started)
        return result

    def _schedule(self, result: EngineOutput) -> list[Work]:
        """The step's work, with its slots in the ledger: plan the decoding threads, admit on what is
        free, plan the catch-up chunks, make room (preempting under pressure), allocate."""
        work = self._plan_drafts(self.scheduler.plan_decode())
        need = self.scheduler.blocks_needed(work)  # new blocks per request
        for req in self.scheduler.admit(reserve=sum(need.values())):
            if not req.admitted:
                req.admitted = True
                result.events.append(ThreadStarted(req.id, 0, None, -1))
        decoding = len(work)
        self.scheduler.plan_catch_up(work)
        need.update(self.scheduler.blocks_needed(work[decoding:]))  # catching up: other requests
        if sum(need.values()) > self.ledger.num_free and any(w.draft for w in work[:decoding]):
            work = [replace(w, draft=()) for w in work]  # under pressure speculation goes first: drafts,
            need = self.scheduler.blocks_needed(work)
        if self.drafter is not None and sum(need.values()) > self.ledger.num_free - self.fork_rules.watermark \
                and self._trim_ahead():  # then the tokens held ahead, before forks are refused
            work = [replace(w, draft=()) if w.draft else w for w in work]  # (a draft followed a dropped tip)
            need = self.scheduler.blocks_needed(work)
        work, full = self.pressure.make_room(work, need)
        if full is not None:  # alone, it does not fit: it has filled the pool
            full.error = "the KV cache is full"
            result.events.extend(self._end_request(full, FinishReason.LENGTH))
        return self._allocate(work, result)

    def _apply_results(self, step: ModelInputs, samplers: list[tuple[Request, Thread]], drafts: list[DraftRows],
                       prefilled: list[Work], logits: torch.Tensor, result: EngineOutput) -> None:
        """Name the prompts just written, sample and apply each thread's token, end finished requests."""
        self.steps += 1
        result.tokens = step.num_tokens
        self._name_prompts(prefilled)  # before sampling: a root may end there
        produced = self._sample(samplers, logits, result, drafts)
        self._end_step(produced, result)

    def _end_step(self, produced: set[str], result: EngineOutput) -> None:
        """Count the step in the usage of the requests that produced; end the requests that are done."""
        for req in list(self.scheduler.running):
            if req.id in produced:
                req.usage.steps += 1
            req.usage.peak_kv_blocks = max(req.usage.peak_kv_blocks, self.ledger.blocks_read(req.id))
            if not req.running_threads:
                result.events.extend(self._end_request(req, None))
        self.peak_blocks = max(self.peak_blocks, self.ledger.num_used)
        self.penalties.flush()  # the step's tokens counted, the rows of ended threads free

    def _build_step(self, work: list[Work]) -> tuple[ModelInputs, list[tuple[Request, Thread]], list[DraftRows],
                                                     list[Work]]:
        """The model inputs (`InputBuilder`), then count its tokens as computed (and in usage); also the
        roots' chunks that complete their prompt. (A draft's tokens count once verified: `_take_runs`.)"""
        step, samplers, drafts = self.input_builder.build(work, self.runner.backend.uses_runs)
        prefilled = []
        for w in work:
            t, n, m = w.thread, w.n, w.tokens
            first = t.computed
            w.request.usage.attended_tokens += m * (t.start_pos + first) + m * (m + 1) // 2  # context lengths
            redo = max(0, min(first + n, t.recompute.mark) - first)
            if redo:
                w.request.usage.recomputed_tokens += redo
                self.recomputed_tokens += redo
            t.computed += n
            if t.parent is None and first < t.n_prompt <= t.computed:
                prefilled.append(w)
        return step, samplers, drafts, prefilled

    # ---- convenience -------------------------------------------------------------------------------
    def run_to_completion(self) -> list[Event]:
        events: list[Event] = []
        while self.has_work():
            events.extend(self.step().events)
        return events
