"""Real service processes for tests: start `apar ...`, wait until it listens, stop it for sure; and
`require(program)` for the programs besides Python's that tests run."""
from __future__ import annotations

import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

# Without one of these on PATH, the tests that run it fail (never skip), saying why.
PROGRAMS = {
    "redis-server": "the KV manager's tests run their own Redis on free ports (apt-get install redis-server)",
    "git": "the repository-copy test lists the repository's files with it (apt-get install git)",
}


# The most tokens `apar serve` allows a request by default. On the 32,768-position model, with a pool that
# holds them, such a request runs on for as long as any test takes to act on it.
LONG_TOKENS = 16000


def require(program: str) -> None:
    """Fail the calling test, with the reason, when `program` is not on PATH."""
    if shutil.which(program) is None:
        pytest.fail(f"{program} is not on PATH: {PROGRAMS[program]}", pytrace=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A child process whose stderr is collected; `wait_for(pattern)` blocks until a line matches."""

    def __init__(self, *args: str, env: dict | None = None, nofile: int | None = None, gate=None) -> None:
        """`nofile`: the child's limit of open file descriptors (`ulimit -n`). `gate`: a `tests.gated.Gate`
        the test holds the child's engine loop with (the child runs through `tests.gated`)."""
        self.args = args
        if gate is not None:
            gate.proc = self
            root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where `tests` is a package
            path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
            env = {**(env or {}), "APAR_TEST_GATE": gate.path, "PYTHONPATH": path}
        self.lines: list[str] = []
        self._cond = threading.Condition()
        module = "apar.cli" if gate is None else "tests.gated"
        self.p = subprocess.Popen([sys.executable, "-m", module, *args], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})},
                                  start_new_session=True, preexec_fn=None if nofile is None else
                                  lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile)))
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.p.stderr:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float = 60.0, since: int = 0) -> re.Match:
        """The first line from `since` on (an index into `lines`: `len(proc.lines)` taken before the
        event) that matches `pattern`."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = since
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    m = rx.search(line)
                    if m:
                        return m
                seen = len(self.lines)
                if self.p.poll() is not None:
                    raise RuntimeError(f"{self.args[0]} exited {self.p.returncode}:\n{''.join(self.lines)[-3000:]}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self.args[0]} never printed {pattern!r}:\n{''.join(self.lines)[-3000:]}")
                self._cond.wait(min(left, 0.5))

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.p.poll() is None:
            os.killpg(self.p.pid, sig)
            self.p.wait(timeout=20)

    def pause(self) -> None:
        """SIGSTOP: the process is frozen (no heartbeat, no step, no answer) until `resume()`."""
        os.killpg(self.p.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.p.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.p.poll() is None:
            self.kill(signal.SIGTERM)
