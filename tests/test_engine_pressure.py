"""The engine under KV pressure: admission on free blocks, forks refused, preemption by recompute.

Expected values come from the replayed trees themselves and from the plain HF model, never from the
engine's own bookkeeping (`context_tokens`); every run checks the ledger's invariants after each step.
"""
from __future__ import annotations

import random
from collections import Counter

import torch
from transformers import AutoModelForCausalLM

from apar.engine.config import EngineConfig
from apar.engine.engine import Engine
from apar.engine.events import FinishReason, RequestFinished, ThreadFinished, ThreadStarted, TokenEvent
from apar.engine.kv.ledger import KVLedger
from apar.engine.params import SamplingParams
from apar.engine.replay import ReplayNode, random_tree
from services.kvmanager.inprocess import InProcessClient
from services.kvmanager.manager import KVManager
from services.worker.kv import RemoteKV
from tests.test_engine_golden import reference_logits


def make_trees(eng: Engine, n: int, seed: int, depth: int = 2) -> list[tuple[list[int], ReplayNode]]:
    rng = random.Random(seed)
    eos = next(iter(eng.eos_ids))
    plain = [i for i in range(5, 400) if i not in (eng.fork_id, eng.child_id, eos)]
    return [(rng.sample(plain, rng.randint(5, 30)), random_tree(rng, plain, eng.fork_id, depth, eos))
            for _ in range(n)]


def tree_linear(node: ReplayNode, fork: int, eos_ids) -> list[int]:
    """The tree's restored text as tokens: each [Fork] replaced by its child's text, EOS dropped."""
    out, k = [], 0
    for tok in node.tokens:
        if tok == fork:
            out += tree_linear(node.children[k], fork, eos_ids)
            k += 1
        elif tok not in eos_ids:
            out.append(tok)
    return out


class Transcript:
    """Every request's threads as the events tell them: (parent, anchor) and streamed tokens."""

    def __init__(self) -> None:
        self.threads: dict[str, dict[int, tuple[int | None, int]]] = {}
        self.tokens: dict[tuple[str, int], list[int]] = {}
        self.finished: dict[str, RequestFinished] = {}
        self.thread_ends: dict[tuple[str, int], int] = {}

    def add(self, events) -> None:
        for ev in events:
            if isinstance(ev, ThreadStarted):
                assert ev.thread not in self.threads.setdefault(ev.request, {}), "thread announced twice"
                self.threads[ev.request][ev.thread] = (ev.parent, ev.anchor)
            elif isinstance(ev, TokenEvent):
                assert ev.request not in self.finished
                self.tokens.setdefault((ev.request, ev.thread), []).append(ev.token)
            elif isinstance(ev, ThreadFinished):
                key = (ev.request, ev.thread)
                self.thread_ends[key] = self.thread_ends.get(key, 0) + 1
            elif isinstance(ev, RequestFinished):
                assert ev.request not in self.finished, "request finished twice"
                self.finished[ev.request] = ev

    def linear(self, rid: str, fork: int, tid: int = 0) -> list[int]:
        kids = {anchor: t for t, (parent, anchor) in self.threads[rid].items() if parent == tid}
        out = []
        for i, tok in enumerate(self.tokens.get((rid, tid), [])):
            out += self.linear(rid, fork, kids[i]) if i in kids else [tok]
        return out


def run(eng: Engine, on_step=None) -> Transcript:
    tr = Transcript()
    while eng.has_work():
        res = eng.step()
        tr.add(res.events)
        eng.ledger.check()
        if on_step:
            on_step(res, tr)
    assert eng.ledger.num_used == 0 and eng.ledger.num_free == eng.ledger.num_blocks
    return tr


