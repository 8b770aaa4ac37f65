"""Draft heads on their own (apar/engine/medusa.py, apar/train/medusa.py): shapes, what untrained heads
guess, that token-conditioned (hydra) heads learn a pattern only the tokens carry, and that saved heads
load as they were. The engine with the heads: tests/test_engine_medusa.py."""
from __future__ import annotations

import pytest
import torch

from apar.engine.errors import UserError
from apar.engine.medusa import HydraHeads, MedusaDrafter, MedusaHeads, load_heads, save_heads
from apar.train.medusa import train_heads
from apar.train.medusa_data import from_threads
from apar.train.medusa_eval import measure

V, H = 24, 32


def _tables(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(V, H, generator=gen), torch.randn(V, H, generator=gen)  # LM head, input embeddings


@pytest.mark.parametrize("blocks", [1, 3])
def test_hydra_shapes_and_the_chain_equals_the_teacher_forced_heads_on_its_own_guesses(blocks):
    heads = HydraHeads(H, 3, blocks)
    assert heads.weight.shape == (blocks, H, 2 * H) and heads.bias.shape == (blocks, H)
    with torch.no_grad():
        heads.weight.normal_(0, 0.3)
    table, embed = _tables()
    h, pending = torch.randn(5, H), torch.tensor([1, 2, 3, 4, 5])
    out = heads(h, embed[torch.randint(0, V, (5, 3))])
    assert out.shape == (5, 3, H)
    drafter = MedusaDrafter(heads, table, None, [], embed)
    toks, conf = drafter.chain(h, pending)  # [5, 3] each
    assert toks.shape == conf.shape == (5, 3) and bool(((conf > 0) & (conf <= 1)).all())
    inputs = torch.cat([pending[:, None], toks[:, :-1]], dim=1)  # each head's input: the token before it
    forced = (heads(h, embed[inputs]) @ table.T).argmax(-1)
    assert torch.equal(forced, toks)
    with pytest.raises(UserError, match="1 block or one per head"):
        HydraHeads(H, 3, 2)


def test_untrained_heads_guess_the_models_next_token_and_hydra_reads_the_pending_token():
    table, embed = _tables()
    h = torch.randn(6, H)
    own = (h @ table.T).argmax(-1)  # the model's own next token from each row
    for heads in (MedusaHeads(H, 2), HydraHeads(H, 2)):
        toks, _ = MedusaDrafter(heads, table, None, [], embed).chain(h, own)
        assert torch.equal(toks, own[:, None].expand(6, 2))
    hydra = HydraHeads(H, 2)
    with torch.no_grad():
        hydra.weight.normal_(0, 0.5)
    drafter = MedusaDrafter(hydra, table, None, [], embed)
    a = drafter.chain(h, torch.zeros(6, dtype=torch.long))[1]
    b = drafter.chain(h, torch.full((6,), 7))[1]
    assert not torch.allclose(a, b)  # the guess depends on the pending token
    with pytest.raises(UserError, match="input embeddings"):
        MedusaDrafter(hydra, table, None, [])


def _pattern_reading(seed: int):
    """Threads of a deterministic pattern: each token follows from the one before (a permutation),
    while the hidden states are noise that carries nothing of it."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(V, generator=torch.Generator().manual_seed(99))
    threads = []
    for _ in range(40):
        tok = int(torch.randint(0, V, (1,), generator=gen))
        toks = []
        for _ in range(30):
            tok = int(perm[tok])
            toks.append(tok)
        threads.append((torch.randn(30, H, generator=gen), toks, toks))
    return from_threads(threads, [])


def test_hydra_heads_learn_a_pattern_the_tokens_carry_and_medusa_heads_cannot():
    table, embed = _tables()
    train, held_out = _pattern_reading(1), _pattern_reading(2)
    found = {}
    for kind in ("medusa", "hydra"):
        heads, _ = train_heads(train, table, embed, list(range(V)), kind, 3, epochs=40, batch_size=64, lr=1e-2,
                               log=lambda line: None)
        found[kind] = measure(MedusaDrafter(heads, table, None, [], embed), held_out, [])
    hydra, medusa = found["hydra"], found["medusa"]
    assert min(hydra["chain_top1"]) > 0.9, hydra["chain_top1"]  # chance: 1/24
    assert max(medusa["top1"]) < 0.3, medusa["top1"]
    best = max(r["accepted"] for r in hydra["table"] if r["k"] == 3)
    assert best > 2.5  # of 3 drafted tokens a position


@pytest.mark.parametrize("kind,blocks", [("medusa", None), ("hydra", 1), ("hydra", 3)])
def test_saved_heads_load_as_they_were_and_guess_the_same(tmp_path, kind, blocks):
    table, embed = _tables()
    heads = MedusaHeads(H, 3) if kind == "medusa" else HydraHeads(H, 3, blocks)
    with torch.no_grad():
        heads.weight.normal_(0, 0.3)
        heads.bias.normal_(0, 0.1)
    vocab = [0, 3, 5, 7, 11, 20]
    save_heads(tmp_path, heads, vocab, {"trained": {"note": "test"}})
    loaded, saved_vocab, meta = load_heads(tmp_path)
    assert type(loaded) is type(heads) and meta["kind"] == kind and loaded.num_heads == 3
    assert getattr(loaded, "blocks", None) == blocks and saved_vocab.tolist() == vocab
    assert torch.equal(loaded.weight, heads.weight) and torch.equal(loaded.bias, heads.bias)
    h, pending = torch.randn(4, H), torch.tensor([1, 2, 3, 4])
    before = MedusaDrafter(heads, table, torch.tensor(vocab), [], embed).guess(h, pending)
    after = MedusaDrafter(loaded, table, saved_vocab, [], embed).guess(h, pending)
    assert before == after and all(set(g) <= set(vocab) for g in after)


def test_heads_saved_without_a_kind_load_as_medusa(tmp_path):
    import json

    save_heads(tmp_path, MedusaHeads(H, 2), None, {})
    config = json.loads((tmp_path / "medusa.json").read_text())
    del config["kind"]
    (tmp_path / "medusa.json").write_text(json.dumps(config))
    assert isinstance(load_heads(tmp_path)[0], MedusaHeads)


def test_a_bfloat16_drafter_leaves_its_heads_alone_and_cuts_the_chain_when_no_row_is_sure():
    """The CPU may run the heads' guesses in bfloat16 (`MedusaDrafter.load` times both): building that
    drafter copies the heads, so a float32 drafter over the same heads still works; and the chain, cut,
    stops at the first head where no row is sure (the heads past it read probability 0)."""
    heads = HydraHeads(H, 3)
    with torch.no_grad():
        heads.weight.normal_(0, 0.3)
    table, embed = _tables()
    h, pending = torch.randn(5, H), torch.tensor([1, 2, 3, 4, 5])
    half = MedusaDrafter(heads, table, None, [], embed, dtype=torch.bfloat16)
    full = MedusaDrafter(heads, table, None, [], embed)
    assert half.heads.weight.dtype == half.table.dtype == torch.bfloat16
    assert heads.weight.dtype == full.heads.weight.dtype == torch.float32
    toks, conf = half.chain(h, pending)
    assert toks.shape == conf.shape == (5, 3) and bool(((conf > 0) & (conf <= 1)).all())
    full.min_confidence = 1.1  # no head is ever sure
    toks, conf = full.chain(h, pending, cut=True)
    assert bool((conf[:, 0] > 0).all()) and bool((conf[:, 1:] == 0).all())
    assert full.guess(h, pending) == [[] for _ in range(5)]
