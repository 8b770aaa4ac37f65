"""`n` answers to one prompt: the prompt is prefilled once and its KV blocks shared by every answer.

Answers are read off the events the way a client reads them: parentless `ThreadStarted` events, in
order, are answers 0, 1, ...; a child belongs to its parent's answer. Expected values come from the
plain HF model and from the same request run with n=1, never from the engine's own bookkeeping.
"""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from apar.engine.config import EngineConfig
from apar.engine.engine import Engine
from apar.engine.errors import CapacityError, UserError
from apar.engine.events import FinishReason
from apar.engine.kv.ledger import ThreadRef
from apar.engine.params import SamplingParams
from apar.engine.replay import ReplayNode
from services.kvmanager.inprocess import InProcessClient
from services.kvmanager.manager import KVManager
from services.worker.kv import RemoteKV
from tests.test_engine_golden import reference_logits
from tests.test_engine_pressure import Transcript, assert_each_as_alone, biased_forward, run

PROMPT = list(range(30, 52))  # 22 tokens: 5 full blocks of 4 and a partial one
FORK_BIAS = 8.0  # added to the [Fork] logit: this random model then forks, greedy or sampling


def answer_roots(tr: Transcript, rid: str) -> list[int]:
    """Thread ids of the answers' roots, in answer order."""
    return [tid for tid, (parent, _) in tr.threads[rid].items() if parent is None]


def answer_of(tr: Transcript, rid: str) -> dict[int, int]:
    roots = answer_roots(tr, rid)
    out: dict[int, int] = {}
    for tid, (parent, _) in tr.threads[rid].items():  # announced parents before children
        out[tid] = roots.index(tid) if parent is None else out[parent]
    return out


def tree(tr: Transcript, rid: str, tid: int) -> tuple:
    """One thread and its children as (tokens, ((anchor, subtree), ...)): thread ids left out."""
    kids = sorted((anchor, t) for t, (parent, anchor) in tr.threads[rid].items() if parent == tid)
    return tuple(tr.tokens.get((rid, tid), [])), tuple((a, tree(tr, rid, t)) for a, t in kids)


def answers(tr: Transcript, rid: str) -> list[tuple]:
    return [tree(tr, rid, t) for t in answer_roots(tr, rid)]


def test_every_thread_of_every_answer_matches_the_plain_model(llama_dir):
    """Seeded sampling, n=3, forks the model really samples: each thread's logits at each step equal the
    plain model's on the context read off the events (an answer's root reads the prompt only)."""
    eng = Engine(llama_dir, EngineConfig(block_size=4, num_blocks=256, max_batch_tokens=16), keep_logits=True)
    biased_forward(eng, FORK_BIAS)
    ref = AutoModelForCausalLM.from_pretrained(str(llama_dir), dtype=torch.float32, attn_implementation="eager")
    rid = eng.add_request(PROMPT, SamplingParams(max_tokens=40, temperature=1.0, top_k=50, seed=3, n=3,
                                                 max_threads=4))
    prefix: dict[int, list[int]] = {}  # the context before the thread's own tokens
    fed: dict[int, int] = {}
    checked = 0

    def on_step(res, tr):
        nonlocal checked
        for (_, tid), (ctx, logits) in res.logits.items():
            if tid not in prefix:
                parent, anchor = tr.threads[rid][tid]
                if parent is None:  # an answer's root; all but answer 0's first ran with a sampled token
                    prefix[tid], fed[tid] = PROMPT, int(tid > 0)
                else:
                    ptoks = tr.tokens[(rid, parent)]
                    prefix[tid], fed[tid] = prefix[parent] + ptoks[: anchor + 1] + [eng.child_id], 0
            k = fed[tid]
            fed[tid] = k + 1
            own = tr.tokens.get((rid, tid), [])[:k]
            assert ctx == prefix[tid] + own
            want = reference_logits(ref, ctx)
            want[eng.fork_id] += FORK_BIAS  # the engine's model is biased the same way
            assert (logits - want).abs().max().item() < 1e-4, (tid, len(ctx))
            checked += 1

    tr = run(eng, on_step)
    roots = answer_roots(tr, rid)
    assert roots == [0, 1, 2]  # answer roots come before any child
    per_answer = answer_of(tr, rid)
    assert all(sum(a == k for a in per_answer.values()) > 1 for k in range(3)), "every answer should fork"
    assert len(set(map(tuple, answers(tr, rid)))) == 3
    assert tr.finished[rid].usage.threads == len(tr.threads[rid])
    assert checked > 60