def test_golden_through_preemption_and_recompute(llama_dir):
    """Every thread's logits, at every step, before and after its request was preempted, equal the plain
    model's on the context read off the replayed tree; each thread streams exactly its tree node."""
    eng = Engine(llama_dir, EngineConfig(block_size=4, num_blocks=36, max_batch_tokens=24, fork_watermark=0.0),
                 keep_logits=True)
    ref = AutoModelForCausalLM.from_pretrained(str(llama_dir), dtype=torch.float32, attn_implementation="eager")
    items = make_trees(eng, 7, seed=11)
    prompts, trees = {}, {}
    for prompt, tree in items:
        rid = eng.add_request(prompt, SamplingParams(max_tokens=500), replay=tree)
        prompts[rid], trees[rid] = prompt, tree
    node_of: dict[tuple[str, int], ReplayNode] = {}
    prefix_of: dict[tuple[str, int], list[int]] = {}  # the context before the thread's own tokens
    fed: dict[tuple[str, int], int] = {}  # own tokens fed so far, counted from the logits rows
    checked, after_preemption = 0, 0

    def on_step(res, tr):
        nonlocal checked, after_preemption
        for (rid, tid), (ctx, logits) in res.logits.items():
            if tid == 0 and (rid, 0) not in node_of:
                node_of[(rid, 0)], prefix_of[(rid, 0)] = trees[rid], prompts[rid]
            if (rid, tid) not in node_of:  # a child: which node is told by its parent and anchor
                parent, anchor = tr.threads[rid][tid]
                pnode = node_of[(rid, parent)]
                assert pnode.tokens[anchor] == eng.fork_id
                node_of[(rid, tid)] = pnode.children[pnode.tokens[:anchor].count(eng.fork_id)]
                prefix_of[(rid, tid)] = prefix_of[(rid, parent)] + pnode.tokens[: anchor + 1] + [eng.child_id]
            k = fed.get((rid, tid), 0)
            expected = prefix_of[(rid, tid)] + node_of[(rid, tid)].tokens[:k]
            fed[(rid, tid)] = k + 1
            assert ctx == expected
            want = reference_logits(ref, expected)
            assert (logits - want).abs().max().item() < 1e-4, (rid, tid, len(expected))
            checked += 1
            req = eng.requests.get(rid)
            after_preemption += bool(req and req.usage.preemptions)

    tr = run(eng, on_step)
    eos = eng.eos_ids
    for rid, tree in trees.items():
        for (r, tid), node in node_of.items():
            if r == rid:
                assert tr.tokens.get((rid, tid), []) == [t for t in node.tokens if t not in eos]
        assert tr.finished[rid].usage.threads == tree.threads()
    assert eng.preemptions >= 3 and eng.recomputed_tokens > 0
    assert after_preemption > 20 and checked > 150


def test_crowded_pool_gives_each_request_its_answer_alone(llama_dir):
    """Many replayed trees through a small pool: forks are refused and requests preempted, yet every
    request's restored text is exactly what it gives alone (and the tree's), and nothing leaks."""
    cfg = dict(block_size=4, max_batch_tokens=32)
    eng = Engine(llama_dir, EngineConfig(num_blocks=48, fork_watermark=0.25, **cfg))
    items = make_trees(eng, 14, seed=3)
    ids = [eng.add_request(p, SamplingParams(max_tokens=500), replay=t) for p, t in items]
    crowded = run(eng)
    assert eng.preemptions > 0 and eng.forks_refused > 0 and eng.recomputed_tokens > 0
    assert sum(crowded.finished[r].usage.preemptions for r in ids) == eng.preemptions
    assert sum(crowded.finished[r].usage.forks_refused for r in ids) == eng.forks_refused

    alone = Engine(llama_dir, EngineConfig(num_blocks=512, **cfg))
    for rid, (prompt, tree) in zip(ids, items):
        alone.add_request(prompt, SamplingParams(max_tokens=500), request_id=rid, replay=tree)
        solo = run(alone)
        assert solo.finished[rid].usage.preemptions == 0 and solo.finished[rid].usage.forks_refused == 0
        want = tree_linear(tree, eng.fork_id, eng.eos_ids)
        assert solo.linear(rid, eng.fork_id) == want
        assert crowded.linear(rid, eng.fork_id) == want
        assert crowded.finished[rid].reason is FinishReason.STOP
    refused = [r for r in ids if crowded.finished[r].usage.forks_refused]
    assert all(crowded.finished[r].usage.threads < items[ids.index(r)][1].threads() for r in refused)


