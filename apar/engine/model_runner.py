"""Loads a Hugging Face causal LM from a local directory and runs one engine step through it.

The runner owns the model, the tokenizer, the KV pool, the context table and the attention backend.
`forward` takes the step's inputs (`ModelInputs`, built by `InputBuilder`), lets the backend prepare its
metadata once, runs the model (or, on CUDA, replays a captured graph of a decode step) and returns the
float32 logits of the rows that sample.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from apar.engine.attention import ATTN_NAME, ATTN_NAME_COMPILED, CurrentStep, KVPool, AttentionInputs, attach_pools
from apar.engine.backends import make_backend, resolve
from apar.engine.backends.base import AttentionBackend, ModelInputs
from apar.engine.config import EngineConfig
from apar.engine.context_table import ContextTable
from apar.engine.errors import UserError
from apar.engine.fusion import fuse_projections
from apar.engine.rows_gemm import use_rows_kernel

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
        self.path = path
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
        self.fused = fuse_projections(self.model)  # q, k, v (gate, up): one product each group
        self.compiled = config.compile if config.compile is not None else self.device.type == "cuda"
        if self.compiled:
            self._compile()
        self.rows_kernel = (config.rows_kernel and not self.compiled and self.device.type == "cpu"
                            and self.dtype == torch.float32 and use_rows_kernel(self.model) > 0)
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
        if self.compiled:
            attach_pools([layer.self_attn for layer in self.model.get_decoder().layers], self.pool)
        self.contexts = ContextTable(self.device, self.max_positions)
        self.windows = {None, getattr(text_cfg, "sliding_window", None)}
        self.backend = self._backend(resolve(config.attention, self.device, self.head_dim))
        self._proven = False  # a forward with this backend succeeded (no fallback after that)
        self.last_hidden: torch.Tensor | None = None  # [S, H] the LM head's input rows, when kept
        self.graphs = None
        if self.device.type == "cuda" and config.cuda_graphs:
            from apar.engine.cuda_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(self)
        log.info("loaded %s on %s (%s): %d KV blocks of %d tokens, %s attention%s%s%s", path, self.device,
                 self.dtype, num_blocks, config.block_size, self.backend.name, ", CUDA graphs" if self.graphs else "",
                 ", compiled layers" if self.compiled else "", ", rows kernel" if self.rows_kernel else "")

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

    def keep_hidden(self) -> None:
        """From now on keep the last hidden states the LM head reads in each forward (its sampled rows,
        [S, H] in `last_hidden`) for draft heads (apar/engine/medusa.py). Steps then run eagerly (a CUDA
        graph would keep its own copy)."""
        def hook(module, args, output) -> None:
            self.last_hidden = args[0].reshape(-1, args[0].shape[-1])

        self.model.get_output_embeddings().register_forward_hook(hook)
        self.graphs = None

    def _compile(self) -> None:
        """torch.compile every decoder layer as one graph: its K/V write traced, the backend's attention an
        opaque custom op (`paged_attention_compiled`). The layers share their code, and their parameters
        and pools are the graphs' inputs: one compile serves all of them, for every batch size (the size
        is symbolic after its second value; one token, the decode step at batch 1, is compiled apart).
        Compiling happens on first use (on CUDA in the warm-up before a graph's capture)."""
        layers = getattr(self.model.get_decoder(), "layers", None)
        if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
            raise UserError("--compile needs a model whose decoder keeps its layers in `.layers`")
        self.model.set_attn_implementation(ATTN_NAME_COMPILED)
        # the first token counts, prefill chunk lengths, each model class: a few graphs per layer's code
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        for layer in layers:
            layer.compile(dynamic=None)

    def _backend(self, name: str) -> AttentionBackend:
        per_position = KVPool.bytes_per_block(1, 1, self.kv_heads, self.head_dim, self.dtype)
        backend = make_backend(name, self.device, self.pool.slots, per_position, self.num_heads // self.kv_heads)
        if hasattr(backend, "windows"):
            backend.windows = set(self.windows)
        return backend

    @torch.inference_mode()
    def forward(self, step: ModelInputs) -> torch.Tensor:
        """Run the model over the step's flat batch; return float32 logits [S, V] of its sampled rows.

        With `--attention auto`, a backend that fails before it ever succeeded (triton or flex that cannot
        compile here) gives way to cascade for the rest of the engine's life."""
        try:
            logits = None
            if self.graphs is not None and self.graphs.fits(step):
                logits = self.graphs.run(step)  # None: not capturable, run it eagerly
            if logits is None:
                logits = self.eager(step)
        except Exception as exc:  # noqa: BLE001 - only the auto choice's first failure, re-raised otherwise
            if self.config.attention != "auto" or self._proven or self.backend.name == "cascade":
                raise
            log.warning("%s attention failed here (%s: %s); using cascade", self.backend.name,
                        type(exc).__name__, exc)
            self.backend = self._backend("cascade")
            logits = self.eager(step)
        self._proven = True
        return logits

    def eager(self, step: ModelInputs) -> torch.Tensor:
        meta = self.backend.prepare(step)
        batch = AttentionInputs(self.pool, step.write_slots, self.backend, meta)
        return self.call_model(step, batch, step.sample_rows).float()  # [S, V]

    def call_model(self, step: ModelInputs, batch: AttentionInputs, logits_to_keep) -> torch.Tensor:
        """The HF model over the step's tokens ([1, N] ids and positions); its logits [S, V] at the rows
        `logits_to_keep` names. Every layer's attention finds its inputs (`AttentionInputs`) in `CurrentStep`, and its
        slots also as a tensor argument (`apar_slots`), which compiled layers trace their K/V write with."""
        CurrentStep.step = batch
        try:
            out = self.model(input_ids=step.input_ids[None], position_ids=step.positions[None], use_cache=False,
                             logits_to_keep=logits_to_keep, apar_slots=step.write_slots)
        finally:
            CurrentStep.step = None
        return out.logits[0]
