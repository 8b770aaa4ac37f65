"""One request's sampling parameters, as the router validates them and the engine applies them."""
from __future__ import annotations

import math
from dataclasses import dataclass

from apar.engine.errors import UserError

MAX_TOKENS_LIMIT = 1 << 20  # anything above is absurd for any model this engine loads
MAX_N = 16  # answers per request
PENALTY_RANGE = 2.0  # frequency_penalty and presence_penalty lie in [-2, 2], as OpenAI documents
MAX_THREADS = 1024  # threads per answer: every thread holds KV blocks and a place in each step
MAX_DEPTH = 1024


@dataclass(slots=True)
class SamplingParams:
    """How one request samples. temperature 0 is greedy; `max_tokens` counts tokens over all threads of
    one answer; `n` answers to the same prompt share its KV blocks."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    auto_parallel: bool = True  # False: auto-regressive mode, [Fork] banned
    max_threads: int = 16  # threads per answer, its root included
    max_depth: int = 4  # fork depth: the root is depth 0
    ignore_eos: bool = False  # EOS banned: generate exactly max_tokens (benchmarks)
    n: int = 1  # answers to the prompt, each with its own thread tree, max_tokens and max_threads
    # over a thread's own context, control tokens excluded (apar/engine/penalties.py says which tokens):
    repetition_penalty: float = 1.0  # HF/vLLM: > 1 divides positive logits of tokens seen, multiplies negative
    frequency_penalty: float = 0.0  # OpenAI: minus count * this for each generated token
    presence_penalty: float = 0.0  # OpenAI: minus this for each token generated at least once

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int):
            raise UserError("max_tokens must be an integer")
        if self.max_tokens <= 0:
            raise UserError(f"max_tokens must be > 0, got {self.max_tokens}")
        if self.max_tokens > MAX_TOKENS_LIMIT:
            raise UserError(f"max_tokens {self.max_tokens} is absurd (limit {MAX_TOKENS_LIMIT})")
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature):
            raise UserError("temperature must be a finite number")
        if self.temperature < 0:
            raise UserError(f"temperature must be >= 0, got {self.temperature}")
        if not isinstance(self.top_p, (int, float)) or not (0.0 < self.top_p <= 1.0):
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise UserError(f"top_k must be an integer >= 0, got {self.top_k}")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**63):
            raise UserError(f"seed must be an integer in [0, 2^63), got {self.seed}")
        if isinstance(self.max_threads, bool) or not isinstance(self.max_threads, int) or \
                not 1 <= self.max_threads <= MAX_THREADS:
            raise UserError(f"max_threads must be an integer in [1, {MAX_THREADS}], got {self.max_threads}")
        if isinstance(self.max_depth, bool) or not isinstance(self.max_depth, int) or \
                not 0 <= self.max_depth <= MAX_DEPTH:
            raise UserError(f"max_depth must be an integer in [0, {MAX_DEPTH}], got {self.max_depth}")
        if isinstance(self.n, bool) or not isinstance(self.n, int) or not 1 <= self.n <= MAX_N:
            raise UserError(f"n must be an integer in [1, {MAX_N}], got {self.n}")
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)
        rep = self.repetition_penalty
        if isinstance(rep, bool) or not isinstance(rep, (int, float)) or not math.isfinite(rep) or rep <= 0:
            raise UserError(f"repetition_penalty must be a finite number > 0 (1: off), got {rep}")
        for name in ("frequency_penalty", "presence_penalty"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not -PENALTY_RANGE <= v <= PENALTY_RANGE:
                raise UserError(f"{name} must be a number in [-{PENALTY_RANGE:g}, {PENALTY_RANGE:g}], got {v}")
        self.repetition_penalty = float(rep)
        self.frequency_penalty = float(self.frequency_penalty)
        self.presence_penalty = float(self.presence_penalty)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0
