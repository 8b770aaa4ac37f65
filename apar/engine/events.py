"""What the engine reports after each step, in order: the stream the router stitches into text.

Torch-free: the router imports it (and so does the worker); the engine's own thread types are in `sequence.py`.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass


class FinishReason(enum.Enum):
    STOP = "stop"  # EOS or a stop token
    LENGTH = "length"  # max_tokens reached, or the model's context is full
    CANCELLED = "cancelled"
    ERROR = "error"


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0  # over all threads: sampled tokens (EOS included) and forced [Child]
    steps: int = 0  # steps in which the request produced at least one token
    threads: int = 0
    peak_kv_blocks: int = 0
    attended_tokens: int = 0  # sum over computed tokens of their context length, itself included
    forks: int = 0
    preemptions: int = 0  # times its blocks were all freed under pressure and its KV recomputed later
    recomputed_tokens: int = 0  # tokens computed again after preemptions
    forks_refused: int = 0  # [Fork]s the model chose (or a replay held) that memory pressure refused
    cached_tokens: int = 0  # prompt tokens served from the prefix cache (at its first start), not computed
    drafted_tokens: int = 0  # tokens its threads drafted and the model verified (apar/engine/speculate.py)
    accepted_tokens: int = 0  # drafted tokens kept: each saved a step of its thread

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.__slots__}


@dataclass(frozen=True, slots=True)
class ThreadStarted:
    request: str
    thread: int
    parent: int | None  # None for the root
    anchor: int  # index of the [Fork] in the parent's tokens (-1 for the root)


@dataclass(frozen=True, slots=True)
class TokenEvent:
    request: str
    thread: int
    token: int  # sampled; [Fork] included, EOS and the forced [Child] not


@dataclass(frozen=True, slots=True)
class ThreadFinished:
    request: str
    thread: int
    reason: FinishReason


@dataclass(frozen=True, slots=True)
class RequestFinished:
    request: str
    reason: FinishReason
    usage: Usage
    error: str | None = None


Event = ThreadStarted | TokenEvent | ThreadFinished | RequestFinished