def test_answers_share_the_prompt_blocks(llama_dir):
    eng = Engine(llama_dir, EngineConfig(block_size=4, num_blocks=64, max_batch_tokens=16))
    params = {"max_tokens": 12, "ignore_eos": True, "auto_parallel": False}
    rid = eng.add_request(PROMPT, SamplingParams(n=3, **params))
    prompt_blocks = -(-len(PROMPT) // 4)
    shared_steps = 0

    def on_step(res, tr):
        nonlocal shared_steps
        req = eng.requests.get(rid)
        if req is None or len(req.threads) < 3 or not all(t.running for t in req.threads):
            return
        root_blocks = eng.ledger.own_blocks(ThreadRef(rid, 0))[:prompt_blocks]
        assert [eng.ledger.refcount(b) for b in root_blocks] == [3] * prompt_blocks
        for a in (1, 2):
            assert eng.ledger.context_blocks(ThreadRef(rid, a))[:prompt_blocks] == root_blocks
            assert set(eng.ledger.own_blocks(ThreadRef(rid, a))).isdisjoint(root_blocks)
        shared_steps += 1

    tr = run(eng, on_step)
    assert shared_steps >= 10
    # the prompt computed once, then 11 tokens per answer at positions 22..32
    prompt_attended, answer_attended = sum(range(1, 23)), sum(range(23, 34))
    assert tr.finished[rid].usage.attended_tokens == prompt_attended + 3 * answer_attended

    # separate requests without the prefix cache (which would share the prompt's blocks too)
    alone = Engine(llama_dir, EngineConfig(block_size=4, num_blocks=64, max_batch_tokens=16, prefix_cache=False))
    ids = [alone.add_request(PROMPT, SamplingParams(**params)) for _ in range(3)]
    separate = sum(u.usage.peak_kv_blocks for rid, u in run(alone).finished.items() if rid in ids)
    # between steps: the prompt's 6 blocks once + 3 blocks per answer, against 8 per separate request
    assert eng.peak_blocks == prompt_blocks + 3 * 3 < separate == 3 * 8


@pytest.fixture(scope="module")
def forking(llama_dir):
    eng = Engine(llama_dir, EngineConfig(block_size=4, num_blocks=512, max_batch_tokens=32))
    biased_forward(eng, FORK_BIAS)
    return eng


def solo_and_many(eng: Engine, params: dict, n: int) -> tuple[list[tuple], list[tuple], Transcript]:
    """The request's answer alone (n=1) and its answers with n; the transcript of the latter."""
    one = eng.add_request(PROMPT, SamplingParams(**params))
    tr_one = run(eng)
    many = eng.add_request(PROMPT, SamplingParams(n=n, **params))
    tr_many = run(eng)
    assert tr_one.finished[one].usage.threads > 1, "the request should fork"
    return answers(tr_one, one), answers(tr_many, many), tr_many


def test_greedy_answers_equal_the_single_answer(forking):
    params = {"max_tokens": 30, "max_threads": 4}
    one, many, tr = solo_and_many(forking, params, 3)
    assert many == one * 3
    (rid, fin), = tr.finished.items()
    assert fin.usage.threads == len(tr.threads[rid]) and fin.usage.forks == fin.usage.threads - 3


def test_seeded_answers_are_reproducible_and_differ(forking):
    params = {"max_tokens": 30, "temperature": 1.0, "seed": 21, "n": 2}
    first = run_answers(forking, params)
    forking.add_request([5, 6, 7, 8], SamplingParams(max_tokens=20, temperature=1.0))  # a neighbour
    assert run_answers(forking, params) == first
    assert first[0] != first[1]
    assert run_answers(forking, dict(params, seed=22)) != first


def run_answers(eng: Engine, params: dict) -> list[tuple]:
    rid = eng.add_request(PROMPT, SamplingParams(**params))
    return answers(run(eng), rid)


def test_max_tokens_and_max_threads_are_per_answer(llama_dir):
    eng = Engine(llama_dir, EngineConfig(block_size=4, num_blocks=128, max_batch_tokens=32))
    ar = eng.add_request(PROMPT, SamplingParams(max_tokens=5, ignore_eos=True, auto_parallel=False, n=2))
    tr = run(eng)
    assert [len(tr.tokens[(ar, t)]) for t in answer_roots(tr, ar)] == [5, 5]
    assert tr.finished[ar].usage.completion_tokens == 10 and tr.finished[ar].reason is FinishReason.LENGTH
    assert all(tr.thread_ends[(ar, t)] == 1 for t in (0, 1))

    biased_forward(eng, 1e4)  # every thread forks whenever it may
    p = SamplingParams(max_tokens=12, ignore_eos=True, max_threads=3, n=2)
    rid = eng.add_request(PROMPT, p)
    tr = run(eng)
    per_answer = answer_of(tr, rid)
    for k in range(2):
        threads = [t for t, a in per_answer.items() if a == k]
        forks = sum(1 for t in threads if t not in answer_roots(tr, rid))  # one [Child] each
        assert len(threads) == p.max_threads
        assert sum(len(tr.tokens.get((rid, t), [])) for t in threads) + forks == p.max_tokens
    usage = tr.finished[rid].usage
    assert usage.threads == 6 and usage.completion_tokens == 24 and tr.finished[rid].reason is FinishReason.LENGTH


def test_preempted_answers_go_on_unchanged(llama_dir):
    """Requests of n=2 and n=3 through a tiny pool, preempted while their answers run, and while a root
    that has ended holds the prompt two answers read: each streams exactly what it streams alone."""
    cfg = {"block_size": 4, "max_batch_tokens": 32, "fork_watermark": 0.0}
    prompts = [list(range(20 + 7 * i, 30 + 7 * i)) for i in range(8)]
    eng = Engine(llama_dir, EngineConfig(num_blocks=36, **cfg))
    biased_forward(eng, 4.0)
    stops = tuple(t for t in range(3, 1024, 37) if t != eng.fork_id)  # answers of many lengths
    params = [SamplingParams(max_tokens=40, temperature=1.0, top_k=50, seed=s, max_threads=4, n=3 - (s % 3 == 2),
                             stop_token_ids=stops) for s in range(8)]
    seen = {"answers running": 0, "root done, two answers running": 0}
    preempt = eng.pressure.preempt

    def spy(req):
        if len(req.threads) >= req.params.n and req.root.in_ledger:
            live = sum(t.running for t in req.threads[1: req.params.n])
            seen["answers running"] += live > 0
            seen["root done, two answers running"] += live > 1 and not req.root.running
        preempt(req)

    eng.pressure.preempt = spy
    ids = [eng.add_request(p, sp) for p, sp in zip(prompts, params)]
    crowded = run(eng)
    assert all(seen.values()), seen
    assert sum(crowded.finished[r].usage.preemptions for r in ids) == eng.preemptions > 0
    assert_each_as_alone(llama_dir, cfg, 4.0, crowded, zip(ids, prompts, params))


def test_kv_manager_ledger_equals_the_workers_with_answers(llama_dir):
    """Cluster mode: the answers' forks travel in the next step's message, before that step's appends;
    through preemptions both ledgers stay equal, block for block."""
    manager = KVManager(store=None)

    def factory(ledger):
        client = InProcessClient(manager, "w-1", "here", ledger.num_blocks, ledger.block_size)
        client.register()
        return RemoteKV(ledger, client)

    eng = Engine(llama_dir, EngineConfig(block_size=4, num_blocks=36, max_batch_tokens=24, fork_watermark=0.0),
                 kv_factory=factory)
    biased_forward(eng, FORK_BIAS)
    for s in range(5):
        eng.add_request(list(range(20 + 9 * s, 33 + 9 * s)), SamplingParams(max_tokens=30, temperature=1.0,
                                                                          seed=s, n=3, max_threads=3))
    while eng.has_work():
        eng.step()
        eng.kv.drain()  # the step's message (and this step's thread ends) acknowledged
        assert manager.state("w-1") == eng.ledger.snapshot()
        manager.check()
    state = manager.state("w-1")  # only cached blocks are left (count 0, index 3 of a snapshot's block)
    assert eng.preemptions > 0
    assert all(b[3] == 0 for b in state["blocks"]) and len(state["cache"]) == len(state["blocks"])


def test_cancel_frees_every_answer(llama_dir):
    eng = Engine(llama_dir, EngineConfig(block_size=4, num_blocks=64, max_batch_tokens=16))
    biased_forward(eng, FORK_BIAS)
    rid = eng.add_request(PROMPT, SamplingParams(max_tokens=40, temperature=1.0, seed=3, n=3))
    tr = Transcript()
    for _ in range(6):
        tr.add(eng.step().events)
    assert len(answer_roots(tr, rid)) == 3 and eng.ledger.blocks_of(rid) > 0
    tr.add(eng.abort(rid))
    eng.ledger.check()
    assert eng.ledger.num_used == 0 and eng.ledger.num_free == 64
    assert tr.finished[rid].reason is FinishReason.CANCELLED
    assert {t for (r, t) in tr.thread_ends} == set(tr.threads[rid])
    assert all(n == 1 for n in tr.thread_ends.values())
    assert not eng.has_work()


def test_n_out_of_range_and_replayed_answers_are_refused(llama_dir):
    for bad in (0, 17, True, 2.0):
        with pytest.raises(UserError, match="n must be"):
            SamplingParams(n=bad)
    eng = Engine(llama_dir, EngineConfig(block_size=4, num_blocks=8))
    with pytest.raises(UserError, match="one answer"):
        eng.add_request([5, 6, 7], SamplingParams(n=2), replay=ReplayNode([11, 12]))
    with pytest.raises(CapacityError, match="and 4 answers needs 9 KV blocks"):
        eng.add_request(list(range(10, 30)), SamplingParams(n=4))  # 5 prompt blocks + 4 first tokens
    rid = eng.add_request(list(range(10, 30)), SamplingParams(n=3, max_tokens=8))  # fits, then fills the pool
    tr = run(eng)
    assert len(answer_roots(tr, rid)) == 3 and tr.finished[rid].reason is FinishReason.LENGTH
