"""Medusa drafts inside threads, end to end on a small real model (the ngram counterparts are in
tests/test_engine_speculation.py): with heads of any quality, greedy answers are token for token the
answers without speculation through forks, nested forks, preemption and the prefix cache; every row of a
drafting step equals the plain model's; heads trained by `apar train-medusa` on a frozen model load and
draft; missing heads are a clear error."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from apar.engine.config import EngineConfig, SpeculativeConfig
from apar.engine.engine import Engine
from apar.engine.errors import UserError
from apar.engine.eagle import EagleHeads
from apar.engine.medusa import CONFIG_FILE, HEADS_FILE, HydraHeads, MedusaHeads, load_heads, save_heads
from apar.engine.params import SamplingParams
from tests import test_engine_speculation as ngram_tests
from tests.test_engine_speculation import APAR, PROMPTS, _worst_gap, engine, run, same_answers

fork_string = ngram_tests.fork_string  # (the fixture: the model's most frequent token named [Fork])

MEDUSA = SpeculativeConfig("medusa", num_tokens=4, policy="all")  # every draft: the mechanics, not the policy


def _with_heads(model_dir, out, heads: MedusaHeads):
    shutil.copytree(model_dir, out)
    save_heads(out, heads, None, {"trained": "for tests"})
    return out


def _own_continuations(model_dir) -> list[tuple[torch.Tensor, list[int], list[int]]]:
    """The test model's greedy continuations of a few prompts, as threads of a `Reading`: per position
    the hidden state and the model's own next token."""
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    threads = []
    with torch.no_grad():
        for p in PROMPTS + [[i, i + 1, i + 2] for i in range(100, 400, 20)]:
            ids = model.generate(torch.tensor([p]), max_new_tokens=60, do_sample=False, min_new_tokens=60)
            h = model.get_decoder()(input_ids=ids).last_hidden_state[0]  # [n, H]
            guess = model.get_output_embeddings()(h).argmax(-1).tolist()
            start = len(p) - 1
            threads.append((h[start:-1], guess[start:-1], guess[start:-1]))
    return threads


def _trained(llama_dir, tmp_path_factory, kind: str):
    """The test model with heads of `kind` quickly trained (`train_heads`) on its own greedy
    continuations of a few prompts: most of their guesses in threads hold, some do not."""
    from apar.train.medusa import train_heads
    from apar.train.medusa_data import from_threads

    model = AutoModelForCausalLM.from_pretrained(str(llama_dir), dtype=torch.float32).eval()
    reading = from_threads(_own_continuations(llama_dir), [])
    if kind == "eagle":
        from apar.train.eagle import train_eagle

        heads, _ = train_eagle(reading, model.get_output_embeddings().weight, model.get_input_embeddings().weight,
                               list(range(model.config.vocab_size)), 4, epochs=30, tokens_per_batch=128, lr=3e-3,
                               held_out=0.0, log=lambda line: None)
        return _with_heads(llama_dir, tmp_path_factory.mktemp(kind) / "model", heads)
    heads, _ = train_heads(reading, model.get_output_embeddings().weight, model.get_input_embeddings().weight,
                           list(range(model.config.vocab_size)), kind, 4, epochs=30, batch_size=128, lr=3e-3,
                           log=lambda line: None)
    return _with_heads(llama_dir, tmp_path_factory.mktemp(kind) / "model", heads)


@pytest.fixture(scope="module")
def medusa_dir(llama_dir, tmp_path_factory):
    return _trained(llama_dir, tmp_path_factory, "medusa")


@pytest.fixture(scope="module")
def hydra_dir(llama_dir, tmp_path_factory):
    return _trained(llama_dir, tmp_path_factory, "hydra")


@pytest.fixture(scope="module")
def eagle_dir(llama_dir, tmp_path_factory):
    return _trained(llama_dir, tmp_path_factory, "eagle")


