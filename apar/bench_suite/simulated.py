"""Simulated workers and a throwaway Redis server, for `apar bench kvmanager` and the KV manager's tests
(kept with the benchmark tooling, outside the services: no service imports them).

`SimWorker` stands in for the worker's engine over any KV backend (`LocalKV`, `RemoteKV`, or a bare
`replication.StepLog`): each `step()` defers the ends of some threads and requests (as the engine does),
starts requests and forks threads to keep about `threads` running, and appends one token to every
running thread (a new thread's first tokens, with a new request's prompt, come by the same append). A
request whose append found no room is released in the next step, as the engine does. Seeded: the same
seed gives the same stream. With `compact`, the decode tokens go to the backend as `ops.record` would
make them (one Advance, one-token appends only where a block opens): the same steps reach the manager
for a fraction of the worker's CPU, which is what a benchmark of the manager on one machine needs. With
`prefixes`, every prompt begins with one of that many shared prefixes: a new root reuses what the
ledger holds of it (`Reuse`) and names the prefix blocks it wrote (`Name`), as the engine does.

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

from apar.engine.kv.ledger import ThreadRef
from apar.engine.kv.ops import Advance, Append, AppendEach, Finish, Fork, Name, Op, Release, Reuse, Start
from services.kvmanager.replication import Ack, ReplicationLog


class SimWorker:
    """Per step, about `threads` × `finish_p` threads end, a request is cancelled with `cancel_p` each,
    and while fewer than `threads` run, a request starts (prompt length drawn from `prompt`) or a
    running thread forks."""

    def __init__(self, kv, threads: int = 6, seed: int = 0, prompt: tuple[int, int] = (1, 12),
                 finish_p: float = 0.08, cancel_p: float = 0.01, compact: bool = False, prefixes: int = 0) -> None:
        self.kv = kv
        self.compact = compact
        self.ledger = kv.ledger
        self.rng = random.Random(seed)
        self.threads, self.prompt = threads, prompt
        self.finish_p, self.cancel_p = finish_p, cancel_p
        self.running: dict[str, list[ThreadRef]] = {}  # request -> its running threads
        self.steps = 0
        self._one: dict[ThreadRef, Append] = {}  # each running thread's one-token append (ops are immutable)
        self._next_thread: dict[str, int] = {}
        self._starved: set[str] = set()
        self._requests = 0
        self.prefixes = prefixes
        self._name: Name | None = None  # the prompt blocks a new root wrote: named in the next step

    @property
    def num_running(self) -> int:
        return len(self._one)

    def step(self) -> None:
        self._ends()
        name, self._name = self._name, None
        named = [name] if name is not None and name.names and name.thread.request in self.running else []
        open_ = self.ledger.open_threads() if self.compact else ()
        new, prompt = self._grow()
        appends = [op for t, op in self._one.items() if t not in open_ and (prompt is None or t != prompt.thread)]
        if prompt:
            appends.insert(0, prompt)
        head: list[Op] = []
        each: list[Append] = []
        if self.compact:  # first, so a parent forked below advances before
            head.append(Advance())
            # then the tokens that open a block, of the threads the step's starts and forks leave alone, as
            # `record` folds them (none when a root reuses cached blocks: an allocation before its Reuse
            # could evict them)
            if not any(type(op) is Reuse for op in new):
                touched = {t for op in new for t in op.touches()}
                each = [op for op in appends if op is not prompt and op.thread not in touched]
                appends = [op for op in appends if op is prompt or op.thread in touched]
                if each:
                    head.append(AppendEach(tuple(op.thread for op in each)))
        answer = self.kv.apply(head + named + new + appends)
        if None in answer.appends:  # in the order the ops came: the AppendEach's threads, then the appends
            self._starved = {op.thread.request for op, s in zip(each + appends, answer.appends) if s is None}
        self.steps += 1

    def _ends(self) -> None:
        rng = self.rng
        for req in sorted(self._starved):
            if req in self.running:
                self._release(req)
        self._starved = set()
        for req in [r for r in self.running if rng.random() < self.cancel_p]:
            self._release(req)
        for _ in range(self._poisson(len(self._one) * self.finish_p)):
            if not self._one:
                break
            t = rng.choice(list(self._one))
            threads = self.running[t.request]
            threads.remove(t)
            del self._one[t]
            self.kv.defer(Finish(t))
            if not threads:
                self._release(t.request)

    def _poisson(self, mean: float) -> int:
        k, p, limit = 0, self.rng.random(), 2.718281828459045 ** -mean
        while p > limit:
            k += 1
            p *= self.rng.random()
        return k

    def _release(self, req: str) -> None:
        self.kv.defer(Release(req))
        for t in self.running.pop(req):
            del self._one[t]

    def _grow(self) -> tuple[list[Op], Append | None]:
        """While fewer than `threads` run, start a request (its root's prompt is its append this step)
        or fork a running thread (the child's first token is its one-token append). Returns (the starts
        and forks, the prompt's append)."""
        rng = self.rng
        if len(self._one) >= self.threads:
            return [], None
        if not self._one or rng.random() < 0.3:
            req = f"req-{self._requests}"
            self._requests += 1
            root = ThreadRef(req, 0)
            self._next_thread[req] = 1
            self.running[req] = [root]
            self._one[root] = Append(root, 1)
            n = rng.randint(*self.prompt)
            if not self.prefixes:
                return [Start(root)], Append(root, n)
            bs, family = self.ledger.block_size, rng.randrange(self.prefixes)
            names = [(family << 32) | i for i in range(n // bs)]  # the prompt's full blocks: all shared
            k = self.ledger.reusable(names, n)
            self._name = Name(root, k, tuple(names[k:]))
            return [Start(root), *([Reuse(root, tuple(names[:k]))] if k else [])], Append(root, n - k * bs)
        parent = rng.choice(list(self._one))
        child = ThreadRef(parent.request, self._next_thread[parent.request])
        self._next_thread[parent.request] += 1
        self.running[parent.request].append(child)
        self._one[child] = Append(child, 1)
        return [Fork(parent, child)], None


def deliver(manager, worker_id: str, log: ReplicationLog) -> Ack | None:
    """Send a ReplicationLog's next batch to an in-process KVManager and hand the ack back (None: nothing to send)."""
    batch = log.batch()
    if batch is None:
        return None
    ack = manager.submit(worker_id, batch)
    log.acked(ack)
    return ack


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
