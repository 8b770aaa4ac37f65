"""What the engine reports after each step, in order: the stream the router stitches into text."""
from __future__ import annotations

from dataclasses import dataclass

from services.worker.sequence import FinishReason, Usage


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
