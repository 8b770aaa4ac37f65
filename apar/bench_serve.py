"""`apar bench serve`: per-token latency of `apar serve` (one process) beside the separated services.

Both setups run as real processes on loopback with the same model and the same requests, one after the
other in one run; the client measures time to first token and per-token latency (time between the
first and the last streamed message over the tokens in between).
"""
from __future__ import annotations

import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import grpc

from apar.errors import UserError


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Proc:
    def __init__(self, *args: str) -> None:
        self.p = subprocess.Popen([sys.executable, "-m", "apar.cli", *args], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True, start_new_session=True)

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        for line in self.p.stderr:
            if re.search(r"listening on", line):
                return
            if time.monotonic() > deadline:
                break
        raise UserError(f"a service did not start: {' '.join(self.p.args[3:5])}")

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


def measure(address: str, name: str, requests: int, max_tokens: int) -> Latency:
    from apar.protogen import stubs

    pb = stubs()
    A = pb.apar_pb2
    ttft, per_token = [], []
    with grpc.insecure_channel(address) as ch:
        stub = pb.apar_pb2_grpc.AparStub(ch)
        for i in range(requests + 2):  # the first two warm up
            req = A.GenerateRequest(prompt=f"Request {i}: give three tips.", stream=A.STREAM_MODE_THREADS,
                                    sampling=pb.common_pb2.SamplingParameters(max_tokens=max_tokens, ignore_eos=True))
            t0 = time.perf_counter()
            first = last = None
            for resp in stub.Generate(req, timeout=300):
                now = time.perf_counter()
                if resp.WhichOneof("event") == "thread" and resp.thread.kind == A.ThreadEvent.DELTA:
                    first = first or now
                    last = now
            if i >= 2 and first is not None and last > first:
                ttft.append(first - t0)
                per_token.append((last - first) / (max_tokens - 1))
    return Latency(name, ttft, per_token)


def run(model_dir: str, requests: int, max_tokens: int, engine_args: list[str],
        redis_url: str | None = "redis://127.0.0.1:6379/0") -> list[Latency]:
    results = []
    port = _port()
    serve = _Proc("serve", "--model", model_dir, "--port", str(port), *engine_args)
    try:
        serve.wait_ready()
        results.append(measure(f"127.0.0.1:{port}", "apar serve (1 process)", requests, max_tokens))
    finally:
        serve.stop()
    kport, wport, rport = _port(), _port(), _port()
    prefix = f"apar-bench-{os.getpid()}:"
    store = ["--redis", redis_url, "--prefix", prefix] if redis_url else ["--no-redis"]
    kv = _Proc("kvmanager", "--port", str(kport), *store)
    worker = router = None
    try:
        kv.wait_ready()
        worker = _Proc("worker", "--model", model_dir, "--port", str(wport), "--kvmanager", f"127.0.0.1:{kport}",
                       *engine_args)
        worker.wait_ready()
        router = _Proc("router", "--model", model_dir, "--kvmanager", f"127.0.0.1:{kport}", "--port", str(rport))
        router.wait_ready()
        name = "router + worker + kvmanager (3 processes, " + ("Redis)" if redis_url else "no Redis)")
        results.append(measure(f"127.0.0.1:{rport}", name, requests, max_tokens))
    finally:
        for p in (router, worker, kv):
            if p is not None:
                p.stop()
    return results