def biased_forward(eng: Engine, bias: float):
    """Make the random model like [Fork]: its logit raised by `bias` in every row (a deterministic
    change of the model, the same alone and crowded)."""
    forward = eng.runner.forward

    def wrapped(*args):
        logits = forward(*args)
        logits[:, eng.fork_id] += bias
        return logits

    eng.runner.forward = wrapped


def test_sampled_answers_are_unchanged_by_preemption(llama_dir):
    """Seeded sampling with model-driven forks: preempted requests stream exactly the threads and tokens
    they stream alone (no fork refused: fork_watermark 0)."""
    cfg = dict(block_size=4, max_batch_tokens=32, fork_watermark=0.0)
    params = [SamplingParams(max_tokens=60, temperature=1.0, top_k=50, seed=s, max_threads=6) for s in range(8)]
    prompts = [list(range(20 + 7 * i, 30 + 7 * i)) for i in range(8)]
    eng = Engine(llama_dir, EngineConfig(num_blocks=40, **cfg))
    biased_forward(eng, 6.0)
    ids = [eng.add_request(p, sp) for p, sp in zip(prompts, params)]
    crowded = run(eng)
    assert eng.preemptions > 0
    assert sum(crowded.finished[r].usage.forks for r in ids) > 4
    assert_each_as_alone(llama_dir, cfg, 6.0, crowded, zip(ids, prompts, params))


def assert_each_as_alone(model_dir, cfg: dict, bias: float, crowded: Transcript, requests) -> None:
    """Each (request id, prompt, params) run alone in a large pool gives the crowded run's threads, tokens
    and usage."""
    alone = Engine(model_dir, EngineConfig(num_blocks=512, **cfg))
    biased_forward(alone, bias)
    for rid, prompt, sp in requests:
        alone.add_request(prompt, sp, request_id=rid)
        solo = run(alone)
        assert crowded.threads[rid] == solo.threads[rid]
        assert {k: v for k, v in crowded.tokens.items() if k[0] == rid} == \
               {k: v for k, v in solo.tokens.items() if k[0] == rid}
        c, s = crowded.finished[rid].usage, solo.finished[rid].usage
        assert (c.completion_tokens, c.threads, c.forks, c.steps) == (s.completion_tokens, s.threads, s.forks, s.steps)
        assert crowded.finished[rid].reason is solo.finished[rid].reason


def test_forks_of_one_request_in_one_step_keep_every_limit(llama_dir):
    """[Fork] forced to the top of every row: threads of one request want to fork in the same step, yet
    max_threads, max_depth and max_tokens hold (the limits are checked as each token is applied)."""
    eng = Engine(llama_dir, EngineConfig(block_size=4, num_blocks=128, max_batch_tokens=32))
    biased_forward(eng, 1e4)
    cases = [SamplingParams(max_tokens=40, max_threads=3, max_depth=8),
             SamplingParams(max_tokens=8, max_threads=16, max_depth=8),
             SamplingParams(max_tokens=40, max_threads=16, max_depth=1),
             SamplingParams(max_tokens=9, max_threads=5, max_depth=8, temperature=0.8, seed=4),
             SamplingParams(max_tokens=40, max_threads=16, max_depth=8)]
    ids = [eng.add_request(list(range(30, 40)), p) for p in cases]
    together: dict[str, int] = {}  # request -> most forks applied in one step

    def on_step(res, tr):
        forks: dict[str, int] = {}
        for ev in res.events:
            if isinstance(ev, TokenEvent) and ev.token == eng.fork_id:
                forks[ev.request] = forks.get(ev.request, 0) + 1
        for rid, n in forks.items():
            together[rid] = max(together.get(rid, 0), n)
        for rid, p in zip(ids, cases):
            req = eng.requests.get(rid)
            if req is not None:
                assert len(req.threads) <= p.max_threads and req.usage.completion_tokens <= p.max_tokens
                assert max(t.depth for t in req.threads) <= p.max_depth

    tr = run(eng, on_step)
    usage = [tr.finished[rid].usage for rid in ids]
    assert together[ids[4]] >= 4  # unconstrained, every thread forks in the same step
    # constrained: two threads wanted [Fork] in the same step, only what the limit allows happened
    assert usage[0].threads == 3  # root and first child both fork-ready in step 3: one fork only
    assert usage[1].completion_tokens == 8 and usage[1].threads == 3  # 3 left in step 3: one fork, not two
    assert usage[2].threads > 2 and together[ids[2]] == 1  # only the root may fork (depth 1)
    assert usage[3].completion_tokens <= 9
    for u, p in zip(usage, cases):
        assert u.completion_tokens <= p.max_tokens and u.threads <= p.max_threads


