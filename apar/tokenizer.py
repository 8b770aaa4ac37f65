"""Build a byte-level BPE tokenizer from text with the `tokenizers` library (no hub needed).

Used for the random-weight test models and the demo model. The APAR control tokens are added as special
tokens, so they are single ids looked up from their strings, never hard-coded.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
FORK, CHILD = "[Fork]", "[Child]"

# A minimal chat template: user turn, then the assistant's answer ended by EOS.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + '\n' }}"
    "{% else %}{{ '<|assistant|>\n' + message['content'] + eos_token + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    control_tokens: tuple[str, ...] = (FORK, CHILD),
    chat_template: str | None = CHAT_TEMPLATE,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts` and wrap it as a transformers fast tokenizer."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [PAD, BOS, EOS, *control_tokens]
    role_markers = ["<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials + role_markers,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=list(control_tokens),
        clean_up_tokenization_spaces=False,
    )
    if chat_template:
        fast.chat_template = chat_template
    return fast


def train_texts(data_dir: Path, limit: int | None = None) -> list[str]:
    """Instructions and responses of the AlpacaEval files in `data_dir` (train split only)."""
    import json

    from apar.data.readers import data_files, kind, read_text
    from apar.data.alpaca_split import is_test_instruction

    texts: list[str] = []
    for path in data_files(data_dir):
        if kind(path) != ".json":
            continue
        for record in json.loads(read_text(path)):
            if is_test_instruction(record["instruction"]):
                continue
            texts.append(record["instruction"])
            texts.append(record["output"])
            if limit is not None and len(texts) >= limit:
                return texts
    return texts


def save(tokenizer: PreTrainedTokenizerFast, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out))
