"""The prefix cache in the engine: a root starts on the cached blocks of its prompt's longest known prefix
and prefills only the rest, its own prompt blocks stay cached after its request, evicted when needed.

Expected values come from the plain HF model (logits on each thread's context) and from the prompts
themselves (cached tokens: the prefix shared with an earlier prompt, rounded down to a block, leaving
at least one prompt token to compute), never from the engine's own bookkeeping.
"""
from __future__ import annotations

import argparse
import random

import pytest
from prometheus_client import CollectorRegistry
from transformers import AutoModelForCausalLM

from apar.engine.config import EngineConfig
from apar.engine.engine import Engine
from apar.engine.events import FinishReason, RequestFinished, TokenEvent, Usage
from apar.engine.params import SamplingParams
from apar.engine.replay import random_tree
from apar.protogen import stubs
from services.protocol.wire import events_from_pb, events_to_pb
from services.worker.metrics import WorkerMetrics
from tests.test_engine_golden import DEVICES, reference_logits, tolerance
from tests.test_engine_pressure import Transcript, run

BS = 4


def shared(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two token lists."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def expected_cached(prompt: list[int], earlier: list[list[int]]) -> int:
    """Prompt tokens served from the cache: the longest prefix shared with an earlier prompt, in whole
    blocks, at most all blocks but the one holding the prompt's last token (its logits are needed)."""
    blocks = max((shared(prompt, p) for p in earlier), default=0) // BS
    return min(blocks, (len(prompt) - 1) // BS) * BS


class Golden:
    """Checks every logits row of every step against the plain model, and the ledger after each step."""

    def __init__(self, eng: Engine, model_dir, device: str = "cpu") -> None:
        self.eng, self.device = eng, device
        self.ref = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=eng.runner.dtype,
                                                        attn_implementation="eager").to(device)
        self.checked = 0

    def step(self, tr: Transcript) -> None:
        res = self.eng.step()
        tr.add(res.events)
        self.eng.ledger.check()
        for (rid, tid), (ctx, logits) in res.logits.items():
            want = reference_logits(self.ref, ctx)
            assert (logits - want).abs().max().item() < tolerance(self.device, want), (rid, tid, len(ctx))
            self.checked += 1


@pytest.mark.parametrize("device", DEVICES)
def test_shared_prefixes_match_the_plain_model(llama_dir, device):
    """Requests whose prompts share a prefix with a running one (ending inside a block, at a block edge,
    the whole prompt, the whole prompt and more, n=2 answers), then the same prompt once it is only
    cached: every thread's logits, forks and answers included, equal the plain model's."""
    dtype = "float32" if device == "cpu" else "bfloat16"
    eng = Engine(llama_dir, EngineConfig(block_size=BS, num_blocks=256, max_batch_tokens=16, device=device,
                                         dtype=dtype), keep_logits=True)
    golden = Golden(eng, llama_dir, device)
    rng = random.Random(5)
    eos = next(iter(eng.eos_ids))
    plain = [i for i in range(5, 400) if i not in (eng.fork_id, eng.child_id, eos)]
    base = rng.sample(plain, 24)  # 6 full blocks

    def tail(n: int) -> list[int]:
        return [500 + rng.randrange(300) for _ in range(n)]  # never in `base`: the prefix ends where it starts

    def replay() -> dict:
        return {"params": SamplingParams(max_tokens=500), "replay": random_tree(rng, plain, eng.fork_id, 2, eos)}

    tr = Transcript()
    first = eng.add_request(base, **replay())
    while (first, 0) not in tr.tokens:  # its prompt is prefilled (and named): it decodes on
        golden.step(tr)
    prompts = {first: base,
               "inside": base[:10] + tail(9),  # shares 2 blocks and half of the third
               "edge": base[:12] + tail(5),  # shares exactly 3 blocks
               "whole": list(base),  # shares all 6: reuses 5, computes the last block for its logits
               "longer": base + tail(3),  # shares all 6 and reuses them
               "answers": base[:17] + tail(6)}
    for rid in ("inside", "edge", "whole", "longer"):
        eng.add_request(prompts[rid], request_id=rid, **replay())
    eng.add_request(prompts["answers"], SamplingParams(max_tokens=12, temperature=1.0, seed=1, n=2),
                    request_id="answers")
    while eng.has_work():
        golden.step(tr)
    assert eng.ledger.num_used == 0 and eng.ledger.num_cached > 0
    prompts["again"] = list(base)  # only cached now: count 0
    eng.add_request(base, request_id="again", **replay())
    while eng.has_work():
        golden.step(tr)

    got = {rid: tr.finished[rid].usage.cached_tokens for rid in prompts}
    want = {rid: expected_cached(p, [base] if rid != first else []) for rid, p in prompts.items()}
    assert got == want == {first: 0, "inside": 8, "edge": 12, "whole": 20, "longer": 24, "answers": 16,
                           "again": 20}
    assert all(tr.finished[rid].error is None for rid in prompts)
    assert sum(1 for (rid, _), _ in tr.tokens.items() if rid == "answers") >= 2  # both answers streamed
    assert golden.checked > 150
    assert eng.prefix_hit_tokens == sum(want.values())
    assert eng.prefix_queried_tokens == sum(len(p) for p in prompts.values())


def greedy_requests(n: int, seed: int) -> list[list[int]]:
    """n prompts: a 16-token system prefix (4 blocks) and 3..9 tokens of their own."""
    rng = random.Random(seed)
    system = rng.sample(range(5, 400), 16)
    return [system + rng.sample(range(400, 900), rng.randint(3, 9)) for _ in range(n)]


def alone_without_cache(llama_dir, prompts: dict[str, list[int]], params: SamplingParams) -> dict[str, list[int]]:
    eng = Engine(llama_dir, EngineConfig(block_size=BS, num_blocks=256, max_batch_tokens=16, prefix_cache=False))
    out = {}
    for rid, p in prompts.items():
        eng.add_request(p, params, request_id=rid)
        out[rid] = run(eng).tokens[(rid, 0)]
    return out


def test_preemption_and_cancellation_with_cached_blocks(llama_dir):
    """A small pool: requests sharing a system prefix are preempted and readmitted (on their own cached
    blocks), one is cancelled while it reads reused blocks and one while it waits after a preemption.
    The ledger's invariants hold after every step, nothing leaks, and every request that ran to its end
    streams what it streams alone without the cache."""
    eng = Engine(llama_dir, EngineConfig(block_size=BS, num_blocks=28, max_batch_tokens=16, fork_watermark=0.0),
                 keep_logits=True)
    golden = Golden(eng, llama_dir)
    params = SamplingParams(max_tokens=24, auto_parallel=False, ignore_eos=True)
    prompts = {f"r{i}": p for i, p in enumerate(greedy_requests(8, seed=2))}
    for rid, p in prompts.items():
        eng.add_request(p, params, request_id=rid)
    tr = Transcript()
    cancelled: dict[str, str] = {}
    readmitted_on_cache = set()
    while eng.has_work():
        for req in list(eng.scheduler.running):
            if not (req.root.in_ledger and req.root.recompute.reused):
                continue
            if "reading" not in cancelled:
                cancelled["reading"] = req.id
                tr.add(eng.abort(req.id))
            elif req.usage.preemptions:
                readmitted_on_cache.add(req.id)
        for req in list(eng.scheduler.waiting):
            if req.usage.preemptions and "waiting" not in cancelled:
                cancelled["waiting"] = req.id
                tr.add(eng.abort(req.id))
        golden.step(tr)
    assert set(cancelled) == {"reading", "waiting"} and set(tr.finished) == set(prompts)
    assert eng.preemptions > 1 and readmitted_on_cache
    assert eng.ledger.num_used == 0 and eng.ledger.num_free == eng.ledger.num_blocks
    for rid in cancelled.values():
        assert tr.finished[rid].reason is FinishReason.CANCELLED
    done = {rid: p for rid, p in prompts.items() if rid not in cancelled.values()}
    assert {rid: tr.tokens[(rid, 0)] for rid in done} == alone_without_cache(llama_dir, done, params)
    assert sum(tr.finished[rid].usage.cached_tokens for rid in done) > 0


def test_small_pool_evicts_least_recently_cached_and_stays_correct(llama_dir):
    """Distinct prompts through a pool too small to keep them all cached: blocks are evicted (the oldest
    prompt's, its tail first), a prompt run again reuses what is left of it, results stay golden, and
    the worker's metrics count the cache's tokens, blocks and evictions."""
    eng = Engine(llama_dir, EngineConfig(block_size=BS, num_blocks=16, max_batch_tokens=16), keep_logits=True)
    golden = Golden(eng, llama_dir)
    metrics = WorkerMetrics("m", CollectorRegistry())
    params = SamplingParams(max_tokens=8, auto_parallel=False, ignore_eos=True)  # 24 + 7 positions: 8 blocks
    prompts = [list(range(10 + 30 * i, 34 + 30 * i)) for i in range(3)]  # 6 full blocks each
    tr = Transcript()
    for rid, p in [("p0", prompts[0]), ("p1", prompts[1]), ("p2", prompts[2]), ("p0-again", prompts[0])]:
        eng.add_request(p, params, request_id=rid)
        while eng.has_work():
            golden.step(tr)
            metrics.on_step(eng, 0.01, None)
    assert eng.ledger.evictions > 0
    again = tr.finished["p0-again"].usage.cached_tokens
    assert 0 < again < 20 and again % BS == 0  # its head survived, its tail was evicted
    assert [tr.finished[r].usage.cached_tokens for r in ("p0", "p1", "p2")] == [0, 0, 0]
    alone = alone_without_cache(llama_dir, {"p0": prompts[0]}, params)
    assert tr.tokens[("p0-again", 0)] == tr.tokens[("p0", 0)] == alone["p0"]

    def value(name: str) -> float:
        return metrics.registry.get_sample_value(name, {"model_name": "m"})

    assert value("apar_prefix_cache_queries_total") == 4 * 24
    assert value("apar_prefix_cache_hits_total") == again
    assert value("apar_kv_blocks_cached") == eng.ledger.num_cached > 0
    assert value("apar_prefix_cache_evictions_total") == eng.ledger.evictions


def test_no_prefix_cache_computes_every_prompt(llama_dir):
    """`--no-prefix-cache`: the same prompt twice is prefilled twice, nothing stays cached."""
    from apar.commands.generate import add_engine_args, engine_config

    p = argparse.ArgumentParser()
    add_engine_args(p)
    args = p.parse_args(["--no-prefix-cache", "--block-size", str(BS), "--kv-blocks", "64"])
    assert engine_config(args).prefix_cache is False and engine_config(p.parse_args([])).prefix_cache is True
    eng = Engine(llama_dir, engine_config(args))
    prompt = list(range(30, 50))
    params = SamplingParams(max_tokens=4, auto_parallel=False)
    for _ in range(2):
        eng.add_request(prompt, params)
    tr = run(eng)
    assert [f.usage.cached_tokens for f in tr.finished.values()] == [0, 0]
    assert eng.ledger.num_cached == 0 and eng.prefix_queried_tokens == eng.prefix_hit_tokens == 0


def test_cached_tokens_travel_in_the_worker_events():
    pb = stubs()
    done = RequestFinished("r", FinishReason.STOP, Usage(prompt_tokens=30, cached_tokens=28))
    (back,) = events_from_pb("r", events_to_pb([done], pb))
    assert back.usage.cached_tokens == 28 and back.usage == done.usage


def crowded(llama_dir, cache: bool, requests: dict, num_blocks: int) -> tuple[Engine, Transcript]:
    eng = Engine(llama_dir, EngineConfig(block_size=BS, num_blocks=num_blocks, max_batch_tokens=64,
                                         prefix_cache=cache))
    for rid, (prompt, params) in requests.items():
        eng.add_request(prompt, params, request_id=rid)
    return eng, run(eng)


def test_preempting_a_request_counts_the_prompt_blocks_it_leaves_cached(llama_dir):
    """Block size 4, 11 blocks: `a` (n=4 answers) needs room, `b` is preempted for it, and `b`'s named
    prompt blocks become cached (free for an allocation) when it lets go of them. With the prefix cache
    on, `a` finishes exactly as it does with the cache off, instead of ending with "the KV cache is full"
    while 6 blocks are free."""
    requests = {"a": (list(range(100, 112)), SamplingParams(max_tokens=7, n=4, auto_parallel=False, ignore_eos=True)),
                "b": (list(range(300, 312)), SamplingParams(max_tokens=11, auto_parallel=False, ignore_eos=True))}
    on_eng, on = crowded(llama_dir, True, requests, 11)
    off_eng, off = crowded(llama_dir, False, requests, 11)
    assert off_eng.preemptions > 0 and on_eng.preemptions > 0  # the pressure the case is about
    assert on_eng.ledger.num_cached > 0  # and with the cache on, b's prompt blocks were named
    ends = {rid: (f.reason, f.error, f.usage.completion_tokens) for rid, f in on.finished.items()}
    assert ends == {rid: (f.reason, f.error, f.usage.completion_tokens) for rid, f in off.finished.items()}
    assert ends["a"] == (FinishReason.LENGTH, None, 4 * 7)
    assert on.tokens == off.tokens and on.threads == off.threads


def test_a_prompt_on_blocks_another_request_reads_starts_beside_it(llama_dir):
    """Two requests with one 33-token prompt in a pool of 16 blocks of 4: once `first` is prefilled, its
    8 full prompt blocks are named and `second` reads them instead of taking 8 new ones: it needs 1 block
    to start, which the pool has, so it starts while `first` still runs (admission and the step's block
    count take shared blocks as shared), and each streams what it streams alone without the cache."""
    prompt = list(range(40, 73))
    params = SamplingParams(max_tokens=12, auto_parallel=False, ignore_eos=True)
    eng = Engine(llama_dir, EngineConfig(block_size=BS, num_blocks=16, max_batch_tokens=64, admit_watermark=0.0))
    for rid in ("first", "second"):
        eng.add_request(prompt, params, request_id=rid)
    order: list[tuple[str, str]] = []
    tr = run(eng, on_step=lambda res, _: order.extend(
        (type(e).__name__, e.request) for e in res.events if isinstance(e, (TokenEvent, RequestFinished))))
    assert order.index(("TokenEvent", "second")) < order.index(("RequestFinished", "first"))
    assert tr.finished["second"].usage.cached_tokens == 32 and eng.preemptions == 0
    alone = alone_without_cache(llama_dir, {"first": prompt}, params)["first"]
    assert tr.tokens[("first", 0)] == tr.tokens[("second", 0)] == alone