@pytest.fixture(scope="module")
def random_eagle_dir(llama_dir, tmp_path_factory):
    """The test model with a random eagle layer: its chains are mostly wrong."""
    hidden = json.loads((llama_dir / "config.json").read_text())["hidden_size"]
    torch.manual_seed(5)
    heads = EagleHeads(hidden, 4, attn_heads=2)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(6)) * 0.05)
    return _with_heads(llama_dir, tmp_path_factory.mktemp("random-eagle") / "model", heads)


@pytest.fixture(scope="module")
def random_medusa_dir(llama_dir, tmp_path_factory):
    """The test model with random heads: their guesses are mostly wrong."""
    hidden = json.loads((llama_dir / "config.json").read_text())["hidden_size"]
    heads = MedusaHeads(hidden, 4)
    with torch.no_grad():
        heads.weight.copy_(torch.randn(heads.weight.shape, generator=torch.Generator().manual_seed(3)) * 0.05)
    return _with_heads(llama_dir, tmp_path_factory.mktemp("random") / "model", heads)


@pytest.fixture(scope="module")
def random_hydra_dir(llama_dir, tmp_path_factory):
    """The test model with random hydra heads, one block for every head: their chains are mostly wrong."""
    hidden = json.loads((llama_dir / "config.json").read_text())["hidden_size"]
    heads = HydraHeads(hidden, 4, blocks=1)
    with torch.no_grad():
        heads.weight.copy_(torch.randn(heads.weight.shape, generator=torch.Generator().manual_seed(4)) * 0.05)
    return _with_heads(llama_dir, tmp_path_factory.mktemp("random-hydra") / "model", heads)


@pytest.mark.parametrize("kind", ["medusa", "hydra", "eagle"])
def test_greedy_with_medusa_drafts_is_the_answer_without_them_through_nested_forks(kind, request, fork_string):
    medusa_dir = request.getfixturevalue(f"{kind}_dir")
    random_medusa_dir = request.getfixturevalue(f"random_{kind}_dir")
    requests = [(p, APAR) for p in PROMPTS] + [(PROMPTS[0], SamplingParams(max_tokens=50, auto_parallel=False))]
    plain = run(engine(medusa_dir, fork_string), requests)
    wrong = engine(random_medusa_dir, fork_string, MEDUSA)
    wrong.drafter.min_confidence = 0.0  # every guess drafted, however unsure
    same_answers(plain, run(wrong, requests))  # whatever the heads guess
    assert wrong.spec_draft_tokens > 100
    eng = engine(medusa_dir, fork_string, MEDUSA)
    spec = run(eng, requests)
    same_answers(plain, spec)
    depth = {}
    for r in plain.values():
        for thread, parent, _ in r["started"]:
            depth[(id(r), thread)] = 0 if parent is None else depth[(id(r), parent)] + 1
    assert max(depth.values()) == 2, "the model should fork, nested"
    # drafts were made, some held and some were rolled back
    assert eng.spec_accepted_tokens > 10 and eng.spec_draft_tokens > eng.spec_accepted_tokens
    usage = [r["finish"].usage for r in spec.values()]
    assert sum(u.accepted_tokens for u in usage) == eng.spec_accepted_tokens
    assert sum(u.steps for u in usage) < sum(r["finish"].usage.steps for r in plain.values())


@pytest.mark.parametrize("kind", ["medusa", "hydra", "eagle"])
def test_greedy_with_medusa_drafts_survives_preemption_and_the_prefix_cache(kind, request, fork_string):
    medusa_dir = request.getfixturevalue(f"{kind}_dir")
    requests = [(p, APAR) for p in PROMPTS]
    plain = engine(medusa_dir, fork_string)
    roomy = run(plain, requests) | run(plain, requests)
    eng = engine(medusa_dir, fork_string, MEDUSA, num_blocks=40, fork_watermark=0.0, admit_watermark=0.0)
    tight = run(eng, requests) | run(eng, requests)
    same_answers(roomy, tight)
    assert eng.preemptions > 0 and eng.prefix_hit_tokens > 0 and eng.spec_accepted_tokens > 0