def test_replayed_fork_where_no_fork_may_happen_never_crashes(short_llama_dir):
    """A replayed [Fork] at the end of the model's context (and past max_threads): the thread goes on
    sequentially with the child's tokens, as a refused fork does; the engine never raises."""
    eng = Engine(short_llama_dir, EngineConfig(block_size=4, num_blocks=64, max_batch_tokens=64))
    F = eng.fork_id
    prompt = list(range(10, 58))  # 48 of the 64 positions
    body = list(range(100, 114))  # 14 more: a [Fork] at position 62 has no room for [Child] and a token
    tree = ReplayNode(body + [F, 200, F, 201], [ReplayNode([300, 301, 302]), ReplayNode([400])])
    rid = eng.add_request(prompt, SamplingParams(max_tokens=100), replay=tree)
    capped = eng.add_request(list(range(10, 20)), SamplingParams(max_tokens=100, max_threads=2),
                             replay=ReplayNode([5, F, 6, F, 7], [ReplayNode([8, 9]), ReplayNode([10, 11])]))
    tr = run(eng)
    assert tr.finished[rid].reason is FinishReason.LENGTH
    assert tr.threads[rid] == {0: (None, -1)}
    assert tr.tokens[(rid, 0)] == body + [300, 301]  # the refused child's tokens, inline, to the end
    assert tr.finished[capped].usage.threads == 2
    assert tr.linear(capped, F) == [5, 8, 9, 6, 10, 11, 7]


def test_cancel_waiting_preempted_and_recomputing_requests(llama_dir):
    """Cancel a request while it waits after a preemption, and one while it recomputes: each ends once
    with every thread reported, nothing is freed twice (the ledger raises on that), nothing leaks."""
    eng = Engine(llama_dir, EngineConfig(block_size=4, num_blocks=40, max_batch_tokens=16, fork_watermark=0.0))
    items = make_trees(eng, 8, seed=5)
    ids = [eng.add_request(p, SamplingParams(max_tokens=500), replay=t) for p, t in items]
    tr = Transcript()
    cancelled = {}
    while eng.has_work():
        for req in list(eng.scheduler.waiting):
            if req.usage.preemptions and "waiting" not in cancelled:
                cancelled["waiting"] = req.id
                tr.add(eng.abort(req.id))
        for req in list(eng.scheduler.running):
            if req.recomputing and req.root.in_ledger and "recomputing" not in cancelled:
                cancelled["recomputing"] = req.id
                tr.add(eng.abort(req.id))
        tr.add(eng.step().events)
        eng.ledger.check()
    assert set(cancelled) == {"waiting", "recomputing"}
    for rid in cancelled.values():
        assert tr.finished[rid].reason is FinishReason.CANCELLED
        announced = set(tr.threads[rid])
        assert {t for (r, t) in tr.thread_ends if r == rid} == announced
        assert all(n == 1 for (r, _), n in tr.thread_ends.items() if r == rid)
    assert set(tr.finished) == set(ids)
    assert eng.ledger.num_used == 0 and eng.ledger.num_free == 40


