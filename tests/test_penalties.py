"""Repetition, frequency and presence penalties against an independent computation: the plain HF model's
logits on each thread's context, penalized by hand here over the tokens that must count (the prompt for
the repetition penalty, the ancestors' tokens up to the fork, the thread's own; never a sibling's, never
a control token), equal the row the engine chose from, and greedy picks its argmax; AR greedy equals
HF generate with its own repetition penalty."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from transformers import AutoModelForCausalLM

from apar.engine.config import ControlTokens, EngineConfig
from apar.engine.engine import Engine
from apar.engine.events import RequestFinished, ThreadStarted, TokenEvent
from apar.engine.params import SamplingParams
from apar.engine.penalties import Penalties
from apar.engine.replay import ReplayNode

PROMPT = [17, 250, 33, 99, 140, 61, 7]


@pytest.fixture(scope="module")
def ref(llama_dir):
    return AutoModelForCausalLM.from_pretrained(str(llama_dir), dtype=torch.float32).eval()


def plain_logits(ref, ctx: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return ref(input_ids=torch.tensor([ctx])).logits[0, -1].float()


def penalize(raw: torch.Tensor, ctx: list[int], n_prompt: int, p: SamplingParams, control: set[int]) -> torch.Tensor:
    """The penalties by hand, token by token: repetition over every context token, frequency and presence
    over the generated ones; control tokens never count."""
    out = raw.clone()
    for t in {t for t in ctx if t not in control}:
        out[t] = out[t] / p.repetition_penalty if out[t] > 0 else out[t] * p.repetition_penalty
    for t, n in Counter(t for t in ctx[n_prompt:] if t not in control).items():
        out[t] -= n * p.frequency_penalty + p.presence_penalty
    return out


def check_rows(eng: Engine, ref, res, params: dict[str, SamplingParams], n_prompt: dict[str, int],
               replayed: frozenset[str] = frozenset()) -> int:
    """Every sampled row of the step: the engine's row after penalties equals the hand computation on the
    plain model's logits (where no ban applies), and a sampled thread's token (not a `replayed` request's)
    is the hand row's argmax."""
    control = {eng.fork_id, eng.child_id}
    tokens = {(e.request, e.thread): e.token for e in res.events if isinstance(e, TokenEvent)}
    checked = 0
    for key, (ctx, raw) in res.logits.items():
        want_raw = plain_logits(ref, ctx)
        assert (raw - want_raw).abs().max().item() < 1e-4
        p = params[key[0]]
        hand = penalize(want_raw, ctx, n_prompt[key[0]], p, control)
        got = res.chosen_from[key]
        banned = ~torch.isfinite(got)
        assert set(banned.nonzero().flatten().tolist()) <= control
        assert (got[~banned] - hand[~banned]).abs().max().item() < 2e-4, key
        if key in tokens and key[0] not in replayed:
            assert tokens[key] == int(hand.masked_fill(banned, float("-inf")).argmax()), key
        checked += 1
    return checked


@pytest.fixture(scope="module")
def forking(llama_dir):
    """An engine whose fork string names the token greedy decoding of this model emits most, so that
    sampled threads really fork."""
    plain = Engine(llama_dir, EngineConfig(block_size=8, num_blocks=64))
    rid = plain.add_request(PROMPT, SamplingParams(max_tokens=60, auto_parallel=False))
    toks = [e.token for e in plain.run_to_completion() if isinstance(e, TokenEvent) and e.request == rid]
    favourite = Counter(t for t in toks if t not in plain.eos_ids).most_common(1)[0][0]
    fork = plain.tokenizer.convert_ids_to_tokens(favourite)
    return Engine(llama_dir, EngineConfig(block_size=8, num_blocks=512, max_batch_tokens=64,
                                          control=ControlTokens(fork=fork, child="[Child]")), keep_logits=True)


def free_rows(eng: Engine) -> bool:
    """Every row of the penalty tables is free again."""
    return eng.penalties.in_use == 0


def test_sampled_forks_are_penalized_over_their_own_context(forking, ref):
    eng = forking
    params = SamplingParams(max_tokens=100, max_threads=6, max_depth=2, repetition_penalty=1.3,
                            frequency_penalty=0.5, presence_penalty=0.3)
    plain = SamplingParams(max_tokens=40, max_threads=6, max_depth=2)  # same batch, no penalty
    ids = {eng.add_request(PROMPT, params): params, eng.add_request(PROMPT[:5], plain): plain}
    n_prompt = {rid: len(PROMPT) if p is params else 5 for rid, p in ids.items()}
    checked, forks = 0, 0
    while eng.has_work():
        res = eng.step()
        checked += check_rows(eng, ref, res, ids, n_prompt)
        forks += sum(isinstance(e, ThreadStarted) and e.parent is not None for e in res.events)
    assert forks >= 2 and checked > 60
    assert eng.ledger.num_used == 0 and free_rows(eng)


def test_a_siblings_tokens_never_count(llama_dir, ref):
    eng = Engine(llama_dir, EngineConfig(block_size=4, num_blocks=128), keep_logits=True)
    # tables of one row of two entries: the prompt widens them, every fork adds rows
    eng.penalties = Penalties(eng.runner.device, {eng.fork_id, eng.child_id}, rows=1, width=2)
    eos = next(iter(eng.eos_ids))
    a, b, c, d, x, y, z, w = 301, 302, 303, 304, 311, 312, 313, 314
    tree = ReplayNode([a, a, b, eng.fork_id, c, eng.fork_id, d, eos],
                      [ReplayNode([x, x, y, eos]), ReplayNode([z, z, w, x])])
    params = SamplingParams(max_tokens=60, repetition_penalty=2.0, frequency_penalty=1.0, presence_penalty=0.5)
    rid = eng.add_request(PROMPT, params, replay=tree)
    other = eng.add_request(PROMPT, SamplingParams(max_tokens=6, auto_parallel=False))
    seen: dict[int, list[tuple[list[int], torch.Tensor, torch.Tensor]]] = {}
    while eng.has_work():
        res = eng.step()
        check_rows(eng, ref, res, {rid: params, other: SamplingParams()}, {rid: len(PROMPT), other: len(PROMPT)},
                   replayed=frozenset({rid}))
        for (r, tid), (ctx, raw) in res.logits.items():
            if r == rid:
                seen.setdefault(tid, []).append((ctx, raw, res.chosen_from[(r, tid)]))
    def penalized(raw, count):  # repetition 2, frequency 1, presence 0.5
        return (raw / 2 if raw > 0 else raw * 2) - count * 1.0 - 0.5

    # thread 1 wrote x twice; thread 2, its sibling, never sees x until it writes x itself (its last token)
    *before, (ctx, raw, got) = seen[2]
    for b_ctx, b_raw, b_got in before:
        assert x not in b_ctx and y not in b_ctx
        assert b_got[x] == b_raw[x] and b_got[y] == b_raw[y]
    assert ctx.count(x) == 1 and torch.isclose(got[x], penalized(raw[x], 1), atol=1e-5)  # its own x only
    ctx, raw, got = seen[1][-1]  # after x, x, y: x counted twice, z never
    assert ctx.count(x) == 2 and got[z] == raw[z]
    assert torch.isclose(got[x], penalized(raw[x], 2), atol=1e-5)
    assert eng.ledger.num_used == 0 and free_rows(eng)


def run_ar(eng: Engine, prompt: list[int], params: SamplingParams) -> dict[int, list[int]]:
    """Tokens per answer root (thread id -> tokens) of one request."""
    rid = eng.add_request(prompt, params)
    out: dict[int, list[int]] = {}
    for ev in eng.run_to_completion():
        if isinstance(ev, TokenEvent) and ev.request == rid:
            out.setdefault(ev.thread, []).append(ev.token)
        elif isinstance(ev, RequestFinished) and ev.request == rid:
            assert ev.error is None
    return out


@pytest.mark.parametrize("penalty", [0.5, 1.5])
def test_ar_greedy_with_repetition_penalty_equals_hf_generate(llama_dir, ref, penalty):
    eng = Engine(llama_dir, EngineConfig(block_size=8, num_blocks=128))
    params = SamplingParams(max_tokens=40, auto_parallel=False, repetition_penalty=penalty)
    got = run_ar(eng, PROMPT, params)[0]
    hf = ref.generate(torch.tensor([PROMPT]), attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long),
                      max_new_tokens=40, do_sample=False, repetition_penalty=penalty,
                      suppress_tokens=[eng.fork_id, eng.child_id])
    assert got == [t for t in hf[0, len(PROMPT):].tolist() if t not in eng.eos_ids]
    if penalty < 1:  # it favours tokens seen: the answer repeats, unlike the plain one
        assert got != run_ar(eng, PROMPT, SamplingParams(max_tokens=40, auto_parallel=False))[0]
        assert len(set(got)) < len(got)


