"""`apar bench serve`: per-token latency of `apar serve` (one process) beside the separated services.

Both setups run as real processes on loopback with the same model and the same requests, one after the
other in one run; the client measures time to first token and per-token latency (time between the
first and the last streamed message over the tokens in between).
"""
from __future__ import annotations

import collections
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import grpc

from apar.engine.errors import UserError


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Proc:
    """A service process of a bench. Its stderr is read to the end by a thread of its own (the last lines
    kept for an error message): a pipe nobody reads fills at 64 KiB, and a server writing its logs to it
    would then block in the middle of a step."""

    def __init__(self, *args: str) -> None:
        self.p = subprocess.Popen([sys.executable, "-m", "apar.cli", *args], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.lines: collections.deque[str] = collections.deque(maxlen=50)
        self._ready = threading.Event()
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        for line in self.p.stderr:
            self.lines.append(line)
            if re.search(r"listening on", line):
                self._ready.set()
        self._ready.set()  # it ended: wait_ready looks at why

    def wait_ready(self, timeout: float = 120) -> None:
        if self._ready.wait(timeout) and self.p.poll() is None:
            return
        raise UserError(f"a service did not start: {' '.join(self.p.args[3:5])}: {''.join(self.lines)[-2000:]}")

    def stop(self) -> None:
        if self.p.poll() is None:
            os.killpg(self.p.pid, signal.SIGTERM)
            try:
                self.p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)


@dataclass(slots=True)
class Latency:
    name: str
    ttft: list[float]
    per_token: list[float]

    def row(self) -> list[str]:
        p = lambda xs, q: statistics.quantiles(xs, n=100)[q - 1] if len(xs) > 1 else xs[0]  # noqa: E731
        return [self.name, f"{1000 * statistics.median(self.ttft):.2f}", f"{1000 * statistics.median(self.per_token):.3f}",
                f"{1000 * p(self.per_token, 99):.3f}"]


def measure(address: str, name: str, requests: int, max_tokens: int, warmup: int = 2) -> Latency:
    from apar.protogen import stubs

    pb = stubs()
    A = pb.apar_pb2
    ttft, per_token = [], []
    with grpc.insecure_channel(address) as ch:
        stub = pb.apar_pb2_grpc.AparStub(ch)
        for i in range(requests + warmup):
            req = A.GenerateRequest(prompt=f"Request {i}: give three tips.", stream=A.STREAM_MODE_THREADS,
                                    sampling=pb.common_pb2.SamplingParameters(max_tokens=max_tokens, ignore_eos=True))
            t0 = time.perf_counter()
            first = last = None
            for resp in stub.Generate(req, timeout=300):
                now = time.perf_counter()
                if resp.WhichOneof("event") == "thread" and resp.thread.kind == A.ThreadEvent.DELTA:
                    first = first or now
                    last = now
            if i >= warmup and first is not None and last > first:
                ttft.append(first - t0)
                per_token.append((last - first) / (max_tokens - 1))
    return Latency(name, ttft, per_token)


def run(model_dir: str, requests: int, max_tokens: int, engine_args: list[str],
        redis_url: str | None = "redis://127.0.0.1:6379/0", rounds: int = 5) -> list[Latency]:
    """Both setups up at once; rounds of `requests` alternate between them, so drift and noise on the
    machine fall on both alike."""
    sport, kport, wport, rport = _port(), _port(), _port(), _port()
    prefix = f"apar-bench-{os.getpid()}:"
    store = ["--redis", redis_url, "--prefix", prefix] if redis_url else ["--no-redis"]
    procs: list[_Proc] = []
    try:
        procs.append(_Proc("serve", "--model", model_dir, "--port", str(sport), *engine_args))
        procs[-1].wait_ready()
        procs.append(_Proc("kvmanager", "--port", str(kport), *store))
        procs[-1].wait_ready()
        procs.append(_Proc("worker", "--model", model_dir, "--port", str(wport), "--kvmanager",
                           f"127.0.0.1:{kport}", *engine_args))
        procs[-1].wait_ready()
        procs.append(_Proc("router", "--model", model_dir, "--kvmanager", f"127.0.0.1:{kport}", "--port", str(rport)))
        procs[-1].wait_ready()
        split_name = "router + worker + kvmanager (3 processes, " + ("Redis)" if redis_url else "no Redis)")
        serve = Latency("apar serve (1 process)", [], [])
        split = Latency(split_name, [], [])
        for r in range(rounds):
            for total, address in ((serve, f"127.0.0.1:{sport}"), (split, f"127.0.0.1:{rport}")):
                got = measure(address, total.name, requests, max_tokens, warmup=2 if r == 0 else 0)
                total.ttft.extend(got.ttft)
                total.per_token.extend(got.per_token)
        return [serve, split]
    finally:
        for p in reversed(procs):
            p.stop()
        if redis_url:
            _drop_keys(redis_url, prefix)


def _drop_keys(redis_url: str, prefix: str) -> None:
    """The benchmark's ledgers leave nothing behind in the user's Redis."""
    import redis

    try:
        client = redis.Redis.from_url(redis_url)
        keys = list(client.scan_iter(match=prefix + "*"))
        if keys:
            client.delete(*keys)
    except redis.RedisError:
        pass
