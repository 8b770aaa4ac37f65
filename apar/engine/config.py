"""Typed configuration of the engine and of one request's sampling; every field checked on creation."""
from __future__ import annotations

from dataclasses import dataclass, field

from apar.engine.errors import UserError

# a request's events waiting for a client that reads slower than the engine generates (worker/service.py)
STREAM_BUFFER_EVENTS = 16384

ATTENTION_CHOICES = ("auto", "portable", "cascade", "flex", "triton")  # apar/engine/backends (kept torch-free here)


@dataclass(slots=True)
class ControlTokens:
    """The strings of the APAR control tokens; ids are looked up in the tokenizer, never hard-coded."""

    fork: str = "[Fork]"
    child: str = "[Child]"

    # the published THUDM/apar checkpoints
    @classmethod
    def published(cls) -> "ControlTokens":
        return cls(fork="[SplitMask]", child="[SplitSop]")


SPECULATE_CHOICES = ("off", "ngram", "medusa")
# which drafted tokens enter a step: "pays", those that raise the step's expected tokens per second
# (apar/engine/draft_policy.py); "all", every token the drafter gives
DRAFT_POLICIES = ("pays", "all")
MAX_SPECULATIVE_TOKENS = 16  # a draft's length: each is a query position of every step it is in


@dataclass(slots=True)
class SpeculativeConfig:
    """What a worker drafts: `method` off, ngram or medusa, up to `num_tokens` tokens per thread and step;
    the ngram drafter matches the context's last n tokens for n from `max_ngram` down to `min_ngram`;
    medusa reads the heads saved in the model's directory (apar/engine/medusa.py)."""

    method: str = "off"
    num_tokens: int = 4
    min_ngram: int = 1
    max_ngram: int = 4
    policy: str = "pays"

    def __post_init__(self) -> None:
        if self.method not in SPECULATE_CHOICES:
            raise UserError(f"speculate must be one of {', '.join(SPECULATE_CHOICES)}, got {self.method!r}")
        if isinstance(self.num_tokens, bool) or not isinstance(self.num_tokens, int) or \
                not 1 <= self.num_tokens <= MAX_SPECULATIVE_TOKENS:
            raise UserError(f"num_speculative_tokens must be an integer in [1, {MAX_SPECULATIVE_TOKENS}], "
                            f"got {self.num_tokens}")
        if not isinstance(self.min_ngram, int) or not isinstance(self.max_ngram, int) or \
                not 1 <= self.min_ngram <= self.max_ngram:
            raise UserError(f"ngram sizes must satisfy 1 <= min <= max, got {self.min_ngram}..{self.max_ngram}")
        if self.policy not in DRAFT_POLICIES:
            raise UserError(f"draft policy must be one of {', '.join(DRAFT_POLICIES)}, got {self.policy!r}")

    @property
    def enabled(self) -> bool:
        return self.method != "off"


@dataclass(slots=True)
class EngineConfig:
    """The engine's fixed sizes: KV pool, batch, devices."""

    block_size: int = 16
    num_blocks: int | None = None  # None: derived from kv_memory_mb
    kv_memory_mb: float = 256.0
    max_batch_tokens: int = 512  # tokens per step: every decode token first, then prefill chunks
    # under KV pressure (shares of the pool): a request is admitted only while this many blocks stay
    # free after its start; [Fork] is refused while fewer than `fork_watermark` are free
    admit_watermark: float = 0.04
    fork_watermark: float = 0.01
    device: str | None = None  # None: cuda when present, else cpu
    dtype: str = "auto"  # auto: bfloat16 on cuda, float32 on cpu; or float32 / float16 / bfloat16
    # how decoding threads attend (apar/engine/backends): portable, cascade, flex, triton, or auto
    # (triton on cuda, flex there for a head dim that is not a power of two; cascade on cpu)
    attention: str = "auto"
    cuda_graphs: bool = True  # on cuda: replay decode steps as CUDA graphs (flex and triton attention)
    # torch.compile each decoder layer as one graph (the attention an opaque custom op): the small ops
    # between the matrix products (norms, rotary embedding with the K/V write, activation, residual adds)
    # fuse into a few kernels; None: on cuda (where a decode step is hundreds of small kernels), off on the cpu
    compile: bool | None = None
    # on the cpu in float32: products of a few rows (decode steps, drafts) through the AVX2 kernel of
    # apar/engine/rows_gemm.py, built once per machine; off: torch's own products everywhere
    rows_kernel: bool = True
    # a new request reads the cached blocks of its prompt's longest known prefix and prefills only the
    # rest; a prompt's full blocks stay cached (evictable) after its request ends
    prefix_cache: bool = True
    control: ControlTokens = field(default_factory=ControlTokens)
    # each decoding thread drafts its next tokens, verified in the same step (apar/engine/speculate.py)
    speculate: SpeculativeConfig = field(default_factory=SpeculativeConfig)

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise UserError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks <= 0:
            raise UserError(f"num_blocks must be > 0, got {self.num_blocks}")
        if self.kv_memory_mb <= 0:
            raise UserError(f"kv_memory_mb must be > 0, got {self.kv_memory_mb}")
        if self.max_batch_tokens < 16:
            raise UserError(f"max_batch_tokens must be >= 16, got {self.max_batch_tokens}")
        for name in ("admit_watermark", "fork_watermark"):
            share = getattr(self, name)
            if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 <= share < 1.0:
                raise UserError(f"{name} must be a share of the pool in [0, 1), got {share}")
        if self.attention not in ATTENTION_CHOICES:
            raise UserError(f"attention must be one of {', '.join(ATTENTION_CHOICES)}, got {self.attention}")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise UserError(f"dtype must be auto, float32, float16 or bfloat16, got {self.dtype}")