def test_ar_greedy_with_frequency_and_presence_equals_a_hand_loop(llama_dir, ref):
    eng = Engine(llama_dir, EngineConfig(block_size=8, num_blocks=128))
    params = SamplingParams(max_tokens=30, auto_parallel=False, frequency_penalty=-1.5, presence_penalty=0.7)
    got = run_ar(eng, PROMPT, params)[0]
    ctx, want = list(PROMPT), []
    for _ in range(30):
        row = penalize(plain_logits(ref, ctx), ctx, len(PROMPT), params, {eng.fork_id, eng.child_id})
        row[[eng.fork_id, eng.child_id]] = float("-inf")
        tok = int(row.argmax())
        if tok in eng.eos_ids:
            break
        want.append(tok)
        ctx.append(tok)
    assert got == want
    assert got != run_ar(eng, PROMPT, SamplingParams(max_tokens=30, auto_parallel=False))[0]
    # n answers: each answer's root counts only its own tokens (greedy: every answer is the same)
    answers = run_ar(eng, PROMPT, SamplingParams(max_tokens=30, auto_parallel=False, n=3, frequency_penalty=-1.5,
                                                presence_penalty=0.7))
    assert len(answers) == 3 and all(toks == want for toks in answers.values())
    assert free_rows(eng)
