"""An `apar` command whose engine loop a test can hold: for tests that act on a request that must still be
running when they act (cancel it, let its deadline pass, drop its connection, fill a key's places).

`python -m tests.gated serve ...` (started by `Proc(..., gate=Gate(path))`; `serve` or `worker`, the
commands with an engine loop) runs `apar serve ...` with one change to its engine loop: before each step
it reads the gate file. No file: the loop runs as usual. A number N: N more steps run, then the loop
holds. While it holds no step runs, but the loop still serves its commands (a new request joins the
engine, an abort ends one, an info call answers), so a request held there stays running for as long as
the test needs, on any machine. The held loop prints `gate: held, N requests` whenever the number of
open requests changes; `Gate` waits for those lines.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def _left(path: str) -> int | None:
    try:
        return int(Path(path).read_text())
    except FileNotFoundError:
        return None


def _write(path: str, steps: int) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    Path(tmp).write_text(str(steps))
    os.replace(tmp, path)  # whole: the reader never sees a half-written number


class Gate:
    """The test's side: hold the loop of the process started with this gate, let steps through, open it."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.proc = None  # the Proc, set by Proc

    def hold(self, steps: int = 0) -> int:
        """Let `steps` more steps run, then hold. Returns the log position to wait from."""
        mark = len(self.proc.lines)
        _write(self.path, steps)
        return mark

    def wait_held(self, requests: int, since: int, timeout: float = 30.0) -> None:
        """Wait until the loop holds (from log position `since` on) with `requests` open requests."""
        self.proc.wait_for(rf"^gate: held, {requests} requests$", timeout, since)

    def open(self) -> None:
        Path(self.path).unlink(missing_ok=True)


def _install(path: str) -> None:
    from services.worker.loop import EngineLoop

    step = EngineLoop._step

    def gated_step(self) -> None:
        left = _left(path)
        if left is None:
            return step(self)
        if left > 0:
            _write(path, left - 1)
            return step(self)
        seen = None
        while _left(path) == 0 and not self._stop.is_set():
            self._drain(block=False)
            if len(self.engine.requests) != seen:
                seen = len(self.engine.requests)
                print(f"gate: held, {seen} requests", file=sys.stderr, flush=True)
            time.sleep(0.005)  # polls the file; the next turn steps what is still there

    EngineLoop._step = gated_step


if __name__ == "__main__":
    _install(os.environ["APAR_TEST_GATE"])
    from apar.cli import main

    sys.exit(main())
