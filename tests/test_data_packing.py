"""Tree packing: exact layout, and the packed loss equals the one-sequence-per-thread loss on a real model."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from apar.data.packing import (
    IGNORE,
    ControlIds,
    PackedExample,
    ThreadTokens,
    TokenTree,
    collate,
    pack,
    per_thread_examples,
    token_loss_sum,
    tokenize_tree,
)
from apar.data.rules import build_tree

F, C, E = 90, 91, 92  # fork, child, eos ids of the hand-made trees
CONTROL = ControlIds(fork=F, child=C, eos=E)
# prompt p0 p1; root "a F b E"; child "C x E" spawned at the root's F (index 1)
SMALL = TokenTree([10, 11], [ThreadTokens(None, None, [1, F, 2, E]), ThreadTokens(0, 1, [C, 3, E])])

ANSWER = (
    "Here are three genres:\n\n"
    "1. **Jazz**: Lively music.\n   - Louis: trumpet solos.\n   - Duke: big band.\n   - Bessie: blues voice.\n\n"
    "2. **Blues**: Sad songs of the South.\n\n"
    "3. **Swing**: Dance music for everyone.\n\nEnjoy listening!"
)


def test_pack_layout_is_exact():
    ex = pack(SMALL, CONTROL)
    assert ex.input_ids == [10, 11, 1, F, 2, E, C, 3, E]
    assert ex.previous == [-1, 0, 1, 2, 3, 4, 3, 6, 7]
    assert ex.position_ids == [0, 1, 2, 3, 4, 5, 4, 5, 6]
    assert ex.labels == [IGNORE, 1, F, 2, E, IGNORE, 3, E, IGNORE]
    assert ex.num_targets == SMALL.response_tokens == 6
    allowed = ex.visible()
    assert allowed[6].nonzero().flatten().tolist() == [0, 1, 2, 3, 6]  # [Child] sees prompt, a, [Fork]
    assert allowed[8].nonzero().flatten().tolist() == [0, 1, 2, 3, 6, 7, 8]
    assert allowed[5].nonzero().flatten().tolist() == [0, 1, 2, 3, 4, 5]  # the root never sees its child


def test_pack_cut_keeps_ancestors():
    ex = pack(SMALL, CONTROL, max_length=7)
    assert ex.input_ids == [10, 11, 1, F, 2, E, C]
    assert ex.labels == [IGNORE, 1, F, 2, E, IGNORE, IGNORE]


def test_per_thread_reference_sequences():
    assert per_thread_examples(SMALL) == [
        ([10, 11, 1, F, 2, E], [IGNORE, IGNORE, 1, F, 2, E]),
        ([10, 11, 1, F, C, 3, E], [IGNORE] * 4 + [IGNORE, 3, E]),
    ]


def test_collate_pads_with_self_only_rows():
    batch = collate([pack(SMALL, CONTROL), PackedExample([10, 1], [0, 1], [-1, 0], [1, IGNORE])], pad_id=0)
    assert batch["input_ids"].shape == (2, 9) and batch["attention_mask"].shape == (2, 1, 9, 9)
    visible = batch["attention_mask"][1, 0] == 0
    assert visible[:2, :2].tolist() == [[True, False], [True, True]]
    assert visible[5].nonzero().flatten().tolist() == [5]  # a pad row sees only itself
    assert batch["labels"][1].tolist() == [1] + [IGNORE] * 8


def _tiny_llama(vocab: int, attn: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    )
    config._attn_implementation = attn
    return LlamaForCausalLM(config).float().eval()


def _per_thread_loss(model, tree: TokenTree) -> tuple[float, int]:
    total, count = 0.0, 0
    for ids, labels in per_thread_examples(tree):
        logits = model(input_ids=torch.tensor([ids])).logits  # [1, T, V]
        loss, n = token_loss_sum(logits[:, :-1], torch.tensor([labels[1:]]))  # shift: t predicts t+1
        total += float(loss)
        count += n
    return total / count, count


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_loss_equals_per_thread_loss(tokenizer, attn):
    control = ControlIds.from_tokenizer(tokenizer)
    tree = tokenize_tree("Name three music genres.", build_tree(ANSWER), tokenizer, control)
    assert len(tree.threads) == 7  # root, 3 items, 3 nested bullets
    model = _tiny_llama(len(tokenizer), attn)
    ex = pack(tree, control)
    batch = collate([ex], pad_id=tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       attention_mask=batch["attention_mask"]).logits  # [1, L, V]
        packed_sum, packed_count = token_loss_sum(logits, batch["labels"])
        reference, reference_count = _per_thread_loss(model, tree)
        # the same sequence with a plain causal mask and positions sees siblings: a different loss
        plain = model(input_ids=batch["input_ids"]).logits
        plain_sum, _ = token_loss_sum(plain, batch["labels"])
    assert packed_count == reference_count == tree.response_tokens
    assert float(packed_sum) / packed_count == pytest.approx(reference, abs=1e-5)
    assert abs(float(plain_sum) / packed_count - reference) > 1e-3


def test_batched_packing_matches_single_examples(tokenizer):
    control = ControlIds.from_tokenizer(tokenizer)
    model = _tiny_llama(len(tokenizer), "sdpa")
    long = pack(tokenize_tree("Genres?", build_tree(ANSWER), tokenizer, control), control)
    short = pack(tokenize_tree("Hi", build_tree("Hello there."), tokenizer, control), control)
    with torch.no_grad():
        losses = []
        for ex in (long, short):
            b = collate([ex], tokenizer.pad_token_id)
            out = model(input_ids=b["input_ids"], position_ids=b["position_ids"], attention_mask=b["attention_mask"])
            losses.append(float(token_loss_sum(out.logits, b["labels"])[0]))
        b = collate([long, short], tokenizer.pad_token_id)
        out = model(input_ids=b["input_ids"], position_ids=b["position_ids"], attention_mask=b["attention_mask"])
        batched = [float(token_loss_sum(out.logits[i:i + 1], b["labels"][i:i + 1])[0]) for i in range(2)]
    assert batched == pytest.approx(losses, abs=1e-4)


def test_tokenizer_without_control_tokens_is_refused():
    from apar.engine.errors import UserError
    from apar.tokenizer import train_bpe

    bare = train_bpe(["plain text only"] * 10, 300, control_tokens=())
    with pytest.raises(UserError, match="no '\\[Fork\\]' token"):
        ControlIds.from_tokenizer(bare)
