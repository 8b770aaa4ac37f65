"""Tokens kept ahead (docs/design.md, "Speculation"): a thread whose drafts hold builds a lead of verified
tokens over its answer's slowest thread, applied in later steps' rounds. An oracle drafter (the plain
answer's own next tokens, for every other thread only, some of them wrong) makes the case certain:
greedy answers stay token for token the plain ones, answers cut by max_tokens mid-tree included; the
tokens ahead dropped by a cancel, a budget's end, memory pressure and preemption leave the ledger's
invariants, the KV manager's replica equal to it, and no block behind."""
from __future__ import annotations

import pytest

from apar.engine.config import ControlTokens, EngineConfig, SpeculativeConfig
from apar.engine.engine import Engine
from apar.engine.events import FinishReason
from apar.engine.kv.step import apply
from apar.engine.params import SamplingParams
from apar.engine.sequence import Thread, context_tokens_upto
from services.kvmanager.json_forms import ops_from_bytes, ops_to_bytes
from services.kvmanager.replica import ReplicaLedger
from services.kvmanager.replication import Ack, ReplicationLog
from tests import test_engine_speculation as ngram_tests
from tests.test_engine_speculation import PROMPTS, collect, same_answers

fork_string = ngram_tests.fork_string  # (the fixture: the model's most frequent token named [Fork])

K = 4
# answers 0 and 1 fork, and are cut by their budget mid-tree
REQUESTS = [(PROMPTS[0], SamplingParams(max_tokens=120, max_threads=6, max_depth=2)),
            (PROMPTS[1], SamplingParams(max_tokens=34, max_threads=6, max_depth=2)),
            (PROMPTS[2], SamplingParams(max_tokens=120, max_threads=6, max_depth=2)),
            (PROMPTS[3], SamplingParams(max_tokens=47, max_threads=6, max_depth=2))]


class OracleDrafter:
    """Drafts a thread's next tokens in the plain answer, for the threads of even id only (their
    siblings of odd id never draft); every `wrong_every`-th draft has its last token changed (rejected)."""

    by_thread = False

    def __init__(self, threads: list[tuple[list[int], int]], stop_ids: set[int], wrong_every: int = 0) -> None:
        self.next: dict[tuple[int, ...], list[int]] = {}  # a context -> the tokens that follow it
        for ctx, own in threads:  # (a thread's whole context, where its own tokens start)
            for i in range(own + 1, len(ctx)):
                self.next[tuple(ctx[:i])] = ctx[i:]
        self.stop_ids, self.wrong_every, self.calls = stop_ids, wrong_every, 0

    def draft(self, context, k: int) -> list[int]:
        out = []
        for tok in self.next.get(tuple(context), [])[:k]:
            if tok in self.stop_ids:
                break
            out.append(tok)
        self.calls += 1
        if out and self.wrong_every and self.calls % self.wrong_every == 0:
            out[-1] = next(x for x in (5, 6, 7) if x != out[-1] and x not in self.stop_ids)
        return out


def make_engine(model_dir, fork: str, spec: bool, replica: bool = False, **cfg) -> tuple[Engine, list]:
    config = dict(block_size=4, num_blocks=512, max_batch_tokens=64, control=ControlTokens(fork=fork, child="[Child]"))
    config.update(cfg)
    logs: list[ReplicationLog] = []

    def kv_factory(ledger):
        logs.append(ReplicationLog(ledger, session=1))
        return logs[-1]

    eng = Engine(model_dir, EngineConfig(**config, speculate=SpeculativeConfig("ngram", K, policy="all") if spec else
                                         SpeculativeConfig()), kv_factory=kv_factory if replica else None)
    return eng, logs


def plain_run(model_dir, fork: str, requests) -> tuple[dict, Engine, list]:
    """The answers without speculation, and every thread's whole context at its end."""
    eng, _ = make_engine(model_dir, fork, spec=False)
    ids = [eng.add_request(p, params) for p, params in requests]
    reqs = [eng.requests[rid] for rid in ids]
    out = collect(eng, ids)
    threads = [(context_tokens_upto(t, t.start_pos + len(t.kv_tokens)), t.start_pos)
               for req in reqs for t in req.threads if t.id % 2 == 0]
    return out, eng, threads


class Replica:
    """The KV manager's replica of the engine's ledger, fed the worker's real outbox over the JSON wire."""

    def __init__(self, eng: Engine, log: ReplicationLog) -> None:
        self.eng, self.log = eng, log
        self.replica = ReplicaLedger(eng.ledger.num_blocks, eng.ledger.block_size)

    def deliver(self) -> None:
        self.log.flush()
        batch = self.log.batch()
        for s in batch.steps if batch else ():
            assert apply(self.replica, ops_from_bytes(ops_to_bytes(s.ops)), slots=False).error is None
            assert self.replica.digest() == s.digest
        if batch and batch.steps:
            self.log.acked(Ack(batch.steps[-1].seq, self.replica.digest()))
        self.replica.check()
        assert self.replica.snapshot() == self.eng.ledger.snapshot()


@pytest.fixture(scope="module")
def plain(llama_dir, fork_string):
    return plain_run(llama_dir, fork_string, REQUESTS)


def lead_watch(eng: Engine, leads: list):
    """After each step: every thread holding 2+ tokens ahead (KV beyond its pending token) while a
    sibling of its answer that never drafts (odd id) runs, as (request, thread, tokens ahead)."""

    def watch(_result) -> None:
        for req in eng.requests.values():
            for t in req.threads:
                if t.running and len(t.ahead) >= 2 and any(s.running and s.id % 2 and s.answer == t.answer
                                                          for s in req.threads):
                    leads.append((req.id, t.id, len(t.ahead)))
    return watch


