"""The demo APAR model, made here from scratch, and its auto-regressive twin.

Recipe (seeded, so one command gives the same model again on the same machine):
1. paragraph trees of the AlpacaEval responses (data/alpaca_eval, `apar.data`), split by instruction hash;
2. a byte-level BPE tokenizer trained on train-split texts only (`apar.tokenizer.train_bpe`), with the
   control tokens and a chat template;
3. a small random-initialised Llama (`LlamaConfig` from the preset);
4. training on train-split trees in APAR form (packed trees), or with `ar=True` on the same responses
   flattened (no control tokens): the twin that every comparison runs against;
5. held-out loss on restored test-split responses, written with the model to OUT/train_summary.json.
Responses longer than the preset's character limit are left out; a packed tree longer than the preset's
context is cut to a prefix, which keeps the root thread (where forks are decided) and the first children.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from apar.data.pipeline import TreeRecord, load_records
from apar.engine.errors import UserError
from apar.data.alpaca_split import data_dir as resolve_data_dir
from apar.tokenizer import train_bpe, train_texts
from apar.train.trainer import TrainConfig, TrainResult, train_records


@dataclass(frozen=True, slots=True)
class Preset:
    """Model shape, data and schedule of one demo recipe."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    max_length: int  # tokens of one packed training sequence
    max_response_chars: int  # longer responses are left out
    tokenizer_texts: int  # train-split texts the tokenizer is trained on
    held_out_records: int  # test-split records evaluated
    steps: int
    batch_size: int
    lr: float
    warmup_steps: int


PRESETS = {
    # a couple of minutes on 2 CPU cores: forks on list prompts, rough text
    "quick": Preset(vocab=2048, hidden=128, layers=4, heads=4, kv_heads=2, intermediate=384,
                    max_length=256, max_response_chars=3000, tokenizer_texts=4000, held_out_records=64,
                    steps=600, batch_size=8, lr=3e-3, warmup_steps=30),
    # about half an hour on 2 idle CPU cores (about 8M training tokens): the one to measure quality with
    "full": Preset(vocab=4096, hidden=192, layers=4, heads=6, kv_heads=2, intermediate=512,
                   max_length=512, max_response_chars=3000, tokenizer_texts=12000, held_out_records=256,
                   steps=2000, batch_size=8, lr=2e-3, warmup_steps=60),
}


def select_records(records: list[TreeRecord], preset: Preset) -> list[TreeRecord]:
    """Train records that fit the preset, and the first `held_out_records` test records that do."""
    fits = [r for r in records if len(r.response) <= preset.max_response_chars]
    train = [r for r in fits if r.split == "train"]
    held = [r for r in fits if r.split == "test"][: preset.held_out_records]
    return train + held


def prepare_data(preset: Preset, data_dir: Path | None = None) -> tuple[list[TreeRecord], PreTrainedTokenizerFast]:
    """Steps 1 and 2: the preset's tree records (train, then held-out test) and the tokenizer trained on
    train-split texts, from the AlpacaEval folder `data_dir` (None: `apar.data.alpaca_split.data_dir()`)."""
    data = resolve_data_dir(data_dir)
    records = select_records(load_records(data), preset)
    texts = train_texts(data, limit=preset.tokenizer_texts)  # train split only
    return records, train_bpe(texts, preset.vocab)


def build_model(preset: Preset, tokenizer, seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=preset.hidden, intermediate_size=preset.intermediate,
        num_hidden_layers=preset.layers, num_attention_heads=preset.heads,
        num_key_value_heads=preset.kv_heads, max_position_embeddings=max(2048, preset.max_length),
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float()
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    return model


def make_demo_model(preset_name: str, out: Path, ar: bool = False, seed: int = 0,
                    data_dir: Path | None = None, steps: int | None = None,
                    device: str = "auto") -> TrainResult:
    """Train the demo model (or its AR twin) of a preset into `out`."""
    if preset_name not in PRESETS:
        raise UserError(f"unknown preset {preset_name!r}; choose one of {', '.join(PRESETS)}")
    preset = PRESETS[preset_name]
    records, tokenizer = prepare_data(preset, data_dir)
    model = build_model(preset, tokenizer, seed)
    config = TrainConfig(
        steps=steps or preset.steps, batch_size=preset.batch_size, lr=preset.lr,
        warmup_steps=preset.warmup_steps, max_length=preset.max_length, seed=seed, flat=ar,
        log_every=20, save_every=max(100, (steps or preset.steps) // 4), device=device,
    )
    extra = {"preset": preset_name, "preset_values": asdict(preset), "form": "ar" if ar else "apar",
             "parameters": sum(p.numel() for p in model.parameters())}
    return train_records(model, tokenizer, records, config, out, extra=extra)