def test_kv_manager_ledger_equals_the_workers_through_preemptions(llama_dir):
    """Cluster mode: a preemption reaches the KV manager as a release, the recompute as new allocations,
    at most one step per engine step; after every step both ledgers are equal, block for block."""
    manager = KVManager(store=None)

    def factory(ledger: KVLedger):
        client = InProcessClient(manager, "w-1", "here", ledger.num_blocks, ledger.block_size)
        client.register()
        return RemoteKV(ledger, client)

    eng = Engine(llama_dir, EngineConfig(block_size=4, num_blocks=40, max_batch_tokens=24, fork_watermark=0.1),
                 kv_factory=factory)
    items = make_trees(eng, 10, seed=8)
    ids = [eng.add_request(p, SamplingParams(max_tokens=500), replay=t) for p, t in items]
    sent: Counter[str] = Counter()  # one-token appends in the compact steps the worker sends
    push = eng.kv.outbox._push

    def counting(ops):
        sent["alone"] += sum(type(op).__name__ == "Append" and op.tokens == 1 for op in ops)
        sent["in append-each"] += sum(len(op.threads) for op in ops if type(op).__name__ == "AppendEach")
        push(ops)

    eng.kv.outbox._push = counting
    while eng.has_work():
        before = eng.kv.outbox.seq
        eng.step()
        assert eng.kv.outbox.seq - before <= 1  # one step message per engine step, or none
        eng.kv.drain()  # acknowledged; for the comparison, this step's thread ends go out now too
        assert manager.state("w-1") == eng.ledger.snapshot()
        manager.check()
    assert eng.kv.outbox.resync is None and manager.applied("w-1")[1] == eng.kv.outbox.seq
    assert eng.preemptions > 0 and eng.forks_refused > 0
    # most tokens that open a block travel in an AppendEach (the others come after a fork of their thread,
    # a prefill chunk or an end in their step)
    assert sent["in append-each"] > sent["alone"] > 0
    state = manager.state("w-1")  # only cached blocks are left (count 0, index 3 of a snapshot's block)
    assert state["free"] and all(b[3] == 0 for b in state["blocks"]) and len(state["cache"]) == len(state["blocks"])
    assert len(ids) == 10


def test_admission_on_free_blocks_not_worst_case(llama_dir):
    """Two requests whose worst cases could not both be reserved start together; a third waits for the
    watermark; with nothing running, the head of the queue is admitted whatever the watermark."""
    eng = Engine(llama_dir, EngineConfig(block_size=4, num_blocks=12, max_batch_tokens=64, admit_watermark=0.25))
    p = SamplingParams(max_tokens=20, auto_parallel=False)  # worst case 9 blocks each: 2 would need 18
    a = eng.add_request(list(range(30, 38)), p)  # 2 blocks
    b = eng.add_request(list(range(40, 48)), p)  # 2 blocks
    c = eng.add_request(list(range(50, 74)), p)  # 6 blocks: 12 - 4 - 6 < 3 (the watermark)
    eng.step()
    assert [r.id for r in eng.scheduler.running] == [a, b]
    assert [r.id for r in eng.scheduler.waiting] == [c]
    tr = run(eng)
    assert set(tr.finished) == {a, b, c}
    lone = Engine(llama_dir, EngineConfig(block_size=4, num_blocks=12, max_batch_tokens=64, admit_watermark=0.5))
    big = lone.add_request(list(range(30, 70)), p)  # 10 of 12 blocks: above the watermark, alone
    lone.step()
    assert [r.id for r in lone.scheduler.running] == [big]


def test_head_of_queue_is_admitted_when_nothing_runs_whatever_it_needs():
    """A preempted request whose recompute estimate exceeds the pool never stalls the queue: with nothing
    running it is admitted (it held that KV before; if it truly cannot fit, it ends with `length`)."""
    from apar.engine.scheduler import Scheduler
    from apar.engine.sequence import Request, Thread

    sched = Scheduler(KVLedger(8, 4), max_batch_tokens=64, admit_watermark=2)
    req = Request(id="r", prompt=[1] * 10, params=SamplingParams(), admitted=True, recomputing=True)
    req.threads.append(Thread(id=0, parent=None, anchor=-1, start_pos=0, depth=0, kv_tokens=[1] * 40, n_prompt=10))
    assert sched.blocks_to_start(req) > 8
    sched.waiting.append(req)
    assert sched.admit() == [req]