@pytest.mark.parametrize("kind", ["medusa", "hydra", "eagle"])
def test_every_row_of_a_medusa_drafting_step_equals_the_plain_model(kind, request, fork_string):
    medusa_dir = request.getfixturevalue(f"{kind}_dir")
    ref = AutoModelForCausalLM.from_pretrained(str(medusa_dir), dtype=torch.float32)
    worst, rows = 0.0, 0

    def compare(res) -> None:
        nonlocal worst, rows
        worst = max(worst, _worst_gap(ref, res))
        rows += len(res.draft_logits)

    eng = engine(medusa_dir, fork_string, MEDUSA)
    run(eng, [(PROMPTS[1], SamplingParams(max_tokens=60, max_threads=4, max_depth=2)),
              (PROMPTS[0], SamplingParams(max_tokens=40, auto_parallel=False))], compare)
    assert worst < 1e-4 and rows >= 16


def test_medusa_without_heads_or_with_too_few_is_a_clear_error(llama_dir, medusa_dir):
    with pytest.raises(UserError, match="train-medusa"):
        Engine(llama_dir, EngineConfig(num_blocks=16, speculate=MEDUSA))
    with pytest.raises(UserError, match="more tokens than the 4 medusa heads"):
        Engine(medusa_dir, EngineConfig(num_blocks=16, speculate=SpeculativeConfig("medusa", num_tokens=5)))


def test_train_medusa_distills_the_frozen_model_and_the_engine_drafts_with_its_heads(llama_dir, tmp_path):
    """`apar train-medusa` on a few records: the base model's weights are untouched, the heads learn
    the model's own guesses (better than the untrained heads, which repeat the next token), and an
    engine drafts with them; with a vocabulary saved, every guess lies in it."""
    from apar.data.pipeline import TreeRecord
    from apar.data.tree import Node
    from apar.train.medusa import train_medusa

    model_dir = tmp_path / "model"
    shutil.copytree(llama_dir, model_dir)
    before = (model_dir / "model.safetensors").read_bytes()
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]
    records = [TreeRecord("t", f"say {w} {i}", Node([f"{w} " * 20 + f"then {words[(i + 1) % 6]} " * 10]), "train")
               for i, w in enumerate(words * 2)]
    logs: list[str] = []
    summary = train_medusa(model_dir, records, model_dir, num_heads=3, kind="medusa", answers=0, max_records=12,
                           max_length=128, epochs=8, batch_size=64, lr=3e-3, log=logs.append)
    assert (model_dir / "model.safetensors").read_bytes() == before  # the base is frozen
    assert "positions from 0 answers and 12 trees" in logs[0]
    first, last = logs[1], logs[-1]
    assert first.startswith("epoch 1/8") and last.startswith("epoch 8/8")
    loss = lambda line: float(line.split("loss ")[1].split(",")[0])  # noqa: E731
    assert loss(last) < loss(first)
    assert summary["top1_per_head"][0] > 0.5, summary
    heads, vocab, meta = load_heads(model_dir)
    assert heads.num_heads == 3 and vocab is not None and meta["trained"]["records"] == 12
    assert (model_dir / HEADS_FILE).is_file() and (model_dir / CONFIG_FILE).is_file()
    eng = Engine(model_dir, EngineConfig(block_size=4, num_blocks=128, speculate=SpeculativeConfig("medusa", 3, policy="all")))
    allowed = set(vocab.tolist())
    eng.add_request(PROMPTS[0], SamplingParams(max_tokens=40, auto_parallel=False))
    while eng.has_work():
        eng.step()
        for _, toks, _ in eng.drafter.proposals.values():
            assert set(toks) <= allowed
    assert eng.spec_draft_tokens > 0 and eng.ledger.num_used == 0


