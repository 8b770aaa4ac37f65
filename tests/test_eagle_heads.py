"""The EAGLE-style drafter on its own (apar/engine/eagle.py, apar/train/eagle.py): the engine's chain,
one row a step over each thread's kept keys and values, equals the layer run over the whole thread as
training runs it, also after a rollback and a gap; the layer learns a pattern only the thread's past
holds, which hydra heads cannot; saved layers load as they were. The engine with it:
tests/test_engine_medusa.py."""
from __future__ import annotations

import torch

from apar.engine.eagle import EagleDrafter, EagleHeads
from apar.engine.medusa import MedusaDrafter, load_heads, save_heads
from apar.train.eagle import measure_eagle, threads_of, train_eagle
from apar.train.medusa import train_heads
from apar.train.medusa_data import from_threads
from apar.train.medusa_eval import measure

V, H, K = 24, 32, 3


def _tables(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(V, H, generator=gen), torch.randn(V, H, generator=gen)  # LM head, input embeddings


def _random_heads(seed: int = 1) -> EagleHeads:
    torch.manual_seed(seed)
    heads = EagleHeads(H, K, attn_heads=4)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return heads


def _unrolled_guesses(heads, table, embed, f, y, tip, toks):
    """What training computes for a draft after position `tip`: the thread's pairs (f, y) up to it,
    then the drafter's own tokens `toks` fed back (teacher forcing on them)."""
    y = y.clone()
    for d in range(1, len(toks)):
        y[tip + d] = toks[d - 1]
    with torch.no_grad():
        outs = heads.unrolled(f[None], embed[y][None], torch.ones(1, len(y), dtype=torch.bool), len(toks))
    return [int((outs[d][0, tip + d] @ table.T).argmax()) for d in range(len(toks))]


def test_the_engines_chain_equals_the_layer_over_the_whole_thread_after_rollbacks_and_gaps():
    heads, (table, embed) = _random_heads(), _tables()
    drafter = EagleDrafter(heads, table, None, [], embed, dtype=torch.float32, min_confidence=0.0)
    gen = torch.Generator().manual_seed(2)
    f, y = torch.randn(16, H, generator=gen), torch.randint(0, V, (16,), generator=gen)
    key, base = ("r", 0), 40  # the thread's first decoded position in its context

    def observe(first: int, stop: int) -> list[int]:  # pairs first..stop-1 seen in one step
        drafter.propose([key], [base + stop], f[first:stop], y[first:stop].tolist(), [stop - first])
        return drafter.proposals[key][1]

    observe(0, 5)
    toks = observe(5, 9)  # a run of 4 verified tokens
    assert len(toks) == K and toks == _unrolled_guesses(heads, table, embed, f, y, 8, toks)
    f[6:] = torch.randn(10, H, generator=gen)  # positions 6.. rolled back and decoded again, otherwise
    toks = observe(6, 11)
    assert toks == _unrolled_guesses(heads, table, embed, f, y, 10, toks)
    assert drafter.caches[key].k.shape[0] == 11
    drafter.propose([key], [base + 15], f[14:15], y[14:15].tolist(), [1])  # a gap
    assert drafter.caches[key].first == base + 14 and drafter.caches[key].k.shape[0] == 1
    # two threads in one step, each over its own past
    other = ("r", 1)
    drafter.propose([key, other], [base + 16, 7], torch.cat([f[15:16], f[:3]]), y[15:16].tolist() + y[:3].tolist(),
                    [1, 3])
    assert drafter.proposals[other][1] == _unrolled_guesses(heads, table, embed, f, y, 2, drafter.proposals[other][1])


def _copy_reading(seed: int, count: int = 200):
    """Threads that repeat three tokens of their own (a b c a b c ...), drawn per thread, with one hidden
    state everywhere: the token after a position is the one three before it, known only from the past."""
    gen = torch.Generator().manual_seed(seed)
    same = torch.randn(H, generator=torch.Generator().manual_seed(7))
    threads = []
    for _ in range(count):
        three = torch.randperm(V, generator=gen)[:3].tolist()
        toks = (three * 10)[:24]
        threads.append((same.expand(24, H).clone(), toks, toks))
    return from_threads(threads, [])


def test_the_layer_learns_what_only_the_threads_past_holds_and_hydra_heads_cannot():
    table, embed = _tables()
    train, held_out = _copy_reading(1), _copy_reading(2, 40)
    assert len(threads_of(train)) == 200 and all(len(t) == 24 for t in threads_of(train))
    heads, summary = train_eagle(train, table, embed, list(range(V)), K, epochs=12, tokens_per_batch=480, lr=1e-2,
                                 log=lambda line: None)
    eagle = measure_eagle(heads, held_out, table, embed, list(range(V)))
    hydra_heads, _ = train_heads(train, table, embed, list(range(V)), "hydra", K, epochs=40, batch_size=64, lr=1e-2,
                                 log=lambda line: None)
    hydra = measure(MedusaDrafter(hydra_heads, table, None, [], embed), held_out, [])
    # from the third position of a thread on the next token is certain; chance is 1/24
    assert eagle["top1"][0] > 0.7, (eagle, summary)
    assert hydra["top1"][0] < 0.3, hydra["top1"]  # (its third head may repeat the pending token)
    best = max(r["accepted"] for r in eagle["table"] if r["k"] == K)
    assert best > 1.8  # of 3 drafted tokens a position


def test_a_saved_layer_loads_as_it_was_and_guesses_the_same(tmp_path):
    heads, (table, embed) = _random_heads(3), _tables()
    vocab = [0, 3, 5, 7, 11, 20]
    save_heads(tmp_path, heads, vocab, {"trained": {"note": "test"}})
    loaded, saved_vocab, meta = load_heads(tmp_path)
    assert isinstance(loaded, EagleHeads) and meta["kind"] == "eagle" and saved_vocab.tolist() == vocab
    assert (loaded.attn_heads, loaded.intermediate, loaded.num_heads) == (4, 2 * H, K)
    for name, t in heads.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    f, y = torch.randn(6, H), [1, 2, 3, 4, 5, 6]
    guesses = []
    for h in (heads, loaded):
        drafter = EagleDrafter(h, table, torch.tensor(vocab), [], embed, min_confidence=0.0)
        drafter.propose([("r", 0)], [6], f, y, [6])
        guesses.append(drafter.proposals[("r", 0)][1])
    assert guesses[0] == guesses[1] and set(guesses[0]) <= set(vocab) and len(guesses[0]) == K


def test_train_medusa_kind_eagle_on_the_models_own_answers_with_a_smaller_vocabulary(llama_dir, tmp_path):
    """`apar train-medusa --kind eagle --vocab N` end to end on the test model: the layer is saved with the
    N tokens the model wrote most, `eval-medusa` measures it, and an engine drafts with it and frees
    every block; --vocab is refused for the heads."""
    import pytest

    from apar.engine.config import EngineConfig, SpeculativeConfig
    from apar.engine.engine import Engine
    from apar.engine.errors import UserError
    from apar.engine.params import SamplingParams
    from apar.train.medusa import evaluate_medusa, train_medusa
    from tests.test_engine_medusa import short_answers_setup
    from tests.test_engine_speculation import PROMPTS

    model_dir, records = short_answers_setup(llama_dir, tmp_path)
    logs: list[str] = []
    summary = train_medusa(model_dir, records, model_dir, num_heads=3, kind="eagle", answers=6, answer_tokens=40,
                           max_records=0, epochs=3, batch_size=64, lr=3e-3, log=logs.append, vocab_size=20)
    assert summary["kind"] == "eagle" and summary["vocab"] == 20 and len(summary["epochs"]) == 3
    assert any(line.startswith("epoch 3/3") for line in logs)
    heads, vocab, meta = load_heads(model_dir)
    assert isinstance(heads, EagleHeads) and meta["kind"] == "eagle" and len(vocab) == 20
    result, text = evaluate_medusa(model_dir, records, model_dir, prompts=2, max_tokens=30, log=logs.append)
    assert result["positions"] > 20 and len(result["top1"]) == 3 and "top-1 per head" in text
    for row in result["table"]:
        assert 0 <= row["accepted"] <= row["drafted"] <= row["k"]
    eng = Engine(model_dir, EngineConfig(block_size=4, num_blocks=128, speculate=SpeculativeConfig("medusa", 3, policy="all")))
    assert isinstance(eng.drafter, EagleDrafter)
    eng.drafter.min_confidence = 0.0
    eng.add_request(PROMPTS[0], SamplingParams(max_tokens=40, auto_parallel=False))
    while eng.has_work():
        eng.step()
        for _, toks, _ in eng.drafter.proposals.values():
            assert set(toks) <= set(vocab.tolist())
    assert eng.spec_draft_tokens > 0 and eng.ledger.num_used == 0
    with pytest.raises(UserError, match="--vocab is for --kind eagle"):
        train_medusa(model_dir, records, model_dir, kind="hydra", answers=1, max_records=0, vocab_size=20)
