"""Loads a Hugging Face causal LM from a local directory and runs one engine step through it.

The runner owns the model, the tokenizer and the KV pool. `forward` takes the flat batch the scheduler
built (token ids, positions, slots) and returns the logits of the rows that sample.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from apar.errors import UserError
from services.worker.attention import ATTN_NAME, ChunkGroup, DecodeGroup, KVPool, StepBatch, TorchBackend
from services.worker.config import EngineConfig

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pick_device(name: str | None) -> torch.device:
    if name:
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"device {name} asked for, but CUDA is not available")
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def check_model_dir(path: str | Path) -> Path:
    """A clear error unless `path` is a local directory holding a causal LM config."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"model directory {p} does not exist")
    if not p.is_dir():
        raise UserError(f"model path {p} is not a directory")
    cfg_file = p / "config.json"
    if not cfg_file.exists():
        raise UserError(f"{p} has no config.json: not a Hugging Face model directory")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{cfg_file} is not valid JSON: {exc}") from None
    archs = cfg.get("architectures") or []
    if not any(a.endswith("ForCausalLM") for a in archs):
        raise UserError(f"{p} is not a causal LM (architectures: {archs or 'none'})")
    if not any(p.glob("*.safetensors")):
        raise UserError(f"{p} has no *.safetensors weights")
    return p


class ModelRunner:
    def __init__(self, model_dir: str | Path, config: EngineConfig) -> None:
        path = check_model_dir(model_dir)
        self.config = config
        self.device = pick_device(config.device)
        self.dtype = pick_dtype(config.dtype, self.device)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path))
            hf_config = AutoConfig.from_pretrained(str(path))
            self.model = AutoModelForCausalLM.from_pretrained(
                str(path), dtype=self.dtype, attn_implementation=ATTN_NAME
            ).to(self.device)
        except (OSError, ValueError, KeyError) as exc:
            raise UserError(f"cannot load model from {path}: {exc}") from None
        self.model.eval()
        self.hf_config = hf_config
        text_cfg = hf_config.get_text_config()
        self.num_layers = text_cfg.num_hidden_layers
        self.num_heads = text_cfg.num_attention_heads
        self.kv_heads = getattr(text_cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // self.num_heads
        self.max_positions = getattr(text_cfg, "max_position_embeddings", None) or 1 << 30
        self.vocab_size = self.model.get_output_embeddings().weight.shape[0]
        per_block = KVPool.bytes_per_block(self.num_layers, config.block_size, self.kv_heads, self.head_dim,
                                           self.dtype)
        num_blocks = config.num_blocks or max(1, int(config.kv_memory_mb * 2**20) // per_block)
        self.pool = KVPool(self.num_layers, num_blocks, config.block_size, self.kv_heads, self.head_dim,
                           self.dtype, self.device)
        self.backend = TorchBackend()
        log.info("loaded %s on %s (%s): %d KV blocks of %d tokens", path, self.device, self.dtype, num_blocks,
                 config.block_size)

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def eos_ids(self) -> set[int]:
        ids: set[int] = set()
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        for v in (gen_eos, self.tokenizer.eos_token_id):
            if isinstance(v, int):
                ids.add(v)
            elif isinstance(v, (list, tuple)):
                ids.update(int(x) for x in v)
        return ids

    def token_id(self, text: str) -> int:
        """The id of a control token string, or a clear error when the tokenizer lacks it."""
        tid = self.tokenizer.convert_tokens_to_ids(text)
        unk = self.tokenizer.unk_token_id
        if tid is None or (unk is not None and tid == unk and text != self.tokenizer.unk_token):
            raise UserError(f"control token {text!r} is not in the tokenizer's vocabulary")
        if self.tokenizer.convert_ids_to_tokens(tid) != text:
            raise UserError(f"control token {text!r} is not a single token in this tokenizer")
        return int(tid)

    @torch.inference_mode()
    def forward(self, token_ids: list[int], positions: list[int], write_slots: list[int],
                decode: list[tuple[int, torch.Tensor, int]], chunks: list[tuple[int, int, torch.Tensor]],
                sample_rows: list[int]) -> torch.Tensor:
        """Run the model over the flat batch; return float32 logits [S, V] for `sample_rows`.

        decode: (row, context slots [C], position) per single-token thread;
        chunks: (first row, rows, context slots [C]) per multi-token thread.
        """
        dev = self.device
        decode_group = None
        if decode:
            rows = torch.tensor([d[0] for d in decode], dtype=torch.long)
            ctx = torch.nn.utils.rnn.pad_sequence([d[1] for d in decode], batch_first=True)  # [T, C]
            lens = torch.tensor([d[1].numel() for d in decode])
            pad = torch.arange(ctx.shape[1])[None, :] >= lens[:, None]  # [T, C]
            bias = torch.zeros(pad.shape, dtype=self.dtype).masked_fill_(pad, float("-inf"))[:, None, None, :]
            pos = torch.tensor([d[2] for d in decode], dtype=torch.long)
            decode_group = DecodeGroup(rows.to(dev), ctx.to(dev), bias.to(dev), pos.to(dev))
        step = StepBatch(
            pool=self.pool,
            write_slots=torch.tensor(write_slots, dtype=torch.long).to(dev),
            decode=decode_group,
            chunks=[ChunkGroup(start, n, ctx.to(dev)) for start, n, ctx in chunks],
            backend=self.backend,
        )
        ids = torch.tensor(token_ids, dtype=torch.long, device=dev)[None]  # [1, N]
        pos_ids = torch.tensor(positions, dtype=torch.long, device=dev)[None]  # [1, N]
        keep = torch.tensor(sample_rows, dtype=torch.long, device=dev)
        out = self.model(input_ids=ids, position_ids=pos_ids, use_cache=False, logits_to_keep=keep,
                         apar_step=step)
        return out.logits[0].float()  # [S, V]
