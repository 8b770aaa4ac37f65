"""Helpers for tests and benchmarks of the KV manager: a simulated worker and a throwaway Redis server.

`SimWorker.step()` produces one step's ops in the order the engine sends them (thread ends first, then
starts, appends and forks), applies them to its own `KVLedger` (the worker's view) and returns them with
the local answer. A request whose append found no room is released in the next step, as the engine does.
Seeded: the same seed gives the same stream.

`ScratchRedis` runs `redis-server` on a free loopback port with no persistence (a restart comes back
empty, like a pod whose Redis lost its data); `kill()` and `start()` make a Redis restart.
"""
from __future__ import annotations

import random
import shutil
import socket
import subprocess
import tempfile
import time

import redis

from services.kvmanager.ledger import KVLedger, ThreadRef
from services.kvmanager.ops import Append, Finish, Fork, Op, Release, Start, StepAnswer, apply


class SimWorker:
    def __init__(self, num_blocks: int = 64, block_size: int = 4, seed: int = 0, max_requests: int = 4,
                 max_threads: int = 6) -> None:
        self.ledger = KVLedger(num_blocks, block_size)
        self.rng = random.Random(seed)
        self.max_requests, self.max_threads = max_requests, max_threads
        self.running: dict[str, list[int]] = {}  # request -> its running thread ids
        self._next_thread: dict[str, int] = {}
        self._starved: set[str] = set()
        self._requests = 0
        self.seq = 0

    def step(self) -> tuple[int, list[Op], StepAnswer]:
        """(seq, ops, the answer of this worker's own ledger)."""
        ends = self._ends()
        starts, new = self._starts()
        ops = ends + starts + self._decode()  # the new request's prompt append is its decode this step
        if new is not None:
            self.running[new] = [0]
        answer = apply(self.ledger, ops)
        if answer.error:
            raise AssertionError(f"simulated worker sent a bad op: {answer.error}")
        appends = [op for op in ops if isinstance(op, Append)]
        self._starved = {op.thread.request for op, s in zip(appends, answer.appends) if s is None}
        self.seq += 1
        return self.seq, ops, answer

    def _ends(self) -> list[Op]:
        ops: list[Op] = []
        for req in sorted(self._starved):
            ops.append(Release(req))
            self.running.pop(req, None)
        for req, threads in list(self.running.items()):
            for t in list(threads):
                if self.rng.random() < 0.08:
                    ops.append(Finish(ThreadRef(req, t)))
                    threads.remove(t)
            if not threads or self.rng.random() < 0.02:
                ops.append(Release(req))
                del self.running[req]
        return ops

    def _starts(self) -> tuple[list[Op], str | None]:
        if len(self.running) >= self.max_requests or self.rng.random() > 0.3:
            return [], None
        req = f"req-{self._requests}"
        self._requests += 1
        root = ThreadRef(req, 0)
        self._next_thread[req] = 1
        return [Start(root), Append(root, self.rng.randint(1, 3 * self.ledger.block_size))], req

    def _decode(self) -> list[Op]:
        ops: list[Op] = []
        for req, threads in self.running.items():
            for t in list(threads):
                ops.append(Append(ThreadRef(req, t), 1))
                if len(threads) < self.max_threads and self.rng.random() < 0.1:
                    child = ThreadRef(req, self._next_thread[req])
                    self._next_thread[req] += 1
                    ops += [Fork(ThreadRef(req, t), child), Append(child, 1)]
                    threads.append(child.thread)
        return ops


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ScratchRedis:
    def __init__(self, port: int | None = None) -> None:
        if shutil.which("redis-server") is None:
            raise FileNotFoundError("redis-server is not on PATH")
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._dir = tempfile.mkdtemp(prefix="apar-redis-")
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self, timeout: float = 10.0) -> None:
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                                      "--save", "", "--appendonly", "no", "--dir", self._dir],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.ping()
                client.close()
                return
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on port {self.port} did not start") from None
                time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL: the data is gone (no persistence)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self._dir, ignore_errors=True)
