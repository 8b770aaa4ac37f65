"""Sampling through the real engine: seeds, top-k/top-p, stop tokens, budgets, and the fork rules on
forks the model really samples (the fork string is pointed at a token this random model likes)."""
from collections import Counter

import pytest
import torch
from transformers import AutoModelForCausalLM

from apar.engine.config import ControlTokens, EngineConfig
from apar.engine.engine import Engine
from apar.engine.events import FinishReason, RequestFinished, ThreadStarted, TokenEvent
from apar.engine.params import SamplingParams

PROMPT = [17, 250, 33, 99, 140, 61, 7]


def run(eng, prompt, params):
    rid = eng.add_request(prompt, params)
    toks, started, fin = {}, [], None
    for ev in eng.run_to_completion():
        if isinstance(ev, TokenEvent) and ev.request == rid:
            toks.setdefault(ev.thread, []).append(ev.token)
        elif isinstance(ev, ThreadStarted) and ev.request == rid:
            started.append(ev)
        elif isinstance(ev, RequestFinished) and ev.request == rid:
            fin = ev
    return toks, started, fin


@pytest.fixture(scope="module")
def eng(llama_dir):
    return Engine(llama_dir, EngineConfig(block_size=8, num_blocks=256))


def test_same_seed_same_answer_other_seed_other_answer(eng):
    p = dict(max_tokens=40, temperature=1.0, auto_parallel=False)
    a = run(eng, PROMPT, SamplingParams(seed=11, **p))[0]
    # a concurrent neighbour must not change a seeded answer
    eng.add_request([5, 6, 7, 8], SamplingParams(max_tokens=30, temperature=1.0))
    b = run(eng, PROMPT, SamplingParams(seed=11, **p))[0]
    c = run(eng, PROMPT, SamplingParams(seed=12, **p))[0]
    assert a == b and a != c


def test_top_k_one_and_tiny_top_p_are_greedy(eng):
    greedy = run(eng, PROMPT, SamplingParams(max_tokens=20, auto_parallel=False))[0]
    k1 = run(eng, PROMPT, SamplingParams(max_tokens=20, temperature=1.5, top_k=1, seed=1, auto_parallel=False))[0]
    p0 = run(eng, PROMPT, SamplingParams(max_tokens=20, temperature=1.5, top_p=1e-6, seed=2, auto_parallel=False))[0]
    assert greedy == k1 == p0


def test_stop_token_and_budget(eng):
    toks, _, fin = run(eng, PROMPT, SamplingParams(max_tokens=20, auto_parallel=False))
    stop = toks[0][5]
    first = toks[0].index(stop)
    toks2, _, fin2 = run(eng, PROMPT, SamplingParams(max_tokens=20, auto_parallel=False, stop_token_ids=(stop,)))
    assert toks2[0] == toks[0][:first] and fin2.reason is FinishReason.STOP
    assert fin.reason is FinishReason.LENGTH and fin.usage.completion_tokens == 20


@pytest.fixture(scope="module")
def forking(llama_dir):
    """An engine whose fork string names the token greedy decoding of this model emits most."""
    plain = Engine(llama_dir, EngineConfig(block_size=8, num_blocks=64))
    toks = run(plain, PROMPT, SamplingParams(max_tokens=60, auto_parallel=False))[0][0]
    favourite = Counter(t for t in toks if t not in plain.eos_ids).most_common(1)[0][0]
    fork = plain.tokenizer.convert_ids_to_tokens(favourite)
    eng = Engine(llama_dir, EngineConfig(block_size=8, num_blocks=512, max_batch_tokens=64,
                                         control=ControlTokens(fork=fork, child="[Child]")), keep_logits=True)
    return eng


def test_model_driven_forks_obey_the_rules_and_match_the_plain_model(forking, llama_dir):
    eng = forking
    ref = AutoModelForCausalLM.from_pretrained(str(llama_dir), dtype=torch.float32)
    params = SamplingParams(max_tokens=120, max_threads=6, max_depth=2)
    rid = eng.add_request(PROMPT, params)
    toks, started, fin, worst = {}, [], None, 0.0
    while eng.has_work():
        res = eng.step()
        for (_, _), (ctx, logits) in res.logits.items():
            with torch.no_grad():
                want = ref(input_ids=torch.tensor([ctx])).logits[0, -1]
            worst = max(worst, (logits - want).abs().max().item())
        for ev in res.events:
            if isinstance(ev, TokenEvent):
                toks.setdefault(ev.thread, []).append(ev.token)
            elif isinstance(ev, ThreadStarted) and ev.parent is not None:
                started.append(ev)
            elif isinstance(ev, RequestFinished):
                fin = ev
    assert worst < 1e-4
    assert len(started) >= 2, "the model should fork"
    assert fin.usage.threads == 1 + len(started) <= params.max_threads
    assert fin.usage.completion_tokens <= params.max_tokens
    depth = {0: 0}
    for ev in started:
        depth[ev.thread] = depth[ev.parent] + 1
        assert toks[ev.parent][ev.anchor] == eng.fork_id
    assert max(depth.values()) <= params.max_depth
    for tid, seq in toks.items():
        assert eng.child_id not in seq  # [Child] is forced, never sampled
        assert seq[0] != eng.fork_id  # no empty segment after [Child] or the prompt
        assert all(not (a == b == eng.fork_id) for a, b in zip(seq, seq[1:]))
    # auto-regressive mode on the same engine never forks
    ar_toks, ar_started, _ = run(eng, PROMPT, SamplingParams(max_tokens=60, auto_parallel=False))
    assert len(ar_started) == 1 and eng.fork_id not in ar_toks[0]
    assert eng.ledger.num_used == 0


def test_stream_of_a_forking_answer_restores_the_tree(forking):
    from apar.text.stitch import restore_tokens
    from apar.text.stream import Final, LinearDelta, RequestStream

    eng = forking
    rid = eng.add_request(PROMPT, SamplingParams(max_tokens=100, max_threads=5))
    stream = RequestStream(eng.tokenizer, eng.fork_id, eng.child_id, eng.eos_ids)
    deltas, per_thread, children = [], {}, {}
    while eng.has_work():
        for ev in eng.step().events:
            if isinstance(ev, TokenEvent):
                per_thread.setdefault(ev.thread, []).append(ev.token)
            elif isinstance(ev, ThreadStarted):
                per_thread.setdefault(ev.thread, [])
                if ev.parent is not None:
                    children.setdefault(ev.parent, {})[ev.anchor] = ev.thread
            for item in stream.feed(ev):
                if isinstance(item, LinearDelta):
                    deltas.append(item.text)
    final = stream.final
    assert isinstance(final, Final) and final.usage["threads"] >= 3
    linear = restore_tokens({t: (toks, children.get(t, {})) for t, toks in per_thread.items()}, eng.fork_id)
    assert "".join(deltas) == final.text == eng.tokenizer.decode(linear)
    assert eng.fork_id not in linear and eng.child_id not in linear