@pytest.mark.parametrize("wrong_every", [0, 3])
def test_a_thread_with_drafts_runs_ahead_of_a_sibling_without_and_answers_stay_plain(llama_dir, fork_string, plain,
                                                                                      wrong_every):
    want, plain_eng, threads = plain
    eng, _ = make_engine(llama_dir, fork_string, spec=True)
    eng.drafter = OracleDrafter(threads, {eng.fork_id, eng.child_id}, wrong_every)
    ids = [eng.add_request(p, params) for p, params in REQUESTS]
    leads: list = []
    got = collect(eng, ids, after=lead_watch(eng, leads))
    same_answers(want, got)
    finishes = [r["finish"] for r in want.values()]
    assert all(f.reason == FinishReason.LENGTH and f.usage.threads >= 2 for f in finishes[:2])
    # drafts held while a sibling had none: their tokens were kept ahead, not rolled back
    assert leads and max(n for _, _, n in leads) >= K
    usage = [r["finish"].usage for r in got.values()]
    assert sum(u.accepted_tokens for u in usage) == eng.spec_accepted_tokens > 50
    assert all(u.accepted_tokens <= u.completion_tokens for u in usage)
    if wrong_every:
        assert eng.spec_draft_tokens > eng.spec_accepted_tokens
    assert sum(u.steps for u in usage) < 0.8 * sum(f.usage.steps for f in finishes)


def _drops(monkeypatch) -> list:
    """Every non-empty drop of a thread's tokens ahead: (its finish, or None for a preemption; how many)."""
    drops = []
    real = Thread.drop_ahead

    def drop_ahead(self) -> None:
        if self.ahead:
            drops.append((self.finish, len(self.ahead)))
        real(self)

    monkeypatch.setattr(Thread, "drop_ahead", drop_ahead)
    return drops


def test_tokens_ahead_dropped_by_a_cancel_or_a_budget_leave_the_ledger_clean(llama_dir, fork_string, plain,
                                                                            monkeypatch):
    _, _, threads = plain
    drops = _drops(monkeypatch)
    eng, logs = make_engine(llama_dir, fork_string, spec=True, replica=True)
    eng.drafter = OracleDrafter(threads, {eng.fork_id, eng.child_id})
    replica = Replica(eng, logs[0])
    ids = [eng.add_request(p, params) for p, params in REQUESTS]
    cancelled = None

    def cancel_one_ahead() -> None:
        nonlocal cancelled
        req = eng.requests.get(ids[0])
        if cancelled is None and req is not None and any(len(t.ahead) >= 3 for t in req.threads if t.running):
            before = eng.ledger.blocks_read(req.id)
            cancelled = sum(len(t.ahead) for t in req.threads)
            eng.abort(req.id)
            eng.ledger.check()
            assert before > 0 and eng.ledger.blocks_read(req.id) == 0
            replica.deliver()

    got = collect(eng, ids, before=cancel_one_ahead, after=lambda _: replica.deliver())
    replica.deliver()
    assert cancelled and any(reason == FinishReason.CANCELLED and n >= 3 for reason, n in drops)
    assert got[ids[0]]["finish"] is None  # (its end was reported by `abort`)
    # the budget ended answer 1 while a thread held verified tokens ahead
    assert any(reason == FinishReason.LENGTH and n >= 2 for reason, n in drops)
    u = got[ids[1]]["finish"].usage
    assert got[ids[1]]["finish"].reason == FinishReason.LENGTH and u.accepted_tokens <= u.completion_tokens
    assert replica.replica.num_used == 0


def test_tokens_ahead_give_way_under_pressure_and_preemption_and_answers_stay_plain(llama_dir, fork_string, plain,
                                                                                   monkeypatch):
    # 36 four-token blocks for four answers: the tokens ahead are trimmed, then requests preempted and
    # recomputed; forks are never refused (fork watermark 0), so the trees stay those of a roomy pool. The
    # forking requests come last: they are the first preempted.
    _, _, threads = plain
    requests = REQUESTS[::-1]
    want = plain_run(llama_dir, fork_string, requests)[0]
    drops = _drops(monkeypatch)
    trims = []
    real_trim = Engine._trim_ahead

    def trim(self) -> bool:
        held = sum(max(0, len(t.ahead) - 1) for r in self.scheduler.running for t in r.threads if t.running)
        done = real_trim(self)
        trims.append(held if done else 0)
        assert sum(max(0, len(t.ahead) - 1) for r in self.scheduler.running for t in r.threads if t.running) == 0
        return done

    monkeypatch.setattr(Engine, "_trim_ahead", trim)
    eng, logs = make_engine(llama_dir, fork_string, spec=True, replica=True, num_blocks=36, fork_watermark=0.0,
                            admit_watermark=0.0)
    eng.drafter = OracleDrafter(threads, {eng.fork_id, eng.child_id}, wrong_every=4)
    replica = Replica(eng, logs[0])
    ids = [eng.add_request(p, params) for p, params in requests]
    got = collect(eng, ids, after=lambda _: replica.deliver())
    same_answers(want, got)
    assert eng.preemptions > 0 and any(trims) and eng.spec_accepted_tokens > 0
    assert any(reason is None for reason, _ in drops)  # a preemption dropped tokens ahead
    assert replica.replica.num_used == 0