def test_train_hydra_on_the_models_own_answers_then_measure_on_test_prompts(llama_dir, tmp_path):
    """`apar train-medusa --kind hydra` on the model's own greedy answers (through the engine): the
    heads learn them, save with their kind,
    and `evaluate_medusa` measures them on answers to test-split prompts: every figure in range, and
    the accepted tokens never more than the drafted."""
    from apar.train.medusa import evaluate_medusa, train_medusa

    model_dir, records = short_answers_setup(llama_dir, tmp_path)
    logs: list[str] = []
    summary = train_medusa(model_dir, records, model_dir, num_heads=3, kind="hydra", answers=6, answer_tokens=40,
                           max_records=0, epochs=30, batch_size=64, lr=3e-3, log=logs.append,
                           cache=tmp_path / "reading.pt")
    assert "greedy answers" in logs[0] and "from 6 answers and 0 trees" in logs[1]
    first = [float(x) for x in logs[2].split("per head ")[1].split()]
    # the tiny model's answers hold about 80 distinct tokens: chance is about 1%
    assert summary["kind"] == "hydra" and summary["top1_per_head"][0] > max(0.35, first[0]), summary
    heads, vocab, meta = load_heads(model_dir)
    assert isinstance(heads, HydraHeads) and meta["kind"] == "hydra" and meta["blocks"] == 3
    result, text = evaluate_medusa(model_dir, records, model_dir, prompts=2, max_tokens=30, log=logs.append)
    assert result["positions"] > 20 and len(result["top1"]) == 3 and "top-1 per head" in text
    for row in result["table"]:
        assert 0 <= row["accepted"] <= row["drafted"] <= row["k"]
    assert all(0.0 <= x <= 1.0 for x in result["top1"] + result["chain_top1"])
    eng = Engine(model_dir, EngineConfig(block_size=4, num_blocks=128, speculate=SpeculativeConfig("medusa", 3, policy="all")))
    eng.add_request(PROMPTS[0], SamplingParams(max_tokens=40, auto_parallel=False))
    while eng.has_work():
        eng.step()
    assert eng.spec_draft_tokens > 0 and eng.ledger.num_used == 0


def short_answers_setup(llama_dir, tmp_path):
    """A copy of the test model, and records of short answers: two in three of the training split."""
    from apar.data.pipeline import TreeRecord
    from apar.data.tree import Node

    model_dir = tmp_path / "model"
    shutil.copytree(llama_dir, model_dir)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]
    records = [TreeRecord("t", f"say {w} {i}", Node([f"{w} " * 5]), "train" if i % 3 else "test")
               for i, w in enumerate(words * 2)]
    return model_dir, records


@pytest.mark.parametrize("window", [None, 3])
def test_short_chunks_attended_as_one_batch_equal_one_by_one(window):
    """Draft chunks (a thread's pending token and its draft) are attended as one padded batch
    (`ShortChunks`); each query's output equals attending its chunk alone, a long chunk beside them too."""
    from apar.engine.backends.base import AttentionBackend, ChunkMeta, ChunkQuery, Chunks

    gen = torch.Generator().manual_seed(0)
    kv_heads, group, dim, pool = 2, 3, 8, 200
    k_pool, v_pool = torch.randn(kv_heads, pool, dim, generator=gen), torch.randn(kv_heads, pool, dim, generator=gen)
    shapes = [(5, 40), (1, 7), (3, 12), (30, 60)]  # (queries, context length): the last is a long chunk
    metas, start = [], 0
    for n, length in shapes:
        slots = torch.randperm(pool, generator=gen)[:length]
        metas.append(ChunkMeta(ChunkQuery(start, n, 0, length), slots))
        start += n
    query = torch.randn(start, kv_heads * group, dim, generator=gen)
    want = torch.zeros_like(query)
    AttentionBackend.attend_chunks(list(metas), query, k_pool, v_pool, 0.3, window, want)  # one by one
    got = torch.zeros_like(query)
    chunks = Chunks(metas)
    AttentionBackend.attend_chunks(chunks, query, k_pool, v_pool, 0.3, window, got)
    assert chunks.short(group, window) is not None and len(chunks.short(group, window).rest) == 1
    assert torch.allclose(got, want, atol=1e-5)
