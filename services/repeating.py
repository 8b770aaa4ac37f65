"""A warning that repeats while a condition lasts (a KV manager shard down, Redis unreachable), logged once
per change of state with a count, instead of once per attempt."""
from __future__ import annotations

import logging
import time
from collections.abc import Hashable


class RepeatingWarning:
    """`failed(key, state, msg, *args)` logs `msg` when `key` starts failing or its `state` (say, a status
    code) changes, and only counts the calls in between; `ok(key, msg, *args)` ends the failure with one
    INFO line that says how many attempts failed over how long."""

    def __init__(self, logger: logging.Logger) -> None:
        self.log = logger
        self._failing: dict[Hashable, list] = {}  # key -> [state, failed attempts, since (monotonic)]

    def failed(self, key: Hashable, state: Hashable, msg: str, *args) -> bool:
        """Count one failed attempt; True when this call logged."""
        now = time.monotonic()
        entry = self._failing.get(key)
        if entry is not None and entry[0] == state:
            entry[1] += 1
            return False
        if entry is not None:
            self.log.warning(msg + " (was %s, %d times in %.1f s; logged again when it changes)", *args, entry[0],
                             entry[1], now - entry[2])
        else:
            self.log.warning(msg + " (logged again when it changes)", *args)
        self._failing[key] = [state, 1, now]
        return True

    def ok(self, key: Hashable, msg: str, *args) -> bool:
        """The attempt succeeded; True when this call logged (it ended a failure)."""
        entry = self._failing.pop(key, None)
        if entry is None:
            return False
        self.log.info(msg + " (after %d failed attempts in %.1f s)", *args, entry[1], time.monotonic() - entry[2])
        return True

    def failing(self, key: Hashable) -> bool:
        return key in self._failing

    def count(self, key: Hashable) -> int:
        entry = self._failing.get(key)
        return 0 if entry is None else entry[1]
