"""Log lines a client can cause, kept few and true: at most so many a second (`LineBudget`), and no text
of a client's that could pass for another line (`printable`). Torch-free."""
from __future__ import annotations

import math
import time


def printable(text: str) -> str:
    """`text` with each character that is not printable (a newline, a terminal escape) written as its
    escape: a request's path, which a client without a key chooses, cannot forge a log line."""
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class LineBudget:
    """At most `per_s` log lines in each second: the lines past it are dropped and counted."""

    def __init__(self, per_s: int, clock=time.monotonic) -> None:
        self.per_s = per_s
        self.clock = clock
        self.window = -math.inf  # when this second began
        self.used = 0
        self.dropped = 0

    def take(self) -> int | None:
        """None: drop this line; else log it, saying that this many lines were dropped before it."""
        now = self.clock()
        if now - self.window >= 1.0:
            self.window, self.used = now, 0
        if self.used >= self.per_s:
            self.dropped += 1
            return None
        self.used += 1
        dropped, self.dropped = self.dropped, 0
        return dropped
