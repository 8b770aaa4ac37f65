"""Small random-weight model directories built from a config: real HF models for tests and benchmarks.

`make_model(out, arch="llama")` writes config.json, model.safetensors, a generation config and a byte-level
BPE tokenizer (trained here on the AlpacaEval data's train split: `data`, else `apar.data.alpaca_split.data_dir()`)
with the control tokens `[Fork]` and `[Child]`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, MistralConfig, Qwen2Config

from apar.engine.errors import UserError
from apar.data.alpaca_split import data_dir
from apar.tokenizer import CHILD, FORK, save, train_bpe, train_texts

ARCHS = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}

@dataclass(slots=True)
class ModelShape:
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2  # < heads: grouped-query attention
    intermediate: int = 128
    max_positions: int = 1024
    vocab: int = 1024


def build_tokenizer(vocab: int, control: tuple[str, str] = (FORK, CHILD), data: str | Path | None = None):
    """A BPE tokenizer trained on the first 3000 train-split texts of the AlpacaEval folder `data`
    (None: `apar.data.alpaca_split.data_dir()`)."""
    texts = train_texts(data_dir(data), limit=3000)
    if not texts:
        raise UserError(f"{data_dir(data)}: no train-split AlpacaEval records to train a tokenizer on")
    return train_bpe(texts, vocab, control_tokens=control)


def config_from_file(path: str | Path, tokenizer):
    """An HF config from a config.json of any causal LM; its vocabulary becomes the tokenizer's."""
    import json

    from transformers import AutoConfig

    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read config {p}: {exc}") from None
    model_type = data.pop("model_type", None)
    if not model_type:
        raise UserError(f"{p} has no model_type")
    try:
        cfg = AutoConfig.for_model(model_type, **data)
    except ValueError as exc:
        raise UserError(f"{p}: {exc}") from None
    cfg.vocab_size = len(tokenizer)
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id, \
        tokenizer.pad_token_id
    return cfg


def make_model(out: str | Path, arch: str = "llama", shape: ModelShape | None = None, seed: int = 0,
               control: tuple[str, str] = (FORK, CHILD), tokenizer=None, config_file: str | Path | None = None,
               data: str | Path | None = None) -> Path:
    if arch not in ARCHS and config_file is None:
        raise UserError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    shape = shape or ModelShape()
    out = Path(out)
    tok = tokenizer or build_tokenizer(shape.vocab, control, data)
    if config_file is not None:
        return _save(out, config_from_file(config_file, tok), tok, seed)
    return _save(out, model_config(arch, shape, tok), tok, seed)


def model_config(arch: str, shape: ModelShape, tok, vocab: int | None = None):
    """The HF config of a random model: `shape`, the tokenizer's special ids; `vocab` (>= the tokenizer's
    size) pads the embeddings to a published model's vocabulary."""
    return ARCHS[arch](
        vocab_size=max(vocab or 0, len(tok)),
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=shape.max_positions,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )


def random_model(cfg, tok, seed: int, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Random weights for `cfg`, initialised directly on `device` in `dtype` (a 7B model on a GPU in
    seconds, where a float32 CPU init takes minutes)."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    # wider random logits than the default init, so greedy choices are far from ties
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0.0, 0.5)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    return model.eval()


def save_model(out: str | Path, model, tok) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    save(tok, out)
    return out


def _save(out: Path, cfg, tok, seed: int) -> Path:
    return save_model(out, random_model(cfg, tok, seed), tok)
