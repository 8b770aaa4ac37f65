"""A tiny GGUF file written in a test with the `gguf` package: a random-weight Llama of a few layers
(float32 tensors, llama.cpp's tensor names) and a real byte-level BPE tokenizer in the metadata (trained
here on train-split texts), with a chat template and no control tokens: what `apar import-model` reads
from a published GGUF, small enough for CI."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from apar.tokenizer import CHAT_TEMPLATE, train_bpe, train_texts
from apar.data.alpaca_split import data_dir

NORMAL, CONTROL = 1, 3  # llama.cpp token types


@dataclass(frozen=True, slots=True)
class TinyShape:
    vocab: int = 384
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 96
    context: int = 512


def bpe_tokenizer(vocab: int):
    """A byte-level BPE trained on a few hundred train-split texts, without control tokens."""
    return train_bpe(train_texts(data_dir(), limit=400), vocab, control_tokens=())


def write_tiny_gguf(path: Path, shape: TinyShape = TinyShape(), seed: int = 0, tied: bool = True) -> Path:
    tok = bpe_tokenizer(shape.vocab)
    model = json.loads(tok.backend_tokenizer.to_str())["model"]
    tokens = [tok.convert_ids_to_tokens(i) for i in range(len(tok))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    special = set(tok.all_special_ids) | {tok.convert_tokens_to_ids(t) for t in ("<|user|>", "<|assistant|>", "<|system|>")}
    v, h, hd = len(tokens), shape.hidden, shape.hidden // shape.heads

    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny test llama")
    w.add_license("apache-2.0")
    w.add_block_count(shape.layers)
    w.add_context_length(shape.context)
    w.add_embedding_length(h)
    w.add_feed_forward_length(shape.intermediate)
    w.add_head_count(shape.heads)
    w.add_head_count_kv(shape.kv_heads)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(v)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([CONTROL if i in special else NORMAL for i in range(v)])
    w.add_token_merges(merges)
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)

    rng = np.random.default_rng(seed)

    def add(name: str, *dims: int, std: float = 0.1, mean: float = 0.0) -> None:
        w.add_tensor(name, (mean + std * rng.standard_normal(dims)).astype(np.float32))

    add("token_embd.weight", v, h, std=0.5)  # [V, H]; wide, so greedy choices are far from ties
    for i in range(shape.layers):
        add(f"blk.{i}.attn_norm.weight", h, mean=1.0)
        add(f"blk.{i}.attn_q.weight", h, h)
        add(f"blk.{i}.attn_k.weight", shape.kv_heads * hd, h)
        add(f"blk.{i}.attn_v.weight", shape.kv_heads * hd, h)
        add(f"blk.{i}.attn_output.weight", h, h)
        add(f"blk.{i}.ffn_norm.weight", h, mean=1.0)
        add(f"blk.{i}.ffn_gate.weight", shape.intermediate, h)
        add(f"blk.{i}.ffn_up.weight", shape.intermediate, h)
        add(f"blk.{i}.ffn_down.weight", h, shape.intermediate)
    add("output_norm.weight", h, mean=1.0)
    if not tied:
        add("output.weight", v, h, std=0.5)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
