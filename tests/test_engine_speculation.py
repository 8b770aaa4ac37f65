"""Speculation inside threads, end to end on a small real model: greedy answers with ngram drafts are
token for token the answers without them (same threads, same anchors, same text, same finish) through
forks, nested forks, preemption and the prefix cache; every logits row of a drafting step, the draft
rows included, equals the plain model's on that row's context (the golden test's rule); the KV manager's
replica of a drafting worker's ledger equals it; the ledger is clean afterwards."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from transformers import AutoModelForCausalLM

from apar.engine.config import ControlTokens, EngineConfig, SpeculativeConfig
from apar.engine.engine import Engine
from apar.engine.events import RequestFinished, ThreadStarted, TokenEvent
from apar.engine.kv.step import apply
from apar.engine.params import SamplingParams
from services.kvmanager.json_forms import ops_from_bytes, ops_to_bytes
from services.kvmanager.replica import ReplicaLedger
from services.kvmanager.replication import Ack, ReplicationLog

NGRAM = SpeculativeConfig("ngram", num_tokens=4, policy="all")  # every draft: the mechanics, not the policy
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30], [40, 41, 42],
           [60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70, 71, 72, 73, 74, 75, 76, 77]]


@pytest.fixture(scope="module")
def fork_string(llama_dir):
    """The token greedy decoding of this model emits most, named as the fork token: the model forks
    often, nested too (as tests/test_engine_sampling.py's `forking`)."""
    plain = Engine(llama_dir, EngineConfig(block_size=8, num_blocks=64))
    toks: Counter = Counter()
    for p in PROMPTS[:2]:
        plain.add_request(p, SamplingParams(max_tokens=60, auto_parallel=False))
    for ev in plain.run_to_completion():
        if isinstance(ev, TokenEvent) and ev.token not in plain.eos_ids:
            toks[ev.token] += 1
    return plain.tokenizer.convert_ids_to_tokens(toks.most_common(1)[0][0])


def engine(model_dir, fork: str, speculate: SpeculativeConfig | None = None, **cfg) -> Engine:
    config = dict(block_size=4, num_blocks=512, max_batch_tokens=64, control=ControlTokens(fork=fork, child="[Child]"))
    config.update(cfg)
    return Engine(model_dir, EngineConfig(**config, speculate=speculate or SpeculativeConfig()), keep_logits=True)


def run(eng: Engine, requests: list[tuple[list[int], SamplingParams]], check=None) -> dict:
    """Each request's answer as the client sees it: per thread its tokens, every thread's start (parent,
    anchor) and the finish with its usage; the ledger checked after every step."""
    return collect(eng, [eng.add_request(p, params) for p, params in requests], after=check)


def collect(eng: Engine, ids, before=None, after=None) -> dict:
    """`run`'s answers of requests already added (`ids`), stepping until the engine is idle; `before()`
    is called before each step, `after(result)` after it and the ledger's check."""
    out = {rid: {"tokens": {}, "started": [], "finish": None} for rid in ids}
    while eng.has_work():
        if before is not None:
            before()
        res = eng.step()
        for ev in res.events:
            if isinstance(ev, TokenEvent):
                out[ev.request]["tokens"].setdefault(ev.thread, []).append(ev.token)
            elif isinstance(ev, ThreadStarted):
                out[ev.request]["started"].append((ev.thread, ev.parent, ev.anchor))
            elif isinstance(ev, RequestFinished) and ev.request in out:
                out[ev.request]["finish"] = ev
        eng.ledger.check()
        if after is not None:
            after(res)
    assert eng.ledger.num_used == 0
    return out


def same_answers(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for rid in a:
        assert a[rid]["tokens"] == b[rid]["tokens"], rid
        assert a[rid]["started"] == b[rid]["started"], rid
        fa, fb = a[rid]["finish"], b[rid]["finish"]
        assert (fa.reason, fa.usage.threads, fa.usage.completion_tokens) == \
               (fb.reason, fb.usage.threads, fb.usage.completion_tokens), rid


APAR = SamplingParams(max_tokens=120, max_threads=6, max_depth=2)



def _worst_gap(ref, res) -> float:
    """The largest gap between a step's logits rows (sampled and draft) and the plain model's on each
    row's context as one ordinary sequence."""
    pairs = [(ctx, logits) for ctx, logits in res.logits.values()]
    pairs += [(ctx, logits) for _, _, ctx, logits in res.draft_logits]
    worst = 0.0
    for ctx, logits in pairs:
        with torch.no_grad():
            want = ref(input_ids=torch.tensor([ctx])).logits[0, -1]
        worst = max(worst, (logits - want).abs().max().item())
    return worst

def test_greedy_with_drafts_is_the_answer_without_them_through_nested_forks(llama_dir, fork_string):
    requests = [(p, APAR) for p in PROMPTS] + [(PROMPTS[0], SamplingParams(max_tokens=50, auto_parallel=False))]
    plain = run(engine(llama_dir, fork_string), requests)
    eng = engine(llama_dir, fork_string, NGRAM)
    spec = run(eng, requests)
    same_answers(plain, spec)
    depth = {}
    for r in plain.values():
        for thread, parent, _ in r["started"]:
            depth[(id(r), thread)] = 0 if parent is None else depth[(id(r), parent)] + 1
    assert max(depth.values()) == 2, "the model should fork, nested"
    assert eng.spec_accepted_tokens > 20 and eng.spec_draft_tokens > eng.spec_accepted_tokens
    usage = [r["finish"].usage for r in spec.values()]
    assert sum(u.accepted_tokens for u in usage) == eng.spec_accepted_tokens
    assert sum(u.drafted_tokens for u in usage) == eng.spec_draft_tokens
    # every accepted draft token saved its thread a step
    assert sum(u.steps for u in usage) < sum(r["finish"].usage.steps for r in plain.values())


def test_greedy_with_drafts_survives_preemption_and_the_prefix_cache(llama_dir, fork_string):
    # a pool of 40 four-token blocks for four answers of up to 120 tokens: requests are preempted and
    # recomputed; forks are never refused (fork watermark 0), so the trees stay those of a roomy pool.
    # Every prompt is asked twice: the second time reads the first's prompt blocks from the prefix cache.
    requests = [(p, APAR) for p in PROMPTS]
    plain = engine(llama_dir, fork_string)
    roomy = run(plain, requests) | run(plain, requests)
    eng = engine(llama_dir, fork_string, NGRAM, num_blocks=40, fork_watermark=0.0, admit_watermark=0.0)
    tight = run(eng, requests) | run(eng, requests)
    same_answers(roomy, tight)
    assert eng.preemptions > 0 and eng.prefix_hit_tokens > 0 and eng.spec_accepted_tokens > 0


def test_every_row_of_a_drafting_step_equals_the_plain_model(llama_dir, fork_string):
    ref = AutoModelForCausalLM.from_pretrained(str(llama_dir), dtype=torch.float32)
    worst, rows = 0.0, 0

    def compare(res) -> None:
        nonlocal worst, rows
        worst = max(worst, _worst_gap(ref, res))
        rows += len(res.draft_logits)

    eng = engine(llama_dir, fork_string, NGRAM)
    run(eng, [(PROMPTS[1], SamplingParams(max_tokens=60, max_threads=4, max_depth=2)),
              (PROMPTS[0], SamplingParams(max_tokens=40, auto_parallel=False))], compare)
    assert worst < 1e-4
    assert rows >= 16  # (the draft rows: each compared like a sampled row)


def test_the_replica_of_a_drafting_worker_equals_its_ledger(llama_dir, fork_string):
    """The worker's real outbox (`ReplicationLog`, as RemoteKV uses it): one message per engine step, its
    rollbacks at the head of the next; the manager's replica replays each through the JSON wire."""
    logs: list[ReplicationLog] = []

    def kv_factory(ledger):
        log = ReplicationLog(ledger, session=1)
        logs.append(log)
        return log

    eng = Engine(llama_dir, EngineConfig(block_size=4, num_blocks=60, max_batch_tokens=64,
                                         control=ControlTokens(fork=fork_string, child="[Child]"),
                                         fork_watermark=0.0, speculate=NGRAM), kv_factory=kv_factory)
    replica = ReplicaLedger(eng.ledger.num_blocks, eng.ledger.block_size)
    rollbacks = 0

    def deliver(res) -> None:
        nonlocal rollbacks
        log = logs[0]
        batch = log.batch()
        for s in batch.steps if batch else ():
            rollbacks += sum(op.to_json()[0] == "t" for op in s.ops)
            assert apply(replica, ops_from_bytes(ops_to_bytes(s.ops)), slots=False).error is None
            assert replica.digest() == s.digest
        if batch and batch.steps:
            log.acked(Ack(batch.steps[-1].seq, replica.digest()))
        replica.check()

    run(eng, [(p, APAR) for p in PROMPTS], deliver)
    logs[0].flush()
    deliver(None)
    assert replica.snapshot() == eng.ledger.snapshot() and replica.num_used == 0
    assert rollbacks > 5


def test_worker_metrics_count_drafted_and_accepted_tokens(llama_dir, fork_string):
    from services.worker.metrics import WorkerMetrics

    eng = engine(llama_dir, fork_string, NGRAM)
    metrics = WorkerMetrics("m")
    eng.add_request(PROMPTS[0], SamplingParams(max_tokens=40, auto_parallel=False))
    while eng.has_work():
        metrics.on_step(eng, 0.01, eng.step())

    def value(name: str) -> float:
        return metrics.registry.get_sample_value(name, {"model_name": "m"})

    assert value("apar_spec_decode_num_draft_tokens_total") == eng.spec_draft_tokens > 0
    assert value("apar_spec_decode_num_accepted_tokens_total") == eng.spec_accepted_tokens > 0


def test_sampled_answers_with_drafts_keep_the_rules_and_the_same_seed_repeats(llama_dir, fork_string):
    """Sampling with drafts (the acceptance rule itself is tested on its own, with a chi-square test, in
    tests/test_speculate.py): trees obey the fork rules, a seed gives the same answer twice."""
    params = SamplingParams(max_tokens=80, temperature=0.3, seed=11, max_threads=5, max_depth=2)
    eng = engine(llama_dir, fork_string, NGRAM)
    first = run(eng, [(PROMPTS[0], params), (PROMPTS[2], SamplingParams(max_tokens=40, temperature=0.3, seed=5,
                                                                        auto_parallel=False))])
    again = run(eng, [(PROMPTS[0], params), (PROMPTS[2], SamplingParams(max_tokens=40, temperature=0.3, seed=5,
                                                                        auto_parallel=False))])
    assert [r["tokens"] for r in first.values()] == [r["tokens"] for r in again.values()]
    assert eng.spec_draft_tokens > 0
    for r in first.values():
        assert r["finish"].usage.completion_tokens <= 80 and r["finish"].usage.threads <= 5
        for thread, parent, anchor in r["started"]:
            if parent is not None:
                assert r["tokens"][parent][anchor] == eng.fork_id
        for seq in r["tokens"].values():
            assert eng.child_id not in seq


def test_replayed_trees_with_drafts_feed_the_tree_and_match_the_plain_model(llama_dir):
    """The golden test's replayed trees (tests/test_engine_golden.py), drafting: a replayed thread's
    known tokens are its model's, so its drafts are checked against them; the engine feeds exactly the
    trees, and every sampled and draft row equals the plain model's on its context."""
    import random

    from apar.engine.replay import ReplayNode, random_tree

    eng = Engine(llama_dir, EngineConfig(block_size=4, num_blocks=256, max_batch_tokens=32, speculate=NGRAM),
                 keep_logits=True)
    ref = AutoModelForCausalLM.from_pretrained(str(llama_dir), dtype=torch.float32)
    rng = random.Random(7)
    eos = next(iter(eng.eos_ids))
    few = [i for i in range(5, 12) if i not in (eng.fork_id, eng.child_id, eos)]  # few tokens: n-grams repeat
    trees = {}
    for _ in range(3):
        tree = random_tree(rng, few, eng.fork_id, depth=2, eos=eos)
        trees[eng.add_request(rng.choices(few, k=12), SamplingParams(max_tokens=500), replay=tree)] = tree
    loop = ReplayNode([5, 6, 7, 8] * 6 + [eos])  # one thread that repeats its prompt: most drafts hold
    trees[eng.add_request([5, 6, 7, 8, 5, 6], SamplingParams(max_tokens=500), replay=loop)] = loop
    worst, tokens = 0.0, {}
    while eng.has_work():
        res = eng.step()
        worst = max(worst, _worst_gap(ref, res))
        for ev in res.events:
            if isinstance(ev, TokenEvent):
                tokens.setdefault((ev.request, ev.thread), []).append(ev.token)
        eng.ledger.check()
    assert worst < 1e-4
    assert eng.spec_accepted_tokens > 10 and eng.ledger.num_used == 0
    for rid, tree in trees.items():
        order = []

        def walk(node):
            order.append([t for t in node.tokens if t != eos])
            for c in node.children:
                walk(c)

        walk(tree)
        got = [tokens.get((rid, i), []) for i in range(len(order))]
        assert sorted(map(tuple, got)) == sorted(map(tuple, order))
